"""Digit-grid pictures that `make-grid` did not render, and how the shipped model reads them.

    python scripts/foreign_images.py OUT_DIR                 # draw the images and OUT_DIR/labels.json
    python scripts/foreign_images.py OUT_DIR --measure DOC   # also read them before/after, write DOC (markdown)

The pictures: digits in the TrueType fonts of this machine (DejaVu and whatever else fc-list finds; PIL's
bitmap font scaled up if there are none), hand-drawn-like strokes (jittered polylines of each digit's shape),
photo-like pages (margins, gradients, noise, blur, JPEG), other aspect ratios, 2x2 and 3x3 grids, dark on
light and light on dark, greyscale, RGB and RGBA. Every picture is drawn from a fixed seed and knows its label:
the digits in reading order (row by row, left to right).

"Before" reads each picture with the loader of commit a27e632 (`git show a27e632:mnist_grid/images.py`: the
whole picture scaled into the grid, no cropping, no --grid); "after" with `read_grid_image`, passing
--grid N for the pictures that say they hold an N x N grid, as a user would.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

ROOT = Path(__file__).resolve().parents[1]
BEFORE_COMMIT = "a27e632"

# Each digit as polylines on a unit box (x right, y down), to be jittered and drawn with a thick pen.
_T = np.linspace(0, 2 * np.pi, 24)


def _loop(cx, cy, rx, ry, t=_T):
    return list(zip(cx + rx * np.sin(t), cy - ry * np.cos(t)))


STROKES = {
    0: [_loop(0.5, 0.5, 0.32, 0.48)],
    1: [[(0.32, 0.2), (0.55, 0.0), (0.55, 1.0)]],
    2: [[(0.15, 0.25), (0.3, 0.04), (0.65, 0.02), (0.84, 0.22), (0.78, 0.45), (0.15, 1.0), (0.9, 0.98)]],
    3: [
        [
            (0.15, 0.1),
            (0.5, 0.0),
            (0.8, 0.15),
            (0.75, 0.38),
            (0.42, 0.48),
            (0.8, 0.6),
            (0.85, 0.84),
            (0.5, 1.0),
            (0.12, 0.9),
        ]
    ],
    4: [[(0.68, 1.0), (0.68, 0.0), (0.08, 0.68), (0.92, 0.68)]],
    5: [[(0.85, 0.0), (0.25, 0.0), (0.18, 0.45), (0.5, 0.37), (0.8, 0.5), (0.85, 0.8), (0.55, 1.0), (0.15, 0.9)]],
    6: [
        [
            (0.75, 0.03),
            (0.42, 0.1),
            (0.2, 0.45),
            (0.2, 0.8),
            (0.45, 1.0),
            (0.75, 0.9),
            (0.8, 0.66),
            (0.52, 0.5),
            (0.2, 0.66),
        ]
    ],
    7: [[(0.08, 0.02), (0.9, 0.0), (0.42, 1.0)]],
    8: [_loop(0.5, 0.25, 0.24, 0.24), _loop(0.5, 0.73, 0.3, 0.27)],
    9: [_loop(0.48, 0.3, 0.27, 0.28), [(0.75, 0.3), (0.7, 0.65), (0.6, 1.0)]],
}


def fonts():
    try:
        out = subprocess.run(
            ["fc-list", "--format", "%{file}\n"], capture_output=True, text=True, timeout=20, check=False
        ).stdout
        files = sorted({f for f in out.splitlines() if f.lower().endswith((".ttf", ".otf"))})
    except (OSError, subprocess.SubprocessError):
        files = []
    files = files or sorted(glob.glob("/usr/share/fonts/**/*.ttf", recursive=True))
    # Decorative or symbol fonts have no digits; keep those whose "8" has ink.
    good = []
    for f in files:
        try:
            font = ImageFont.truetype(f, 40)
        except OSError:
            continue
        if font.getbbox("8")[3] - font.getbbox("8")[1] > 10:
            good.append(f)
    return good


def _glyph_font(path, size):
    if path is None:  # no TrueType font here: PIL's bitmap font, drawn small and scaled up by the caller
        return ImageFont.load_default()
    return ImageFont.truetype(path, size)


def draw_digit(canvas, digit, box, style, rng, font_path=None, ink=255):
    """Draw one digit into box (x0, y0, x1, y1) of an 'L' canvas."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    d = ImageDraw.Draw(canvas)
    if style == "font":
        size = int(h * rng.uniform(0.6, 0.8))
        font = _glyph_font(font_path, size)
        cx, cy = x0 + w / 2 + rng.uniform(-0.05, 0.05) * w, y0 + h / 2 + rng.uniform(-0.05, 0.05) * h
        if font_path is None:
            tile = Image.new("L", (16, 16), 0)
            ImageDraw.Draw(tile).text((8, 8), str(digit), fill=255, font=font, anchor="mm")
            tile = tile.resize((size, size), Image.BILINEAR)
            canvas.paste(Image.new("L", tile.size, ink), (int(cx - size / 2), int(cy - size / 2)), tile)
        else:
            d.text((cx, cy), str(digit), fill=ink, font=font, anchor="mm")
        return
    # Hand-drawn-like: jittered polylines, slanted, pen width ~ 1/9 of the digit's height.
    dh = h * rng.uniform(0.62, 0.78)
    dw = dh * rng.uniform(0.55, 0.75)
    ox, oy = x0 + (w - dw) / 2, y0 + (h - dh) / 2
    slant = rng.uniform(-0.25, 0.15)
    pen = max(2, int(dh * rng.uniform(0.08, 0.14)))
    for line in STROKES[digit]:
        pts = np.asarray(line) + rng.normal(0, 0.03, (len(line), 2))
        xs = ox + (pts[:, 0] + slant * (0.5 - pts[:, 1])) * dw
        ys = oy + pts[:, 1] * dh
        d.line(list(zip(xs, ys)), fill=ink, width=pen, joint="curve")


