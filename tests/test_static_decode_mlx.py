"""MLX's fixed-shape absorbed decoding (mla_mlx.static_decode): the tokens of generate()'s loop, every batch's own,
the weights of the moment, no new parameters, and clear errors where it does not apply."""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from mlx.utils import tree_flatten, tree_map  # noqa: E402

from convert import ModelConfig  # noqa: E402
from mla_mlx import checkpoint as ckpt  # noqa: E402
from mla_mlx.generate import generate  # noqa: E402
from mla_mlx.static_decode import _KEPT, StaticDecoder, static_decoder  # noqa: E402
from mnist_grid import FINISH, PAD, START, GridStream  # noqa: E402

TINY = ModelConfig.preset("tiny")


def _images(cfg, b, seed=0):
    return mx.array(np.random.default_rng(seed).random((b, cfg.image_size, cfg.image_size), dtype=np.float32))


@pytest.fixture(scope="module")
def model():
    """A random tiny MLA model, its weights scaled up so the read-outs vary by image and some rows finish early."""
    m = ckpt.build(TINY, seed=1).eval()
    m.update(tree_map(lambda p: p * 3, m.parameters()))
    return m


@pytest.fixture(scope="module")
def shipped():
    """The shipped small checkpoint, 16 test grids and its greedy read-outs from generate()'s loop."""
    m = ckpt.load()
    images, targets = GridStream("test", m.config.grid, 0).fixed(16, seed=3)
    images = mx.array(images)
    return m, images, targets, np.array(generate(m, images, static="off"))


@pytest.mark.parametrize("how", ["eager", "compiled"])
@pytest.mark.parametrize("stop", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("max_length", [3, TINY.max_tokens])
def test_static_tokens_equal_the_loop(model, how, stop, batch, max_length):
    images = _images(TINY, batch, seed=batch)
    want = np.array(generate(model, images, max_length=max_length, mode="absorbed", stop=stop, static="off"))
    got = np.array(generate(model, images, max_length=max_length, stop=stop, static=how))
    assert got.dtype == np.int32 and got.shape == (batch, max_length)
    np.testing.assert_array_equal(got, want)


def test_random_model_reads_out_varied_rows(model):
    """The comparisons above are over rows that differ and finish at different steps, not constant ones."""
    tokens = np.array(generate(model, _images(TINY, 8), static="eager", stop=False))
    assert (tokens[:, 0] == START).all() and len({tuple(row) for row in tokens}) >= 3
    assert (tokens == FINISH).any() and (tokens == PAD).any()


@pytest.mark.parametrize("how", ["eager", "compiled"])
def test_shipped_model_tokens_equal_the_loop(shipped, how):
    model, images, targets, want = shipped
    np.testing.assert_array_equal(np.array(generate(model, images, static=how)), want)
    assert (want == targets).all(axis=1).mean() > 0.5  # a model that reads: real, varied read-outs


def test_each_run_decodes_its_own_batch(shipped):
    model, images, _, want = shipped
    decoder = StaticDecoder(model, 4, want.shape[1], "compiled")
    for rows in (slice(0, 4), slice(4, 8), slice(0, 4)):
        got = decoder.run(model.encode(images[rows]))
        np.testing.assert_array_equal(np.array(got), want[rows])


@pytest.mark.parametrize("how", ["eager", "compiled"])
def test_static_decoder_follows_changed_weights(how):
    model = ckpt.build(TINY, seed=1).eval()
    model.update(tree_map(lambda p: p * 3, model.parameters()))
    images = _images(TINY, 3)
    decoder = static_decoder(model, 3, TINY.max_tokens, how)
    before = np.array(decoder.run(model.encode(images), stop=False))
    # One decoder-side weight of each kind the step reads: a module's own (through the model) and one that is
    # folded into the absorbed projections when run() starts.
    model.head.bias = model.head.bias + 4.0 * (mx.arange(TINY.vocab) == 7)
    attn = model.decoder[0].self_attn
    attn.kv_b_proj.weight = attn.kv_b_proj.weight * 1.5
    want = np.array(generate(model, images, static="off", stop=False))
    assert static_decoder(model, 3, TINY.max_tokens, how) is decoder  # reused, not rebuilt
    got = np.array(decoder.run(model.encode(images), stop=False))
    assert not (want == before).all()
    np.testing.assert_array_equal(got, want)


def test_parameters_unchanged_and_decoders_kept_per_shape(model):
    names = [k for k, _ in tree_flatten(model.parameters())]
    for b in range(1, _KEPT + 3):
        generate(model, _images(TINY, b), static="eager")
    assert [k for k, _ in tree_flatten(model.parameters())] == names
    assert [k for k, _ in tree_flatten(model.trainable_parameters())] == names
    decoders = model.__dict__["_static_decoders"]
    assert len(decoders) == _KEPT and (_KEPT + 2, TINY.max_tokens, mx.float32, "eager") in decoders


def test_where_static_decoding_does_not_apply(model):
    images = _images(TINY, 2)
    for kwargs in (
        dict(mode="expanded"),
        dict(mode="uncached"),
        dict(temperature=1.0, seed=0),
        dict(quantize_cache=True),
        dict(return_cache=True),
    ):
        with pytest.raises(ValueError, match="static='eager' does not apply"):
            generate(model, images, static="eager", **kwargs)
        generate(model, images, **kwargs)  # auto falls back to the loop
    with pytest.raises(ValueError, match="use compiled"):
        generate(model, images, static="graph")
    with pytest.raises(ValueError, match="static must be"):
        generate(model, images, static="fast")
    mha = ckpt.build(TINY.replace(attention="mha"))
    with pytest.raises(ValueError, match="absorbed"):
        generate(mha, images, static="compiled")
    with pytest.raises(ValueError, match="needs an MLA model"):
        StaticDecoder(mha, 2, TINY.max_tokens, "eager")
    with pytest.raises(ValueError, match="batches of 3"):
        StaticDecoder(model, 3, TINY.max_tokens, "eager").run(model.encode(images))


def test_auto_is_the_loop_on_the_cpu(model):
    if mx.default_device() == mx.gpu:
        pytest.skip("auto compiles on a GPU")
    model.__dict__.pop("_static_decoders", None)
    generate(model, _images(TINY, 2))
    assert not model.__dict__.get("_static_decoders")
