"""Hostile files and hostile numbers: every case exits 2 with exactly one stderr line, no traceback, nothing left
behind, memory bounded; and odd but legitimate inputs still work, so refusing everything cannot pass.

Most cases call `mla_mnist.cli.main` in-process (fast); a few run `python -m mla_mnist` in a subprocess to
measure peak RSS, and to hold a run lock from another process.
"""

import gzip
import io
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from convert import checkpoint, safetensors_np
from convert.config import ModelConfig
from convert.errors import quote
from convert.schema import schema
from convert.training import TrainConfig
from mla_mnist.cli import main
from mnist_grid import mnist

ROOT = Path(__file__).resolve().parents[1]
TORCH = ["--framework", "torch", "--device", "cpu"]
MB = 2**20


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}  # hidden temp and lock files included


def _fails(argv, capsys, root: Path, phrase: str = ""):
    """In-process CLI run: exit 2, one `mla-mnist: error:` line on stderr, no traceback, no new file."""
    before = _tree(root)
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert rc == 2, (rc, out, err)
    assert len(lines) == 1 and lines[0].startswith("mla-mnist: error: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    assert phrase in lines[0], lines[0]
    assert _tree(root) == before, f"left behind: {_tree(root) - before}"
    return lines[0]


def _works(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, (rc, out, err)
    return out


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def tiny_ck(tmp_path_factory):
    """An untrained tiny checkpoint (no training: loaders only need the files), with a resumable train state."""
    mla_torch = pytest.importorskip("mla_torch")
    path = tmp_path_factory.mktemp("tiny") / "ck"
    cfg = ModelConfig.preset("tiny")
    mla_torch.save(mla_torch.build(cfg), path, preset="tiny")
    (path / "train_state.json").write_text(json.dumps(_state()))
    safetensors_np.write(path / "optimizer.safetensors", _optimizer(cfg))
    return path


def _state():
    spec = {
        "epochs": 1,
        "batch_size": 4,
        "train_samples": 8,
        "seed": 0,
        "augment": False,
        "train": TrainConfig(lr=3e-3, warmup_steps=1, total_steps=2).to_dict(),
    }
    return {"step": 1, "framework": "torch", "spec": json.loads(json.dumps(spec)), "history": [], "best": None}


def _optimizer(cfg):
    arrays = {"step": np.array(1, dtype=np.int64)}
    for name, shape in schema(cfg).items():
        arrays[f"m.{name}"] = np.zeros(shape, np.float32)
        arrays[f"v.{name}"] = np.zeros(shape, np.float32)
    return arrays


@pytest.fixture
def ck(tiny_ck, tmp_path):
    return Path(shutil.copytree(tiny_ck, tmp_path / "ck"))


def _weights(tiny_ck):
    return safetensors_np.read(tiny_ck / "model.safetensors")[0]


def _raw_safetensors(path: Path, header, body: bytes = b"\0" * 64, length=None):
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head) if length is None else length) + head + body)
    return path


# ---- 1. safetensors headers: wrong JSON types, huge numbers, sizes ----------------------------------------


def _entry(**over):
    return {"t": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64], **over}}


SAFETENSORS = {
    "offsets as strings": _entry(data_offsets=["0", "64"]),
    "offsets as floats": _entry(data_offsets=[0.0, 64.0]),
    "offsets as booleans": _entry(data_offsets=[False, True]),
    "offsets NaN": b'{"t": {"dtype": "F32", "shape": [4, 4], "data_offsets": [NaN, 64]}}',
    "offsets overflow to inf": b'{"t": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 1e400]}}',
    "one offset": _entry(data_offsets=[64]),
    "three offsets": _entry(data_offsets=[0, 32, 64]),
    "offsets an object": _entry(data_offsets={"a": 0}),
    "negative offsets": _entry(data_offsets=[-64, 0]),
    "reversed offsets": _entry(data_offsets=[64, 0]),
    "offsets past the end": _entry(data_offsets=[0, 10**6]),
    "offsets beyond 64 bits": _entry(data_offsets=[0, 2**70]),
    "dtype a list": _entry(dtype=["F32"]),
    "dtype a number": _entry(dtype=5),
    "dtype null": _entry(dtype=None),
    "dtype an object": _entry(dtype={"F32": 1}),
    "dtype float8": _entry(dtype="F8_E4M3"),
    "dtype lowercase": _entry(dtype="f32"),
    "negative shape": _entry(shape=[-4, -4]),
    "shape product wraps int64 to 0": _entry(shape=[2**32, 2**32], data_offsets=[0, 0]),
    "shape times itemsize wraps": _entry(shape=[2**62, 4], data_offsets=[0, 0]),
    "shape entry beyond 64 bits": _entry(shape=[10**30]),
    "shape a string": _entry(shape="4,4"),
    "shape floats": _entry(shape=[4.0, 4.0]),
    "shape booleans": _entry(shape=[True, 16]),
    "shape an object": _entry(shape={"rows": 4}),
    "shape of 40 dimensions": _entry(shape=[1] * 40),
    "shape not matching the bytes": _entry(shape=[4, 5]),
    "entry a number": {"t": 7},
    "entry a list": {"t": ["F32", [4, 4], [0, 64]]},
    "entry missing offsets": {"t": {"dtype": "F32", "shape": [4, 4]}},
    "entry with an extra key": _entry(extra=1),
    "header a list": [1, 2, 3],
    "header a string": "tensors",
    "header null": None,
    "header nested 100000 deep": b"[" * 100_000 + b"]" * 100_000,
    "header not UTF-8": b'{"t\xff\xfe": 1}',
    "header not JSON": b"\x00" * 32,
    "metadata a list": {"__metadata__": ["format", "pt"], **_entry()},
    "metadata with numbers": {"__metadata__": {"format": 1}, **_entry()},
}


