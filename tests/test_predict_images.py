"""predict on pictures that are not the model's own grids: warnings, --grid, hostile files, MNIST discovery."""

import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convert.errors import UserError
from mla_mnist.cli import main
from mnist_grid import (
    GridStream,
    load_image,
    read_grid_image,
    readout_warnings,
    save_image,
)
from mnist_grid import images as images_mod

ROOT = Path(__file__).resolve().parents[1]
TORCH = ["--framework", "torch", "--device", "cpu"]


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    try:
        import torch
    except ImportError:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def off_grid(tmp_path_factory):
    """Pictures that do not fit a 4x4 grid: four grids side by side, a blank page, a solid block of ink."""
    d = tmp_path_factory.mktemp("off_grid")
    x, _ = GridStream("test", 4, 0).fixed(4, seed=1, k=16)
    save_image(d / "wide.png", np.concatenate(list(x), axis=1))
    Image.new("RGB", (120, 90), (255, 255, 255)).save(d / "empty.png")
    ink = np.zeros((120, 120), np.uint8)
    ink[:4], ink[-4:], ink[:, :4], ink[:, -4:] = 255, 255, 255, 255  # a white frame round black
    Image.fromarray(ink).save(d / "all_ink.png")
    return d


def test_off_grid_pictures_warn_one_line_each_and_still_exit_0(off_grid):
    paths = [off_grid / n for n in ("wide.png", "empty.png", "all_ink.png")]
    rc, out, err = run_cli(["predict", *paths, *TORCH, "--json"])
    assert rc == 0, err
    assert [r["file"] for r in json.loads(out)] == [str(p) for p in paths]
    lines = err.strip().splitlines()
    assert len(lines) == 3, err
    for p, line in zip(paths, lines):
        assert line.startswith(f"mla-mnist: warning: {str(p)!r}: "), line
    assert "more than the 4x4 grid holds" in lines[0]
    assert "blank" in lines[1] and "no digits read" in lines[1]
    assert "no clear background" in lines[2]


def test_readout_warnings():
    assert readout_warnings("", 4) == ["no digits read"]
    assert readout_warnings("12345", 2) == ["read 5 digits, more than the 4 cells of a 2x2 grid"]
    assert readout_warnings("1234", 2) == []


def _make_grid(path, g, seed):
    rc, out, err = run_cli(["make-grid", path, "--grid", g, "--seed", seed])
    assert rc == 0, err
    return out.strip()


@pytest.mark.parametrize("g", [2, 3])
def test_smaller_grid_goes_to_the_top_left_cells(g, tmp_path):
    label = _make_grid(tmp_path / "g.png", g, 5)
    x, warnings = read_grid_image(tmp_path / "g.png", 4, g)
    assert x.shape == (112, 112) and warnings == [] and label
    np.testing.assert_array_equal(x[: g * 28, : g * 28], load_image(tmp_path / "g.png", g))  # cell (r, c) -> (r, c)
    assert not x[g * 28 :].any() and not x[:, g * 28 :].any()


def test_shipped_model_reads_2x2_and_3x3_grids_with_grid_flag(tmp_path):
    for g in (2, 3):
        paths = [tmp_path / f"g{g}_{s}.png" for s in range(1, 5)]
        labels = [_make_grid(p, g, s) for s, p in zip(range(1, 5), paths)]
        rc, out, err = run_cli(["predict", *paths, "--grid", g, *TORCH, "--json"])
        assert rc == 0 and err == "", err
        assert [r["digits"] for r in json.loads(out)] == labels


def test_a_rendered_4x4_grid_reads_as_before(tmp_path):
    x, _ = GridStream("test", 4, 0).fixed(3, seed=7)
    for i in range(3):
        save_image(tmp_path / f"{i}.png", x[i])
        y, warnings = read_grid_image(tmp_path / f"{i}.png", 4)
        np.testing.assert_array_equal(y, load_image(tmp_path / f"{i}.png", 4))
        assert warnings == []