def layout(cells, rows, cols, cell, style, rng, font_path=None, margin=(0, 0, 0, 0)):
    """An 'L' picture (white ink on black) of a rows x cols lattice; cells: {(r, c): digit}."""
    top, right, bottom, left = margin
    img = Image.new("L", (left + cols * cell + right, top + rows * cell + bottom), 0)
    for (r, c), digit in cells.items():
        x, y = left + c * cell, top + r * cell
        draw_digit(img, digit, (x, y, x + cell, y + cell), style, rng, font_path)
    return img


def finish(img, rng, dark_on_light, photo=False, mode="L"):
    """Polarity, page effects and colour mode; img is white ink on black 'L'."""
    if photo:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.6, 1.6)))
    y = np.asarray(img, np.float32) / 255
    page = np.full_like(y, 1.0 if dark_on_light else 0.0)
    ink = 0.08 if dark_on_light else 0.95
    if photo:  # uneven light and a greyish page, sensor noise
        h, w = y.shape
        gy, gx = np.mgrid[0:h, 0:w] / max(h, w)
        grad = rng.uniform(-0.25, 0.25) * gx + rng.uniform(-0.25, 0.25) * gy
        page = page * rng.uniform(0.8, 0.95) + (0.1 if not dark_on_light else 0) + grad
    out = page * (1 - y) + ink * y
    if photo:
        out = out + rng.normal(0, rng.uniform(0.02, 0.06), out.shape)
    g = np.clip(np.round(out * 255), 0, 255).astype(np.uint8)
    if mode == "L":
        return Image.fromarray(g, "L")
    tint = rng.uniform(0.8, 1.0, 3)
    rgb = np.clip(g[..., None] * tint, 0, 255).astype(np.uint8)
    if mode == "RGB":
        return Image.fromarray(rgb, "RGB")
    # RGBA: ink colour everywhere, alpha = ink coverage (a transparent page)
    a = np.round(np.clip(y, 0, 1) * 255).astype(np.uint8)
    col = np.zeros_like(rgb) + (np.array([20, 30, 120]) if dark_on_light else np.array([250, 250, 210])).astype(
        np.uint8
    )
    return Image.fromarray(np.dstack([col, a]), "RGBA")


