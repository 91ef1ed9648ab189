"""Reading a user's grid picture into the model's input format, and writing grids as PNG."""

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from convert.config import CELL
from convert.errors import UserError

MIN_SIDE = 8


def _open(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file; pass the path of a PNG or JPEG image")
    try:
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img)  # photos carry their rotation in EXIF
    except Image.DecompressionBombError:
        raise UserError(f"{path} has too many pixels to be a digit grid; scale it down first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise UserError(f"{path} is not a readable PNG/JPEG image; pass a valid image file") from None


def _luminance(img):
    """Float [0, 1] luminance; transparency is composited over the background the ink implies."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # high bit depth grayscale
        y = np.asarray(img, dtype=np.float32)
        return y / (65535.0 if y.max(initial=0) > 255 else 255.0)
    rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255
    y = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    alpha = rgba[..., 3]
    if alpha.min() < 1:
        # Dark ink on a transparent page is meant to be seen on white, light ink on black.
        ink = float((y * alpha).sum() / max(alpha.sum(), 1e-6))
        background = 1.0 if ink < 0.5 else 0.0
        y = alpha * y + (1 - alpha) * background
    return y


def load_image(path, grid):
    """An image as float32 [G*28, G*28] in [0, 1], light digits on a zero background like MNIST."""
    img = _open(path)
    if min(img.size) < MIN_SIDE:
        raise UserError(f"{path} is too small ({img.size[0]}x{img.size[1]} px); "
                        f"use an image of at least {MIN_SIDE}x{MIN_SIDE} px")
    y = _luminance(img)
    h, w = y.shape
    b = max(1, min(h, w) // 20)
    border = np.concatenate([y[:b].ravel(), y[-b:].ravel(), y[:, :b].ravel(), y[:, -b:].ravel()])
    background = float(np.median(border))
    if background > 0.5:  # dark digits on a light page: invert to MNIST's polarity
        y, background = 1 - y, 1 - background
    top = float(y.max())
    # Stretch so the page becomes exactly 0 and the strongest ink 1, as in MNIST.
    y = np.clip((y - background) / (top - background), 0, 1) if top - background > 1e-3 else y * 0

    side = grid * CELL
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != (w, h):
        y = np.asarray(Image.fromarray(y.astype(np.float32), "F").resize(size, Image.LANCZOS))
        y = np.clip(y, 0, 1)
    out = np.zeros((side, side), dtype=np.float32)
    top_, left = (side - size[1]) // 2, (side - size[0]) // 2
    out[top_:top_ + size[1], left:left + size[0]] = y
    return out


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
