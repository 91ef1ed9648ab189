"""The PyTorch model against its spec: causality, RoPE, parameter counts, checkpoints, learning."""

import numpy as np
import pytest
import torch

import mla_torch
from convert import checkpoint
from convert.config import ModelConfig
from convert.errors import UserError
from convert.schema import parameter_count, schema
from convert.training import TrainConfig
from mla_torch.attention import rope
from mla_torch.train import Trainer, loss_fn
from mnist_grid import GridStream


def tiny(**kw):
    return ModelConfig.preset("tiny", **kw)


@pytest.mark.parametrize("preset", ["tiny", "small", "seed"])
@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_state_dict_matches_schema(preset, attention):
    cfg = ModelConfig.preset(preset, attention=attention)
    model = mla_torch.build(cfg)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == schema(cfg)
    assert sum(p.numel() for p in model.parameters()) == parameter_count(cfg)


def test_seed_preset_has_the_original_parameter_count():
    assert parameter_count(ModelConfig.preset("seed")) == 6_733_133
    assert sum(p.numel() for p in mla_torch.build(ModelConfig.preset("seed")).parameters()) == 6_733_133


def test_seed_derived_ranks_follow_the_original_rules():
    c = ModelConfig.preset("seed")
    assert (c.head_dim, c.rope_dim, c.enc_kv_rank, c.enc_q_rank, c.dec_kv_rank, c.dec_q_rank, c.cross_kv_rank) == (
        8,
        4,
        64,
        96,
        42,
        64,
        32,
    )
    assert c.image_size == 280 and c.enc_tokens == 401 and c.max_tokens == 102


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_future_tokens_never_change_earlier_logits(attention):
    model = mla_torch.build(tiny(attention=attention)).eval()
    images = torch.rand(2, 56, 56)
    tokens = torch.randint(0, 13, (2, 6))
    base = model(images, tokens)
    changed = tokens.clone()
    changed[:, 4:] = (changed[:, 4:] + 5) % 13
    after = model(images, changed)
    torch.testing.assert_close(after[:, :4], base[:, :4], rtol=0, atol=1e-6)
    assert (after[:, 4:] - base[:, 4:]).abs().max() > 1e-3  # and later ones do see them


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    s = [float((rope(q, m, 10000.0) * rope(k, n, 10000.0)).sum()) for m, n in [(3, 1), (10, 8), (52, 50)]]
    assert s[0] == pytest.approx(s[1], abs=1e-5) and s[0] == pytest.approx(s[2], abs=1e-4)
    assert float((rope(q, 5, 10000.0) * rope(k, 1, 10000.0)).sum()) != pytest.approx(s[0], abs=1e-3)
    # interleaved pairs: position 1 rotates (x0, x1) by angle 1 rad at the first frequency
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(
        rope(x, 1, 10000.0), torch.tensor([[np.cos(1.0), np.sin(1.0), 0.0, 0.0]], dtype=torch.float32)
    )


def test_encoder_is_permutation_sensitive_through_rope():
    # no absolute position embedding: only RoPE tells patches apart, so swapping two patches changes output
    model = mla_torch.build(tiny()).eval()
    img = torch.rand(1, 56, 56)
    swapped = img.clone()
    swapped[:, :14, :14], swapped[:, :14, 14:28] = img[:, :14, 14:28], img[:, :14, :14]
    a, b = model.encode(img), model.encode(swapped)
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-4


