"""Composing G x G grids of MNIST digits, vectorised over the batch.

Composition is split in two so distributed training can shard it: `draw` consumes all the
randomness of a global batch (cheap: a few ints per cell), `render` builds any slice of its rows.
"""

from typing import NamedTuple

import numpy as np

from convert.config import CELL
from convert.errors import UserError

from .mnist import digits
from .tokens import FINISH, PAD, START, max_tokens

SHIFT = 2  # augmentation: per-digit shift of up to +-SHIFT px inside its cell
# "affine" augmentation: per-digit rotation, scale and shear (bilinear resampling), on top of the shift.
ROTATE, SCALE, SHEAR = np.deg2rad(12.0), 0.1, 0.15
SPLIT_ID = {"train": 0, "val": 1, "test": 2}


class Draw(NamedTuple):
    k: np.ndarray  # [n] number of digits per grid
    occupied: np.ndarray  # [n, G*G] bool, cells in reading order
    index: np.ndarray  # [n, G*G] pool index of each cell's digit, -1 where empty
    shift: np.ndarray | None = None  # [n, G*G, 2] (dy, dx) or None without augmentation
    affine: np.ndarray | None = None  # [n, G*G, 2, 2] output->input sampling matrices, or None


def draw(grid, n, pool_size, rng, k=None, shift=0, affine=False):
    """All random choices for n grids: k ~ U{1..G*G}, which cells, which digits, shifts."""
    cells = grid * grid
    if k is None:
        k = rng.integers(1, cells + 1, size=n)
    else:
        k = np.broadcast_to(np.asarray(k, dtype=np.int64), (n,)).copy()
        if k.size and (k.min() < 1 or k.max() > cells):
            raise UserError(
                f"the number of digits must be between 1 and {cells} for a {grid}x{grid} "
                f"grid, got {k.min() if k.min() < 1 else k.max()}; pick a value in range"
            )
    # A uniformly random set of k cells: the k smallest of i.i.d. uniform keys.
    rank = np.argsort(np.argsort(rng.random((n, cells)), axis=1), axis=1)
    occupied = rank < k[:, None]
    index = np.where(occupied, rng.integers(0, pool_size, size=(n, cells)), -1)
    offsets = rng.integers(-shift, shift + 1, size=(n, cells, 2)) if shift else None
    mats = None
    if affine:  # drawn last, so the draws above are the same with or without it
        u = rng.uniform(-1, 1, size=(n, cells, 3))
        angle, scale, shear = u[..., 0] * ROTATE, 1 + u[..., 1] * SCALE, u[..., 2] * SHEAR
        cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
        mats = np.stack([np.stack([cos, -sin + shear], -1), np.stack([sin, cos], -1)], -2).astype(np.float32)
    return Draw(k, occupied, index, offsets, mats)


def _warped(cells, mats):
    """Resample each [28, 28] digit through its own 2x2 matrix about the cell centre (bilinear, zeros outside)."""
    m = len(cells)
    c = (CELL - 1) / 2
    yy, xx = np.mgrid[0:CELL, 0:CELL].astype(np.float32) - c
    sx = mats[:, 0, 0, None, None] * xx + mats[:, 0, 1, None, None] * yy + c
    sy = mats[:, 1, 0, None, None] * xx + mats[:, 1, 1, None, None] * yy + c
    x0, y0 = np.floor(sx), np.floor(sy)
    wx, wy = sx - x0, sy - y0
    size = CELL + 2
    padded = np.pad(cells.astype(np.float32), ((0, 0), (1, 1), (1, 1))).reshape(m, -1)
    xi = np.clip(x0.astype(np.int64) + 1, 0, size - 2)  # clipped reads land on the zero border
    yi = np.clip(y0.astype(np.int64) + 1, 0, size - 2)
    inside = (x0 >= -1) & (x0 <= CELL - 1) & (y0 >= -1) & (y0 <= CELL - 1)

    def at(dy, dx):
        return np.take_along_axis(padded, ((yi + dy) * size + xi + dx).reshape(m, -1), axis=1).reshape(m, CELL, CELL)

    out = (1 - wy) * ((1 - wx) * at(0, 0) + wx * at(0, 1)) + wy * ((1 - wx) * at(1, 0) + wx * at(1, 1))
    return np.where(inside, out, 0).astype(np.float32)


def _shifted(cells, offsets):
    """Move each [28, 28] digit by its own (dy, dx), filling with zeros (one gather, no loop)."""
    m = len(cells)
    pad = int(np.abs(offsets).max(initial=0))
    if pad == 0:
        return cells
    size = CELL + 2 * pad
    padded = np.pad(cells, ((0, 0), (pad, pad), (pad, pad)))
    ar = np.arange(CELL)
    ys = (pad - offsets[:, 0])[:, None] + ar  # out[y, x] = in[y - dy, x - dx]
    xs = (pad - offsets[:, 1])[:, None] + ar
    flat = (ys[:, :, None] * size + xs[:, None, :]).reshape(m, -1)
    return np.take_along_axis(padded.reshape(m, -1), flat, axis=1).reshape(m, CELL, CELL)


