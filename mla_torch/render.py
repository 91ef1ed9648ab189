"""Grids composed on the device from a mnist_grid Draw: the same pixels as mnist_grid.grid.render.

The digit pool is uploaded once as uint8; a batch uploads only its Draw (a few ints and floats per cell).
Every output pixel is one explicit gather (four for the affine warp), so there is no grid_sample and no
limit on the number of tiles per call. The float math follows the numpy renderer operation by operation.
"""

from __future__ import annotations

import time

import numpy as np
import torch

CELL = 28
SIZE = CELL + 2  # a digit with its one-pixel zero border


class DeviceRenderer:
    def __init__(self, pool, device="cpu", dtype=torch.float32):
        """pool: uint8 [N, 28, 28] digits (GridStream.images); dtype: of the images render returns."""
        pool = np.asarray(pool)
        if pool.dtype != np.uint8 or pool.shape[1:] != (CELL, CELL):
            raise ValueError(f"pool must be uint8 [N, {CELL}, {CELL}], got {pool.dtype} {pool.shape}")
        self.device, self.dtype = torch.device(device), dtype
        # Each digit inside a zero border (as numpy's _warped pads it), plus one all-zero digit for empty cells:
        # a read clamped into the border is a read of zeros, so the gathers need no masks.
        padded = np.pad(pool, ((0, 1), (1, 1), (1, 1)))
        self.pool, self.empty = torch.from_numpy(padded.reshape(-1)).to(self.device), len(pool)
        # uint8 -> [0, 1] by table: exactly numpy's float32(v) / float32(255) on any device (no reciprocal).
        self.lut = torch.from_numpy(np.arange(256, dtype=np.float32) / np.float32(255)).to(self.device)
        self.ar = torch.arange(CELL, device=self.device)

    def _take(self, index):
        return self.pool.index_select(0, index.reshape(-1)).reshape(index.shape)

    def _upload(self, a, dtype):
        return torch.from_numpy(np.array(a)).to(self.device, dtype, non_blocking=True)

    def render(self, d, rows=slice(None)) -> torch.Tensor:
        """Images [m, G*28, G*28] in [0, 1] for rows of Draw d, equal to mnist_grid's render(...)[0]."""
        occupied = d.occupied[rows]
        m, cells = occupied.shape
        grid = int(round(cells**0.5))
        base = self._upload(np.where(occupied, d.index[rows], self.empty).reshape(-1), torch.int64) * SIZE**2
        base = base[:, None, None]  # [M, 1, 1]
        # Source pixel of each output pixel before the warp: out[y, x] = in[y - dy, x - dx] (zeros outside).
        py, px = self.ar[None, :, None], self.ar[None, None, :]
        if d.shift is not None:
            shift = self._upload(d.shift[rows].reshape(-1, 2), torch.int64)
            py, px = py - shift[:, 0, None, None], px - shift[:, 1, None, None]

        if d.affine is None:  # out-of-cell reads clamp into the zero border
            x = self.lut[self._take(base + (py + 1).clamp(0, SIZE - 1) * SIZE + (px + 1).clamp(0, SIZE - 1)).long()]
        else:
            keep = ((py >= 0) & (py < CELL)) & ((px >= 0) & (px < CELL))
            x = self._warped(base, py, px, self._upload(d.affine[rows].reshape(-1, 2, 2), torch.float32), keep)
            x = x / torch.tensor(255.0, device=self.device)
        x = x.reshape(m, grid, grid, CELL, CELL).permute(0, 1, 3, 2, 4).reshape(m, grid * CELL, grid * CELL)
        return x.to(self.dtype)

    def _warped(self, base, py, px, mats, keep):
        """Bilinear sample of each digit at (py, px) through its 2x2 matrix about the cell centre: numpy's _warped
        op for op, zero where not `keep` (shifted in from outside the cell)."""
        c = (CELL - 1) / 2
        yy, xx = py.float() - c, px.float() - c
        sx = mats[:, 0, 0, None, None] * xx + mats[:, 0, 1, None, None] * yy + c
        sy = mats[:, 1, 0, None, None] * xx + mats[:, 1, 1, None, None] * yy + c
        x0, y0 = torch.floor(sx), torch.floor(sy)
        wx, wy = sx - x0, sy - y0
        keep = keep & (x0 >= -1) & (x0 <= CELL - 1) & (y0 >= -1) & (y0 <= CELL - 1)
        at = base + (y0.long() + 1).clamp(0, SIZE - 2) * SIZE + (x0.long() + 1).clamp(0, SIZE - 2)
        a00, a01, a10, a11 = (self._take(at + o).float() for o in (0, 1, SIZE, SIZE + 1))
        out = (1 - wy) * ((1 - wx) * a00 + wx * a01) + wy * ((1 - wx) * a10 + wx * a11)
        return torch.where(keep, out, 0.0)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def throughput(renderer, draws, repeats=3) -> float:
    """Grids per second rendering each Draw in `draws` `repeats` times (after one warm-up pass)."""
    for d in draws:
        renderer.render(d)
    _sync(renderer.device)
    start, n = time.perf_counter(), 0
    for _ in range(repeats):
        for d in draws:
            renderer.render(d)
            n += len(d.k)
    _sync(renderer.device)
    return n / (time.perf_counter() - start)
