"""The checkpoint directory both frameworks share: config.json + model.safetensors (+ metrics, train state).

Saves are atomic for the directory as a whole: everything is written and fsynced in a sibling temporary
directory, then swapped in with two renames. If a crash falls between the renames, the previous checkpoint
is left at a `.NAME.old-*` path and `resolve()` moves it back, so there is always one whole checkpoint.

Temporary names carry the writer's pid: a save removes only those of processes that are gone, never those of
a live writer. `run_lock()` keeps a second process from writing the same destination at all.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from . import safetensors_np
from .config import ModelConfig
from .errors import UserError, quote
from .schema import check

FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
BEST = "best.safetensors"
METRICS = "metrics.json"
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
# The shipped model, installed beside these packages: the default of every loader and command that takes one.
SHIPPED = Path(__file__).resolve().parents[1] / "mla_mnist" / "checkpoints" / "small"


def shipped() -> dict[str, Path]:
    """The checkpoints that ship with the package, by name (their directory's name)."""
    return {p.name: p for p in sorted(SHIPPED.parent.iterdir()) if (p / CONFIG).is_file()}


def by_name(text) -> Path:
    """A checkpoint argument: the path as given, or, where nothing exists there, a shipped checkpoint's name."""
    path = Path(text)
    return path if path.exists() else shipped().get(str(text), path)


JSON_LIMIT = 64_000_000  # bytes: config.json, metrics.json and train_state.json are far smaller
_PID_SUFFIX = re.compile(r"-(\d+)$")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # someone else's process (or a pid out of range: not ours to judge)
    return True


def remove_stale(parent: Path, name: str, kind: str) -> None:
    """Remove `parent/.NAME.KIND-PID` entries whose writing process is no longer alive."""
    try:
        candidates = list(parent.glob(f".{glob.escape(name)}.{kind}-*"))
    except OSError:
        return
    for stale in candidates:
        m = _PID_SUFFIX.search(stale.name)
        if m is None or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        remove(stale)


def remove(path: Path) -> None:
    """Delete a file, a symlink (never what it points to) or a directory tree; quietly."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass


def lock_path(path) -> Path:
    path = Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def run_lock(path):
    """Hold an exclusive, non-blocking flock on `.NAME.lock` beside `path` for the whole write.

    A second writer of the same destination fails at once with a UserError naming the holder's pid. The lock
    file is removed on release (the holder re-checks after locking that its file is still the one at the path).
    Parent folders created for it are removed again if they are left empty.
    """
    path = Path(path)
    lock = lock_path(path)
    created = []
    ancestor = lock.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        created.append(ancestor)
        ancestor = ancestor.parent
    fd = None
    try:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise
                    holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                    os.close(fd)
                    fd = None
                    raise UserError(
                        f"{quote(path)} is being written by another process (pid {holder}): wait for "
                        "it or choose another --out"
                    ) from None
                try:
                    same = os.fstat(fd).st_ino == os.stat(lock).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)  # the holder we waited on removed the file: lock the one now at the path
                fd = None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError as e:
            raise UserError(f"cannot write {quote(path)}: {e.strerror or e} -- choose a writable destination") from None
        yield
    finally:
        if fd is not None:
            try:
                os.unlink(lock)
            except OSError:
                pass
            os.close(fd)
        for folder in created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break


def read_json(path: Path, what: str):
    """JSON from a file we wrote, refusing before reading one that is too large, deep or not UTF-8."""
    try:
        if path.stat().st_size > JSON_LIMIT:
            raise UserError(f"{quote(path)} is over {JSON_LIMIT:,} bytes: it is not {what}")
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{quote(path)} is not valid JSON ({e}): {what} is corrupt") from None
    except RecursionError:
        raise UserError(f"{quote(path)} is JSON nested too deeply: {what} is corrupt") from None
    except OSError as e:
        raise UserError(f"cannot read {quote(path)}: {e.strerror or e}") from None


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def resolve(path) -> Path:
    """The checkpoint directory at `path`, recovering one left between the two renames of a save."""
    path = Path(path)
    if not path.exists():
        olds = sorted(path.parent.glob(f".{glob.escape(path.name)}.old-*")) if path.parent.is_dir() else []
        olds = [o for o in olds if o.is_dir()]
        if olds:  # save() leaves at most one: it clears stale ones before its first rename
            try:
                os.rename(olds[-1], path)
            except OSError:  # read-only location: read the previous checkpoint where it lies
                return olds[-1]
        else:
            raise UserError(
                f"checkpoint {quote(path)} does not exist: pass a directory written by `mla-mnist train` "
                "or `mla-mnist convert`"
            )
    if not path.is_dir():
        raise UserError(
            f"{quote(path)} is not a checkpoint directory (expected a folder with {CONFIG} and {WEIGHTS}); "
            "use `mla-mnist convert` to turn a weights file into one"
        )
    if not (path / CONFIG).is_file():
        raise UserError(
            f"{quote(path)} has no {CONFIG}: it is not a checkpoint directory; pass a directory written by "
            "`mla-mnist train`, or make one from a weights file with `mla-mnist convert`"
        )
    return path


def check_writable(path) -> None:
    """Refuse, before any work, an output path that save() could not write or would clobber."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise UserError(
                f"{quote(path)} exists and is not a directory: choose another output path for the checkpoint"
            )
        if not (path / CONFIG).is_file() and any(path.iterdir()):
            raise UserError(
                f"{quote(path)} is a folder that is not a checkpoint and is not empty; saving would replace "
                "its contents: choose a new or empty output directory"
            )
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(
            f"cannot write checkpoint to {quote(path)}: {quote(ancestor)} is a file, not a directory -- "
            "choose a writable output directory"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(
            f"cannot write checkpoint to {quote(path)}: {quote(ancestor)} is not writable -- "
            "choose a writable output directory"
        )


def write_json(path: Path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def save(
    path,
    config: ModelConfig,
    weights: dict[str, np.ndarray],
    *,
    dtype: str | None = None,
    preset: str | None = None,
    metrics: dict | None = None,
    files: dict | None = None,
    keep: tuple[str, ...] = (),
) -> Path:
    """Atomically (re)write the checkpoint directory `path`.

    files: extra {name: bytes | callable(Path)} written inside; keep: names carried over from the previous
    version of the directory (hard-linked, not copied) when they are not rewritten.
    """
    path = Path(path)
    check(config, {k: v.shape for k, v in weights.items()})
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: choose one of {', '.join(FLOAT_DTYPES)}")
    check_writable(path)
    if path.is_symlink():  # write where the link points, and keep the link: renaming it would replace it
        for kind in ("tmp", "old"):  # left by versions that renamed the link
            remove_stale(path.parent, path.name, kind)
        path = Path(os.path.realpath(path))
    parent = path.parent
    where = quote(path)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale(parent, path.name, "tmp")  # those of killed saves; a live writer's stay
        tmp = parent / f".{path.name}.tmp-{os.getpid()}"
        remove(tmp)
        tmp.mkdir()
    except OSError as e:
        raise UserError(
            f"cannot write checkpoint to {where}: {e.strerror} -- choose a writable --out directory"
        ) from None
    try:
        wdtype = dtype or _dtype_of(weights)
        safetensors_np.write(tmp / WEIGHTS, weights, dtype=wdtype, metadata={"format": "pt"})
        write_json(
            tmp / CONFIG,
            {"format_version": FORMAT_VERSION, "preset": preset, "dtype": wdtype, "model": config.to_dict()},
        )
        if metrics is not None:
            write_json(tmp / METRICS, metrics)
        for name, content in (files or {}).items():
            if callable(content):
                content(tmp / name)
            else:
                (tmp / name).write_bytes(content)
        if path.exists():
            for name in keep:
                if not (tmp / name).exists() and (path / name).exists():
                    try:
                        os.link(path / name, tmp / name)
                    except OSError:  # a file system without hard links
                        shutil.copyfile(path / name, tmp / name)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        old = None
        if path.exists():
            # Left by a save killed after its swap: garbage now, and resolve() must find only this save's.
            remove_stale(parent, path.name, "old")
            old = parent / f".{path.name}.old-{os.getpid()}"
            remove(old)
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync_dir(parent)
        if old is not None:
            remove(old)
        # Left by a save killed between its renames while `path` was missing: this save replaces it.
        remove_stale(parent, path.name, "old")
    except OSError as e:
        remove(tmp)
        raise UserError(
            f"cannot write checkpoint to {where}: {e.strerror} -- choose a writable --out directory"
        ) from None
    except BaseException:
        remove(tmp)
        raise
    return path


def _dtype_of(weights) -> str:
    kinds = {str(np.asarray(v).dtype) for v in weights.values()}
    return "float16" if kinds == {"float16"} else "float32"


def read_config(path) -> tuple[ModelConfig, dict]:
    path = resolve(path)
    meta = read_json(path / CONFIG, "the checkpoint's config")
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise UserError(f"{quote(path / CONFIG)} has no 'model' section: it is not a mla-mnist checkpoint config")
    version = meta.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool) or not isinstance(version, int):
        raise UserError(f"{quote(path)} has checkpoint format {version!r}; this version reads format {FORMAT_VERSION}")
    if not isinstance(meta.get("preset"), (str, type(None))) or not isinstance(meta.get("dtype"), (str, type(None))):
        raise UserError(f"{quote(path / CONFIG)} has a preset or dtype that is not a string: the checkpoint is corrupt")
    return ModelConfig.from_dict(meta["model"]), meta


def validate_weights(weights: dict[str, np.ndarray], config: ModelConfig, where) -> None:
    check(config, {k: v.shape for k, v in weights.items()}, what=f"weights in {quote(where)}")
    packed = (
        {k for k in weights if k.endswith(".weight") and f"{k[: -len('.weight')]}.scales" in weights}
        if config.quantization
        else set()
    )
    bad_dtype = [
        f"{k} ({v.dtype})"
        for k, v in weights.items()
        if v.dtype.kind != "f" and not (k in packed and v.dtype == np.uint32)
    ]
    if bad_dtype:
        raise UserError(f"weights in {quote(where)} must be floating point; got {', '.join(bad_dtype[:4])}")
    nonfinite = [k for k, v in weights.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
    if nonfinite:
        raise UserError(
            f"weights in {quote(where)} contain NaN or Inf ({', '.join(nonfinite[:4])}): "
            "the training run diverged or the file is corrupt; use an earlier checkpoint"
        )


def load(path, which: str = WEIGHTS) -> tuple[ModelConfig, dict[str, np.ndarray], dict]:
    """(config, weights as float32/float16 numpy arrays, config.json contents), fully validated."""
    path = resolve(path)
    config, meta = read_config(path)
    file = path / which
    if not file.is_file():
        raise UserError(f"{quote(path)} has no {which}: the checkpoint is incomplete; re-run the save or convert")
    weights, dtypes, _ = safetensors_np.read(file)
    validate_weights(weights, config, file)
    meta["weight_dtypes"] = sorted(set(dtypes.values()))
    return config, weights, meta


def read_metrics(path) -> dict:
    f = resolve(path) / METRICS
    if not f.is_file():
        return {}
    data = read_json(f, f"the checkpoint's {METRICS} (delete it or save again)")
    if not isinstance(data, dict):
        raise UserError(
            f"{quote(f)} is not a JSON object: the checkpoint is corrupt; delete {METRICS} or save it again"
        )
    return data
