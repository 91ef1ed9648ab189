"""torch's fused decoding step (mla_torch.fused_step): the absorbed step with its products as multiplies and sums
gives the loop's tokens, on a random tiny model and on the shipped checkpoint, run eagerly (fast) and compiled by
Inductor for the CPU (slow); its weight copies keep their addresses from run to run (a captured graph reads them)."""

import functools
import shutil

import pytest
import torch

import mla_torch
from convert import ModelConfig
from mla_torch import fused_step
from mla_torch.static_decode import StaticDecoder
from mnist_grid import GridStream

TINY = ModelConfig.preset("tiny")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = mla_torch.build(TINY).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3)  # read-outs that vary by image, some rows ending early
    return m


def _eager_fused(model, batch, max_length):
    dec = StaticDecoder(model, batch, max_length, "fused")
    dec._fn = functools.partial(fused_step.step, dec)  # the same math without Inductor
    return dec


def test_the_fused_math_gives_the_loops_tokens(model):
    images = torch.rand(4, TINY.image_size, TINY.image_size, generator=torch.Generator().manual_seed(3))
    want = mla_torch.generate(model, images, static="off", stop=False)
    assert len({tuple(r) for r in want.tolist()}) >= 3
    dec = _eager_fused(model, 4, TINY.max_tokens)
    with torch.no_grad():
        got = dec.run(model.encode(images), stop=False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_fused_math_reads_the_shipped_model_as_the_loop_does():
    model = mla_torch.load().eval()
    images, _ = GridStream("test", model.config.grid, 0).fixed(16, seed=5)
    images = torch.as_tensor(images)
    want = mla_torch.generate(model, images, static="off")
    with torch.no_grad():
        got = _eager_fused(model, 16, model.config.max_tokens).run(model.encode(images))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_its_weight_copies_keep_their_addresses_and_follow_the_weights(model):
    dec = _eager_fused(model, 2, 5)
    images = torch.rand(2, TINY.image_size, TINY.image_size)
    with torch.no_grad():
        enc = model.encode(images)
        dec.run(enc)
        before = [w.data_ptr() for s in dec._layers for w in s.output_major]
        first = dec._layers[0].output_major[0].clone()
        model.decoder[0].self_attn.q_b_proj.weight.mul_(2)
        dec.run(enc)
        model.decoder[0].self_attn.q_b_proj.weight.div_(2)
    assert [w.data_ptr() for s in dec._layers for w in s.output_major] == before
    assert not torch.equal(dec._layers[0].output_major[0], first)


@pytest.mark.slow
def test_compiled_fused_step_reads_the_same_tokens(model):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("Inductor needs a C compiler on the CPU")
    images = torch.rand(2, TINY.image_size, TINY.image_size, generator=torch.Generator().manual_seed(4))
    want = mla_torch.generate(model, images, max_length=7, static="off")
    torch.testing.assert_close(mla_torch.generate(model, images, max_length=7, static="fused"), want, rtol=0, atol=0)