def _cells(rng, rows, cols, k):
    picked = sorted(rng.choice(rows * cols, size=k, replace=False))
    return {(int(i) // cols, int(i) % cols): int(rng.integers(0, 10)) for i in picked}


def generate(out_dir: Path, seed: int = 17):
    """Draw the pictures into out_dir; returns [{file, kind, label, grid, mode}]."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ttf = fonts() or [None]
    items = []

    def save(name, img, kind, cells, cols, grid=None, fmt="png", font=None):
        label = "".join(str(cells[k]) for k in sorted(cells))
        kind = f"{kind} ({Path(font).stem})" if font else kind
        path = out_dir / f"{len(items):02d}_{name}.{fmt}"
        img.save(path, **({"quality": int(rng.integers(70, 92))} if fmt == "jpg" else {"optimize": True}))
        items.append(
            {
                "file": path.name,
                "kind": kind,
                "label": label,
                "grid": grid,
                "mode": img.mode,
                "size": f"{img.width}x{img.height}",
            }
        )

    def font_at(i):
        return ttf[i % len(ttf)]

    i = 0
    for n in range(10):  # typeset 4x4 grids: the picture is the grid, various cell sizes
        cells = _cells(rng, 4, 4, int(rng.integers(2, 17)))
        cell = int(rng.integers(28, 64))
        img = layout(cells, 4, 4, cell, "font", rng, font_at(i))
        i += 1
        save(
            "font_grid",
            finish(img, rng, n % 2 == 0, mode="L" if n % 3 else "RGB"),
            "font 4x4 grid",
            cells,
            4,
            font=font_at(i - 1),
        )
    for n in range(8):  # a few typeset digits with a wide margin on a larger page
        rows, cols = int(rng.integers(1, 3)), int(rng.integers(1, 5))
        cells = _cells(rng, rows, cols, int(rng.integers(1, rows * cols + 1)))
        cell = int(rng.integers(24, 48))
        m = tuple(int(v) for v in rng.integers(cell, 5 * cell, 4))
        img = layout(cells, rows, cols, cell, "font", rng, font_at(i), margin=m)
        i += 1
        save(
            "font_page",
            finish(img, rng, n % 2 == 1, mode="RGB"),
            f"font {rows}x{cols} on a page",
            cells,
            cols,
            font=font_at(i - 1),
        )
    for n in range(10):  # hand-drawn-like 4x4 grids
        cells = _cells(rng, 4, 4, int(rng.integers(2, 17)))
        img = layout(cells, 4, 4, int(rng.integers(28, 56)), "strokes", rng)
        save("strokes_grid", finish(img, rng, n % 2 == 0), "strokes 4x4 grid", cells, 4)
    for n in range(10):  # photo-like: margins, gradient, noise, blur, JPEG
        style = "font" if n % 2 else "strokes"
        rows, cols = (4, 4) if n < 5 else (int(rng.integers(1, 4)), int(rng.integers(2, 5)))
        cells = _cells(rng, rows, cols, int(rng.integers(1, rows * cols + 1)))
        cell = int(rng.integers(30, 56))
        m = tuple(int(v) for v in rng.integers(4, 3 * cell, 4))
        img = layout(cells, rows, cols, cell, style, rng, font_at(i), margin=m)
        i += 1
        save(
            "photo",
            finish(img, rng, n % 3 != 2, photo=True, mode="RGB"),
            f"photo-like {style} {rows}x{cols}",
            cells,
            cols,
            fmt="jpg",
        )
    for g in (2, 3):  # grids smaller than the model's, read with --grid
        for n in range(6):
            style = "font" if n % 2 else "strokes"
            cells = _cells(rng, g, g, int(rng.integers(1, g * g + 1)))
            img = layout(cells, g, g, int(rng.integers(28, 60)), style, rng, font_at(i))
            i += 1
            save(
                f"grid{g}",
                finish(img, rng, n % 3 == 0, mode="L" if n % 2 else "RGB"),
                f"{style} {g}x{g} grid",
                cells,
                g,
                grid=g,
            )
    for n in range(4):  # RGBA: ink on a transparent page
        cells = _cells(rng, 4, 4, int(rng.integers(2, 12)))
        img = layout(cells, 4, 4, int(rng.integers(28, 48)), "font" if n % 2 else "strokes", rng, font_at(i))
        i += 1
        save("rgba", finish(img, rng, n % 2 == 0, mode="RGBA"), "RGBA 4x4 grid", cells, 4)
    for n in range(4):  # other aspect ratios: 2x4 and 4x2 lattices that fill the picture
        rows, cols = (2, 4) if n % 2 == 0 else (4, 2)
        cells = _cells(rng, rows, cols, int(rng.integers(2, rows * cols + 1)))
        img = layout(cells, rows, cols, int(rng.integers(28, 50)), "font" if n < 2 else "strokes", rng, font_at(i))
        i += 1
        save("aspect", finish(img, rng, n % 2 == 0), f"{rows}x{cols} lattice", cells, cols)
    (out_dir / "labels.json").write_text(json.dumps(items, indent=1) + "\n")
    return items


def _old_images_module():
    src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{BEFORE_COMMIT}:mnist_grid/images.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    tmp = Path(tempfile.mkdtemp()) / "images_before.py"
    tmp.write_text(src)
    spec = importlib.util.spec_from_file_location("images_before", tmp)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def measure(out_dir: Path, items, doc: Path, checkpoint=None):
    sys.path.insert(0, str(ROOT))
    from mla_mnist.backends import DEFAULT_CHECKPOINT, get_backend
    from mla_mnist.evaluation import predict_tokens
    from mnist_grid import decode, read_grid_image, readout_warnings

    checkpoint = checkpoint or DEFAULT_CHECKPOINT
    backend = get_backend("torch", "cpu")
    model = backend.load(checkpoint)
    grid = model.config.grid
    old = _old_images_module()
    paths = [out_dir / it["file"] for it in items]
    before = decode(predict_tokens(backend, model, np.stack([old.load_image(p, grid) for p in paths])))
    read = [read_grid_image(p, grid, it["grid"]) for p, it in zip(paths, items)]
    after = decode(predict_tokens(backend, model, np.stack([x for x, _ in read])))
    rows, ok_b, ok_a, warned_wrong, warned_right = [], 0, 0, 0, 0
    groups = {}
    for it, b, a, (_, w) in zip(items, before, after, read):
        g = groups.setdefault(it["file"].split("_", 1)[1].rsplit(".", 1)[0], [0, 0, 0])
        g[0] += 1
        g[1] += b == it["label"]
        g[2] += a == it["label"]
        w = [*w, *readout_warnings(a, it["grid"] or grid)]
        ok_b += b == it["label"]
        ok_a += a == it["label"]
        warned_wrong += bool(w) and a != it["label"]
        warned_right += bool(w) and a == it["label"]

        def mark(read, label=it["label"]):
            return f"`{read or '(none)'}`" + (" ✓" if read == label else "")

        rows.append(
            f"| {it['file']} | {it['kind']}, {it['mode']} {it['size']} | {it.get('grid') or ''} | "
            f"`{it['label']}` | {mark(b)} | {mark(a)} | {'; '.join(w)} |"
        )
    n = len(items)
    wrong_a = n - ok_a
    text = (
        f"""# Foreign images: what the shipped model reads in pictures it did not render

`python scripts/foreign_images.py docs/foreign_images --measure docs/foreign_images.md` draws {n} pictures
(seed 17; {len(fonts()) or "no"} TrueType fonts found on this machine, named in the table) and reads them
with `{Path(checkpoint).relative_to(ROOT) if Path(checkpoint).is_relative_to(ROOT) else checkpoint}` (torch, CPU,
greedy). *Before*: the loader of commit {BEFORE_COMMIT} (the whole picture scaled into the {grid}x{grid} grid).
*After*: `read_grid_image` (crop to the ink padded back to whole cells, `--grid N` for the pictures that
hold an N x N grid) and the warnings `predict` prints for it. ✓ marks an exact read-out.

## Totals

| | exact read-outs |
|---|---|
| before | {ok_b} / {n} ({ok_b / n:.0%}) |
| after | {ok_a} / {n} ({ok_a / n:.0%}) |

After: {warned_wrong} of the {wrong_a} wrong read-outs came with a warning; {warned_right} of the {ok_a} right
ones did too.

What the warnings can and cannot say: they check the layout (aspect ratio, cells, ink, length of the
read-out), so a picture the model reads digit for digit but gets one digit wrong (a thin or unusual glyph, a
noisy photo) passes without one. The 2x2 and 3x3 pictures are read *before* as the old loader did (no
`--grid`: the picture stretched over the 4x4 grid) and *after* with `--grid 2` / `--grid 3`.

By group (file name):

| group | pictures | before | after |
|---|---|---|---|
"""
        + "\n".join(f"| {k} | {v[0]} | {v[1]} | {v[2]} |" for k, v in groups.items())
        + """

## Per image

| file | kind | --grid | label | before | after | warnings (after) |
|---|---|---|---|---|---|---|
"""
        + "\n".join(rows)
        + "\n"
    )
    doc.write_text(text)
    print(
        f"exact before {ok_b}/{n}, after {ok_a}/{n}; warned on {warned_wrong}/{wrong_a} wrong, "
        f"{warned_right}/{ok_a} right"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=17)
    p.add_argument("--measure", type=Path, metavar="DOC", help="read the pictures and write this markdown file")
    p.add_argument("--checkpoint", type=Path)
    args = p.parse_args()
    items = generate(args.out, args.seed)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"{len(items)} pictures in {args.out} ({size / 1e6:.2f} MB)")
    if args.measure:
        measure(args.out, items, args.measure, args.checkpoint)


if __name__ == "__main__":
    main()