def render(images, labels, grid, d, rows=slice(None), raw=False):
    """Images float32 [m, G*28, G*28] in [0, 1] and tokens int64 [m, G*G+2] for rows of a Draw. raw: the images as
    uint8 0-255 instead (only without augmentation, where the pixels are the digits' own: exact)."""
    if raw and (d.affine is not None or d.shift is not None):
        raise ValueError("raw uint8 grids are only exact without augmentation")
    occupied, index, _k = d.occupied[rows], d.index[rows], d.k[rows]
    m, cells = occupied.shape
    safe = np.where(occupied, index, 0)
    tiles = images[safe.reshape(-1)] * occupied.reshape(-1, 1, 1).astype(images.dtype)
    if d.affine is not None:
        occ = occupied.reshape(-1)
        warped = np.zeros(tiles.shape, np.float32)
        warped[occ] = _warped(tiles[occ], d.affine[rows].reshape(-1, 2, 2)[occ])
        tiles = warped
    if d.shift is not None:
        tiles = _shifted(tiles, d.shift[rows].reshape(-1, 2))
    x = tiles.reshape(m, grid, grid, CELL, CELL).transpose(0, 1, 3, 2, 4)
    x = x.reshape(m, grid * CELL, grid * CELL)
    if raw:
        return x.astype(np.uint8), tokens(labels, grid, d, rows)
    return x.astype(np.float32) / np.float32(255), tokens(labels, grid, d, rows)


def tokens(labels, grid, d, rows=slice(None)):
    """The target tokens int64 [m, G*G+2] of rows of a Draw: all a renderer on the device leaves to the host."""
    occupied, index, k = d.occupied[rows], d.index[rows], d.k[rows]
    m = len(occupied)
    out = np.full((m, max_tokens(grid)), PAD, dtype=np.int64)
    out[:, 0] = START
    r, c = np.nonzero(occupied)  # row-major, so digits come out in reading order
    position = np.cumsum(occupied, axis=1)[r, c]  # 1-based slot after <start>
    out[r, position] = labels[index[r, c]]
    out[np.arange(m), k + 1] = FINISH
    return out


def compose(images, labels, grid, n, rng, k=None):
    """n random grids from an image pool: (x float32 [n, G*28, G*28], tokens int64 [n, G*G+2])."""
    return render(images, labels, grid, draw(grid, n, len(labels), rng, k=k))


class GridStream:
    """Deterministic, shardable batches of grids built from one split of MNIST."""

    def __init__(self, split, grid, seed, data_dir=None, augment=False):
        if not isinstance(grid, (int, np.integer)) or grid < 1:
            raise UserError(f"grid size must be a positive integer, got {grid!r}; use e.g. 4")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UserError(f"seed must be a non-negative integer, got {seed!r}; use e.g. 0")
        self.images, self.labels = digits(split, data_dir)
        self.split, self.grid, self.seed, self.augment = split, int(grid), int(seed), augment
        self.split_id = SPLIT_ID[split]

    def draw(self, rng, n, k=None, augment=None):
        """augment: False, True / "shift" (move each digit by up to SHIFT px) or "affine" (also rotate,
        scale and shear it)."""
        mode = self.augment if augment is None else augment
        if mode not in (False, True, "shift", "affine", None):
            raise UserError(f"unknown augmentation {mode!r}: use shift or affine")
        return draw(self.grid, n, len(self.labels), rng, k=k, shift=SHIFT if mode else 0, affine=mode == "affine")

    def batch(self, epoch, index, batch_size, rank=0, world=1, k=None):
        """This rank's share of global batch `index` of `epoch` (ranks concatenate to the whole); k: digits per
        grid (default: uniform in 1..G*G)."""
        return render(self.images, self.labels, self.grid, *self.batch_draw(epoch, index, batch_size, rank, world, k))

    def batch_draw(self, epoch, index, batch_size, rank=0, world=1, k=None):
        """(Draw, rows) of `batch`, for a renderer on the device: render(images, labels, grid, *this) is batch."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world of size {world}")
        rng = np.random.default_rng([self.seed, epoch, index, self.split_id])
        rows = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
        return self.draw(rng, batch_size, k=k), rows

    def batches(self, epoch, n_samples, batch_size, rank=0, world=1):
        """Batches covering n_samples grids of one epoch; the last may be smaller."""
        for index, start in enumerate(range(0, n_samples, batch_size)):
            yield self.batch(epoch, index, min(batch_size, n_samples - start), rank, world)

    def fixed(self, n, seed=0, k=None, chunk=1024, raw=False):
        """A fixed evaluation set of n grids, the same for every caller; never augmented. raw: uint8 pixels
        (0-255; the models scale them on their device), a quarter of float32's bytes and exactly the same grids."""
        rng = np.random.default_rng([seed, 2**31 - 1, self.split_id])
        d = self.draw(rng, n, k=k, augment=False)
        side = self.grid * CELL
        x = np.empty((n, side, side), dtype=np.uint8 if raw else np.float32)
        tokens = np.empty((n, max_tokens(self.grid)), dtype=np.int64)
        for start in range(0, n, chunk):  # bounds the uint8 -> float32 intermediates
            rows = slice(start, min(start + chunk, n))
            x[rows], tokens[rows] = render(self.images, self.labels, self.grid, d, rows, raw=raw)
        return x, tokens
