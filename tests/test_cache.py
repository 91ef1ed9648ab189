"""The latent cache in both frameworks: same tokens and logits as the full re-run, its size, the absorbed
weights derived once, and sampling."""

import importlib.util

import numpy as np
import pytest

from convert import ModelConfig
from mla_mnist.backends import get_backend
from mnist_grid import FINISH, PAD, START, GridStream

FRAMEWORKS = [
    pytest.param(fw, marks=pytest.mark.skipif(importlib.util.find_spec(fw) is None, reason=f"{fw} not installed"))
    for fw in ("torch", "mlx")
]
GRIDS = 512


def _fw_module(backend, name):
    from importlib import import_module

    return import_module(f"mla_{backend.name}.{name}")


@pytest.fixture(scope="module")
def grids():
    return GridStream("test", 2, 0).fixed(GRIDS, seed=3)


@pytest.fixture(scope="module", params=FRAMEWORKS)
def fw(request, tiny_checkpoint):
    """(backend, trained tiny model) for one framework."""
    backend = get_backend(request.param, "cpu")
    return backend, backend.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def greedy(grids):
    """Cached (absorbed) greedy read-outs of the test grids, per framework: computed once, compared often."""
    out = {}

    def get(backend, model):
        if backend.name not in out:
            out[backend.name] = backend.generate(model, grids[0])
        return out[backend.name]

    return get


def _step_logits(backend, model, images, tokens, **kw):
    step_logits = _fw_module(backend, "generate").step_logits
    return backend.numpy(step_logits(model, backend.array(images), backend.array(tokens), **kw))


# ---- 1. the cache changes nothing ------------------------------------------------------------------
def test_cached_and_uncached_greedy_tokens_identical(fw, grids, greedy):
    backend, model = fw
    images, targets = grids
    cached = greedy(backend, model)
    np.testing.assert_array_equal(backend.generate(model, images, mode="uncached"), cached)
    np.testing.assert_array_equal(backend.generate(model, images, mode="expanded"), cached)
    # A model that reads: the comparison is over real, varied read-outs, not constant rows.
    assert cached.shape == targets.shape and (cached[:, 0] == START).all()
    assert (cached == targets).all(axis=1).mean() > 0.15
    assert len({tuple(row) for row in cached}) >= 100


def test_step_logits_match_the_full_rerun(fw, grids):
    """Teacher-forced logits at every step, fp32: absorbed cache, expanded cache and full re-run."""
    backend, model = fw
    n = GRIDS if backend.name == "torch" else 128  # MLX's CPU backend is slow
    images, tokens = grids[0][:n], grids[1][:n]
    uncached = _step_logits(backend, model, images, tokens, mode="uncached")
    expanded = _step_logits(backend, model, images, tokens, mode="expanded")
    absorbed = _step_logits(backend, model, images, tokens, mode="absorbed")
    assert uncached.shape == (n, tokens.shape[1], 13)
    assert np.abs(expanded - uncached).max() <= 1e-5
    assert np.abs(absorbed - uncached).max() <= 1e-5
    assert np.abs(absorbed - expanded).max() <= 1e-5
    assert np.abs(uncached).max() > 1.0  # real logits, not a degenerate all-zero comparison


def test_mlx_and_torch_cached_generation_identical(tiny_checkpoint, grids, greedy):
    pytest.importorskip("torch")
    pytest.importorskip("mlx")
    tb, mb = get_backend("torch", "cpu"), get_backend("mlx", "cpu")
    t_tokens = greedy(tb, tb.load(tiny_checkpoint))
    m_tokens = greedy(mb, mb.load(tiny_checkpoint))
    np.testing.assert_array_equal(m_tokens, t_tokens)


# ---- 2. what the cache holds -----------------------------------------------------------------------
def _measured_cache(backend, cfg, batch, tokens):
    model = backend.build(cfg, seed=0)
    images = np.random.default_rng(0).random((batch, cfg.image_size, cfg.image_size), dtype=np.float32)
    generate = _fw_module(backend, "generate").generate
    out, dc = generate(model, backend.array(images), max_length=tokens, stop=False, return_cache=True)
    assert backend.numpy(out).shape == (batch, tokens)
    assert dc.offset == tokens - 1  # the last token is sampled, never fed back
    return dc


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_seed_cache_bytes_against_mha(framework):
    """The seed preset, batch 4, 50 tokens. MLX's CPU backend needs ~15 s per seed encoder pass, so there the
    image is a 2x2 grid (17 encoder tokens): every size that the cache holds per token is the seed's."""
    backend = get_backend(framework, "cpu")
    cfg = ModelConfig.preset("seed", **({} if framework == "torch" else {"grid": 2}))
    batch, tokens, fp32 = 4, 50, 4
    mla = _measured_cache(backend, cfg, batch, tokens)
    mha = _measured_cache(backend, cfg.replace(attention="mha"), batch, tokens)
    per_token = cfg.dec_kv_rank + cfg.rope_dim  # latent c and the shared rotary key: 42 + 4
    assert (cfg.dec_layers, per_token) == (16, 46)
    assert mla.self_nbytes == batch * tokens * cfg.dec_layers * per_token * fp32
    assert mha.self_nbytes == batch * tokens * cfg.dec_layers * 2 * cfg.d_model * fp32
    assert mla.self_nbytes * 5 <= mha.self_nbytes
    # Cross-attention: MLA holds the encoder latent c; MHA holds K and V over every encoder token.
    mha_kv = batch * cfg.enc_tokens * cfg.dec_layers * 2 * cfg.d_model * fp32
    assert cfg.enc_tokens == (401 if framework == "torch" else 17) and mha.cross_nbytes == mha_kv
    assert mla.cross_nbytes == batch * cfg.enc_tokens * cfg.dec_layers * cfg.cross_kv_rank * fp32
    assert mla.cross_nbytes * 8 <= mha_kv
    assert mla.nbytes == mla.self_nbytes + mla.cross_nbytes


