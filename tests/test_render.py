"""The device renderers (torch, MLX) against mnist_grid's numpy renderer, on real MNIST digits.

The numpy renderer defines the dataset: without augmentation the device must reproduce it exactly, with
the affine warp to 1e-5 per pixel (float rounding may differ off the CPU; on the CPU it is exact too).
"""

import subprocess
import sys

import numpy as np
import pytest

from convert.config import ModelConfig
from mnist_grid.grid import GridStream, draw, render, tokens

AUGMENT = [False, "shift", "affine"]


@pytest.fixture(scope="module", params=["tiny", "small"])
def stream(request):
    return GridStream("test", ModelConfig.preset(request.param).grid, seed=3)


def _renderer(framework, pool):
    if framework == "torch":
        pytest.importorskip("torch")
        from mla_torch.render import DeviceRenderer, throughput

        return DeviceRenderer(pool, "cpu"), lambda x: x.numpy(), throughput
    pytest.importorskip("mlx.core")
    from mla_mlx.render import DeviceRenderer, throughput

    return DeviceRenderer(pool), np.array, throughput


@pytest.mark.parametrize("framework", ["torch", "mlx"])
@pytest.mark.parametrize("augment", AUGMENT)
def test_device_render_matches_numpy(stream, framework, augment):
    r, to_numpy, _ = _renderer(framework, stream.images)
    d = stream.draw(np.random.default_rng(7), 16, augment=augment)
    want, _ = render(stream.images, stream.labels, stream.grid, d)
    got = to_numpy(r.render(d))
    assert got.dtype == np.float32 and got.shape == want.shape
    if augment == "affine":
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        assert np.count_nonzero(want != np.round(want * 255) / 255) > 0  # the warp did interpolate
    else:
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("framework", ["torch", "mlx"])
def test_rows_and_warp_without_shift(stream, framework):
    """A rank's rows of a Draw, and a warp with no shift (draw() allows it; GridStream always shifts)."""
    r, to_numpy, throughput = _renderer(framework, stream.images)
    d = draw(stream.grid, 12, len(stream.labels), np.random.default_rng(1), affine=True)
    rows = slice(5, 9)
    want, _ = render(stream.images, stream.labels, stream.grid, d, rows)
    np.testing.assert_allclose(to_numpy(r.render(d, rows)), want, rtol=0, atol=1e-5)
    assert throughput(r, [d], repeats=1) > 0


def test_batch_draw_and_tokens_split_batch(stream):
    """What a device pipeline uses, batch_draw + tokens, gives exactly batch's tokens."""
    x, want = stream.batch(epoch=1, index=2, batch_size=10, rank=1, world=2)
    d, rows = stream.batch_draw(epoch=1, index=2, batch_size=10, rank=1, world=2)
    np.testing.assert_array_equal(tokens(stream.labels, stream.grid, d, rows), want)
    np.testing.assert_array_equal(render(stream.images, stream.labels, stream.grid, d, rows)[0], x)


def test_mlx_render_does_not_import_torch():
    pytest.importorskip("mlx.core")
    code = "import mla_mlx.render, sys; assert 'torch' not in sys.modules, 'mla_mlx.render imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
