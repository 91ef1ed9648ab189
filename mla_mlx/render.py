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


class DeviceRenderer:
    def __init__(self, pool, device=None, dtype=mx.float32):
        """pool: uint8 [N, 28, 28] digits (GridStream.images); device: MLX uses mx.default_device();
        dtype: of the images render returns."""
        pool = np.asarray(pool)
        if pool.dtype != np.uint8 or pool.shape[1:] != (CELL, CELL):
            raise ValueError(f"pool must be uint8 [N, {CELL}, {CELL}], got {pool.dtype} {pool.shape}")
        if pool.size >= 2**31:
            raise ValueError("pool too large for int32 gather indices")
        self.device, self.dtype = device, dtype
        self.pool = mx.array(pool.reshape(-1))
        # uint8 -> [0, 1] by table: exactly numpy's float32(v) / float32(255) on any device (no fast-math divide).
        self.lut = mx.array(np.arange(256, dtype=np.float32) / np.float32(255))
        self.ar = mx.arange(CELL, dtype=mx.int32)

    def render(self, d, rows=slice(None)) -> mx.array:
        """Images [m, G*28, G*28] in [0, 1] for rows of Draw d, equal to mnist_grid's render(...)[0]."""
        occupied = d.occupied[rows]
        m, cells = occupied.shape
        grid = int(round(cells ** 0.5))
        occ = mx.array(occupied.reshape(-1))[:, None, None]  # [M, 1, 1]
        base = mx.array(np.where(occupied, d.index[rows], 0).reshape(-1).astype(np.int32))[:, None, None] * CELL**2
        # Source pixel of each output pixel before the warp: out[y, x] = in[y - dy, x - dx] (zeros outside).
        py, px = self.ar[None, :, None], self.ar[None, None, :]
        if d.shift is not None:
            shift = mx.array(d.shift[rows].reshape(-1, 2).astype(np.int32))
            py, px = py - shift[:, 0, None, None], px - shift[:, 1, None, None]
        keep = occ & (py >= 0) & (py < CELL) & (px >= 0) & (px < CELL)

        if d.affine is None:
            v = mx.take(self.pool, base + mx.clip(py, 0, CELL - 1) * CELL + mx.clip(px, 0, CELL - 1))
            x = mx.where(keep, mx.take(self.lut, v.astype(mx.int32)), 0.0)
        else:
            x = self._warped(base, py, px, mx.array(d.affine[rows].reshape(-1, 2, 2).astype(np.float32)))
            x = mx.where(keep, x, 0.0) / mx.array(255.0)
        x = x.reshape(m, grid, grid, CELL, CELL).transpose(0, 1, 3, 2, 4).reshape(m, grid * CELL, grid * CELL)
        return x.astype(self.dtype)

    def _warped(self, base, py, px, mats):
        """Bilinear sample of each digit at (py, px) through its 2x2 matrix about the cell centre, as _warped."""
        c = (CELL - 1) / 2
        yy, xx = py.astype(mx.float32) - c, px.astype(mx.float32) - c
        sx = mats[:, 0, 0, None, None] * xx + mats[:, 0, 1, None, None] * yy + c
        sy = mats[:, 1, 0, None, None] * xx + mats[:, 1, 1, None, None] * yy + c
        x0, y0 = mx.floor(sx), mx.floor(sy)
        wx, wy = sx - x0, sy - y0
        x0, y0 = x0.astype(mx.int32), y0.astype(mx.int32)

        def at(dy, dx):  # a tap outside the digit reads 0, as numpy's zero border does
            ty, tx = y0 + dy, x0 + dx
            ok = (ty >= 0) & (ty < CELL) & (tx >= 0) & (tx < CELL)
            v = mx.take(self.pool, base + mx.clip(ty, 0, CELL - 1) * CELL + mx.clip(tx, 0, CELL - 1))
            return mx.where(ok, v.astype(mx.float32), 0.0)

        return (1 - wy) * ((1 - wx) * at(0, 0) + wx * at(0, 1)) + wy * ((1 - wx) * at(1, 0) + wx * at(1, 1))


def throughput(renderer, draws, repeats=3) -> float:
    """Grids per second rendering each Draw in `draws` `repeats` times (after one warm-up pass)."""
    mx.eval([renderer.render(d) for d in draws])
    start, n = time.perf_counter(), 0
    for _ in range(repeats):
        for d in draws:
            mx.eval(renderer.render(d))
            n += len(d.k)
    return n / (time.perf_counter() - start)
