"""The checkpoint directory both frameworks share: config.json + model.safetensors (+ metrics, train state).

Saves are atomic for the directory as a whole: everything is written and fsynced in a sibling temporary
directory, then swapped in with two renames. If a crash falls between the renames, the previous checkpoint
is left at a `.NAME.old-*` path and `resolve()` moves it back, so there is always one whole checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from . import safetensors_np
from .config import ModelConfig
from .errors import UserError
from .schema import check

FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
BEST = "best.safetensors"
METRICS = "metrics.json"
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
# The shipped model, installed beside these packages: the default of every loader and command that takes one.
SHIPPED = Path(__file__).resolve().parents[1] / "mla_mnist" / "checkpoints" / "small"


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
        olds = sorted(path.parent.glob(f".{path.name}.old-*")) if path.parent.is_dir() else []
        if olds:  # save() leaves at most one: it clears stale ones before its first rename
            try:
                os.rename(olds[-1], path)
            except OSError:  # read-only location: read the previous checkpoint where it lies
                return olds[-1]
        else:
            raise UserError(f"checkpoint {path} does not exist: pass a directory written by `mla-mnist train` "
                            "or `mla-mnist convert`")
    if not path.is_dir():
        raise UserError(f"{path} is not a checkpoint directory (expected a folder with {CONFIG} and {WEIGHTS}); "
                        "use `mla-mnist convert` to turn a weights file into one")
    if not (path / CONFIG).is_file():
        raise UserError(f"{path} has no {CONFIG}: it is not a checkpoint directory; pass a directory written by "
                        "`mla-mnist train`, or make one from a weights file with `mla-mnist convert`")
    return path


def check_writable(path) -> None:
    """Refuse, before any work, an output path that save() could not write or would clobber."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise UserError(f"{path} exists and is not a directory: choose another output path for the checkpoint")
        if not (path / CONFIG).is_file() and any(path.iterdir()):
            raise UserError(f"{path} is a folder that is not a checkpoint and is not empty; saving would replace "
                            "its contents: choose a new or empty output directory")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot write checkpoint to {path}: {ancestor} is a file, not a directory -- "
                        "choose a writable output directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"cannot write checkpoint to {path}: {ancestor} is not writable -- "
                        "choose a writable output directory")


def write_json(path: Path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def save(path, config: ModelConfig, weights: dict[str, np.ndarray], *, dtype: str | None = None,
         preset: str | None = None, metrics: dict | None = None, files: dict | None = None,
         keep: tuple[str, ...] = ()) -> Path:
    """Atomically (re)write the checkpoint directory `path`.

    files: extra {name: bytes | callable(Path)} written inside; keep: names carried over from the previous
    version of the directory (hard-linked, not copied) when they are not rewritten.
    """
    path = Path(path)
    check(config, {k: v.shape for k, v in weights.items()})
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: choose one of {', '.join(FLOAT_DTYPES)}")
    check_writable(path)
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(f".{path.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = parent / f".{path.name}.tmp-{os.getpid()}"
        tmp.mkdir()
    except OSError as e:
        raise UserError(f"cannot write checkpoint to {path}: {e.strerror} -- choose a writable --out directory") from None
    try:
        wdtype = dtype or _dtype_of(weights)
        safetensors_np.write(tmp / WEIGHTS, weights, dtype=wdtype, metadata={"format": "pt"})
        write_json(tmp / CONFIG, {"format_version": FORMAT_VERSION, "preset": preset, "dtype": wdtype,
                                  "model": config.to_dict()})
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
            for stale in parent.glob(f".{path.name}.old-*"):
                shutil.rmtree(stale, ignore_errors=True)
            old = parent / f".{path.name}.old-{os.getpid()}"
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write checkpoint to {path}: {e.strerror} -- choose a writable --out directory") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _dtype_of(weights) -> str:
    kinds = {str(np.asarray(v).dtype) for v in weights.values()}
    return "float16" if kinds == {"float16"} else "float32"


def read_config(path) -> tuple[ModelConfig, dict]:
    path = resolve(path)
    try:
        meta = json.loads((path / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path / CONFIG} is not valid JSON ({e}): the checkpoint is corrupt") from None
    if not isinstance(meta, dict) or "model" not in meta:
        raise UserError(f"{path / CONFIG} has no 'model' section: it is not a mla-mnist checkpoint config")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format {version!r}; this version reads format {FORMAT_VERSION}")
    return ModelConfig.from_dict(meta["model"]), meta


def validate_weights(weights: dict[str, np.ndarray], config: ModelConfig, where) -> None:
    check(config, {k: v.shape for k, v in weights.items()}, what=f"weights in {where}")
    packed = {k for k in weights if k.endswith(".weight") and f"{k[:-len('.weight')]}.scales" in weights} \
        if config.quantization else set()
    bad_dtype = [f"{k} ({v.dtype})" for k, v in weights.items()
                 if v.dtype.kind != "f" and not (k in packed and v.dtype == np.uint32)]
    if bad_dtype:
        raise UserError(f"weights in {where} must be floating point; got {', '.join(bad_dtype[:4])}")
    nonfinite = [k for k, v in weights.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
    if nonfinite:
        raise UserError(f"weights in {where} contain NaN or Inf ({', '.join(nonfinite[:4])}): "
                        "the training run diverged or the file is corrupt; use an earlier checkpoint")


def load(path, which: str = WEIGHTS) -> tuple[ModelConfig, dict[str, np.ndarray], dict]:
    """(config, weights as float32/float16 numpy arrays, config.json contents), fully validated."""
    path = resolve(path)
    config, meta = read_config(path)
    file = path / which
    if not file.is_file():
        raise UserError(f"{path} has no {which}: the checkpoint is incomplete; re-run the save or convert")
    weights, dtypes, _ = safetensors_np.read(file)
    validate_weights(weights, config, file)
    meta["weight_dtypes"] = sorted(set(dtypes.values()))
    return config, weights, meta


def read_metrics(path) -> dict:
    f = resolve(path) / METRICS
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{f} is not valid JSON ({e}): the checkpoint is corrupt; delete {METRICS} "
                        "or save it again") from None
