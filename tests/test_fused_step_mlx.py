"""The fused decoding step (mla_mlx.fused_step): its kernel, built for the host with one thread a block, gives the
eager fixed-shape step's tokens, on a random tiny model and on the shipped checkpoint; its weights are packed in
the layout the kernel reads; where it cannot run it says so in one line."""

import ctypes
import importlib
import shutil
import subprocess

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from mlx.utils import tree_map  # noqa: E402

from convert import ModelConfig  # noqa: E402
from mla_mlx import checkpoint as ckpt  # noqa: E402
from mla_mlx import fused_step  # noqa: E402
from mla_mlx.generate import generate  # noqa: E402
from mla_mlx.static_decode import StaticDecoder  # noqa: E402
from mnist_grid import START, GridStream  # noqa: E402

TINY = ModelConfig.preset("tiny")
COMPILER = shutil.which("g++") or shutil.which("c++")


def _host_kernel(k: dict, tmp_path):
    """SOURCE and HEADER compiled as C++ for these sizes: each block's rows run one after another, one thread each
    (so the barriers are no-ops and the strided loops do all the work)."""
    consts = "\n".join(f"  constexpr int {name} = {value};" for name, value in k.items())
    args = [f"const float* {n}" for n in fused_step.PACKED] + ["const float* cache", "const int* tokens",
            "const int* finished", "const int* position", "float* cache_out", "int* tokens_out",
            "int* finished_out", "int* position_out", "float* smem"]  # fmt: skip
    body = fused_step.SOURCE.replace("THREAD_INDEX", "const int tid = 0, nt = 1;")
    src = (
        "#include <math.h>\n#include <stddef.h>\n#define DEV static inline\n#define SYNC()\n"
        + fused_step.HEADER
        + f'extern "C" void step({", ".join(args)}) {{\n{consts}\n'
        + "  for (int row = 0; row < B; row++) {\n"
        + body
        + "  }\n}\n"
    )
    (tmp_path / "step.cpp").write_text(src)
    lib = tmp_path / "step.so"
    subprocess.run([COMPILER, "-O2", "-shared", "-fPIC", "-o", str(lib), str(tmp_path / "step.cpp")], check=True)
    return ctypes.CDLL(str(lib)).step


def _host_decode(model, images, max_length, tmp_path):
    """Greedy tokens through the host-built kernel, position after position, as StaticDecoder._run_fused does."""
    cfg, b = model.config, images.shape[0]
    k = fused_step.constants(cfg, b, max_length, model.decoder_norm is not None)
    step = _host_kernel(k, tmp_path)
    table = StaticDecoder(model, b, max_length, "eager").rotation
    packed = fused_step.pack(model, model.memories(model.encode(images), absorbed=True), table)
    arrays = [np.ascontiguousarray(np.array(packed[n]), dtype=np.float32) for n in fused_step.PACKED]
    assert arrays[0].shape == (cfg.dec_layers, fused_step.layer_floats(k))
    width = k["R"] + k["PE"]
    cache = np.zeros((k["NL"], b, max_length, width), np.float32)
    tokens = np.full((b, max_length), 0, np.int32)
    tokens[:, 0] = START
    finished, position = np.zeros(b, np.int32), np.zeros(1, np.int32)
    smem = np.zeros(fused_step.shared_floats(k), np.float32)
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    for _ in range(1, max_length):
        outs = [np.empty_like(cache), np.empty_like(tokens), np.empty_like(finished), np.empty_like(position)]
        step(*[ptr(a) for a in arrays + [cache, tokens, finished, position] + outs + [smem]])
        cache, tokens, finished, position = outs
    return tokens, position


@pytest.mark.skipif(COMPILER is None, reason="needs a C++ compiler to build the kernel for the host")
def test_the_kernel_gives_the_eager_steps_tokens_on_a_random_model(tmp_path):
    model = ckpt.build(TINY, seed=1).eval()
    model.update(tree_map(lambda p: p * 3, model.parameters()))  # read-outs that vary by image, some end early
    images = mx.array(np.random.default_rng(0).random((3, TINY.image_size, TINY.image_size), dtype=np.float32))
    want = np.array(generate(model, images, stop=False, static="eager"))
    got, position = _host_decode(model, images, TINY.max_tokens, tmp_path)
    assert len({tuple(r) for r in want}) == 3  # rows that differ
    np.testing.assert_array_equal(got, want)
    assert position[0] == TINY.max_tokens - 1


@pytest.mark.skipif(COMPILER is None, reason="needs a C++ compiler to build the kernel for the host")
def test_the_kernel_reads_the_shipped_model_as_the_loop_does(tmp_path):
    model = ckpt.load()
    images, targets = GridStream("test", model.config.grid, 0).fixed(8, seed=5)
    images = mx.array(images)
    want = np.array(generate(model, images, static="off", stop=False))
    got, _ = _host_decode(model, images, model.config.max_tokens, tmp_path)
    np.testing.assert_array_equal(got, want)


def test_its_sizes_fit_the_shipped_models():
    for name in ("small", "seed"):
        cfg = ModelConfig.preset(name)
        k = fused_step.constants(cfg, 4, cfg.max_tokens, cfg.final_norm)
        assert 4 * fused_step.shared_floats(k) <= fused_step.SMEM_LIMIT


def test_it_is_refused_off_mlx_cuda_in_one_line():
    """This machine's MLX has no CUDA backend: the fused step is refused, by StaticDecoder and by generate."""
    model = ckpt.build(TINY, seed=1).eval()
    for call in (
        lambda: StaticDecoder(model, 2, 5, "fused"),
        lambda: generate(model, mx.zeros((2, 28, 28)), static="fused"),
    ):
        with pytest.raises(ValueError, match="CUDA backend only"):
            call()


def test_generate_takes_it_by_default_only_up_to_its_batch(monkeypatch):
    """Where the kernel runs, generate's default decodes with it up to AUTO_MAX_BATCH rows and with the compiled
    step above (each block reads every weight for its row: past that batch the compiled matmuls win)."""
    gen = importlib.import_module("mla_mlx.generate")  # the module: the package exports its function

    asked = []

    class Recorder:
        def __init__(self, how):
            self.how = how

        def run(self, enc, stop):
            asked.append(self.how)
            return mx.zeros((enc.shape[0], 3), dtype=mx.int32)

    monkeypatch.setattr(gen, "static_how", lambda *a: "compiled")  # what a GPU gets
    monkeypatch.setattr(gen.fused_step, "blocker", lambda *a: None)  # as on MLX's CUDA backend
    monkeypatch.setattr(gen, "static_decoder", lambda model, b, length, how: Recorder(how))
    model = ckpt.build(TINY, seed=1).eval()
    enc = model.encode(mx.zeros((1, TINY.image_size, TINY.image_size)))
    for b in (1, fused_step.AUTO_MAX_BATCH, fused_step.AUTO_MAX_BATCH + 1):
        gen.generate(model, encoded=mx.broadcast_to(enc, (b, *enc.shape[1:])), max_length=3)
    gen.generate(model, encoded=enc, max_length=3, static="compiled")  # asked for: kept
    assert asked == ["fused", "fused", "compiled", "compiled"]