@pytest.mark.parametrize("case", SAFETENSORS)
def test_safetensors_header(case, tmp_path, capsys):
    bad = _raw_safetensors(tmp_path / "w.safetensors", SAFETENSORS[case])
    _fails(["convert", bad, tmp_path / "out.npz", "--preset", "tiny"], capsys, tmp_path, "safetensors")


SAFETENSORS_SIZES = {
    "header over 100 MB": (lambda p: _raw_safetensors(p, b"{}", length=200_000_000), "over the 100,000,000-byte"),
    "header length 2**64-1": (lambda p: _raw_safetensors(p, b"{}", length=2**64 - 1), "over the 100,000,000-byte"),
    "header past the end": (lambda p: _raw_safetensors(p, b"{}", length=5000), "runs past the end"),
    "empty file": (lambda p: p.write_bytes(b""), "shorter than its 8-byte"),
    "3 bytes": (lambda p: p.write_bytes(b"abc"), "shorter than its 8-byte"),
}


@pytest.mark.parametrize("case", SAFETENSORS_SIZES)
def test_safetensors_size(case, tmp_path, capsys):
    make, phrase = SAFETENSORS_SIZES[case]
    bad = tmp_path / "w.safetensors"
    make(bad)
    _fails(["convert", bad, tmp_path / "out.npz", "--preset", "tiny"], capsys, tmp_path, phrase)


def test_hostile_weights_inside_a_checkpoint(ck, tmp_path, capsys):
    _raw_safetensors(ck / "model.safetensors", _entry(shape=[2**32, 2**32], data_offsets=[0, 0]))
    _fails(["eval", ck, *TORCH, "--samples", "4"], capsys, tmp_path, "data of t is out of range")


# ---- 2. config fields of the wrong type or size ---------------------------------------------------------

CONFIG_FIELDS = {
    "grid as a string": {"grid": "2"},
    "grid a float": {"grid": 2.0},
    "grid a boolean": {"grid": True},
    "grid beyond 64 bits": {"grid": 10**30},
    "grid over the limit": {"grid": 65},
    "d_model as a string": {"d_model": "32"},
    "d_model a float": {"d_model": 32.5},
    "d_model over the limit": {"d_model": 2**20},
    "heads a boolean": {"heads": True},
    "heads null": {"heads": None},
    "enc_layers a float": {"enc_layers": 2.0},
    "enc_layers over the limit": {"enc_layers": 10**9},
    "dec_layers negative": {"dec_layers": -2},
    "mlp_ratio over the limit": {"mlp_ratio": 10**5},
    "parameters over 2e9": {
        "d_model": 8192,
        "heads": 64,
        "enc_layers": 64,
        "enc_kv_rank": 4096,
        "enc_q_rank": 4096,
        "dec_kv_rank": 4096,
        "dec_q_rank": 4096,
        "cross_kv_rank": 4096,
    },
    "rank a boolean": {"enc_kv_rank": True},
    "rank as a string": {"enc_kv_rank": "16"},
    "rank a float": {"dec_q_rank": 0.5},
    "rank over the limit": {"cross_kv_rank": 10**6},
    "head_dim as a string": {"head_dim": "8"},
    "rope_dim a float": {"rope_dim": 4.0},
    "dropout as a string": {"dropout": "0.1"},
    "dropout NaN": {"dropout": float("nan")},
    "dropout Infinity": {"dropout": float("inf")},
    "dropout a boolean": {"dropout": False},
    "rope_base NaN": {"rope_base": float("nan")},
    "rope_base Infinity": {"rope_base": float("inf")},
    "rope_base negative": {"rope_base": -10000.0},
    "rope_base zero": {"rope_base": 0},
    "rope_base one": {"rope_base": 1.0},
    "rope_base as a string": {"rope_base": "10000"},
    "final_norm as a string": {"final_norm": "yes"},
    "final_norm an integer": {"final_norm": 1},
    "attention a list": {"attention": ["mla"]},
    "attention null": {"attention": None},
    "vocab a float": {"vocab": 13.0},
    "quantization a string": {"quantization": "4bit"},
    "quantization a list": {"quantization": [4, 64]},
    "quantization float bits": {"quantization": {"bits": 4.0, "group_size": 64}},
    "quantization extra key": {"quantization": {"bits": 4, "group_size": 64, "scheme": "nf4"}},
}


def _set_config(ck, edit):
    meta = json.loads((ck / "config.json").read_text())
    edit(meta)
    (ck / "config.json").write_text(json.dumps(meta))  # NaN and Infinity as Python's json writes them


@pytest.mark.parametrize("case", CONFIG_FIELDS)
def test_config_field(case, ck, tmp_path, capsys):
    _set_config(ck, lambda m: m["model"].update(CONFIG_FIELDS[case]))
    _fails(["convert", ck, tmp_path / "out"], capsys, tmp_path, "invalid model config")


CONFIG_FILES = {
    "model section a list": (lambda m: m.update(model=[2, 14]), "no 'model' section"),
    "model section null": (lambda m: m.update(model=None), "no 'model' section"),
    "format_version a boolean": (lambda m: m.update(format_version=True), "checkpoint format True"),
    "format_version a string": (lambda m: m.update(format_version="1"), "checkpoint format '1'"),
    "preset a number": (lambda m: m.update(preset=5), "not a string"),
}


