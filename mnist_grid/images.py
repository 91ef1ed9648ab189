"""Reading a user's grid picture into the model's input format, and writing grids as PNG.

How MNIST grids place digits, and the rules `read_grid_image` applies to a picture that was not rendered here:

* A grid of G x G cells is G*28 px square. Each 28 x 28 cell holds one digit or nothing; MNIST fits a digit
  into a 20 x 20 box (its longer side is 20 px) and centres it by mass in the cell, so a digit leaves a margin
  of about 4 px (1/7 of the cell) on every side, and two neighbouring digits are about 8 px apart.
* Polarity: the median of the border (a strip 1/20 of the shorter side) is the page. A light page is
  inverted, then the page is stretched to 0 and the strongest ink to 1, as in MNIST. RGB(A), palette and
  greyscale (8/16 bit, float) images all become this one luminance plane; transparency is composited over
  the page its ink implies (dark ink over white, light ink over black).
* Ink is a pixel above 0.35 after the stretch, with isolated specks removed (3 x 3 median filter). The content
  is the bounding box of the ink. Its rows of digits are the runs of ink rows in the row profile.
* The cell size. The picture is taken as an N x N grid (N = `image_grid`, else the model's grid G): its cells
  are s_img = max(width, height) / N px. The digits say the cells are s_ink = 28/20 * h px, where h is the
  height of the tallest row of digits. If s_ink >= 0.6 * s_img the picture is a grid that fills itself (a
  `make-grid` image, a scan of one): the ink box padded out to whole cells of that N x N lattice is the whole
  grid again, so the picture is scaled as a whole (longer side N*28 px) and, for N < G, its N x N cells go
  into the top-left N x N cells of the model's grid, cell (r, c) to cell (r, c). Reading order is kept: the
  model reads occupied cells row by row and skips blank ones.
* Otherwise the digits are much smaller than the picture's cells (a margin, a page, a photo): the cell is
  s = 28/20 * m px, m the median height of the rows of digits, and the ink box (h x w) is padded back to a
  whole number of cells: R = max(1, round((h + s - m) / s)) rows and C = max(1, round((w + s - m) / s))
  columns (a box of k digits is k cells less one margin pair), a box of R*s x C*s px centred on the ink box.
  It is scaled so a cell is 28 px and placed at the top-left of the model's grid; one that spans more than G
  cells either way is shrunk to fit (and warned about).

Warnings (returned, one short phrase each; the image is still read): the picture's aspect ratio is outside
[0.8, 1.25] when it is taken as a whole grid; the content spans more cells than the grid holds; almost no ink
(blank or flat image); ink over 45% of the content (no background to tell digits from). `readout_warnings`
adds: no digits read, or more digits than the grid has cells.

Hostile inputs: a picture over MAX_PIXELS is refused from its header, before any pixel is decoded (and
Pillow's own decompression-bomb limit is set to it); NaN or infinite pixels (float TIFF) are refused.
File names are quoted with repr() so a newline in one cannot split the one-line error.
"""

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from convert.errors import UserError

CELL = 28
DIGIT = 20  # MNIST's digit box inside a cell
MIN_SIDE = 8
MAX_PIXELS = 50_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow's own bomb check: warns above, refuses above twice this
INK = 0.35
LATTICE = 0.6
ASPECT = (0.8, 1.25)
FULL = 0.45
MIN_INK_PX = 15  # at model scale: a thin MNIST "1" has about 40 pixels above 0.5


def _open(path):
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise UserError(f"{str(path)!r} {what}; pass the path of a PNG or JPEG image")
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:  # from the header: nothing decoded yet
                raise UserError(f"image {str(path)!r} is {w}\u00d7{h} pixels, over the "
                                f"{MAX_PIXELS // 1_000_000}-megapixel limit; scale it down first")
            img.load()
            return ImageOps.exif_transpose(img)  # photos carry their rotation in EXIF
    except Image.DecompressionBombError:
        raise UserError(f"image {str(path)!r} has too many pixels to be a digit grid; scale it down first") from None
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
        raise UserError(f"{str(path)!r} is too small ({img.size[0]}x{img.size[1]} px); "
                        f"use an image of at least {MIN_SIDE}x{MIN_SIDE} px")
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
    out[top_:top_ + size[1], left:left + size[0]] = y
    return out


