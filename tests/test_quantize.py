"""Quantization: MLX's 8/4-bit affine group weights (saved, reloaded, run by MLX and, dequantized, by torch),
the int8 latent cache in both frameworks, and `mla-mnist convert --quantize` end to end."""

import json
import sys

import numpy as np
import pytest

from convert import checkpoint
from convert.config import ModelConfig
from convert.errors import UserError
from convert.formats import convert
from convert.quantize import dequantize, quantizable
from mla_mnist.backends import get_backend
from mla_mnist.cli import main
from mnist_grid import PAD, START, GridStream

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")

import mla_mlx  # noqa: E402
import mla_torch  # noqa: E402
from mla_mlx.checkpoint import quantize as mlx_quantize  # noqa: E402
from mla_mlx.checkpoint import to_numpy as mlx_numpy  # noqa: E402

# Every width a multiple of 64 (patch 8 -> 64 pixels), so that both group sizes quantize every layer but the
# embedding, the head and kv_b_proj.
QCFG = ModelConfig(
    grid=2,
    patch=8,
    d_model=64,
    enc_layers=1,
    dec_layers=1,
    heads=4,
    dropout=0.0,
    enc_q_rank=64,
    enc_kv_rank=32,
    dec_q_rank=64,
    dec_kv_rank=32,
    cross_kv_rank=32,
)
VARIANTS = [(bits, group) for bits in (8, 4) for group in (32, 64)]
FRAMEWORKS = ("torch", "mlx")


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "float"
    mla_torch.save(mla_torch.build(QCFG, seed=0), path)
    return path


@pytest.fixture(scope="module")
def quantized(float_ckpt):
    """{(bits, group): checkpoint directory written by convert --quantize}."""
    out = {}
    for bits, group in VARIANTS:
        out[bits, group] = float_ckpt.parent / f"q{bits}-{group}"
        convert(float_ckpt, out[bits, group], quantize=bits, group_size=group)
    return out


def _inputs(cfg, batch=8, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 10, (batch, cfg.max_tokens))
    tokens[:, 0] = START
    return rng.random((batch, cfg.image_size, cfg.image_size), dtype=np.float32), tokens


def _torch_logits(path, images, tokens):
    with torch.no_grad():
        return mla_torch.load(path)(torch.from_numpy(images), torch.from_numpy(tokens)).numpy()


def _mlx_logits(path, images, tokens):
    return np.array(mla_mlx.load(path)(mx.array(images), mx.array(tokens)))


# ---- 1. the checkpoint format ---------------------------------------------------------------------------
@pytest.mark.parametrize("bits, group", VARIANTS)
def test_mlx_quantize_save_load_is_bit_exact(tmp_path, float_ckpt, quantized, bits, group):
    model = mlx_quantize(mla_mlx.load(float_ckpt), bits, group)
    mla_mlx.save(model, tmp_path / "q")
    config, _ = checkpoint.read_config(tmp_path / "q")
    assert config.quantization == {"bits": bits, "group_size": group}
    ref, back = mlx_numpy(model), mlx_numpy(mla_mlx.load(tmp_path / "q"))
    assert back.keys() == ref.keys()
    packed = [k for k, v in ref.items() if v.dtype == np.uint32]
    assert len(packed) == sum(quantizable(k, a.shape, group) for k, a in checkpoint.load(float_ckpt)[1].items()) > 10
    assert all(np.array_equal(back[k], ref[k]) and back[k].dtype == ref[k].dtype for k in ref)
    # convert --quantize writes exactly what MLX's QuantizedLinear layers hold.
    _, written, _ = checkpoint.load(quantized[bits, group])
    assert written.keys() == ref.keys() and all(np.array_equal(written[k], ref[k]) for k in ref)


@pytest.mark.parametrize("bits, group", VARIANTS)
def test_numpy_dequantize_equals_mlx(bits, group):
    w = mx.array(np.random.default_rng(bits + group).standard_normal((48, 256)).astype(np.float32))
    wq, scales, biases = mx.quantize(w, group_size=group, bits=bits)
    ref = np.array(mx.dequantize(wq, scales, biases, group_size=group, bits=bits))
    ours = dequantize(
        {"l.weight": np.array(wq), "l.scales": np.array(scales), "l.biases": np.array(biases)}, bits, group
    )
    assert ours.keys() == {"l.weight"}
    np.testing.assert_allclose(ours["l.weight"], ref, rtol=0, atol=1e-6)
    assert np.abs(ref - np.array(w)).max() > 1e-3  # really quantized, not a copy


# ---- 2. the same model in both frameworks, and what quantization costs -------------------------------------
@pytest.mark.parametrize("bits, group", VARIANTS)
def test_torch_dequantized_logits_match_mlx_quantized(quantized, bits, group):
    images, tokens = _inputs(QCFG)
    t, m = _torch_logits(quantized[bits, group], images, tokens), _mlx_logits(quantized[bits, group], images, tokens)
    # Torch multiplies by the dequantized fp32 weights, MLX unpacks inside its quantized matmul: the same
    # products, summed in another order. Measured ~1e-6 on logits of magnitude ~2; 1e-4 leaves room for
    # other CPUs' kernels while still catching one wrong group, scale or bit order (>= 1e-2).
    assert np.abs(t - m).max() <= 1e-4
    assert np.abs(t).max() > 1.0