@pytest.mark.parametrize("case", CONFIG_FILES)
def test_config_file(case, ck, tmp_path, capsys):
    edit, phrase = CONFIG_FILES[case]
    _set_config(ck, edit)
    _fails(["convert", ck, tmp_path / "out"], capsys, tmp_path, phrase)


@pytest.mark.parametrize("content", ["deep", "not utf-8", "a number"])
def test_config_json_bytes(content, ck, tmp_path, capsys):
    data = {"deep": b"[" * 200_000 + b"]" * 200_000, "not utf-8": b'{"model": "\xff\xfe"}', "a number": b"7"}
    (ck / "config.json").write_bytes(data[content])
    _fails(["convert", ck, tmp_path / "out"], capsys, tmp_path, "config.json")


@pytest.mark.parametrize("case", ["nested --config", "NaN rope_base --config", "string grid --config"])
def test_train_config_file(case, tmp_path, capsys):
    text = {
        "nested --config": "[" * 100_000 + "]" * 100_000,
        "NaN rope_base --config": json.dumps({**ModelConfig.preset("tiny").to_dict(), "rope_base": float("nan")}),
        "string grid --config": json.dumps({**ModelConfig.preset("tiny").to_dict(), "grid": "2"}),
    }[case]
    (tmp_path / "model.json").write_text(text)
    _fails(
        ["train", *TORCH, "--config", tmp_path / "model.json", "--out", tmp_path / "out", "--quiet"], capsys, tmp_path
    )


# ---- 3. torch .pt files numpy cannot take -----------------------------------------------------------------


def _pt(kind, tiny_ck, path):
    import torch

    state = {k: torch.from_numpy(v) for k, v in _weights(tiny_ck).items()}
    if kind == "integer keys":
        state = {i: t for i, t in enumerate(state.values())}
    elif kind == "tuple key":
        state[("head", "bias")] = state.pop("head.bias")
    elif kind == "float8 tensor":
        state["head.bias"] = state["head.bias"].to(torch.float8_e4m3fn)
    elif kind == "complex tensor":
        state["head.bias"] = state["head.bias"].to(torch.complex64)
    elif kind == "sparse tensor":
        state["head.weight"] = state["head.weight"].to_sparse()
    elif kind == "quantized tensor":
        with warnings.catch_warnings():  # torch deprecates making them, not loading them
            warnings.simplefilter("ignore")
            state["head.weight"] = torch.quantize_per_tensor(state["head.weight"], 0.1, 0, torch.qint8)
    elif kind == "a list of tensors":
        state = list(state.values())
    elif kind == "empty dict":
        state = {}
    elif kind == "numbers not tensors":
        state = {k: 1.0 for k in state}
    elif kind == "wrapped integer keys":
        state = {"state_dict": {i: t for i, t in enumerate(state.values())}}
    if kind == "code-running pickle":
        path.write_bytes(pickle.dumps(_Evil()))
    elif kind == "random bytes":
        path.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        torch.save(state, path)
        path.write_bytes(path.read_bytes()[:1000])
    else:
        torch.save(state, path)
    return path


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


PT_CASES = {
    "integer keys": "not strings",
    "tuple key": "not strings",
    "float8 tensor": "float8_e4m3fn",
    "complex tensor": "complex64",
    "sparse tensor": "sparse_coo",
    "quantized tensor": "qint8",
    "a list of tensors": "holds a list",
    "empty dict": "holds a dict",
    "numbers not tensors": "are not tensors",
    "wrapped integer keys": "not strings",
    "code-running pickle": "refused to load",
    "random bytes": "refused to load",
    "truncated": "refused to load",
}


@pytest.mark.parametrize("kind", PT_CASES)
def test_torch_file(kind, tiny_ck, tmp_path, capsys):
    pytest.importorskip("torch")
    bad = _pt(kind, tiny_ck, tmp_path / "w.pt")
    _fails(["convert", bad, tmp_path / "out.safetensors", "--preset", "tiny"], capsys, tmp_path, PT_CASES[kind])


# ---- 4. .npz members checked before they are inflated -----------------------------------------------------


