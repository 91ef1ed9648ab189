"""Reading (and if needed fetching) the four MNIST IDX files, checked against the published md5."""

import functools
import gzip
import hashlib
import io
import math
import os
import sys
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from convert.errors import UserError, quote
from convert.files import atomic_write

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILES = {"train": (TRAIN_IMAGES, TRAIN_LABELS), "test": (TEST_IMAGES, TEST_LABELS)}
# md5 of the decompressed content: the .gz wrappers differ between mirrors.
MD5 = {
    TRAIN_IMAGES: "6bbc9ace898e44ae57da46a324031adb",
    TRAIN_LABELS: "a25bea736e30d166cdddb491f175f624",
    TEST_IMAGES: "2646ac647ad5339dbf082846283269ea",
    TEST_LABELS: "27ae3e4e09519cfbb04c329615203637",
}
MIRRORS = ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"]
TIMEOUT_S = 20
N_VAL = 5000  # last 5,000 training images, held out for validation

_IDX = {2051: 3, 2049: 1}  # magic -> number of dimensions (images, labels)
# The largest MNIST file (train images) is 47,040,016 bytes: nothing bigger is read or inflated.
MAX_BYTES = 64 * 2**20
_verified = set()


def resolve_data_dir(data_dir=None):
    """The MNIST directory: the argument, else $MLA_MNIST_DIR, else a per-user cache dir."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("MLA_MNIST_DIR"):
        return Path(os.environ["MLA_MNIST_DIR"]).expanduser()
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mla-mnist" / "mnist"


def _find(directory, name):
    for candidate in (directory / name, directory / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _bad_header(path):
    return UserError(
        f"{quote(path)} has a wrong IDX header or size (not an MNIST file, or truncated); delete it and re-download it"
    )


def _expected_size(path, head):
    """Bytes an IDX file must have, from its header alone (Python ints: dimensions cannot overflow)."""
    magic = int.from_bytes(head[:4], "big") if len(head) >= 4 else None
    ndim = _IDX.get(magic)
    if ndim is None or len(head) < 4 + 4 * ndim:
        raise _bad_header(path)
    dims = [int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return 4 + 4 * ndim + math.prod(dims)


def _read(path):
    """The decompressed bytes, never more than MAX_BYTES; a plain file's header is checked against its size
    before the rest is read."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read(MAX_BYTES + 1)
        else:
            with open(path, "rb") as f:
                head = f.read(16)
                if _expected_size(path, head) != os.fstat(f.fileno()).st_size:
                    raise _bad_header(path)
                data = head + f.read(MAX_BYTES + 1 - len(head))
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise UserError(f"cannot read {quote(path)} ({e}); delete it and re-download") from None
    if len(data) > MAX_BYTES:
        raise UserError(
            f"{quote(path)} holds more than {MAX_BYTES:,} bytes: it is not an MNIST file; delete it and re-download it"
        )
    return data


def _parse(path, data):
    """Array from IDX bytes, after checking magic, dimensions and size."""
    if len(data) != _expected_size(path, data[:16]):
        raise _bad_header(path)
    ndim = _IDX[int.from_bytes(data[:4], "big")]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _verify(path, name, data):
    key = str(path.resolve())
    if key in _verified:
        return
    digest = hashlib.md5(data).hexdigest()
    if digest != MD5[name]:
        raise UserError(
            f"checksum mismatch for {quote(path)}: md5 {digest}, expected {MD5[name]}; "
            "the file is corrupt or not the original MNIST, delete it and re-download"
        )
    _verified.add(key)


def _load_file(path, name):
    data = _read(path)
    array = _parse(path, data)
    _verify(path, name, data)
    return array


def _fetch(directory, name):
    """Download NAME.gz from the first mirror that answers; returns an error string or None."""
    errors = []
    for mirror in MIRRORS:
        try:
            with urllib.request.urlopen(mirror + name + ".gz", timeout=TIMEOUT_S) as r:
                blob = r.read(MAX_BYTES + 1)
            with gzip.GzipFile(fileobj=io.BytesIO(blob)) as g:
                content = g.read(MAX_BYTES + 1)
            if len(blob) > MAX_BYTES or hashlib.md5(content).hexdigest() != MD5[name]:
                raise ValueError("checksum mismatch")
        except Exception as e:  # any network or format failure: try the next mirror
            errors.append(f"{mirror}: {e}")
            continue
        try:
            atomic_write(directory / (name + ".gz"), lambda f, blob=blob: f.write(blob), binary_file=True)
        except UserError as e:
            raise OSError(str(e)) from None  # reported below as the data directory's problem
        return None
    return "; ".join(errors)


def _download(directory, names):
    try:
        directory.mkdir(parents=True, exist_ok=True)
        errors = [_fetch(directory, name) for name in names]
    except OSError as e:
        raise UserError(
            f"cannot write the MNIST directory {quote(directory)} ({e.strerror or e}); "
            "pass --data-dir or set MLA_MNIST_DIR to a writable directory"
        ) from None
    return [e for e in errors if e]


@functools.lru_cache(maxsize=4)
def _load_cached(directory, split):
    arrays = [_load_file(_find(Path(directory), name), name) for name in FILES[split]]
    images, labels = arrays
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise UserError(
            f"the MNIST {split} files in {quote(directory)} do not match each other; delete them and re-download"
        )
    return images, labels


def load_split(split, data_dir=None, download=True):
    """(images uint8 [N, 28, 28], labels uint8 [N]) of the MNIST 'train' or 'test' file pair."""
    if split not in FILES:
        raise UserError(f"unknown MNIST split {split!r}; use 'train' or 'test'")
    directory = resolve_data_dir(data_dir).resolve()
    missing = [name for name in FILES[split] if _find(directory, name) is None]
    errors = _download(directory, missing) if missing and download else []
    missing = [name for name in missing if _find(directory, name) is None]
    if missing:
        why = f" (download failed: {errors[0]})" if errors else ""
        raise UserError(
            f"MNIST files missing from {quote(directory)}: {', '.join(missing)}{why}; put them there "
            "(plain or .gz), or point --data-dir or MLA_MNIST_DIR at a directory that has them"
        )
    return _load_cached(str(directory), split)


def digits(split, data_dir=None):
    """The model's splits: 'train' (first 55,000), 'val' (last 5,000 of train), 'test' (10,000)."""
    if split not in ("train", "val", "test"):
        raise UserError(f"unknown split {split!r}; use 'train', 'val' or 'test'")
    images, labels = load_split("test" if split == "test" else "train", data_dir)
    if split == "train":
        return images[:-N_VAL], labels[:-N_VAL]
    if split == "val":
        return images[-N_VAL:], labels[-N_VAL:]
    return images, labels
