"""Greedy evaluation on a fixed set of grids, the same for every framework."""

from __future__ import annotations

import hashlib

import numpy as np
from tqdm import tqdm

from mnist_grid import GridStream, decode, evaluate

EVAL_SEED = 2024  # the fixed evaluation grids: every command and framework reads the same ones


def eval_set(split: str, grid: int, samples: int, data_dir=None, raw: bool = False):
    """The fixed evaluation grids (raw: as uint8 pixels, the same grids in a quarter of the bytes)."""
    return GridStream(split, grid, seed=0, data_dir=data_dir).fixed(samples, seed=EVAL_SEED, raw=raw)


def progress_bar(total: int, unit: str, quiet: bool = False, desc: str | None = None):
    """A tqdm bar on stderr with rate and ETA; silent with quiet, or when stderr is not a terminal."""
    return tqdm(total=total, unit=unit, desc=desc, disable=True if quiet else None, dynamic_ncols=True, mininterval=0.5)


def default_batch(backend) -> int:
    """Grids per generate call: a CPU is busy at 64; a GPU needs thousands in flight (its step costs about the
    same at batch 4 and 1024)."""
    return 64 if backend.on_cpu else 1024


def predict_tokens(backend, model, images: np.ndarray, batch_size: int | None = None, progress=None, **kwargs):
    """Greedy tokens [N, L] of every image, batch by batch (default: the device's batch); progress: a bar to
    advance by the grids read."""
    batch_size = batch_size or default_batch(backend)
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        if not backend.on_cpu and len(chunk) < batch_size < len(images):
            # A GPU captures or compiles its decoding step per batch shape: the last, shorter batch is padded
            # with copies of its own first grid (finishing with it) rather than paying for a second capture.
            pad = np.repeat(chunk[:1], batch_size - len(chunk), axis=0)
            out.append(backend.generate(model, np.concatenate([chunk, pad]), **kwargs)[: len(chunk)])
        else:
            out.append(backend.generate(model, chunk, **kwargs))
        if progress is not None:
            progress.update(len(out[-1]))
    return np.concatenate(out)


def readout_text(readouts: list[str]) -> str:
    """The read-outs as text, one line of digits per grid in order (what `eval --readouts` writes)."""
    return "".join(f"{r}\n" for r in readouts)


def readout_digest(readouts: list[str]) -> str:
    """sha256 of readout_text (so `sha256sum` of an `eval --readouts` file gives it): two runs (frameworks,
    devices, dtypes) read the same grids identically exactly when their digests are equal."""
    return hashlib.sha256(readout_text(readouts).encode()).hexdigest()


def evaluate_model(
    backend, model, images, tokens, batch_size: int | None = None, quiet: bool = True, **generate_kwargs
) -> tuple[dict, list[str]]:
    """Metrics of the greedy read-out against the targets (with the read-outs' digest), and the read-outs."""
    with progress_bar(len(images), "grid", quiet, desc="reading") as bar:
        pred = predict_tokens(backend, model, images, batch_size, progress=bar, **generate_kwargs)
    readouts = [str(r) for r in decode(pred)]
    metrics = evaluate(readouts, decode(tokens))
    metrics["readout_sha256"] = readout_digest(readouts)
    return metrics, readouts