def _npy_header(dtype: str, shape) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def _npz(kind, tiny_ck, path):
    weights = _weights(tiny_ck)
    if kind == "zip bomb":  # 200 MB of zeros, a few hundred KB on disk
        n = 200 * MB
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z, z.open("head.bias.npy", "w", force_zip64=True) as f:
            f.write(_npy_header("<f4", (n // 4,)))
            chunk = bytes(MB)
            for _ in range(n // MB):
                f.write(chunk)
    elif kind == "header bigger than the data":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("head.bias.npy", _npy_header("<f4", (10**12,)) + b"\0" * 52)
    elif kind == "shape entry beyond 64 bits":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("head.bias.npy", _npy_header("<f4", (2**70,)) + b"\0" * 52)
    elif kind == "object array":
        np.savez(path, **{"head.bias": np.array([{"a": 1}], dtype=object)}, allow_pickle=True)
    elif kind == "unicode strings":
        np.savez(path, **{"head.bias": np.array(["abc"] * 13)})
    elif kind == "complex values":
        np.savez(path, **{**weights, "head.bias": weights["head.bias"].astype(np.complex64)})
    elif kind == "datetimes":
        np.savez(path, **{"head.bias": np.zeros(13, "M8[s]")})
    elif kind == "structured dtype":
        np.savez(path, **{"head.bias": np.zeros(13, [("a", "<f4"), ("b", "<i4")])})
    elif kind == "member not .npy":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("README.txt", "hello")
    elif kind == "npy format 9":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("head.bias.npy", b"\x93NUMPY\x09\x00" + b"\0" * 100)
    elif kind == "a single .npy":
        with open(path, "wb") as f:
            np.save(f, weights["head.bias"])
    elif kind == "truncated zip":
        np.savez(path, **weights)
        path.write_bytes(path.read_bytes()[:-300])
    elif kind == "random bytes":
        path.write_bytes(os.urandom(2048))
    return path


NPZ_CASES = {
    "zip bomb": "inflate to",
    "header bigger than the data": "not the 1,000,000,000,000 values",
    "shape entry beyond 64 bits": "values of its shape",
    "object array": "dtype object",
    "unicode strings": "dtype <U3",
    "complex values": "dtype complex64",
    "datetimes": "datetime64",
    "structured dtype": "expected floating point",
    "member not .npy": "not a .npy array",
    "npy format 9": "not a readable .npz",
    "a single .npy": "not an archive",
    "truncated zip": "not a readable .npz",
    "random bytes": "not a readable .npz",
}


@pytest.mark.parametrize("kind", NPZ_CASES)
def test_npz_file(kind, tiny_ck, tmp_path, capsys):
    bad = _npz(kind, tiny_ck, tmp_path / "w.npz")
    _fails(["convert", bad, tmp_path / "out.safetensors", "--preset", "tiny"], capsys, tmp_path, NPZ_CASES[kind])


# ---- 5. resume state with missing or malformed fields -----------------------------------------------------


def _spec(**over):
    return lambda s: s["spec"].update(over)


def _train(**over):
    return lambda s: s["spec"]["train"].update(over)


def _del(*keys):
    def edit(s):
        d = s
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]

    return edit


STATE_CASES = {
    "spec without epochs": _del("spec", "epochs"),
    "spec without train": _del("spec", "train"),
    "epochs as a string": _spec(epochs="1"),
    "epochs a float": _spec(epochs=1.5),
    "epochs a boolean": _spec(epochs=True),
    "batch_size 0": _spec(batch_size=0),
    "batch_size beyond 64 bits": _spec(batch_size=10**30),
    "train_samples null": _spec(train_samples=None),
    "seed negative": _spec(seed=-1),
    "augment unknown": _spec(augment="rotate"),
    "augment a list": _spec(augment=["shift"]),
    "full_grid_steps negative": _spec(full_grid_steps=-1),
    "full_grid_steps a float": _spec(full_grid_steps=2.5),
    "train unknown setting": _train(momentum=0.9),
    "train lr a string": _train(lr="0.001"),
    "train lr NaN": _train(lr=float("nan")),
    "train warmup a float": _train(warmup_steps=1.5),
    "train betas one number": _train(betas=[0.9]),
    "train betas a string": _train(betas="0.9,0.98"),
    "train a list": _spec(train=[1, 2]),
    "history an object": lambda s: s.update(history={"a": 1}),
    "history of numbers": lambda s: s.update(history=[1, 2]),
    "best a string": lambda s: s.update(best="epoch 3"),
    "best without val_exact_match": lambda s: s.update(best={"step": 1}),
    "step a string": lambda s: s.update(step="1"),
}


@pytest.mark.parametrize("case", STATE_CASES)
def test_resume_state(case, ck, tmp_path, capsys):
    state = _state()
    STATE_CASES[case](state)
    (ck / "train_state.json").write_text(json.dumps(state))
    _fails(
        ["train", *TORCH, "--resume", ck, "--val-samples", "4", "--quiet"],
        capsys,
        tmp_path,
        "train_state.json is corrupt",
    )


def _opt_step(value):
    def edit(arrays):
        arrays["step"] = value

    return edit


OPTIMIZER_CASES = {
    "step NaN": (_opt_step(np.array(np.nan, np.float32)), "not a step count"),
    "step negative": (_opt_step(np.array(-5, np.int64)), "not a step count"),
    "step a fraction": (_opt_step(np.array(1.5, np.float64)), "not a step count"),
    "step of two values": (_opt_step(np.array([1, 2], np.int64)), "not a step count"),
    "moment NaN": (lambda a: a["m.head.bias"].__setitem__(0, np.nan), "non-finite"),
    "moment integer": (lambda a: a.__setitem__("v.head.bias", np.zeros(13, np.int32)), "non-float"),
}


@pytest.mark.parametrize("case", OPTIMIZER_CASES)
def test_resume_optimizer(case, ck, tmp_path, capsys):
    edit, phrase = OPTIMIZER_CASES[case]
    arrays = safetensors_np.read(ck / "optimizer.safetensors")[0]
    edit(arrays)
    safetensors_np.write(ck / "optimizer.safetensors", arrays)
    _fails(["train", *TORCH, "--resume", ck, "--val-samples", "4", "--quiet"], capsys, tmp_path, phrase)


@pytest.mark.parametrize("content", ["nested", "not utf-8"])
def test_resume_state_bytes(content, ck, tmp_path, capsys):
    data = {"nested": b"[" * 100_000 + b"]" * 100_000, "not utf-8": b'{"spec": "\xff"}'}[content]
    (ck / "train_state.json").write_bytes(data)
    _fails(["train", *TORCH, "--resume", ck, "--val-samples", "4", "--quiet"], capsys, tmp_path, "is corrupt")


# ---- 6. CLI numbers beyond what fits --------------------------------------------------------------------

BIG = str(10**30)
NUMBER_CASES = {
    "eval --samples beyond 64 bits": (["eval", "CK", "--samples", BIG], "--samples"),
    "eval --samples over the limit": (["eval", "CK", "--samples", "10000001"], "over the limit of 10,000,000"),
    "eval --batch-size over the limit": (["eval", "CK", "--batch-size", "1000000"], "over the limit of 65,536"),
    "eval --samples a float": (["eval", "CK", "--samples", "1e3"], "expected a positive integer"),
    "eval --samples hex": (["eval", "CK", "--samples", "0x10"], "expected a positive integer"),
    "eval --samples 100000 digits": (["eval", "CK", "--samples", "9" * 100_000], "--samples"),
    "train --val-samples beyond 64 bits": (["train", "--val-samples", BIG], "--val-samples"),
    "train --train-samples over the limit": (["train", "--train-samples", str(10**12)], "--train-samples"),
    "train --batch-size beyond 64 bits": (["train", "--batch-size", str(2**64)], "--batch-size"),
    "train --epochs over the limit": (["train", "--epochs", str(10**7)], "--epochs"),
    "train --seed beyond 64 bits": (["train", "--seed", str(10**40)], "--seed"),
    "train --max-steps 2**64": (["train", "--max-steps", str(2**64)], "--max-steps"),
    "train --save-every beyond 64 bits": (["train", "--save-every", BIG], "--save-every"),
    "train --warmup 2**63": (["train", "--warmup", str(2**63)], "--warmup"),
    "make-grid --grid 65": (["make-grid", "g.png", "--grid", "65"], "over the limit of 64"),
    "make-grid --grid beyond 64 bits": (["make-grid", "g.png", "--grid", BIG], "--grid"),
    "make-grid --digits over the limit": (["make-grid", "g.png", "--digits", "5000"], "--digits"),
    "make-grid --seed beyond 64 bits": (["make-grid", "g.png", "--seed", BIG], "--seed"),
    "convert --grid beyond 64 bits": (["convert", "CK", "out", "--grid", BIG], "--grid"),
    "bench --lengths over the limit": (["bench", "--lengths", "10,1000000"], "over the limit of 100,000"),
    "bench --lengths beyond 64 bits": (["bench", "--lengths", f"10,{BIG}"], "--lengths"),
    "bench --lengths empty": (["bench", "--lengths", ","], "comma-separated"),
    "bench --lengths not numbers": (["bench", "--lengths", "5,ten"], "--lengths"),
    "bench --batch-size over the limit": (["bench", "--batch-size", "100000"], "--batch-size"),
    "bench --train-batch-size beyond 64 bits": (["bench", "--train-batch-size", BIG], "--train-batch-size"),
    "bench --repeats beyond 64 bits": (["bench", "--repeats", BIG], "--repeats"),
    "bench --threads over the limit": (["bench", "--threads", "100000"], "--threads"),
    "bench --decode-length 1": (["bench", "--decode-length", "1"], "--decode-length 1: at least 2"),
    "bench --decode-length beyond 64 bits": (["bench", "--decode-length", BIG], "--decode-length"),
    "bench --decode-batches 0": (["bench", "--decode-batches", "1,0"], "--decode-batches"),
    "bench --decode-paths unknown": (["bench", "--decode-paths", "graph,warp"], "--decode-paths"),
    "bench --eval-samples beyond 64 bits": (["bench", "--eval-samples", BIG], "--eval-samples"),
    "eval --static a path the CPU lacks": (
        ["eval", "CK", "--framework", "torch", "--static", "graph"],
        "--static graph: torch on cpu decodes with off, eager",
    ),
    "eval --static with the int8 cache": (
        ["eval", "CK", "--framework", "torch", "--static", "eager", "--quantize-cache"],
        "drop --quantize-cache",
    ),
}


@pytest.mark.parametrize("case", NUMBER_CASES)
def test_cli_number(case, ck, tmp_path, capsys):
    argv, phrase = NUMBER_CASES[case]
    _fails([ck if a == "CK" else a for a in argv], capsys, tmp_path, phrase)


# ---- 7. MNIST IDX and gzip files: sizes checked before reading --------------------------------------------


def _idx(magic, dims, payload=b""):
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + payload


def _mnist_dir(tmp, labels: bytes | None = None, images: bytes | None = None, gz=False):
    d = tmp / "mnist"
    d.mkdir()
    src = mnist.resolve_data_dir()
    for name, content in ((mnist.TEST_IMAGES, images), (mnist.TEST_LABELS, labels)):
        if content is None:
            real = mnist._find(src, name)
            os.symlink(real, d / real.name)
        else:
            (d / (name + (".gz" if gz else ""))).write_bytes(content)
    return d


def _bomb():
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1) as g:
        chunk = bytes(MB)
        for _ in range(100):
            g.write(chunk)
    return out.getvalue()


IDX_CASES = {
    "labels claim 2**32-1 items": (dict(labels=_idx(2049, [2**32 - 1], b"\0" * 100)), "wrong IDX header"),
    "images dims whose product wraps int64": (
        dict(images=_idx(2051, [2**31, 2**31, 2**31], b"\0" * 100)),
        "wrong IDX header",
    ),
    "images shorter than their header": (dict(images=b"\x00\x00\x08"), "wrong IDX header"),
    "unknown magic": (dict(labels=_idx(2050, [10], b"\0" * 10)), "wrong IDX header"),
    "images of 7x7 digits": (dict(images=_idx(2051, [10000, 7, 7], b"\0" * 490000)), "checksum mismatch"),
    "gzip bomb": (dict(labels=_bomb(), gz=True), "more than 67,108,864 bytes"),
    "gzip garbage": (dict(labels=b"\x1f\x8b" + os.urandom(200), gz=True), "cannot read"),
    "gzip truncated": (dict(labels=gzip.compress(_idx(2049, [10000], b"\1" * 10000))[:-40], gz=True), "cannot read"),
    "gzip labels claim 2**32-1 items": (
        dict(labels=gzip.compress(_idx(2049, [2**32 - 1], b"\0" * 100)), gz=True),
        "wrong IDX header",
    ),
}


@pytest.mark.parametrize("case", IDX_CASES)
def test_mnist_file(case, tmp_path, capsys):
    kwargs, phrase = IDX_CASES[case]
    data = _mnist_dir(tmp_path, **kwargs)
    _fails(["make-grid", tmp_path / "g.png", "--data-dir", data], capsys, tmp_path, phrase)


# ---- 8. one line means one line: names that could split or colour the error ------------------------------

NAMES = {
    "newline": "bad\nname",
    "carriage return": "bad\rname",
    "escape sequence": "bad\x1b[31mname",
    "tab": "bad\tname",
}


@pytest.mark.parametrize("name", NAMES)
def test_hostile_file_names(name, tmp_path, capsys):
    bad = tmp_path / (NAMES[name] + ".safetensors")
    bad.write_bytes(b"\xff" * 20)
    line = _fails(["convert", bad, tmp_path / "out.npz", "--preset", "tiny"], capsys, tmp_path, quote(bad))
    assert "\x1b" not in line and "\t" not in line


@pytest.mark.parametrize("name", ["newline", "escape sequence"])
def test_hostile_checkpoint_names(name, tmp_path, capsys):
    _fails(["eval", tmp_path / NAMES[name], *TORCH], capsys, tmp_path, "does not exist")


# ---- 9. writes: locks, killed runs, symlinks ---------------------------------------------------------------

HOLDER = (
    "import sys, time; from convert import checkpoint\n"
    "with checkpoint.run_lock(sys.argv[1]):\n"
    "    print('locked', flush=True); sys.stdin.read()\n"
)


@pytest.fixture
def holder(tmp_path):
    """Another process holding the run lock of tmp/out until the test ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "out")],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.stdin.close()
    proc.wait(timeout=30)


@pytest.mark.parametrize("command", ["train", "convert to a directory", "convert to a file"])
def test_locked_destination(command, holder, ck, tmp_path, capsys):
    argv = {
        "train": ["train", *TORCH, "--preset", "tiny", "--out", tmp_path / "out", "--quiet"],
        "convert to a directory": ["convert", ck, tmp_path / "out"],
        "convert to a file": ["convert", ck, tmp_path / "out"],
    }[command]
    if command == "convert to a file":  # a file destination locks its own name
        holder.stdin.close()
        holder.wait(timeout=30)
        other = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(tmp_path / "w.safetensors")],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert other.stdout.readline().strip() == "locked"
        try:
            _fails(["convert", ck, tmp_path / "w.safetensors"], capsys, tmp_path, f"(pid {other.pid})")
        finally:
            other.stdin.close()
            other.wait(timeout=30)
        return
    _fails(argv, capsys, tmp_path, f"is being written by another process (pid {holder.pid})")


def _train_cmd(out, samples):
    return [
        sys.executable,
        "-m",
        "mla_mnist",
        "train",
        *TORCH,
        "--preset",
        "tiny",
        "--train-samples",
        str(samples),
        "--batch-size",
        "4",
        "--val-samples",
        "8",
        "--quiet",
        "--out",
        str(out),
    ]


def test_two_trainings_into_one_out(tmp_path, capsys):
    """A training into an --out another training is writing refuses at once; the first one's checkpoint loads.

    The first runs in a subprocess; the second is main() in this process, already imported, so it reaches the lock
    while the first still trains."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        _train_cmd(out, 400), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lock = checkpoint.lock_path(out)
    deadline = time.time() + 120
    while not lock.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert lock.exists(), first.communicate()
    rc = main([str(a) for a in _train_cmd(out, 8)[3:]])
    err = capsys.readouterr().err
    out1, err1 = first.communicate(timeout=240)
    assert first.returncode == 0, err1
    assert rc == 2 and err.splitlines() == [
        f"mla-mnist: error: {out} is being written by another process (pid {first.pid}): wait for it or choose "
        "another --out"
    ], err
    cfg, weights, _ = checkpoint.load(out)
    assert cfg == ModelConfig.preset("tiny") and weights
    assert not lock.exists() and not list(tmp_path.glob(".out.*"))


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("dst", ["out", "w.safetensors", "w.npz", "out[1]*"])
def test_killed_convert_leaves_nothing(dst, ck, tmp_path, capsys):
    """What a SIGKILLed convert leaves (temp dir or file, a moved-away old checkpoint) goes on the next run; a live
    writer's temp stays."""
    pid, live = _dead_pid(), os.getppid()
    target = tmp_path / dst
    if dst.startswith("out"):  # a checkpoint directory; glob characters in its name match only itself
        shutil.copytree(ck, target)
        for name in (f".{dst}.tmp-{pid}", f".{dst}.old-{pid}"):
            shutil.copytree(ck, tmp_path / name)
        (tmp_path / f".{dst}.tmp-{live}").mkdir()
        (tmp_path / f".out1.tmp-{pid}").mkdir()  # another destination's: not this run's to judge
    else:
        (tmp_path / f".{dst}.tmp-{pid}").write_bytes(b"half a file")
        (tmp_path / f".{dst}.tmp-{live}").write_bytes(b"someone else's")
    _works(["convert", ck, target, "--force"], capsys)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert left == sorted([f".{dst}.tmp-{live}"] + ([f".out1.tmp-{pid}"] if dst.startswith("out") else [])), left


def test_real_sigkill_during_convert(ck, tmp_path, capsys):
    """A convert killed with SIGKILL at a random moment: the next run leaves only its destination."""
    dst = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mla_mnist", "convert", str(ck), str(dst)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60  # kill it as soon as it has started writing (or when it is done)
    while proc.poll() is None and time.time() < deadline and not list(tmp_path.glob(".out.*")):
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _works(["convert", ck, dst], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "out"]
    checkpoint.load(dst)


def test_symlinked_out(ck, tmp_path, capsys):
    """--out a symlink to a checkpoint: written through the link, the link kept, no `.link.old-*` left."""
    real = Path(shutil.copytree(ck, tmp_path / "real"))
    link = tmp_path / "link"
    link.symlink_to(real)
    (tmp_path / f".link.old-{_dead_pid()}").symlink_to(real)  # what an older version left behind
    _works(["convert", ck, link, "--dtype", "float16", "--force"], capsys)
    assert link.is_symlink() and checkpoint.load(link)[2]["dtype"] == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "link", "real"]


def test_diverged_run_claims_no_checkpoint(tmp_path, capsys):
    line = _fails(
        [
            "train",
            *TORCH,
            "--preset",
            "tiny",
            "--train-samples",
            "8",
            "--batch-size",
            "4",
            "--lr",
            "1e30",
            "--val-samples",
            "4",
            "--quiet",
            "--out",
            tmp_path / "out",
        ],
        capsys,
        tmp_path,
        "diverged",
    )
    assert "no checkpoint was saved" in line and "last" not in line


def test_internal_error_is_one_line(monkeypatch, capsys):
    from mla_mnist import commands

    def broken(args):
        raise ValueError("a\nbug")

    monkeypatch.setattr(commands, "cmd_make_grid", broken)
    assert main(["make-grid", "g.png"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "mla-mnist: internal error (a bug, please report): ValueError: a\\nbug; rerun with --debug for the traceback"
    ]


# ---- 10. peak memory: inputs of at most 10 MB stay under 1 GB ----------------------------------------------


def _peak_rss_mb(argv, cwd) -> tuple[int, str, float]:
    report = Path(cwd) / "time.txt"
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "%M", "-o", str(report), sys.executable, "-m", "mla_mnist", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    kb = int(report.read_text().split()[-1])
    report.unlink()
    return proc.returncode, proc.stderr, kb / 1024


MEMORY_CASES = {
    "safetensors shape wrapping int64": lambda t, ck: [
        "convert",
        _raw_safetensors(t / "w.safetensors", _entry(shape=[2**32, 2**32], data_offsets=[0, 0]), body=b"\0" * (8 * MB)),
        t / "o.npz",
        "--preset",
        "tiny",
    ],
    "safetensors header 2**63": lambda t, ck: [
        "convert",
        _raw_safetensors(t / "w.safetensors", b"{}", length=2**63, body=b"\0" * (8 * MB)),
        t / "o.npz",
        "--preset",
        "tiny",
    ],
    "npz bomb": lambda t, ck: ["convert", _npz("zip bomb", ck, t / "w.npz"), t / "o.safetensors", "--preset", "tiny"],
    "gzip bomb": lambda t, ck: ["make-grid", t / "g.png", "--data-dir", _mnist_dir(t, labels=_bomb(), gz=True)],
    "IDX dims 2**31 cubed": lambda t, ck: [
        "make-grid",
        t / "g.png",
        "--data-dir",
        _mnist_dir(t, images=_idx(2051, [2**31, 2**31, 2**31], b"\0" * (8 * MB))),
    ],
}


@pytest.mark.skipif(not Path("/usr/bin/time").exists(), reason="needs /usr/bin/time")
@pytest.mark.parametrize("case", MEMORY_CASES)
def test_peak_memory(case, tiny_ck, tmp_path):
    argv = [str(a) for a in MEMORY_CASES[case](tmp_path, tiny_ck)]
    assert all(p.stat().st_size <= 10 * MB for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink())
    rc, err, peak = _peak_rss_mb(argv, tmp_path)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("mla-mnist: error: "), err
    assert peak <= 1024, f"peak RSS {peak:.0f} MB"


# ---- 11. odd but legitimate inputs still work ------------------------------------------------------------


def _legit_safetensors(tiny_ck, path, **kw):
    safetensors_np.write(path, _weights(tiny_ck), **kw)
    return path


def _padded_safetensors(tiny_ck, path):
    _legit_safetensors(tiny_ck, path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"] = {"format": "pt", "note": "line one\nline two", "ünï": "✓"}
    head = json.dumps(header).encode() + b" " * 37
    body = raw[8 + n :]
    path.write_bytes(struct.pack("<Q", len(head)) + head + body)
    return path


def _legit(kind, tiny_ck, tmp):
    import torch

    w = _weights(tiny_ck)
    if kind == "bf16 safetensors":
        return [_legit_safetensors(tiny_ck, tmp / "w.safetensors", dtype="bfloat16"), tmp / "o.npz", "--preset", "tiny"]
    if kind == "padded header with metadata":
        return [_padded_safetensors(tiny_ck, tmp / "w.safetensors"), tmp / "o.pt", "--preset", "tiny"]
    if kind == "unicode and spaces in names":
        return [_legit_safetensors(tiny_ck, tmp / "wéights ✓ 1.safetensors"), tmp / "out dir ✓", "--preset", "tiny"]
    if kind == "wrapped .pt":
        torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in w.items()}, "epoch": 3}, tmp / "w.pt")
        return [tmp / "w.pt", tmp / "o.safetensors", "--preset", "tiny"]
    if kind == "float64 .pt":
        torch.save({k: torch.from_numpy(v.astype(np.float64)) for k, v in w.items()}, tmp / "w.pt")
        return [tmp / "w.pt", tmp / "o.npz", "--preset", "tiny"]
    if kind == "compressed .npz":
        np.savez_compressed(tmp / "w.npz", **w)
        return [tmp / "w.npz", tmp / "o.safetensors", "--preset", "tiny"]
    if kind == "float16 .npz":
        np.savez(tmp / "w.npz", **{k: v.astype(np.float16) for k, v in w.items()})
        return [tmp / "w.npz", tmp / "o.safetensors", "--preset", "tiny"]
    ck = Path(shutil.copytree(tiny_ck, tmp / "ck"))
    if kind == "integer dropout and rope_base":
        _set_config(ck, lambda m: m["model"].update(dropout=0, rope_base=500))
    elif kind == "derived fields left null":
        _set_config(ck, lambda m: m["model"].update(head_dim=None, rope_dim=None))
    elif kind == "another grid in config.json":
        _set_config(ck, lambda m: m["model"].update(grid=3))
    elif kind == "config.json with extra keys":
        _set_config(ck, lambda m: m.update(comment={"nested": [1, 2, {"x": None}]}))
    return [ck, tmp / "out"]


