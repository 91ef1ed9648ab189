"""`mla-mnist show`: an image, the digits read from it, and where the decoder looked for each digit."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np

from convert import checkpoint
from convert.errors import UserError

from .backends import default_framework, get_backend


def attention_maps(backend, model, images: np.ndarray, layers: str = "last"):
    """Greedy read-out plus one heat map per generated digit.

    Returns (digit strings, maps): maps[i] is float32 [k_i, S, S] with S = image side / patch, the
    cross-attention weight of each patch (heads averaged; the last decoder layer, or all layers averaged
    with layers="all") at the step that produced digit j. The class token's share is left out.
    """
    from mnist_grid import decode

    cfg = model.config
    tokens = backend.generate(model, images)
    w = backend.attention_weights(model, images, tokens)  # [B, L, H, T, 1 + N]
    w = (w[:, -1] if layers == "last" else w.mean(axis=1)).mean(axis=1)  # [B, T, 1 + N]
    side = cfg.image_size // cfg.patch
    digits = decode(tokens)
    # Query t predicts token t + 1, so digit j (token j + 1) comes from query j.
    maps = [w[b, : len(d), 1:].reshape(len(d), side, side).astype(np.float32) for b, d in enumerate(digits)]
    return digits, maps


def _overlay(heat: np.ndarray) -> np.ndarray:
    """RGBA heat map scaled to its own maximum (where it looked, not how sharply); faint patches transparent."""
    from matplotlib import colormaps

    level = np.clip(heat / max(float(heat.max()), 1e-12), 0, 1)
    rgba = colormaps["autumn"](level)
    rgba[..., 3] = 0.9 * level
    return rgba


def draw(
    image: np.ndarray,
    digits: str,
    maps: np.ndarray,
    title: str | None = None,
    caption: str | None = None,
    columns: int = 8,
):
    """A matplotlib Figure (no pyplot: safe in scripts and notebooks): the image and one panel per digit."""
    from matplotlib.figure import Figure

    k = len(digits)
    cols = max(1, min(columns, k))
    rows = math.ceil(k / cols)
    panel = 1.3
    top = max(3.0, min(5.0, panel * cols * 0.6))
    fig = Figure(figsize=(max(panel * cols, top), top + panel * rows + 0.3), layout="constrained")
    grid = fig.add_gridspec(1 + rows, cols, height_ratios=[top] + [panel] * rows)
    h, w = image.shape
    ax = fig.add_subplot(grid[0, :])
    ax.imshow(image, cmap="gray", vmin=0, vmax=1)
    # A 100-digit read-out is wider than the figure: wrapped onto several lines rather than cut off.
    text = title or f"read: {digits or '(no digits)'}"
    ax.set_title("\n".join(textwrap.wrap(text, width=max(40, 9 * cols))), fontsize=12)
    ax.set_axis_off()
    for j, (digit, heat) in enumerate(zip(digits, maps)):
        ax = fig.add_subplot(grid[1 + j // cols, j % cols])
        ax.imshow(image, cmap="gray", vmin=0, vmax=1.6)  # dimmed under the heat map
        ax.imshow(_overlay(heat), extent=(0, w, h, 0), interpolation="nearest")
        ax.set_title(f"{j + 1}: {digit}", fontsize=9)
        ax.set_axis_off()
    if caption and k:
        fig.supxlabel(caption, fontsize=9)
    return fig


def _png_path(out) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out} must end in .png; show writes PNG images")
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: the folder {out.parent} does not exist; create it or choose another")
    return out


def save_figure(fig, out) -> Path:
    """PNG written to a temporary file beside `out`, then renamed over it (never a half-written file)."""
    from mnist_grid.images import atomic_write

    out = _png_path(out)
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100))
    return out


def show(checkpoint_dir, image_path, out, device="auto", framework=None, layers="last") -> str:
    """Read one image, draw it with its cross-attention maps to `out` (PNG); returns the digits read."""
    from mnist_grid import read_grid_image

    _png_path(out)  # before any work
    config, _ = checkpoint.read_config(checkpoint_dir)
    image, _ = read_grid_image(image_path, config.grid)  # cropped and placed as predict reads it
    backend = get_backend(framework or default_framework(), device)
    model = backend.load(checkpoint_dir)
    digits, maps = attention_maps(backend, model, image[None], layers)
    which = "last decoder layer" if layers == "last" else "all decoder layers averaged"
    fig = draw(
        image,
        digits[0],
        maps[0],
        title=f"{Path(image_path).name}: {digits[0] or '(no digits)'}",
        caption=f"where the decoder's cross-attention looked while writing each digit ({which}, heads averaged)",
    )
    save_figure(fig, out)
    return digits[0]
