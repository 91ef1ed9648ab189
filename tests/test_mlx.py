"""The MLX package on its own: names, caches, decoding paths, the compiled trainer, checkpoints."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from mlx.utils import tree_flatten  # noqa: E402

import mla_mlx  # noqa: E402
from convert import ModelConfig, parameter_count, schema  # noqa: E402
from convert.training import TrainConfig  # noqa: E402
from mla_mlx import checkpoint as ckpt  # noqa: E402
from mla_mlx import train as mtrain  # noqa: E402
from mla_mlx.attention import absorb  # noqa: E402
from mla_mlx.generate import generate, step_logits  # noqa: E402
from mnist_grid.tokens import FINISH, PAD, START  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _images(cfg, b, seed=0):
    return np.random.default_rng(seed).random((b, cfg.image_size, cfg.image_size), dtype=np.float32)


def _tokens(cfg, b, seed=0):
    """Valid targets: <start> k digits <finish> <pad>..., k from 1 to grid^2."""
    rng = np.random.default_rng(seed)
    out = np.full((b, cfg.max_tokens), PAD, dtype=np.int64)
    out[:, 0] = START
    for row in range(b):
        k = int(rng.integers(1, cfg.grid * cfg.grid + 1))
        out[row, 1 : k + 1] = rng.integers(0, 10, k)
        out[row, k + 1] = FINISH
    return out


def _np(a):
    return np.array(a.astype(mx.float32) if a.dtype in (mx.bfloat16, mx.float16) else a)


def test_import_does_not_load_torch():
    code = "import mla_mlx, sys; assert 'torch' not in sys.modules, 'mla_mlx imported torch'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.parametrize("attention", ["mla", "mha"])
@pytest.mark.parametrize("preset", ["tiny", "small", "seed"])
def test_parameter_names_and_shapes_match_schema(preset, attention):
    cfg = ModelConfig.preset(preset, attention=attention)
    model = ckpt.build(cfg)  # lazy: nothing is computed to read names and shapes
    got = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    assert got == schema(cfg)
    assert list(got) == list(schema(cfg))  # module order too
    # Buffers and caches are private: only the schema's arrays are parameters, also after decoding.
    if preset == "tiny":
        generate(model, _images(cfg, 1), max_length=3)
    assert {k for k, _ in tree_flatten(model.parameters())} == set(schema(cfg))


def test_seed_parameter_count():
    cfg = ModelConfig.preset("seed")
    assert parameter_count(cfg) == 6_733_133
    assert sum(v.size for _, v in tree_flatten(ckpt.build(cfg).parameters())) == 6_733_133


def test_init_statistics():
    """token_embed and cls_token start as N(0, 0.02) like torch's, not MLX's default Embedding init."""
    model = ckpt.build(ModelConfig.preset("small"))
    for w in (model.token_embed.weight, model.cls_token):
        assert abs(float(w.std()) - 0.02) < 0.004
    assert float(model.head.weight.abs().max()) <= 128**-0.5  # Linear: U(-1/sqrt(in), 1/sqrt(in))


@pytest.mark.parametrize("attention", ["mla", "mha", "gqa"])
def test_cached_decoding_matches_full_rerun(attention):
    cfg = ModelConfig.preset("tiny", attention=attention)
    model = ckpt.build(cfg, seed=1)
    images, tokens = _images(cfg, 3), _tokens(cfg, 3)
    full = _np(model(mx.array(images), mx.array(tokens)))
    logits = {mode: _np(step_logits(model, images, tokens, mode)) for mode in model.decode_modes}
    assert np.abs(logits["uncached"] - full).max() <= 1e-5
    for mode in model.decode_modes:
        assert np.abs(logits[mode] - logits["uncached"]).max() <= 1e-5
    assert ("absorbed" in model.decode_modes) == (attention == "mla")
    greedy = [np.array(generate(model, images, mode=mode, stop=False)) for mode in reversed(model.decode_modes)]
    for g in greedy[1:]:
        np.testing.assert_array_equal(g, greedy[0])
    assert (greedy[0][:, 0] == START).all()


def test_generate_structure_and_sampling():
    cfg = ModelConfig.preset("tiny")
    model = ckpt.build(cfg, seed=2)
    images = _images(cfg, 8)
    a = np.array(generate(model, images, temperature=1.0, top_k=5, seed=7, stop=False))
    b = np.array(generate(model, images, temperature=1.0, top_k=5, seed=7, stop=False))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (8, cfg.max_tokens) and (a[:, 0] == START).all()
    for row in a:  # after <finish> only <pad>
        hit = np.flatnonzero(row == FINISH)
        if hit.size:
            assert (row[hit[0] + 1 :] == PAD).all()
    with pytest.raises(ValueError):
        generate(model, images, max_length=1)
    with pytest.raises(ValueError):
        generate(model, images, temperature=-1)
    assert model.training  # restored


@pytest.mark.parametrize("attention", ["mla", "mha", "gqa"])
def test_cache_nbytes(attention):
    cfg = ModelConfig.preset("tiny", attention=attention)
    model = ckpt.build(cfg).eval()
    b, length = 3, cfg.max_tokens
    _, dc = generate(model, _images(cfg, b), stop=False, return_cache=True)
    kv_heads = {"mla": None, "mha": cfg.heads, "gqa": cfg.kv_heads}[attention]
    per_token = cfg.dec_kv_rank + cfg.rope_dim if attention == "mla" else 2 * kv_heads * cfg.head_dim
    assert dc.self_nbytes == b * length * cfg.dec_layers * per_token * 4
    assert dc.offset == length - 1
    n = cfg.enc_tokens
    cross = n * cfg.cross_kv_rank if attention == "mla" else 2 * n * kv_heads * cfg.head_dim  # MLA: latent c only
    assert dc.cross_nbytes == b * cfg.dec_layers * cross * 4
    assert dc.nbytes == dc.self_nbytes + dc.cross_nbytes


def test_absorbed_weights_are_derived_from_the_weights_of_the_moment():
    cfg = ModelConfig.preset("tiny")
    model = ckpt.build(cfg)
    attn = model.decoder[0].self_attn
    folded = absorb(attn, attn.q_b_proj, attn.nope_dim)
    h, r = cfg.heads, cfg.dec_kv_rank
    w_q, w_o = folded.w_q, folded.w_o
    assert w_q.shape == (cfg.dec_q_rank, h * (r + cfg.rope_dim)) and w_o.shape == (h * r, cfg.d_model)  # input-major
    attn.kv_b_proj.weight = attn.kv_b_proj.weight * 2  # a new cache folds the new weights
    again = model.new_cache(1, 2, [], absorbed=True).layers[0].absorbed
    q_lat = np.array(w_q).T.reshape(h, r + cfg.rope_dim, -1)
    q_lat2 = np.array(again.w_q).T.reshape(h, r + cfg.rope_dim, -1)
    assert np.allclose(q_lat2[:, :r], 2 * q_lat[:, :r]) and np.allclose(q_lat2[:, r:], q_lat[:, r:])
    assert np.allclose(np.array(again.w_o), 2 * np.array(w_o))
    assert "absorbed" not in str(model.parameters().keys())  # derived state never joins the parameters


def test_compiled_train_step_reduces_loss(monkeypatch):
    cfg = ModelConfig.preset("tiny")
    model = ckpt.build(cfg)
    traces = []
    real_loss = mtrain.loss_fn
    monkeypatch.setattr(mtrain, "loss_fn", lambda *a, **k: traces.append(1) or real_loss(*a, **k))
    tc = TrainConfig(lr=3e-3, warmup_steps=5, total_steps=40)
    trainer = mtrain.Trainer(model, tc)
    images, tokens = _images(cfg, 16, seed=3), _tokens(cfg, 16, seed=3)
    first = trainer.eval_loss(images, tokens)
    for _ in range(40):
        loss, norm = trainer.step(images, tokens)
        assert isinstance(loss, mx.array) and loss.shape == () and norm.shape == ()
    mx.eval(loss)
    # One call from the first eval_loss, one trace of the compiled step: the learning rate changed every
    # step without a recompile.
    assert len(traces) == 2
    assert float(trainer.opt.learning_rate) == pytest.approx(tc.lr_at(39))
    last = trainer.eval_loss(images, tokens)
    assert last < 0.5 * first, (first, last)


def test_trainer_state_resumes_exactly():
    """Interrupted and resumed (moments, step, dropout RNG through the numpy state) == uninterrupted."""
    cfg = ModelConfig.preset("tiny", dropout=0.2)
    tc = TrainConfig(lr=1e-3, warmup_steps=2, total_steps=6)
    batches = [(_images(cfg, 4, seed=s), _tokens(cfg, 4, seed=s)) for s in range(6)]
    init = ckpt.to_numpy(ckpt.build(cfg))

    a = mtrain.Trainer(ckpt.from_numpy(ckpt.build(cfg), init), tc)
    mx.random.seed(123)  # the dropout stream
    for x, y in batches:
        a.step(x, y)
    want = ckpt.to_numpy(a.model)

    b = mtrain.Trainer(ckpt.from_numpy(ckpt.build(cfg), init), tc)
    mx.random.seed(123)
    assert set(b.state()) == {"step", "rng.mlx"}  # no moments before the first step, like torch
    for x, y in batches[:3]:
        b.step(x, y)
    state, weights = b.state(), ckpt.to_numpy(b.model)
    assert state["rng.mlx"].dtype == np.uint32 and int(state["step"]) == 3
    assert {k[2:] for k in state if k.startswith("m.")} == set(schema(cfg))
    mx.random.seed(999)  # clobbered: load_state must restore it
    c = mtrain.Trainer(ckpt.from_numpy(ckpt.build(cfg), weights), tc)
    c.load_state({**state, "rng.torch": np.zeros(8, np.uint8)})  # foreign keys are ignored
    for x, y in batches[3:]:
        c.step(x, y)
    got = ckpt.to_numpy(c.model)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    cfg = ModelConfig.preset("tiny", attention="mha")
    model = ckpt.build(cfg, seed=4)
    mla_mlx.save(model, tmp_path / "ck", preset="tiny")
    loaded = mla_mlx.load(tmp_path / "ck")
    assert loaded.config == cfg and not loaded.training
    a, b = ckpt.to_numpy(model), ckpt.to_numpy(loaded)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    half = mla_mlx.load(tmp_path / "ck", dtype=mx.bfloat16)
    assert {v.dtype for _, v in tree_flatten(half.parameters())} == {mx.bfloat16}
    from convert.errors import UserError

    bad = dict(a)
    bad.pop("head.bias")
    with pytest.raises(UserError, match="head.bias"):
        ckpt.from_numpy(ckpt.build(cfg), bad)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("offset,t", [(0, 17), (5, 1), (40, 3)])
def test_plain_rope_equals_the_fused_kernel(offset, t, dtype):
    """The plain-ops RoPE the CUDA backend uses computes what mx.fast.rope does (interleaved pairs); in bf16
    (the training step) as a matmul per position, whose gradient is the inverse rotation's."""
    from mla_mlx.attention import rope_plain

    dt = getattr(mx, dtype)
    x = mx.random.normal((2, 3, t, 8)).astype(dt)
    fused = mx.fast.rope(x.astype(mx.float32), 8, traditional=True, base=10000.0, scale=1.0, offset=offset)
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == "float32" else dict(atol=3e-2, rtol=2e-2)
    plain = rope_plain(x, offset, 10000.0)
    assert plain.dtype == dt and plain.shape == x.shape
    np.testing.assert_allclose(np.array(plain.astype(mx.float32)), np.array(fused), **tol)
    g = mx.random.normal(x.shape).astype(dt)
    grad = mx.vjp(lambda v: rope_plain(v, offset, 10000.0), [x], [g])[1][0]
    inverse = mx.vjp(
        lambda v: mx.fast.rope(v, 8, traditional=True, base=10000.0, scale=1.0, offset=offset),
        [x.astype(mx.float32)],
        [g.astype(mx.float32)],
    )[1][0]
    np.testing.assert_allclose(np.array(grad.astype(mx.float32)), np.array(inverse), **tol)