# ---- 3. absorbed weights: derived once, when a decoding cache is made ----------------------------------
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_absorbed_weights_derived_once_per_cache_from_the_current_weights(framework, monkeypatch):
    from convert.training import TrainConfig

    backend = get_backend(framework, "cpu")
    cfg = ModelConfig.preset("tiny")
    model = backend.build(cfg, seed=0)
    images, tokens = GridStream("train", cfg.grid, 0).batch(0, 0, 8)
    attention = _fw_module(backend, "attention")
    original, calls = attention.absorb, []

    def recording(module, *args):
        calls.append(id(module))
        return original(module, *args)

    monkeypatch.setattr(attention, "absorb", recording)
    for _ in range(2):  # two generate calls of 5 decoding steps each
        backend.generate(model, images, max_length=6, stop=False)
    modules = 2 * cfg.dec_layers  # self- and cross-attention of every decoder layer
    assert len(calls) == 2 * modules and len(set(calls)) == modules  # per cache, never per step
    calls.clear()
    backend.generate(model, images, mode="expanded", max_length=6, stop=False)
    assert calls == []  # the expanded form folds nothing

    trainer = backend.trainer(model, TrainConfig(lr=1e-2, warmup_steps=0, total_steps=10))
    float(trainer.step(images, tokens)[0])
    model.eval()
    cache = model.new_cache(2, 4, [], absorbed=True)
    # Equal to a derivation from the new weights: per head, w_uk folded into the query's no-rope rows (rope
    # rows kept, scale folded in), w_uv folded into o_proj.
    attn = model.decoder[0].self_attn
    w_kv = backend.numpy(attn.kv_b_proj.weight).astype(np.float64).reshape(cfg.heads, -1, cfg.dec_kv_rank)
    w_qb = backend.numpy(attn.q_b_proj.weight).astype(np.float64).reshape(cfg.heads, cfg.head_dim, -1)
    w_out = backend.numpy(attn.o_proj.weight).astype(np.float64).reshape(cfg.d_model, cfg.heads, cfg.head_dim)
    n = cfg.nope_dim
    q_lat = np.einsum("hkr,hki->hri", w_kv[:, :n], w_qb[:, :n])
    want_q = np.concatenate([q_lat, w_qb[:, n:]], axis=1).reshape(-1, w_qb.shape[2]) * cfg.head_dim**-0.5
    want_o = np.einsum("dhv,hvr->dhr", w_out, w_kv[:, n:]).reshape(cfg.d_model, -1)
    folded = cache.layers[0].absorbed
    w_q, w_o = backend.numpy(folded.w_q).T, backend.numpy(folded.w_o).T  # stored input-major
    np.testing.assert_allclose(w_q, want_q, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(w_o, want_o, rtol=1e-5, atol=1e-7)
    assert model.new_cache(2, 4, []).layers[0].absorbed is None  # the expanded form's cache carries none


# ---- 4. sampling -----------------------------------------------------------------------------------
def test_sampling(fw, grids, greedy):
    backend, model = fw
    images = grids[0][:128]
    greedy_tokens = greedy(backend, model)[:128]
    hot = dict(temperature=3.0, stop=False)
    a = backend.generate(model, images, seed=7, **hot)
    np.testing.assert_array_equal(backend.generate(model, images, seed=7, **hot), a)  # reproducible
    assert (backend.generate(model, images, seed=8, **hot) != a).any()  # and the seed matters
    assert (a != greedy_tokens).any()
    top1 = backend.generate(model, images, temperature=1.0, top_k=1, seed=3)
    np.testing.assert_array_equal(top1, greedy_tokens)
    # A finished row is padded afterwards, also when it must keep going (stop=False) and when sampled.
    for out in (a, backend.generate(model, images, stop=False, max_length=9)):
        finished_early = 0
        for row in out:
            hit = np.flatnonzero(row == FINISH)
            if hit.size:
                assert (row[hit[0] + 1 :] == PAD).all()
                finished_early += hit[0] + 1 < row.size
        assert finished_early >= 10