LEGIT = [
    "bf16 safetensors",
    "padded header with metadata",
    "unicode and spaces in names",
    "wrapped .pt",
    "float64 .pt",
    "compressed .npz",
    "float16 .npz",
    "integer dropout and rope_base",
    "derived fields left null",
    "another grid in config.json",
    "config.json with extra keys",
]


@pytest.mark.parametrize("kind", LEGIT)
def test_legitimate_odd_input(kind, tiny_ck, tmp_path, capsys):
    pytest.importorskip("torch")
    argv = _legit(kind, tiny_ck, tmp_path)
    out = _works(["convert", *argv], capsys)
    assert "wrote" in out
    dst = Path(argv[1])
    assert dst.exists() and not list(tmp_path.glob(".*.lock")) and not list(tmp_path.glob(".*.tmp-*"))


def test_legitimate_numbers_at_the_limits(tmp_path, capsys):
    out = _works(["make-grid", tmp_path / "g.png", "--grid", "64", "--digits", "3", "--seed", str(2**63 - 1)], capsys)
    assert len(out.strip()) == 3 and (tmp_path / "g.png").is_file()


def test_legitimate_gzipped_mnist(tmp_path, capsys):
    src = mnist.resolve_data_dir()
    d = tmp_path / "gz"
    d.mkdir()
    for name in (mnist.TEST_IMAGES, mnist.TEST_LABELS):
        (d / (name + ".gz")).write_bytes(gzip.compress(mnist._read(mnist._find(src, name)), compresslevel=1))
    assert _works(["make-grid", tmp_path / "g.png", "--grid", "2", "--data-dir", d], capsys).strip().isdigit()


