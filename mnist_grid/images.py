"""Reading a user's grid picture into the model's input format, and writing grids as PNG.

How MNIST grids place digits, and the rules `read_grid_image` applies to a picture that was not rendered here:

* A grid of G x G cells is G*28 px square. Each 28 x 28 cell holds one digit or nothing; MNIST fits a digit
  into a 20 x 20 box (its longer side is 20 px) and centres it by mass in the cell, so a digit leaves a margin
  of about 4 px (1/7 of the cell) on every side, and two neighbouring digits are about 8 px apart.
* Polarity: the median of the border (a strip 1/20 of the shorter side) is the page. A light page is
  inverted, then the page is stretched to 0 and the strongest ink to 1, as in MNIST. RGB(A), palette and
  greyscale (8/16 bit, float) images all become this one luminance plane; transparency is composited over
  the page its ink implies (dark ink over white, light ink over black).
* An uneven page (`read_grid_image` only): when the border's 10th-90th percentile spread exceeds 0.03 (a
  gradient, sensor noise; a rendered grid has 0), a page level (median over windows of about 1/9 of the
  picture) is subtracted, the rest re-stretched and values under 0.25 set to 0.
* Ink is a pixel above 0.35 (0.2 on a flattened page), with isolated specks removed (3 x 3 median). The content
  is the bounding box of the ink; its rows of digits are the runs of ink rows, its columns the runs of ink
  columns (runs one pixel apart are one run).
* Whole grid or page? The picture is taken as an N x N grid (N = `image_grid`, else the model's grid G): cells
  of s_img = max(width, height) / N px. Its digits say the cells are s_ink = 28/20 * m px, m the median height
  of the rows of digits. If s_ink >= 0.85 * s_img (digits at least 0.6 of a cell tall), or the picture is
  square with a side that is a multiple of N*28 px (a `make-grid` render), it is a grid filling the picture:
  the ink box padded out to whole cells of that lattice is the picture itself, so the picture is scaled as a
  whole (longer side N*28 px, as `load_image` does) and for N < G its N x N cells land on the top-left N x N
  cells of the model's grid, cell (r, c) on cell (r, c). Reading order is kept: the model reads occupied
  cells row by row and skips blank ones.
* Otherwise (a margin, a page, a photo: digits small against the picture's cells) each digit's box is padded
  back to a cell of its own: the ink where row run i meets column run j is scaled so that m becomes 20 px
  (at most 24 px either way), centred in cell (i, j) of the model's grid. This needs at most G rows and G
  columns and runs no longer than 1.5 m (one digit each).
* Failing that, the ink box (h x w) is padded back to a whole number of cells of s = 28/20 * m px:
  R = max(1, round((h + s - m) / s)) rows and C = max(1, round((w + s - m) / s)) columns (k digits span k
  cells less one margin pair), a box of R*s x C*s px centred on the ink box, scaled so a cell is 28 px and
  placed top-left; more than G cells either way is shrunk to fit, with a warning.
* Pen strokes thinner than MNIST's (fewer than 70 pixels above 0.5 per occupied cell) are widened by a 3 x 3
  maximum, in the last two cases only.

Warnings (returned, one short phrase each; the image is still read): a whole-grid picture's aspect ratio is
outside [0.8, 1.25]; the content spans more cells than the grid holds; almost no ink (blank or flat image,
or under 15 strong pixels at the model's scale); ink over 45% of the content (no background to tell digits
from). `readout_warnings` adds: no digits read, or more digits than the grid has cells.

Hostile inputs: a picture over MAX_PIXELS is refused from its header, before any pixel is decoded (and
Pillow's own decompression-bomb limit is set to it); NaN or infinite pixels (float TIFF) are refused.
File names are quoted with repr() so a newline in one cannot split the one-line error.
"""

import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from convert.config import CELL
from convert.errors import UserError
from convert.files import atomic_write as _atomic_write

DIGIT = 20  # MNIST's digit box inside a cell
MIN_SIDE = 8
MAX_PIXELS = 50_000_000
# Pillow's own bomb check, for every opener: warns above this (refused here from the header) and refuses
# above twice this inside Image.open, so no path decodes more than the limit.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
INK = 0.35
LATTICE = 0.85
ASPECT = (0.8, 1.25)
FULL = 0.45
MIN_INK_PX = 15
PAGE_SPREAD = 0.03  # border p90 - p10 above this: an uneven page, flattened
FLOOR = 0.25
INK_UNEVEN = 0.2  # ink threshold once an uneven page is flattened (FLOOR already removed)
THIN_PX = 70  # at model scale: a thin MNIST "1" has about 40 pixels above 0.5