def test_quantization_error_is_bounded_and_shrinks_with_bits(float_ckpt, quantized):
    images, tokens = _inputs(QCFG)
    ref = _torch_logits(float_ckpt, images, tokens)
    scale = np.abs(ref).max()
    for group in (32, 64):
        err8, err4 = (np.abs(_torch_logits(quantized[b, group], images, tokens) - ref).max() / scale for b in (8, 4))
        # A weight's error is at most half a step of (max - min) / (2^bits - 1) in its group; measured here
        # ~0.5% of the logit range at 8 bits and ~8% at 4 bits.
        assert 0 < err8 <= 0.02 and err4 <= 0.3
        # 255 levels per group against 15: about 17x finer steps; ask for 4x.
        assert err4 >= 4 * err8


# ---- 3. the int8 latent cache -----------------------------------------------------------------------------
@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_int8_latent_cache_bytes(framework, dtype):
    backend = get_backend(framework, "cpu")
    cfg = ModelConfig.preset("tiny")
    model = backend.cast(backend.build(cfg, seed=0), dtype)
    batch, length, itemsize = 3, 5, np.dtype(dtype).itemsize
    images = np.random.default_rng(0).random((batch, cfg.image_size, cfg.image_size), dtype=np.float32)
    generate = (mla_torch if framework == "torch" else mla_mlx).generate
    sizes = {}
    for quantized in (False, True):
        out, dc = generate(
            model, backend.array(images), max_length=length, stop=False, return_cache=True, quantize_cache=quantized
        )
        assert backend.numpy(out).shape == (batch, length)
        sizes[quantized] = dc.self_nbytes
    # Per position and layer: the latent as int8, one scale and the rotary key in the compute dtype.
    assert sizes[True] == batch * length * cfg.dec_layers * (cfg.dec_kv_rank + itemsize + cfg.rope_dim * itemsize)
    assert sizes[False] == batch * length * cfg.dec_layers * (cfg.dec_kv_rank + cfg.rope_dim) * itemsize


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_int8_latent_cache_reads_like_the_float_cache(framework, tiny_checkpoint):
    backend = get_backend(framework, "cpu")
    model = backend.load(tiny_checkpoint)
    images, targets = GridStream("test", 2, 0).fixed(256, seed=5)
    ref = backend.generate(model, images)
    int8 = backend.generate(model, images, quantize_cache=True)
    read = ref != PAD  # the positions the float cache wrote; pads after both finish would inflate the share
    assert (int8 == ref)[read].mean() >= 0.99
    assert (ref == targets).all(axis=1).mean() > 0.15  # a model that reads, so the tokens are not constant


# ---- 4. the command line ----------------------------------------------------------------------------------
def _eval_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_convert_quantize_then_eval_in_both_frameworks(tmp_path, capsys, tiny_checkpoint):
    out = tmp_path / "q8"
    assert main(["convert", str(tiny_checkpoint), str(out), "--quantize", "8", "--group-size", "32"]) == 0
    report = capsys.readouterr().out
    assert "8-bit groups of 32" in report and "quantized" in report and " MB -> " in report
    assert (out / checkpoint.WEIGHTS).stat().st_size < (tiny_checkpoint / checkpoint.WEIGHTS).stat().st_size
    grids = ["--samples", "64", "--batch-size", "64", "--json", "--device", "cpu"]
    ref = _eval_json(capsys, ["eval", str(tiny_checkpoint), "--framework", "torch", *grids])
    runs = {fw: _eval_json(capsys, ["eval", str(out), "--framework", fw, *grids]) for fw in FRAMEWORKS}
    runs["cache"] = _eval_json(
        capsys, ["eval", str(tiny_checkpoint), "--framework", "torch", "--quantize-cache", *grids]
    )
    assert runs["torch"]["quantization"] == runs["mlx"]["quantization"] == {"bits": 8, "group_size": 32}
    assert runs["cache"]["quantize_cache"] and not runs["torch"]["quantize_cache"]
    for m in runs.values():  # 8-bit weights or an int8 cache read (almost) every digit the float model reads
        assert m["samples"] == 64 and abs(m["digit_accuracy"] - ref["digit_accuracy"]) <= 0.03
    assert ref["exact_match"] > 0.15  # a model that reads: the comparison is over real read-outs


def test_convert_quantize_refusals(tmp_path, float_ckpt, quantized, monkeypatch):
    with pytest.raises(UserError, match="checkpoint directory"):
        convert(float_ckpt, tmp_path / "q.npz", quantize=8, group_size=64)
    with pytest.raises(UserError, match="already quantized"):
        convert(quantized[8, 64], tmp_path / "again", quantize=4, group_size=64)
    with pytest.raises(UserError, match="group size"):
        convert(float_ckpt, tmp_path / "q", quantize=8, group_size=16)
    monkeypatch.setitem(sys.modules, "mlx", None)
    monkeypatch.setitem(sys.modules, "mlx.core", None)
    with pytest.raises(UserError, match="needs MLX"):
        convert(float_ckpt, tmp_path / "q", quantize=8, group_size=64)
    assert not any(p.name.startswith("q") for p in tmp_path.iterdir())


def test_quantize_cache_refused_for_mha(tmp_path, capsys):
    mla_torch.save(mla_torch.build(ModelConfig.preset("tiny", attention="mha")), tmp_path / "mha")
    assert main(["eval", str(tmp_path / "mha"), "--framework", "torch", "--quantize-cache", "--samples", "4"]) == 2
    assert "--quantize-cache" in capsys.readouterr().err