def test_legitimate_resume(ck, tmp_path, capsys):
    """The hand-made train state the resume cases damage is itself good: resuming it trains and saves."""
    assert "saved" in _works(["train", *TORCH, "--resume", ck, "--val-samples", "4", "--quiet"], capsys)
    assert not list(tmp_path.glob(".ck.*"))


def test_parameter_limit_is_exact():
    """2e9 parameters is checked with Python ints, before anything is allocated: 1.7e9 passes, 2.6e9 does not."""
    from convert.errors import UserError
    from convert.schema import parameter_count

    cfg = ModelConfig.preset("seed", d_model=2048, heads=16, enc_layers=16, dec_layers=16)
    assert 1.7e9 < parameter_count(cfg) < 2e9
    with pytest.raises(UserError, match="2,559,016,925 parameters is over the limit"):
        ModelConfig.preset("seed", d_model=2048, heads=16, enc_layers=24, dec_layers=24)


@pytest.mark.parametrize("inv_freq", ["tiny", "NaN", "above one"])
def test_original_rope_buffer(inv_freq, tiny_ck, tmp_path, capsys):
    """An original-format state_dict whose RoPE buffer gives an absurd base: refused (or the default), never NaN."""
    torch = pytest.importorskip("torch")
    from test_convert import _original_state

    cfg = ModelConfig.preset("tiny")
    state = _original_state({k: torch.from_numpy(v) for k, v in _weights(tiny_ck).items()}, cfg, conv=False)
    value = {"tiny": 1e-30, "NaN": float("nan"), "above one": 2.0}[inv_freq]
    for k in state:
        if k.endswith("rope.inv_freq"):
            state[k] = torch.tensor([1.0, value])
    torch.save(state, tmp_path / "orig.pt")
    if inv_freq == "tiny":  # base 1e60
        _fails(["convert", tmp_path / "orig.pt", tmp_path / "out", "--grid", "2"], capsys, tmp_path, "rope_base")
    else:  # not a frequency: the default base, as before
        _works(["convert", tmp_path / "orig.pt", tmp_path / "out", "--grid", "2"], capsys)
        assert checkpoint.read_config(tmp_path / "out")[0].rope_base == 10000.0