def _runs(flags):
    """(start, stop) of each run of True."""
    f = np.concatenate([[False], flags, [False]]).astype(np.int8)
    d = np.diff(f)
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def read_grid_image(path, grid, image_grid=None):
    """(float32 [G*28, G*28] in [0, 1], warnings) for a picture of an N x N grid (N = image_grid or G).

    The rules (cropping, cell size, placement, warnings) are in the module docstring."""
    n = grid if image_grid is None else image_grid
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise UserError(f"--grid must be a positive integer, got {n!r}")
    if n > grid:
        raise UserError(f"--grid {n} is larger than the model's {grid}x{grid} grid; "
                        f"this model reads at most {grid}x{grid} digits")
    y = _ink_plane(path)
    h_img, w_img = y.shape
    side = grid * CELL
    out = np.zeros((side, side), dtype=np.float32)
    warnings = []
    mask = y > INK
    if mask.any():
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MedianFilter(3))) > 0
    if not mask.any():
        return out, ["almost no ink: the image looks blank"]
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    bands = [b - a for a, b in _runs(mask[y0:y1].any(1))]
    s_img = max(h_img, w_img) / n
    s_ink = CELL / DIGIT * max(bands)
    if s_ink >= LATTICE * s_img:  # a grid that fills the picture: scale it whole
        scale = n * CELL / max(h_img, w_img)
        size = (max(1, round(w_img * scale)), max(1, round(h_img * scale)))
        placed = _resized(y, size)
        if n == grid:  # centred, as load_image does
            top, left = (side - size[1]) // 2, (side - size[0]) // 2
        else:  # the N x N cells go to the top-left N x N cells
            top, left = (n * CELL - size[1]) // 2, (n * CELL - size[0]) // 2
        out[top:top + size[1], left:left + size[0]] = placed
        aspect = w_img / h_img
        if not ASPECT[0] <= aspect <= ASPECT[1]:
            warnings.append(f"aspect ratio {aspect:.2f} (width/height) is outside [{ASPECT[0]}, {ASPECT[1]}]: "
                            f"it does not look like a {n}x{n} grid")
        region = placed
    else:  # small digits on a larger page: crop to the ink, padded back to whole cells
        m = float(np.median(bands))
        s = CELL / DIGIT * m
        h, w = y1 - y0, x1 - x0
        r_cells = max(1, round((h + s - m) / s))
        c_cells = max(1, round((w + s - m) / s))
        cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
        box_h, box_w = r_cells * s, c_cells * s
        top_src, left_src = int(round(cy - box_h / 2)), int(round(cx - box_w / 2))
        bh, bw = int(round(box_h)), int(round(box_w))
        crop = np.zeros((bh, bw), np.float32)  # the padding may reach past the picture: zeros there
        sy0, sx0 = max(0, top_src), max(0, left_src)
        sy1, sx1 = min(h_img, top_src + bh), min(w_img, left_src + bw)
        crop[sy0 - top_src:sy1 - top_src, sx0 - left_src:sx1 - left_src] = y[sy0:sy1, sx0:sx1]
        if r_cells > grid or c_cells > grid:
            warnings.append(f"the content spans {r_cells}x{c_cells} cells, more than the {grid}x{grid} grid "
                            "holds: shrunk to fit, digits may be misread")
        scale = min(CELL / s, side / max(bh, bw))
        size = (max(1, min(side, round(bw * scale))), max(1, min(side, round(bh * scale))))
        placed = _resized(crop, size)
        out[:size[1], :size[0]] = placed
        region = placed
    if (out > 0.5).sum() < MIN_INK_PX:
        warnings.append("almost no ink at the model's scale: the image looks (nearly) empty")
    full = float((region > 0.5).mean())
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
    """write_fn(f) fills a binary temp file beside `path` that then replaces it: never a half-written file."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path} ({e.strerror or e}); choose a writable location") from None
        raise


def save_image(path, x):
    """Write a float [0, 1] array as an 8-bit grayscale PNG, atomically."""
    pixels = np.round(np.clip(np.asarray(x, dtype=np.float32).squeeze(), 0, 1) * 255).astype(np.uint8)
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {np.shape(x)}")
    atomic_write(path, lambda f: Image.fromarray(pixels, "L").save(f, format="PNG"))
