"""Grids composed on the device from a mnist_grid Draw: the same pixels as mnist_grid.grid.render.

The digit pool is uploaded once as uint8; a batch uploads only its Draw (a few ints and floats per cell).
Every output pixel is one explicit gather (four for the affine warp) with mx.take; the float math follows
the numpy renderer operation by operation.
"""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np

CELL = 28
SIZE = CELL + 2  # a digit with its one-pixel zero border


class DeviceRenderer:
    def __init__(self, pool, device=None, dtype=mx.float32):
        """pool: uint8 [N, 28, 28] digits (GridStream.images); device: MLX uses mx.default_device();
        dtype: of the images render returns."""
        pool = np.asarray(pool)
        if pool.dtype != np.uint8 or pool.shape[1:] != (CELL, CELL):
            raise ValueError(f"pool must be uint8 [N, {CELL}, {CELL}], got {pool.dtype} {pool.shape}")
        if (len(pool) + 1) * SIZE**2 >= 2**31:
            raise ValueError("pool too large for int32 gather indices")
        self.device, self.dtype = device, dtype
        # Each digit inside a zero border (as numpy's _warped pads it), plus one all-zero digit for empty cells:
        # a read clamped into the border is a read of zeros, so the gathers need no masks.
        self.pool, self.empty = mx.array(np.pad(pool, ((0, 1), (1, 1), (1, 1))).reshape(-1)), len(pool)
        # uint8 -> [0, 1] by table: exactly numpy's float32(v) / float32(255) on any device (no fast-math divide).
        self.lut = mx.array(np.arange(256, dtype=np.float32) / np.float32(255))
        self.ar = mx.arange(CELL, dtype=mx.int32)

    def render(self, d, rows=slice(None)) -> mx.array:
        """Images [m, G*28, G*28] in [0, 1] for rows of Draw d, equal to mnist_grid's render(...)[0]."""
        occupied = d.occupied[rows]
        m, cells = occupied.shape
        grid = int(round(cells**0.5))
        index = np.where(occupied, d.index[rows], self.empty).reshape(-1).astype(np.int32)
        base = (mx.array(index) * SIZE**2)[:, None, None]  # [M, 1, 1]
        # Source pixel of each output pixel before the warp: out[y, x] = in[y - dy, x - dx] (zeros outside).
        py, px = self.ar[None, :, None], self.ar[None, None, :]
        if d.shift is not None:
            shift = mx.array(d.shift[rows].reshape(-1, 2).astype(np.int32))
            py, px = py - shift[:, 0, None, None], px - shift[:, 1, None, None]

        if d.affine is None:  # out-of-cell reads clamp into the zero border
            v = mx.take(self.pool, base + mx.clip(py + 1, 0, SIZE - 1) * SIZE + mx.clip(px + 1, 0, SIZE - 1))
            x = mx.take(self.lut, v.astype(mx.int32))
        else:
            keep = ((py >= 0) & (py < CELL)) & ((px >= 0) & (px < CELL))
            mats = mx.array(d.affine[rows].reshape(-1, 2, 2).astype(np.float32))
            x = self._warped(base, py, px, mats, keep) / mx.array(255.0)
        x = x.reshape(m, grid, grid, CELL, CELL).transpose(0, 1, 3, 2, 4).reshape(m, grid * CELL, grid * CELL)
        return x.astype(self.dtype)

    def _warped(self, base, py, px, mats, keep):
        """Bilinear sample of each digit at (py, px) through its 2x2 matrix about the cell centre: numpy's _warped
        op for op, zero where not `keep` (shifted in from outside the cell)."""
        c = (CELL - 1) / 2
        yy, xx = py.astype(mx.float32) - c, px.astype(mx.float32) - c
        sx = mats[:, 0, 0, None, None] * xx + mats[:, 0, 1, None, None] * yy + c
        sy = mats[:, 1, 0, None, None] * xx + mats[:, 1, 1, None, None] * yy + c
        x0, y0 = mx.floor(sx), mx.floor(sy)
        wx, wy = sx - x0, sy - y0
        keep = keep & (x0 >= -1) & (x0 <= CELL - 1) & (y0 >= -1) & (y0 <= CELL - 1)
        at = base + mx.clip(y0.astype(mx.int32) + 1, 0, SIZE - 2) * SIZE + mx.clip(x0.astype(mx.int32) + 1, 0, SIZE - 2)
        a00, a01, a10, a11 = (mx.take(self.pool, at + o).astype(mx.float32) for o in (0, 1, SIZE, SIZE + 1))
        out = (1 - wy) * ((1 - wx) * a00 + wx * a01) + wy * ((1 - wx) * a10 + wx * a11)
        return mx.where(keep, out, 0.0)


def throughput(renderer, draws, repeats=3) -> float:
    """Grids per second rendering each Draw in `draws` `repeats` times (after one warm-up pass)."""
    mx.eval([renderer.render(d) for d in draws])
    start, n = time.perf_counter(), 0
    for _ in range(repeats):
        for d in draws:
            mx.eval(renderer.render(d))
            n += len(d.k)
    return n / (time.perf_counter() - start)
