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
        olds = sorted(path.parent.glob(f".{path.name}.old-*")) if path.parent.exists() else []
        if olds:
            os.rename(olds[-1], path)
        else:
            raise UserError(f"checkpoint {path} does not exist: pass a directory written by `mla-mnist train` "
                            "or `mla-mnist convert`")
    if not path.is_dir():
        raise UserError(f"{path} is not a checkpoint directory (expected a folder with {CONFIG} and {WEIGHTS}); "
                        "use `mla-mnist convert` to turn a weights file into one")
    if not (path / CONFIG).is_file():
        raise UserError(f"{path} has no {CONFIG}: it is not a checkpoint directory, or it was not written whole")
    return path


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
                    os.link(path / name, tmp / name)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        old = None
        if path.exists():
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
    bad_dtype = [f"{k} ({v.dtype})" for k, v in weights.items() if v.dtype.kind != "f"]
    if bad_dtype:
        raise UserError(f"weights in {where} must be floating point; got {', '.join(bad_dtype[:4])}")
    nonfinite = [k for k, v in weights.items() if not np.isfinite(v).all()]
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
    return json.loads(f.read_text()) if f.is_file() else {}