@pytest.mark.parametrize("preset, expected", [(None, "0"), ("1", "1")])
def test_float32_stays_float32_unless_asked(preset, expected):
    """MLX's CUDA backend would run float32 matmuls as TF32; importing mla_mlx keeps them float32 (a value the
    user set wins)."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "MLX_ENABLE_TF32"}
    if preset is not None:
        env["MLX_ENABLE_TF32"] = preset
    code = "import os, mla_mlx; print(os.environ['MLX_ENABLE_TF32'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_plain_rope_table_made_inside_a_compiled_function_is_a_constant():
    """The CUDA backend's training step is compiled: the RoPE table first asked for inside it must stay usable
    after the trace (a traced array kept in the cache would not be)."""
    from mla_mlx import attention

    attention._ROPE_TABLES.clear()
    x = mx.random.normal((2, 1, 1, 8))
    compiled = mx.compile(lambda x: attention.rope_plain(x, 7, 10000.0))
    inside = np.array(compiled(x))
    outside = np.array(attention.rope_plain(x, 7, 10000.0))  # reads the table the trace made
    fused = np.array(mx.fast.rope(x, 8, traditional=True, base=10000.0, scale=1.0, offset=7))
    np.testing.assert_allclose(inside, fused, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(outside, fused, atol=2e-5, rtol=1e-5)


# ---- the training step's forms that the CUDA backend builds fewer kernels for: the same function
def test_gelu_derivative_written_out_is_nn_gelus():
    import mlx.nn as nn

    from mla_mlx.model import gelu

    x = mx.random.normal((4096,), key=mx.random.key(1)) * 4
    g = mx.random.normal((4096,), key=mx.random.key(2))
    assert mx.array_equal(gelu(x), nn.gelu(x))  # the forward is nn.gelu itself
    ours = mx.vjp(gelu, [x], [g])[1][0]
    theirs = mx.vjp(nn.gelu, [x], [g])[1][0]
    np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=1e-5, atol=1e-6)
    compiled = mx.compile(mx.grad(lambda v: (gelu(v) * g).sum()))
    np.testing.assert_allclose(np.array(compiled(x)), np.array(theirs), rtol=1e-5, atol=1e-6)
    # bf16 in, bf16 out, computed in float32: nearer the float32 derivative than autodiff in bf16 gets
    xb, gb = x.astype(mx.bfloat16), g.astype(mx.bfloat16)
    exact = np.array(mx.vjp(nn.gelu, [xb.astype(mx.float32)], [gb.astype(mx.float32)])[1][0])
    ours_b = mx.vjp(gelu, [xb], [gb])[1][0]
    assert ours_b.dtype == mx.bfloat16
    err = np.abs(np.array(ours_b.astype(mx.float32)) - exact).max()
    assert err <= np.abs(np.array(mx.vjp(nn.gelu, [xb], [gb])[1][0].astype(mx.float32)) - exact).max()


def test_training_embeds_tokens_as_a_one_hot_product_with_the_lookups_values_and_gradient():
    cfg = ModelConfig.preset("tiny")
    model = ckpt.build(cfg)
    tokens = mx.array(_tokens(cfg, 8, seed=4))
    model.eval()
    looked_up = model.embed_tokens(tokens)
    model.train()
    assert mx.array_equal(model.embed_tokens(tokens), looked_up)
    cot = mx.random.normal(looked_up.shape, key=mx.random.key(3))

    def grad(training):
        model.train(training)

        def total(w):
            model.update({"token_embed": {"weight": w}})
            return (model.embed_tokens(tokens) * cot).sum()

        return mx.grad(total)(model.token_embed.weight)

    np.testing.assert_allclose(np.array(grad(True)), np.array(grad(False)), rtol=1e-5, atol=1e-6)


def test_clip_grad_norm_is_mlx_optimizers():
    import mlx.optimizers as optim

    grads = {"a": mx.random.normal((30, 7), key=mx.random.key(5)), "b": [mx.random.normal((3,), key=mx.random.key(6))]}
    for max_norm in (0.5, 1e3):
        ours, norm = mtrain.clip_grad_norm(grads, max_norm)
        theirs, norm2 = optim.clip_grad_norm(grads, max_norm)
        assert float(norm) == pytest.approx(float(norm2), rel=1e-6)
        for (_, a), (_, b) in zip(tree_flatten(ours), tree_flatten(theirs)):
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-6, atol=1e-7)


def test_loss_with_the_mask_made_outside_is_the_loss():
    cfg = ModelConfig.preset("tiny")
    model = ckpt.build(cfg)
    images, tokens = mx.array(_images(cfg, 6, seed=7)), mx.array(_tokens(cfg, 6, seed=7))
    assert int((tokens == PAD).sum()) > 0  # the case the mask is for
    inside = mtrain.loss_fn(model, images, tokens)
    outside = mtrain.loss_fn(model, images, tokens, mask=mtrain.target_mask(tokens))
    logits = model(images, tokens[:, :-1]).astype(mx.float32)
    keep = np.array(tokens[:, 1:] != PAD)
    logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    picked = np.take_along_axis(logp, np.array(tokens[:, 1:])[..., None], -1)[..., 0]
    assert float(inside) == float(outside) == pytest.approx(-picked[keep].mean(), rel=1e-5)
