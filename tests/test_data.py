"""Tests of the framework-neutral data package: MNIST files, grids, tokens, metrics, images."""

import gzip
import os
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from convert.errors import UserError
from mnist_grid import (
    FINISH,
    PAD,
    START,
    VOCAB,
    GridStream,
    compose,
    decode,
    digits,
    draw,
    edit_distance,
    encode,
    evaluate,
    load_image,
    load_split,
    mnist,
    render,
    resolve_data_dir,
    save_image,
)
from mnist_grid.metrics import format_table
from mnist_grid.tokens import max_tokens

TEST_FILES = (mnist.TEST_IMAGES, mnist.TEST_LABELS)


def _real_dir():
    env = os.environ.get("MLA_MNIST_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared/data/mnist"


@pytest.fixture(scope="module")
def mnist_dir():
    d = _real_dir()
    if not all(mnist._find(d, n) for names in mnist.FILES.values() for n in names):
        pytest.skip(f"MNIST not found in {d}; set MLA_MNIST_DIR to the directory of the IDX files")
    return d


@pytest.fixture(scope="module")
def test_pool(mnist_dir):
    return load_split("test", mnist_dir, download=False)


def _plain_copy(src_dir, dst_dir, names=TEST_FILES):
    """Decompressed copies of MNIST files in dst_dir, as plain IDX files."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        (dst_dir / name).write_bytes(mnist._read(mnist._find(src_dir, name)))
    return dst_dir


# --- MNIST files ---------------------------------------------------------------------------


def test_real_files_parse(mnist_dir):
    train_x, train_y = load_split("train", mnist_dir, download=False)
    test_x, test_y = load_split("test", mnist_dir, download=False)
    assert train_x.shape == (60000, 28, 28) and train_y.shape == (60000,)
    assert test_x.shape == (10000, 28, 28) and test_y.shape == (10000,)
    assert train_x.dtype == np.uint8 and train_y.dtype == np.uint8
    assert set(np.unique(train_y)) == set(range(10)) == set(np.unique(test_y))
    assert train_x.max() == 255 and train_x.min() == 0
    assert not train_x.flags.writeable  # the in-process cache can't be modified by callers


def test_plain_and_gzip_read_the_same(mnist_dir, test_pool, tmp_path):
    plain = _plain_copy(mnist_dir, tmp_path / "plain")
    assert not list(plain.glob("*.gz"))
    x, y = load_split("test", plain, download=False)
    np.testing.assert_array_equal(x, test_pool[0])
    np.testing.assert_array_equal(y, test_pool[1])


def test_model_splits(mnist_dir):
    full_x, full_y = load_split("train", mnist_dir)
    tx, ty = digits("train", mnist_dir)
    vx, vy = digits("val", mnist_dir)
    ex, _ = digits("test", mnist_dir)
    assert len(tx) == len(ty) == 55000 and len(vx) == len(vy) == 5000 and len(ex) == 10000
    np.testing.assert_array_equal(np.concatenate([tx, vx]), full_x)
    np.testing.assert_array_equal(np.concatenate([ty, vy]), full_y)
    with pytest.raises(UserError, match="unknown split"):
        digits("validation", mnist_dir)
    with pytest.raises(UserError, match="unknown MNIST split"):
        load_split("val", mnist_dir)


def test_flipped_byte_fails_checksum(mnist_dir, tmp_path):
    d = _plain_copy(mnist_dir, tmp_path)
    path = d / mnist.TEST_IMAGES
    data = bytearray(path.read_bytes())
    data[5000] ^= 0xFF  # pixel data, so the header stays valid
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum mismatch") as e:
        load_split("test", d, download=False)
    assert str(path) in str(e.value) and "re-download" in str(e.value)


def test_corrupt_gzip_copy_fails_checksum(mnist_dir, tmp_path):
    data = bytearray(mnist._read(mnist._find(mnist_dir, mnist.TEST_LABELS)))
    data[100] = (data[100] + 1) % 10
    (tmp_path / (mnist.TEST_LABELS + ".gz")).write_bytes(gzip.compress(bytes(data)))
    shutil.copy(mnist._find(mnist_dir, mnist.TEST_IMAGES), tmp_path)
    with pytest.raises(UserError, match="checksum mismatch"):
        load_split("test", tmp_path, download=False)


@pytest.mark.parametrize("damage", ["magic", "truncate", "short"])
def test_wrong_idx_header(mnist_dir, tmp_path, damage):
    d = _plain_copy(mnist_dir, tmp_path)
    path = d / mnist.TEST_LABELS
    data = path.read_bytes()
    data = {"magic": b"\x00\x00\x08\x03" + data[4:], "truncate": data[:-10], "short": data[:3]}[damage]
    path.write_bytes(data)
    with pytest.raises(UserError, match="wrong IDX header") as e:
        load_split("test", d, download=False)
    assert "re-download" in str(e.value)


def test_not_gzip_is_user_error(mnist_dir, tmp_path):
    _plain_copy(mnist_dir, tmp_path, names=(mnist.TEST_IMAGES,))
    (tmp_path / (mnist.TEST_LABELS + ".gz")).write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="re-download"):
        load_split("test", tmp_path, download=False)


def test_missing_files_without_download(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(UserError) as e:
        load_split("test", d, download=False)
    msg = str(e.value)
    assert str(d.resolve()) in msg and mnist.TEST_IMAGES in msg and mnist.TEST_LABELS in msg
    assert "--data-dir" in msg and "MLA_MNIST_DIR" in msg and "\n" not in msg


def test_missing_files_offline(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(mnist.urllib.request, "urlopen", offline)
    d = tmp_path / "new" / "mnist"
    with pytest.raises(UserError, match="missing") as e:
        load_split("test", d)
    assert str(d.resolve()) in str(e.value) and "download failed" in str(e.value)
    assert not list(d.iterdir())  # nothing half-written is left behind


def test_download_from_mirror(mnist_dir, test_pool, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in TEST_FILES:
        (mirror / (name + ".gz")).write_bytes(gzip.compress(mnist._read(mnist._find(mnist_dir, name))))
    monkeypatch.setattr(mnist, "MIRRORS", ["file:///nonexistent/", mirror.as_uri() + "/"])
    d = tmp_path / "cache"
    x, y = load_split("test", d)
    assert sorted(p.name for p in d.iterdir()) == sorted(n + ".gz" for n in TEST_FILES)
    np.testing.assert_array_equal(x, test_pool[0])
    np.testing.assert_array_equal(y, test_pool[1])


def test_unwritable_data_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write the MNIST directory"):
        load_split("test", blocker / "mnist")


def test_resolve_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MLA_MNIST_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("MLA_MNIST_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(mnist.sys, "platform", "linux")
    assert resolve_data_dir() == tmp_path / "xdg" / "mla-mnist" / "mnist"
    monkeypatch.setattr(mnist.sys, "platform", "darwin")
    assert resolve_data_dir() == Path.home() / "Library/Caches/mla-mnist/mnist"


# --- grid composition ----------------------------------------------------------------------


def _cells(x, grid):
    """[n, G*28, G*28] -> [n, G*G, 28, 28] in reading order."""
    n = len(x)
    return x.reshape(n, grid, 28, grid, 28).transpose(0, 1, 3, 2, 4).reshape(n, grid * grid, 28, 28)


def _check_grids(x, tokens, d, images, labels, grid):
    """Blank cells are exactly 0, and each digit is its source image at its reading-order slot."""
    cells = _cells(x, grid)
    n = len(x)
    assert x.dtype == np.float32 and tokens.dtype == np.int64
    assert x.shape == (n, grid * 28, grid * 28) and tokens.shape == (n, grid * grid + 2)
    np.testing.assert_array_equal(cells.reshape(n, grid * grid, -1).any(-1), d.occupied)
    assert not cells[~d.occupied].any()
    for i in range(n):
        occupied = np.flatnonzero(d.occupied[i])
        assert len(occupied) == d.k[i]
        assert tokens[i, 0] == START and tokens[i, d.k[i] + 1] == FINISH
        assert (tokens[i, d.k[i] + 2 :] == PAD).all()
        for slot, c in enumerate(occupied):
            np.testing.assert_array_equal(cells[i, c], images[d.index[i, c]] / np.float32(255))
            assert tokens[i, slot + 1] == labels[d.index[i, c]]


def test_blank_cells_and_reading_order(test_pool):
    images, labels = test_pool
    d = draw(4, 64, len(labels), np.random.default_rng(1))
    x, tokens = render(images, labels, 4, d)
    _check_grids(x, tokens, d, images, labels, 4)
    assert 0 <= x.min() and x.max() <= 1
    x2, tokens2 = compose(images, labels, 4, 64, np.random.default_rng(1))
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(tokens2, tokens)
    assert (d.index[~d.occupied] == -1).all()


def test_k_distribution_and_cells_uniform():
    d = draw(4, 8000, 100, np.random.default_rng(0))
    counts = np.bincount(d.k, minlength=17)
    assert counts[0] == 0 and (counts[1:] > 8000 / 16 * 0.75).all()
    np.testing.assert_array_equal(d.occupied.sum(1), d.k)
    per_cell = d.occupied.mean(0)  # expected 8.5/16 for every cell
    assert np.abs(per_cell - 8.5 / 16).max() < 0.04
    assert d.index.max() < 100 and d.index[d.occupied].min() >= 0


def test_forced_digit_count(test_pool):
    images, labels = test_pool
    x, tokens = compose(images, labels, 3, 20, np.random.default_rng(0), k=5)
    assert ((tokens != PAD).sum(1) == 7).all()
    d = draw(3, 4, 10, np.random.default_rng(0), k=np.array([1, 2, 8, 9]))
    np.testing.assert_array_equal(d.occupied.sum(1), [1, 2, 8, 9])
    for bad in (0, 10):
        with pytest.raises(UserError, match="between 1 and 9"):
            draw(3, 4, 10, np.random.default_rng(0), k=bad)


def test_augmentation_shifts_digits(test_pool):
    images, labels = test_pool
    d = draw(3, 16, len(labels), np.random.default_rng(2), shift=2)
    x, tokens = render(images, labels, 3, d)
    cells = _cells(x, 3)
    assert not cells[~d.occupied].any()
    assert np.abs(d.shift).max() == 2 and (d.shift != 0).any()
    for i, c in zip(*np.nonzero(d.occupied)):
        dy, dx = d.shift[i, c]
        src = np.pad(images[d.index[i, c]], 2)[2 - dy : 30 - dy, 2 - dx : 30 - dx] / np.float32(255)
        np.testing.assert_array_equal(cells[i, c], src)
    plain = render(images, labels, 3, d._replace(shift=None))
    np.testing.assert_array_equal(plain[1], tokens)


@pytest.fixture(scope="module")
def stream(mnist_dir):
    return GridStream("val", 4, seed=7, data_dir=mnist_dir)


def test_stream_determinism(stream, mnist_dir):
    x, t = stream.batch(0, 3, 16)
    x2, t2 = GridStream("val", 4, seed=7, data_dir=mnist_dir).batch(0, 3, 16)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(t, t2)
    for other in (
        GridStream("val", 4, seed=8, data_dir=mnist_dir).batch(0, 3, 16),
        stream.batch(1, 3, 16),
        stream.batch(0, 4, 16),
        GridStream("test", 4, seed=7, data_dir=mnist_dir).batch(0, 3, 16),
    ):
        assert not np.array_equal(other[0], x)


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("world,batch_size", [(2, 16), (2, 7), (3, 10), (3, 2)])
def test_rank_shards_concatenate(mnist_dir, augment, world, batch_size):
    s = GridStream("val", 3, seed=1, data_dir=mnist_dir, augment=augment)
    full_x, full_t = s.batch(2, 5, batch_size)
    parts = [s.batch(2, 5, batch_size, rank=r, world=world) for r in range(world)]
    assert sum(len(p[0]) for p in parts) == batch_size
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), full_x)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), full_t)


def test_batches_cover_epoch(stream):
    sizes = [len(t) for _, t in stream.batches(0, 10, 4)]
    assert sizes == [4, 4, 2]
    shard = [len(t) for _, t in stream.batches(0, 10, 4, rank=1, world=2)]
    assert shard == [2, 2, 1]
    first = next(stream.batches(0, 10, 4))
    np.testing.assert_array_equal(first[1], stream.batch(0, 0, 4)[1])


def test_fixed_eval_set(stream, mnist_dir):
    x, t = stream.fixed(50, chunk=16)
    other = GridStream("val", 4, seed=123, data_dir=mnist_dir, augment=True)
    x2, t2 = other.fixed(50, chunk=50)
    np.testing.assert_array_equal(x, x2)  # independent of the training seed, chunking, augmentation
    np.testing.assert_array_equal(t, t2)
    assert x.shape == (50, 112, 112) and not np.array_equal(stream.fixed(50, seed=1)[1], t)
    assert ((t != PAD).sum(1) >= 3).all() and (t[:, 0] == START).all()


def test_stream_rejects_bad_settings(mnist_dir):
    with pytest.raises(UserError, match="seed"):
        GridStream("val", 4, seed=-1, data_dir=mnist_dir)
    with pytest.raises(UserError, match="grid"):
        GridStream("val", 0, seed=0, data_dir=mnist_dir)
    with pytest.raises(UserError, match="unknown split"):
        GridStream("dev", 4, seed=0, data_dir=mnist_dir)


@settings(max_examples=50, deadline=None)
@given(grid=st.integers(1, 5), seed=st.integers(0, 2**32 - 1), n=st.integers(1, 6))
def test_composer_property(test_pool, grid, seed, n):
    images, labels = test_pool
    d = draw(grid, n, len(labels), np.random.default_rng(seed))
    x, tokens = render(images, labels, grid, d)
    assert ((tokens != PAD).sum(1) == d.k + 2).all()
    assert ((1 <= d.k) & (d.k <= grid * grid)).all()
    _check_grids(x, tokens, d, images, labels, grid)


# --- tokens --------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(0, 9), max_size=16), max_size=8))
def test_encode_decode_roundtrip(seqs):
    tokens = encode(seqs, 18)
    assert tokens.shape == (len(seqs), 18) and tokens.dtype == np.int64
    assert ((tokens >= 0) & (tokens < VOCAB)).all()
    assert decode(tokens) == ["".join(map(str, s)) for s in seqs]
    assert decode(tokens.tolist()) == decode(tokens)


def test_token_edges():
    assert START == 10 and FINISH == 11 and PAD == 12 and VOCAB == 13 and max_tokens(4) == 18
    np.testing.assert_array_equal(encode(["307"], 6), [[START, 3, 0, 7, FINISH, PAD]])
    with pytest.raises(UserError, match="sequence length"):
        encode([[1, 2, 3, 4, 5]], 6)
    for bad in (["12a"], [[1, 10]]):
        with pytest.raises(UserError, match="outside 0-9"):
            encode(bad, 6)
    assert decode([[1, 2, PAD, 3], [START, FINISH, 4], [START, 5, START, 6], []]) == ["12", "", "5", ""]


# --- metrics -------------------------------------------------------------------------------

digit_strings = st.text(alphabet="0123456789", max_size=12)


@settings(max_examples=50, deadline=None)
@given(digit_strings, digit_strings, digit_strings)
def test_edit_distance_properties(a, b, c):
    d = edit_distance(a, b)
    assert edit_distance(a, a) == 0
    assert d == edit_distance(b, a)
    assert abs(len(a) - len(b)) <= d <= max(len(a), len(b))
    assert (d == 0) == (a == b)
    assert edit_distance(a, c) <= d + edit_distance(b, c)


def test_edit_distance_known():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([1, 2, 3], [1, 3]) == 1
    assert edit_distance("", "123") == 3


def test_evaluate_known_numbers():
    m = evaluate(["123"], ["1234"])
    assert m["samples"] == 1 and m["exact_match"] == 0 and m["length_accuracy"] == 0
    assert m["digit_accuracy"] == pytest.approx(0.75)
    m = evaluate(["123", "5", "77", "0"], ["1234", "5", "78", "0"])
    assert m["exact_match"] == pytest.approx(0.5)
    assert m["length_accuracy"] == pytest.approx(0.75)
    assert m["digit_accuracy"] == pytest.approx(1 - 2 / 8)
    assert set(m["per_length"]) == {1, 2, 4}
    assert m["per_length"][1] == {"samples": 2, "exact_match": 1.0, "digit_accuracy": 1.0}
    assert m["per_length"][2]["digit_accuracy"] == pytest.approx(0.5)
    table = format_table(m)
    assert "| all | 4 | 50.00% | 75.00% |" in table and "| 4 | 1 | 0.00% | 75.00% |" in table
    empty = evaluate([], [])
    assert empty["samples"] == 0 and empty["exact_match"] == 0 and empty["per_length"] == {}
    assert evaluate(["12345"], [""])["digit_accuracy"] == 0.0


def test_evaluate_token_arrays():
    target = encode(["12", "345"], 6)
    pred = encode(["12", "35"], 6)
    m = evaluate(pred, target)
    assert m["exact_match"] == 0.5 and m["digit_accuracy"] == pytest.approx(1 - 1 / 5)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(digit_strings, digit_strings), max_size=12), st.randoms(use_true_random=False))
def test_evaluate_properties(pairs, rnd):
    pred, target = [p for p, _ in pairs], [t for _, t in pairs]
    m = evaluate(pred, target)
    n = len(pairs)
    assert m["samples"] == n
    for key in ("exact_match", "digit_accuracy", "length_accuracy"):
        assert 0 <= m[key] <= 1
    if n:
        assert m["exact_match"] == sum(p == t for p, t in pairs) / n
        # Digit accuracy is perfect exactly when every read-out is: no error is ever free.
        assert (m["digit_accuracy"] == 1) == (m["exact_match"] == 1)
        assert m["exact_match"] <= m["length_accuracy"]
    # The per-length rows partition the samples and average back to the totals.
    assert set(m["per_length"]) == {len(t) for t in target}
    assert sum(r["samples"] for r in m["per_length"].values()) == n
    assert sum(r["exact_match"] * r["samples"] for r in m["per_length"].values()) == pytest.approx(m["exact_match"] * n)
    # Order does not matter, and token arrays read the same as strings.
    rnd.shuffle(pairs)
    assert evaluate([p for p, _ in pairs], [t for _, t in pairs]) == m  # integer counts: exactly equal
    assert evaluate(encode(pred, 14), encode(target, 14)) == m
    if n:
        perfect = evaluate(target, target)
        assert perfect["exact_match"] == perfect["digit_accuracy"] == perfect["length_accuracy"] == 1.0


# --- images --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grid_image(test_pool):
    images, labels = test_pool
    x, _ = compose(images, labels, 4, 1, np.random.default_rng(3), k=6)
    return x[0] / x[0].max()  # the loader stretches the strongest ink to 1


def test_png_roundtrip(grid_image, tmp_path):
    save_image(tmp_path / "g.png", grid_image)
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]  # no temp file left behind
    with Image.open(tmp_path / "g.png") as img:
        assert img.mode == "L" and img.size == (112, 112)
    y = load_image(tmp_path / "g.png", 4)
    assert y.dtype == np.float32 and y.shape == (112, 112)
    assert np.abs(y - grid_image).max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize("fmt,tol", [("PNG", 0.005), ("JPEG", 0.03)])
def test_inverted_rgb_is_detected(grid_image, tmp_path, fmt, tol):
    rgb = np.repeat(np.round((1 - grid_image) * 255).astype(np.uint8)[..., None], 3, axis=2)
    path = tmp_path / f"dark_on_light.{fmt.lower()}"
    Image.fromarray(rgb, "RGB").save(path, format=fmt, quality=95)
    y = load_image(path, 4)
    assert np.abs(y - grid_image).mean() < tol
    assert np.median(y) < 0.02  # background back to dark


@pytest.mark.parametrize("ink", [0, 255])
def test_rgba_ink_on_transparent(grid_image, tmp_path, ink):
    rgba = np.zeros((112, 112, 4), dtype=np.uint8)
    rgba[..., :3] = ink
    rgba[..., 3] = np.round(grid_image * 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    y = load_image(tmp_path / "a.png", 4)
    assert np.abs(y - grid_image).max() <= 2 / 255


def test_palette_and_rescaled_images(grid_image, tmp_path):
    gray = Image.fromarray(np.round(grid_image * 255).astype(np.uint8), "L")
    gray.convert("P").save(tmp_path / "p.png")
    assert np.abs(load_image(tmp_path / "p.png", 4) - grid_image).max() <= 2 / 255
    gray.resize((224, 224), Image.NEAREST).save(tmp_path / "big.png")
    assert np.abs(load_image(tmp_path / "big.png", 4) - grid_image).mean() < 0.01
    gray.crop((0, 0, 112, 56)).save(tmp_path / "wide.png")  # 2:1 -> centred, padded rows
    y = load_image(tmp_path / "wide.png", 4)
    assert y.shape == (112, 112) and not y[:28].any() and not y[84:].any()
    assert np.abs(y[28:84] - grid_image[:56] / grid_image[:56].max()).max() <= 2 / 255


def test_bad_images(tmp_path):
    (tmp_path / "notes.txt").write_text("these are not pixels\n")
    (tmp_path / "empty.png").write_bytes(b"")
    Image.new("L", (4, 4)).save(tmp_path / "tiny.png")
    Image.fromarray(np.full((40, 40), 200, np.uint8)).save(tmp_path / "truncated.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "truncated.png").read_bytes()[:60])
    for name in ("notes.txt", "empty.png", "truncated.png"):
        with pytest.raises(UserError, match="not a readable PNG/JPEG image"):
            load_image(tmp_path / name, 4)
    with pytest.raises(UserError, match="too small"):
        load_image(tmp_path / "tiny.png", 4)
    with pytest.raises(UserError, match="does not exist"):
        load_image(tmp_path / "missing.png", 4)
    with pytest.raises(UserError, match="cannot write"):
        save_image(tmp_path / "no" / "such" / "dir.png", np.zeros((8, 8)))


def test_blank_image_loads_as_zeros(tmp_path):
    Image.new("RGB", (50, 30), (255, 255, 255)).save(tmp_path / "white.png")
    y = load_image(tmp_path / "white.png", 2)
    assert y.shape == (56, 56) and not y.any()
