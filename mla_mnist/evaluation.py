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


GPU_BATCH = 1024  # grids per call on a GPU when the model is not known
_GPU_ELEMENTS = 1 << 32  # activation elements one encoder call may hold on a GPU (a few GB at most)


def default_batch(backend, config=None, samples: int | None = None) -> int:
    """Grids per generate call: a CPU is busy at 64; a GPU needs thousands in flight (its decoding step costs
    about the same at batch 4 and 1024). Given the model's config, a GPU takes as many grids as an encoder layer's
    largest activations allow (tokens x (MLP width + heads x tokens) elements a grid: the shipped small model
    ~6,500, seed ~1,500), and given `samples`, equal batches: 10,000 grids in two calls of 5,000, none padded."""
    if backend.on_cpu:
        return 64
    if config is None:
        return GPU_BATCH
    tokens = config.enc_tokens
    per_grid = tokens * (config.d_model * config.mlp_ratio + config.heads * tokens)
    cap = min(16384, max(64, _GPU_ELEMENTS // per_grid))
    if samples is None:
        return cap
    calls = -(-samples // cap)
    return -(-samples // calls)


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
    readouts = decode(pred)
    metrics = evaluate(readouts, decode(tokens))
    metrics["readout_sha256"] = readout_digest(readouts)
    return metrics, readouts