def test_model_normalises_its_own_input():
    model = mla_torch.build(tiny()).eval()
    blank = torch.zeros(1, 56, 56)
    x = model.patch_embed.weight.new_full((1, 16, 196), -0.1307 / 0.3081)
    expected = model.patch_embed(x)
    from mla_torch.model import patchify

    torch.testing.assert_close(model.patch_embed(patchify((blank - 0.1307) / 0.3081, 14)), expected)


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    model = mla_torch.build(tiny(), seed=3)
    mla_torch.save(model, tmp_path / "ck", preset="tiny")
    back = mla_torch.load(tmp_path / "ck")
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    cfg, _ = checkpoint.read_config(tmp_path / "ck")
    assert cfg == model.config


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoint_round_trip(tmp_path, dtype):
    model = mla_torch.build(tiny(), seed=4)
    mla_torch.save(model, tmp_path / "ck", dtype=dtype)
    back = mla_torch.load(tmp_path / "ck", dtype=getattr(torch, dtype))
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v.to(getattr(torch, dtype)))


def test_one_fixed_batch_overfits():
    torch.manual_seed(0)
    cfg = tiny()
    model = mla_torch.build(cfg)
    x, y = GridStream("train", cfg.grid, seed=1).batch(0, 0, 16)
    trainer = Trainer(model, TrainConfig(lr=3e-3, warmup_steps=10, total_steps=300, weight_decay=0.0))
    for _ in range(300):
        loss, _ = trainer.step(x, y)
    model.eval()
    with torch.no_grad():
        final = float(loss_fn(model, torch.from_numpy(x), torch.from_numpy(y)))
    assert final < 0.05


def test_generate_batched_pads_after_finish(tiny_checkpoint):
    from mnist_grid import FINISH, PAD, START

    model = mla_torch.load(tiny_checkpoint)
    x, _ = GridStream("test", 2, 0).fixed(64, seed=5)
    out = mla_torch.generate(model, torch.from_numpy(x))
    assert (out[:, 0] == START).all()
    for row in out.tolist():
        if FINISH in row:
            assert all(t == PAD for t in row[row.index(FINISH) + 1 :])


def test_config_json_round_trip_and_errors():
    cfg = ModelConfig.preset("small")
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(UserError, match="unknown preset"):
        ModelConfig.preset("huge")
    with pytest.raises(UserError, match="unknown config field"):
        ModelConfig.from_dict({"grid": 2, "colour": 1})
    with pytest.raises(UserError, match="grid"):
        ModelConfig.preset("tiny", grid=0)


@pytest.mark.parametrize("attention", ["mla", "mha", "gqa"])
def test_fused_attention_gets_aligned_inputs(attention, monkeypatch):
    """cuDNN's fused attention (SDPA's pick for bfloat16 on Hopper) silently misreads a q/k/v view that starts or
    steps off a 16-byte boundary; MLA's v is such a view (sliced at nope_dim). Every tensor SDPA sees, in
    training and in decoding, in bfloat16 with the seed model's head shapes (head_dim 8, rope 4), is aligned;
    and the result is unchanged."""
    import mla_torch.attention as A

    seen = []
    real = A.F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.extend((q, k, v))
        return real(q, k, v, **kw)

    monkeypatch.setattr(A.F, "scaled_dot_product_attention", spy)
    cfg = ModelConfig.preset("tiny").replace(attention=attention, kv_heads=2 if attention == "gqa" else None)
    assert (cfg.head_dim, cfg.rope_dim) == (8, 4)
    torch.manual_seed(0)
    model = mla_torch.build(cfg).to(torch.bfloat16)
    x = torch.rand(2, cfg.image_size, cfg.image_size).to(torch.bfloat16)
    tokens = torch.tensor([[10, 1, 2, 3, 11], [10, 4, 11, 12, 12]])
    logits = model(x, tokens)
    mla_torch.generate(model, x, mode="expanded")
    assert seen
    for t in seen:
        size = t.element_size()
        assert (t.storage_offset() * size) % 16 == 0 and t.stride(-1) == 1
        assert all(st * size % 16 == 0 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)
    monkeypatch.setattr(A.F, "scaled_dot_product_attention", real)
    monkeypatch.setattr(A, "_aligned", lambda t: t)  # the same math on the unaligned views
    torch.testing.assert_close(model(x, tokens), logits, rtol=0, atol=0)
