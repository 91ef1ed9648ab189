"""`mla-mnist convert`: bit-exact round trips between formats, dtype rounding, the original implementation's
state dicts, schema errors, refusal of code-running pickles, MLX files, and running without torch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from convert import checkpoint, original
from convert.config import ModelConfig
from convert.errors import UserError
from convert.formats import convert
from convert.schema import schema
from mla_mnist.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig.preset("tiny")
# Shaped like the original implementation (no final norms, dropout 0.1) with every rank distinct, so that a
# mixed-up inference shows; heads 4 x head_dim 8, rope_dim 4.
ORIGINAL_CFG = ModelConfig(
    grid=2,
    patch=7,
    d_model=32,
    enc_layers=2,
    dec_layers=1,
    heads=4,
    dropout=0.1,
    final_norm=False,
    enc_q_rank=24,
    enc_kv_rank=16,
    dec_q_rank=20,
    dec_kv_rank=12,
    cross_kv_rank=8,
)


def _random_weights(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(shape).astype(np.float32) for k, shape in schema(cfg).items()}


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _one_line_error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("mla-mnist: error: ") and err.count("\n") == 1, err
    return err


# ---- 1. round trips and dtypes ------------------------------------------------------------------------------
def test_torch_mlx_round_trip_and_file_exports_are_bit_exact(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("mlx.core")
    import mla_mlx
    import mla_torch

    model = mla_torch.build(TINY, seed=1)
    ref = _state(model)
    mla_torch.save(model, tmp_path / "a")
    mla_mlx.save(mla_mlx.load(tmp_path / "a"), tmp_path / "b")
    back = _state(mla_torch.load(tmp_path / "b"))
    assert back.keys() == ref.keys()
    assert all(torch.equal(back[k], ref[k]) for k in ref)

    for name in ("w.pt", "w.npz", "w.safetensors"):
        report = convert(tmp_path / "b", tmp_path / name)
        assert f"{len(ref)} tensors" in report and str(tmp_path / name) in report
        # ... and back to a checkpoint directory, the config given as flags would give it
        convert(tmp_path / name, tmp_path / f"ckpt-{name[2:]}", config=TINY)
        cfg, weights, meta = checkpoint.load(tmp_path / f"ckpt-{name[2:]}")
        assert cfg == TINY and meta["weight_dtypes"] == ["float32"]
        assert all(np.array_equal(weights[k], ref[k].numpy()) for k in ref)
    pt = torch.load(tmp_path / "w.pt", weights_only=True)
    assert all(pt[k].dtype == torch.float32 and torch.equal(pt[k], ref[k]) for k in ref)
    with np.load(tmp_path / "w.npz") as npz:
        assert set(npz.files) == set(ref)
        assert all(npz[k].dtype == np.float32 and np.array_equal(npz[k], ref[k].numpy()) for k in ref)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_conversion_rounds_like_torch(tmp_path, dtype):
    torch = pytest.importorskip("torch")
    import mla_torch

    ref = _state(mla_torch.build(TINY, seed=2))
    target = getattr(torch, dtype)
    rounded = {k: v.to(target) for k, v in ref.items()}
    assert any(not torch.equal(rounded[k].float(), ref[k]) for k in ref)  # the rounding is not a no-op
    src = tmp_path / "src"
    checkpoint.save(src, TINY, {k: v.numpy() for k, v in ref.items()})

    convert(src, tmp_path / "w.pt", dtype=dtype)
    pt = torch.load(tmp_path / "w.pt", weights_only=True)
    assert all(pt[k].dtype == target and torch.equal(pt[k], rounded[k]) for k in ref)

    report = convert(src, tmp_path / "w.npz", dtype=dtype)
    assert ("stored as float32" in report) == (dtype == "bfloat16")
    with np.load(tmp_path / "w.npz") as npz:
        for k in ref:
            assert npz[k].dtype == (np.float32 if dtype == "bfloat16" else np.float16)
            assert np.array_equal(npz[k].astype(np.float32), rounded[k].float().numpy())

    convert(src, tmp_path / "ckpt", dtype=dtype)
    _, weights, meta = checkpoint.load(tmp_path / "ckpt")
    assert meta["weight_dtypes"] == [dtype]
    assert all(np.array_equal(weights[k].astype(np.float32), rounded[k].float().numpy()) for k in ref)

    # Without --dtype the source's dtype is kept.
    convert(tmp_path / "ckpt", tmp_path / "kept.pt")
    kept = torch.load(tmp_path / "kept.pt", weights_only=True)
    assert all(kept[k].dtype == target and torch.equal(kept[k], rounded[k]) for k in ref)


# ---- 2. the original implementation's state dicts ----------------------------------------------------------
_SELF = {
    "q_a_proj": "q_a_proj",
    "q_a_layernorm": "q_a_norm",
    "q_b_proj": "q_b_proj",
    "kv_a_proj_with_rope": "kv_a_proj",
    "kv_a_layernorm": "kv_a_norm",
    "kv_b_proj": "kv_b_proj",
    "out_proj": "o_proj",
}
_CROSS = {
    "q_proj": "q_proj",
    "kv_a_proj": "kv_a_proj",
    "kv_a_layernorm": "kv_a_norm",
    "kv_b_proj": "kv_b_proj",
    "out_proj": "o_proj",
}


def _original_state(ours: dict, cfg: ModelConfig, conv: bool) -> dict:
    """Our weights under the original implementation's names, with its RoPE buffers."""
    import torch

    out = {}

    def copy(theirs, mine):
        for leaf in ("weight", "bias"):
            if f"{mine}.{leaf}" in ours:
                out[f"{theirs}.{leaf}"] = ours[f"{mine}.{leaf}"]

    def attention(theirs, mine, table, rope):
        for t, m in table.items():
            copy(f"{theirs}.mla_attention.{t}", f"{mine}.{m}")
        if rope:
            r = cfg.rope_dim
            out[f"{theirs}.mla_attention.rope.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, r, 2).float() / r))

    p = cfg.patch
    w = ours["patch_embed.weight"]
    out["patch_embedding.patch_embedding.weight"] = w.reshape(cfg.d_model, 1, p, p) if conv else w
    out["patch_embedding.patch_embedding.bias"] = ours["patch_embed.bias"]
    out["patch_embedding.class_token"] = ours["cls_token"]
    for i in range(cfg.enc_layers):
        b = f"encoder_blocks.{i}"
        attention(f"{b}.attention", f"encoder.{i}.attn", _SELF, rope=True)
        for n in ("norm1", "norm2"):
            copy(f"{b}.{n}", f"encoder.{i}.{n}")
        copy(f"{b}.mlp.mlp_up", f"encoder.{i}.mlp.fc1")
        copy(f"{b}.mlp.mlp_down", f"encoder.{i}.mlp.fc2")
    out["decoder_embedding.token_embedding.weight"] = ours["token_embed.weight"]
    for i in range(cfg.dec_layers):
        b = f"decoder_blocks.{i}"
        attention(f"{b}.self_attention", f"decoder.{i}.self_attn", _SELF, rope=True)
        attention(f"{b}.cross_attention", f"decoder.{i}.cross_attn", _CROSS, rope=False)
        for n in ("norm1", "norm2", "norm3"):
            copy(f"{b}.{n}", f"decoder.{i}.{n}")
        copy(f"{b}.mlp.mlp_up", f"decoder.{i}.mlp.fc1")
        copy(f"{b}.mlp.mlp_down", f"decoder.{i}.mlp.fc2")
    copy("output_projection.projection", "head")
    return out


def test_original_patch_layout_matches_ours():
    """Why no weight changes: the original's unfold patches and Conv2d over normalised [B,1,H,W] images equal our
    patchify + Linear (ours normalises inside the model)."""
    torch = pytest.importorskip("torch")
    import mla_torch
    from convert.config import MNIST_MEAN, MNIST_STD
    from mla_torch.model import patchify

    cfg, p = ORIGINAL_CFG, ORIGINAL_CFG.patch
    model = mla_torch.build(cfg, seed=3).eval()
    images = torch.rand(2, cfg.image_size, cfg.image_size)
    normalised = ((images - MNIST_MEAN) / MNIST_STD)[:, None]
    unfolded = normalised.unfold(2, p, p).unfold(3, p, p).reshape(2, cfg.num_patches, p * p)
    assert torch.equal(unfolded, patchify(normalised[:, 0], p))
    w, b = model.patch_embed.weight, model.patch_embed.bias
    conv = torch.nn.functional.conv2d(normalised, w.reshape(cfg.d_model, 1, p, p), b, stride=p)
    with torch.no_grad():
        ours = model.patch_embed(patchify((images - MNIST_MEAN) / MNIST_STD, p))
        assert torch.allclose(conv.flatten(2).transpose(1, 2), ours, atol=1e-5)


@pytest.mark.parametrize("conv", [False, True], ids=["linear-patch", "conv2d-patch"])
def test_original_state_dict_converts_to_an_equal_model(tmp_path, conv):
    torch = pytest.importorskip("torch")
    import mla_torch

    cfg = ORIGINAL_CFG
    model = mla_torch.build(cfg, seed=4).eval()
    ours = _state(model)
    theirs = _original_state(ours, cfg, conv)
    assert sum(k.endswith("rope.inv_freq") for k in theirs) == cfg.enc_layers + cfg.dec_layers
    torch.save({"epoch": 7, "model_state_dict": theirs}, tmp_path / "original.pt")

    out = tmp_path / "ckpt"
    assert main(["convert", str(tmp_path / "original.pt"), str(out), "--grid", str(cfg.grid)]) == 0
    loaded_cfg, _ = checkpoint.read_config(out)
    assert loaded_cfg == cfg  # every dimension inferred; final_norm off, dropout 0.1, grid from --grid
    converted = mla_torch.load(out)
    assert all(torch.equal(converted.state_dict()[k], ours[k]) for k in ours)
    images = torch.rand(3, cfg.image_size, cfg.image_size)
    tokens = torch.randint(0, 13, (3, cfg.max_tokens))
    with torch.no_grad():
        assert torch.allclose(converted(images, tokens), model(images, tokens), rtol=0, atol=1e-6)

    # Without --grid the original's 10x10 grid is assumed.
    assert original.infer_config({k: v.numpy() for k, v in theirs.items()}).grid == 10


def test_inconsistent_original_state_dict_is_refused(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    import mla_torch

    theirs = _original_state(_state(mla_torch.build(ORIGINAL_CFG)), ORIGINAL_CFG, conv=False)
    bad = "encoder_blocks.1.attention.mla_attention.q_a_proj.weight"  # layer 0 sets the config
    theirs[bad] = torch.zeros(5, ORIGINAL_CFG.d_model)
    torch.save(theirs, tmp_path / "original.pt")
    err = _one_line_error(capsys, ["convert", str(tmp_path / "original.pt"), str(tmp_path / "out"), "--grid", "2"])
    assert "encoder.1.attn.q_a_proj.weight (5, 32) != (24, 32)" in err
    assert not (tmp_path / "out").exists()


# ---- 3. schema errors ----------------------------------------------------------------------------------------
def test_all_schema_problems_reported_at_once(tmp_path, capsys):
    torch = pytest.importorskip("torch")

    state = {k: torch.from_numpy(v) for k, v in _random_weights(TINY).items()}
    del state["encoder.1.mlp.fc2.bias"]
    state["encoder.0.attn.rope_freqs"] = torch.zeros(2)
    state["head.weight"] = torch.zeros(13, 31)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(UserError) as e:
        convert(tmp_path / "bad.pt", tmp_path / "out", config=TINY)
    for part in (
        "missing 1: encoder.1.mlp.fc2.bias",
        "unexpected 1: encoder.0.attn.rope_freqs",
        "head.weight (13, 31) != (13, 32)",
    ):
        assert part in str(e.value)
    for dst in ("out", "out.npz", "out.pt"):
        err = _one_line_error(capsys, ["convert", str(tmp_path / "bad.pt"), str(tmp_path / dst), "--preset", "tiny"])
        assert "encoder.1.mlp.fc2.bias" in err and "rope_freqs" in err and "head.weight" in err
        assert not (tmp_path / dst).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]  # no temporary left behind either


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    weights = _random_weights(TINY)
    weights["head.bias"][3] = np.nan
    np.savez(tmp_path / "nan.npz", **weights)
    assert "NaN" in _one_line_error(
        capsys, ["convert", str(tmp_path / "nan.npz"), str(tmp_path / "o"), "--preset", "tiny"]
    )
    (tmp_path / "w.bin").write_bytes(b"\0" * 16)
    err = _one_line_error(capsys, ["convert", str(tmp_path / "w.bin"), str(tmp_path / "o")])
    assert ".pt" in err and ".npz" in err and ".safetensors" in err and "checkpoint directory" in err
    np.savez(tmp_path / "noconf.npz", **_random_weights(TINY))
    assert "--preset" in _one_line_error(capsys, ["convert", str(tmp_path / "noconf.npz"), str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    # A non-empty folder that is not a checkpoint is never replaced.
    keep = tmp_path / "docs"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    checkpoint.save(tmp_path / "ckpt", TINY, _random_weights(TINY))
    assert "not a checkpoint" in _one_line_error(capsys, ["convert", str(tmp_path / "ckpt"), str(keep), "--force"])
    assert (keep / "notes.txt").read_text() == "mine"
    with pytest.raises(UserError, match="checkpoint directory"):  # quantized weights need their config
        convert(tmp_path / "ckpt", tmp_path / "q.npz", quantize=4, group_size=64)


# ---- 4. code-running pickles ---------------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_malicious_pickle_is_refused_without_running(tmp_path, capsys):
    torch = pytest.importorskip("torch")

    marker = tmp_path / "pwned"
    torch.save({"head.weight": _Payload(marker)}, tmp_path / "evil.pt")
    err = _one_line_error(capsys, ["convert", str(tmp_path / "evil.pt"), str(tmp_path / "out"), "--preset", "tiny"])
    assert "refused to load" in err and "system" in err
    assert not marker.exists() and not (tmp_path / "out").exists()

    # The payload is live: a plain unpickle would have run it.
    live = tmp_path / "live"
    torch.save({"w": _Payload(live)}, tmp_path / "live.pt")
    torch.load(tmp_path / "live.pt", weights_only=False)
    assert live.exists()


# ---- 5. MLX weight files -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["npz", "safetensors", "npz-bf16"])
def test_mlx_weight_files_convert_for_torch(tmp_path, fmt):
    pytest.importorskip("torch")
    mx = pytest.importorskip("mlx.core")
    from mlx.utils import tree_flatten

    import mla_mlx
    import mla_torch

    model = mla_mlx.build(TINY, seed=5)
    if fmt == "npz-bf16":
        model.set_dtype(mx.bfloat16)
    params = dict(tree_flatten(model.parameters()))
    src = tmp_path / "mlx"
    src.mkdir()
    if fmt == "safetensors":  # config from the flags
        mx.save_safetensors(str(src / "weights.safetensors"), params)
        argv = [str(src / "weights.safetensors"), str(tmp_path / "ckpt"), "--preset", "tiny"]
    else:  # config from a config.json beside the weights
        mx.savez(str(src / "weights.npz"), **params)
        (src / "config.json").write_text(json.dumps(TINY.to_dict()))
        argv = [str(src / "weights.npz"), str(tmp_path / "ckpt")]
    assert main(["convert", *argv]) == 0
    loaded = mla_torch.load(tmp_path / "ckpt")
    assert loaded.config == TINY
    state = loaded.state_dict()
    assert state.keys() == params.keys()
    assert all(np.array_equal(state[k].numpy(), np.array(v.astype(mx.float32))) for k, v in params.items())
    _, _, meta = checkpoint.load(tmp_path / "ckpt")
    assert meta["weight_dtypes"] == (["bfloat16"] if fmt == "npz-bf16" else ["float32"])


# ---- 6. no torch needed --------------------------------------------------------------------------------------
def test_convert_runs_without_torch(tmp_path):
    weights = _random_weights(TINY, seed=6)
    checkpoint.save(tmp_path / "ckpt", TINY, weights)
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "from mla_mnist.cli import main\n"
        f"assert main(['convert', {str(tmp_path / 'ckpt')!r}, {str(tmp_path / 'w.npz')!r}]) == 0\n"
        f"assert main(['convert', {str(tmp_path / 'ckpt')!r}, {str(tmp_path / 'w.pt')!r}]) == 2\n"
        "assert sys.modules['torch'] is None\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "writing .pt needs torch: pip install 'mla-mnist[torch]'" in run.stderr
    assert "wrote" in run.stdout
    with np.load(tmp_path / "w.npz") as npz:
        assert all(np.array_equal(npz[k], weights[k]) for k in weights)
    assert not (tmp_path / "w.pt").exists()