def _open(path):
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise UserError(f"{str(path)!r} {what}; pass the path of a PNG or JPEG image")
    limit = f"over the {MAX_PIXELS // 1_000_000}-megapixel limit; scale it down first"
    try:
        with warnings.catch_warnings():
            # Pillow warns from MAX_IMAGE_PIXELS on: those are refused just below, with their size.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            w, h = img.size
            if w * h > MAX_PIXELS:  # from the header: nothing decoded yet
                raise UserError(f"image {str(path)!r} is {w}\u00d7{h} pixels, {limit}")
            img.load()
            return ImageOps.exif_transpose(img)  # photos carry their rotation in EXIF
    except Image.DecompressionBombError as e:  # over twice the limit: Pillow refuses it in open()
        n = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(n.group(1)) / 1e6:.0f} megapixels" if n else "too many pixels"
        raise UserError(f"image {str(path)!r} is {size}, {limit}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise UserError(f"{str(path)!r} is not a readable PNG/JPEG image; pass a valid image file") from None


def _luminance(img):
    """Float [0, 1] luminance; transparency is composited over the background the ink implies."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # high bit depth grayscale
        y = np.asarray(img, dtype=np.float32)
        if not np.isfinite(y).all():
            return y  # the caller refuses it
        top = y.max(initial=0)
        return y / (65535.0 if top > 255 else 255.0 if top > 1 else 1.0)
    rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255
    y = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    alpha = rgba[..., 3]
    if alpha.min() < 1:
        # Dark ink on a transparent page is meant to be seen on white, light ink on black.
        ink = float((y * alpha).sum() / max(alpha.sum(), 1e-6))
        background = 1.0 if ink < 0.5 else 0.0
        y = alpha * y + (1 - alpha) * background
    return y


def _ink_plane(path):
    """The picture as float32 [H, W] in [0, 1]: light ink on a zero page, like MNIST."""
    img = _open(path)
    if min(img.size) < MIN_SIDE:
        raise UserError(
            f"{str(path)!r} is too small ({img.size[0]}x{img.size[1]} px); "
            f"use an image of at least {MIN_SIDE}x{MIN_SIDE} px"
        )
    y = _luminance(img)
    if not np.isfinite(y).all():
        raise UserError(f"{str(path)!r} has NaN or infinite pixels; save it with finite values (e.g. as 8-bit PNG)")
    h, w = y.shape
    b = max(1, min(h, w) // 20)
    border = np.concatenate([y[:b].ravel(), y[-b:].ravel(), y[:, :b].ravel(), y[:, -b:].ravel()])
    background = float(np.median(border))
    if background > 0.5:  # dark digits on a light page: invert to MNIST's polarity
        y, background = 1 - y, 1 - background
    top = float(y.max())
    # Stretch so the page becomes exactly 0 and the strongest ink 1, as in MNIST.
    y = np.clip((y - background) / (top - background), 0, 1) if top - background > 1e-3 else y * 0
    return y.astype(np.float32)


def _resized(y, size):
    if size == (y.shape[1], y.shape[0]):
        return y
    y = np.asarray(Image.fromarray(y.astype(np.float32), "F").resize(size, Image.LANCZOS))
    return np.clip(y, 0, 1)


def load_image(path, grid):
    """An image as float32 [G*28, G*28] in [0, 1], light digits on a zero background like MNIST.

    The whole picture is the grid (no cropping); `read_grid_image` is the forgiving reader."""
    y = _ink_plane(path)
    h, w = y.shape
    side = grid * CELL
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    y = _resized(y, size)
    out = np.zeros((side, side), dtype=np.float32)
    top_, left = (side - size[1]) // 2, (side - size[0]) // 2
    out[top_ : top_ + size[1], left : left + size[0]] = y
    return out


def _runs(flags):
    """(start, stop) of each run of True; runs split by a one-pixel gap are one run (a broken stroke)."""
    f = np.concatenate([[False], flags, [False]]).astype(np.int8)
    d = np.diff(f)
    runs = [[int(a), int(b)] for a, b in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1))]
    merged = runs[:1]
    for a, b in runs[1:]:
        pb = merged[-1][1]
        if a - pb <= 1:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    return [tuple(r) for r in merged]


def _flattened(y):
    """(y, flat): an uneven page (light gradient, sensor noise) taken out: the page level is a median over
    windows of 1/9 of the picture, subtracted, and what is left below FLOOR is page too. A flat page is kept."""
    h, w = y.shape
    b = max(1, min(h, w) // 20)
    border = np.concatenate([y[:b].ravel(), y[-b:].ravel(), y[:, :b].ravel(), y[:, -b:].ravel()])
    if np.percentile(border, 90) - np.percentile(border, 10) < PAGE_SPREAD:
        return y, True
    k = 4 if max(h, w) >= 64 else 1
    small = Image.fromarray(y, "F").resize((max(1, w // k), max(1, h // k)), Image.BOX)
    win = max(3, (max(h, w) // k // 9) | 1)
    page = (
        np.asarray(
            Image.fromarray(np.round(np.asarray(small) * 255).astype(np.uint8), "L").filter(
                ImageFilter.MedianFilter(min(win, 15))
            ),
            np.float32,
        )
        / 255
    )
    page = np.asarray(Image.fromarray(page, "F").resize((w, h), Image.BILINEAR))
    y = np.clip(y - page, 0, None)
    top = float(y.max())
    y = np.clip((y / top - FLOOR) / (1 - FLOOR), 0, 1) if top > 1e-3 else y * 0
    return y.astype(np.float32), False


def _segmented(y, mask, grid):
    """Each digit's box moved into its own cell: rows of digits are the runs of ink rows, columns the runs of
    ink columns; the ink where row band i meets column band j goes to cell (i, j), scaled so the median row
    is DIGIT px tall. None where the bands do not look like one digit each, or exceed the grid."""
    row_bands = _runs(mask.any(1))
    col_bands = _runs(mask.any(0))
    heights = np.array([b - a for a, b in row_bands])
    widths = np.array([b - a for a, b in col_bands])
    m = float(np.median(heights))
    if len(row_bands) > grid or len(col_bands) > grid or heights.max() > 1.5 * m or widths.max() > 1.5 * m:
        return None
    scale = DIGIT / m
    out = np.zeros((grid * CELL, grid * CELL), np.float32)
    for i, (r0, r1) in enumerate(row_bands):
        for j, (c0, c1) in enumerate(col_bands):
            sub = mask[r0:r1, c0:c1]
            if not sub.any():
                continue
            rr, cc = np.flatnonzero(sub.any(1)), np.flatnonzero(sub.any(0))
            piece = y[r0 + rr[0] : r0 + rr[-1] + 1, c0 + cc[0] : c0 + cc[-1] + 1]
            ph, pw = piece.shape
            f = min(scale, (CELL - 4) / max(ph, pw))
            size = (max(1, round(pw * f)), max(1, round(ph * f)))
            piece = _resized(piece, size)
            top, left = i * CELL + (CELL - size[1]) // 2, j * CELL + (CELL - size[0]) // 2
            out[top : top + size[1], left : left + size[0]] = np.maximum(
                out[top : top + size[1], left : left + size[0]], piece
            )
    return out


def _thickened(x):
    """Pen strokes thinner than MNIST's (about 1/8 of a digit's height) widened by a 3 x 3 maximum: a digit
    with fewer than THIN_PX strong pixels per occupied cell is a thin pen or a small font."""
    cells = x.reshape(x.shape[0] // CELL, CELL, x.shape[1] // CELL, CELL)
    occupied = int(((cells > 0.5).sum(axis=(1, 3)) > 0).sum())
    if occupied and (x > 0.5).sum() / occupied < THIN_PX:
        x = np.asarray(Image.fromarray(x, "F").filter(ImageFilter.MaxFilter(3)), np.float32)
    return x


def read_grid_image(path, grid, image_grid=None):
    """(float32 [G*28, G*28] in [0, 1], warnings) for a picture of an N x N grid (N = image_grid or G).

    The rules (cropping, cell size, placement, warnings) are in the module docstring."""
    n = grid if image_grid is None else image_grid
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise UserError(f"--grid must be a positive integer, got {n!r}")
    if n > grid:
        raise UserError(
            f"--grid {n} is larger than the model's {grid}x{grid} grid; this model reads at most {grid}x{grid} digits"
        )
    raw = _ink_plane(path)
    y, flat = _flattened(raw)
    raw_full = float((raw > 0.5).mean())  # before flattening, which would take a solid block for the page
    h_img, w_img = y.shape
    side = grid * CELL
    out = np.zeros((side, side), dtype=np.float32)
    warnings = []
    mask = y > (INK if flat else INK_UNEVEN)
    if mask.any():
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MedianFilter(3))) > 0
    if not mask.any():
        if raw_full > FULL:
            return out, [f"ink covers {raw_full:.0%} of the image: no clear background to tell digits from"]
        return out, ["almost no ink: the image looks blank"]
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    bands = [b - a for a, b in _runs(mask[y0:y1].any(1))]
    s_img = max(h_img, w_img) / n
    s_ink = CELL / DIGIT * float(np.median(bands))
    # A render at (a multiple of) the grid's own size is a grid whatever its digits look like.
    lattice = s_ink >= LATTICE * s_img or (h_img == w_img and h_img % (n * CELL) == 0)
    segmented = None if lattice else _segmented(y, mask, grid)
    if lattice:  # a grid that fills the picture: scale it whole
        scale = n * CELL / max(h_img, w_img)
        size = (max(1, round(w_img * scale)), max(1, round(h_img * scale)))
        placed = _resized(y, size)
        if n == grid:  # centred, as load_image does
            top, left = (side - size[1]) // 2, (side - size[0]) // 2
        else:  # the N x N cells go to the top-left N x N cells
            top, left = (n * CELL - size[1]) // 2, (n * CELL - size[0]) // 2
        out[top : top + size[1], left : left + size[0]] = placed
        aspect = w_img / h_img
        if not ASPECT[0] <= aspect <= ASPECT[1]:
            warnings.append(
                f"aspect ratio {aspect:.2f} (width/height) is outside [{ASPECT[0]}, {ASPECT[1]}]: "
                f"it does not look like a {n}x{n} grid"
            )
        region = placed
    elif segmented is not None:  # one digit per row band x column band: each into its own cell
        out = _thickened(segmented)
        used = out.reshape(grid, CELL, grid, CELL).max(axis=(1, 3)) > 0
        region = out[: CELL * (np.flatnonzero(used.any(1)).max() + 1), : CELL * (np.flatnonzero(used.any(0)).max() + 1)]
    else:  # small digits on a larger page: crop to the ink, padded back to whole cells
        m = float(np.median(bands))
        s = CELL / DIGIT * m
        h, w = y1 - y0, x1 - x0
        r_cells = max(1, round((h + s - m) / s))
        c_cells = max(1, round((w + s - m) / s))
        cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
        box_h, box_w = r_cells * s, c_cells * s
        top_src, left_src = round(cy - box_h / 2), round(cx - box_w / 2)
        bh, bw = round(box_h), round(box_w)
        crop = np.zeros((bh, bw), np.float32)  # the padding may reach past the picture: zeros there
        sy0, sx0 = max(0, top_src), max(0, left_src)
        sy1, sx1 = min(h_img, top_src + bh), min(w_img, left_src + bw)
        crop[sy0 - top_src : sy1 - top_src, sx0 - left_src : sx1 - left_src] = y[sy0:sy1, sx0:sx1]
        if r_cells > grid or c_cells > grid:
            warnings.append(
                f"the content spans {r_cells}x{c_cells} cells, more than the {grid}x{grid} grid "
                "holds: shrunk to fit, digits may be misread"
            )
        scale = min(CELL / s, side / max(bh, bw))
        size = (max(1, min(side, round(bw * scale))), max(1, min(side, round(bh * scale))))
        placed = _resized(crop, size)
        out[: size[1], : size[0]] = placed
        out = _thickened(out)
        region = placed
    if (out > 0.5).sum() < MIN_INK_PX:
        warnings.append("almost no ink at the model's scale: the image looks (nearly) empty")
    full = max(raw_full, float((region > 0.5).mean()))
    if full > FULL:
        warnings.append(f"ink covers {full:.0%} of the content: no clear background to tell digits from")
    return out, warnings


def readout_warnings(digits, grid):
    """Warnings about one read-out (a digit string) of a grid of grid x grid cells."""
    if not digits:
        return ["no digits read"]
    if len(digits) > grid * grid:
        return [f"read {len(digits)} digits, more than the {grid * grid} cells of a {grid}x{grid} grid"]
    return []


def atomic_write(path, write_fn):
    """write_fn(f) fills a binary file that replaces `path` whole (convert.files.atomic_write, the one writer)."""
    return _atomic_write(path, write_fn, binary_file=True, make_parents=False)


def save_image(path, x):
    """Write a float [0, 1] array as an 8-bit grayscale PNG, atomically."""
    pixels = np.round(np.clip(np.asarray(x, dtype=np.float32).squeeze(), 0, 1) * 255).astype(np.uint8)
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {np.shape(x)}")
    atomic_write(path, lambda f: Image.fromarray(pixels, "L").save(f, format="PNG"))