def test_grid_larger_than_the_models_is_refused(tmp_path):
    _make_grid(tmp_path / "g.png", 2, 1)
    rc, out, err = run_cli(["predict", tmp_path / "g.png", "--grid", "5", *TORCH])
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mla-mnist: error: --grid 5 is larger than the model's 4x4")


def _png(width, height):
    """A valid 1-bit greyscale PNG of width x height, all black: tiny on disk, huge once decoded."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + bytes((width + 7) // 8)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(row * height, 9))
        + chunk(b"IEND", b"")
    )


def test_pixel_limit_is_checked_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    path.write_bytes(_png(10_000, 10_000))
    assert path.stat().st_size < 100_000
    assert Image.MAX_IMAGE_PIXELS == images_mod.MAX_PIXELS == 50_000_000

    def no_decoding(self, *a, **k):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    with pytest.raises(UserError, match="is 10000\u00d710000 pixels, over the 50-megapixel limit"):
        read_grid_image(path, 4)
    monkeypatch.undo()
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png(20_000, 20_000))  # past twice the limit: Pillow itself refuses it in open()
    for p in (path, bomb):
        rc, _, err = run_cli(["predict", p, *TORCH])
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "over the 50-megapixel limit" in err, err
    assert "400 megapixels" in err


def test_just_under_the_limit_is_not_refused_for_its_size(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(_png(7_000, 7_000))  # 49 megapixels: decoded, and blank
    x, warnings = read_grid_image(path, 4)
    assert not x.any() and "blank" in warnings[0]


def test_nan_pixels_are_refused(tmp_path):
    y = np.zeros((40, 40), np.float32)
    y[10, 10] = np.nan
    Image.fromarray(y, "F").save(tmp_path / "nan.tif")
    with pytest.raises(UserError, match="NaN or infinite pixels"):
        read_grid_image(tmp_path / "nan.tif", 4)
    y[10, 10] = np.inf
    Image.fromarray(y, "F").save(tmp_path / "inf.tif")
    rc, _, err = run_cli(["predict", tmp_path / "inf.tif", *TORCH])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "NaN or infinite" in err


def test_float_tiff_in_0_1_reads(tmp_path):
    y = np.zeros((56, 56), np.float32)
    y[10:40, 20:26] = 0.9
    Image.fromarray(y, "F").save(tmp_path / "f.tif")
    x, _ = read_grid_image(tmp_path / "f.tif", 2)
    assert x.max() == pytest.approx(1.0)


def test_newline_in_a_missing_file_name_stays_one_line(tmp_path):
    rc, out, err = run_cli(["predict", tmp_path / "two\nlines.png", *TORCH])
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0] and "two\\nlines.png" in lines[0]


# ---- finding MNIST the way the CLI does ---------------------------------------------------------------


def test_mnist_candidates_follow_the_cli(monkeypatch, tmp_path):
    import conftest

    monkeypatch.setenv("MLA_MNIST_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("MLA_MNIST_TEST_FALLBACK", str(tmp_path / "shared"))
    assert conftest.mnist_candidates() == [
        tmp_path / "env",
        tmp_path / "cache" / "mla-mnist" / "mnist",
        tmp_path / "shared",
    ]
    assert conftest.mnist_dir() is None


def test_missing_mnist_is_one_line_not_a_crashed_worker(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "XDG_CACHE"))}
    env.update(MLA_MNIST_DIR="/nonexistent", HOME=str(tmp_path), MLA_MNIST_TEST_FALLBACK=str(tmp_path / "none"))
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider", "tests/test_data.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    text = (r.stdout + r.stderr).strip()
    assert r.returncode == 2, text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and "MNIST not found" in lines[0] and "MLA_MNIST_DIR" in lines[0], text
    assert "node down" not in text and "Traceback" not in text
