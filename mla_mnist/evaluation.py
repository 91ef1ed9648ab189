"""Greedy evaluation on a fixed set of grids, the same for every framework."""
from __future__ import annotations

import numpy as np

from mnist_grid import GridStream, decode, evaluate

EVAL_SEED = 2024  # the fixed evaluation grids: every command and framework reads the same ones


def eval_set(split: str, grid: int, samples: int, data_dir=None):
    return GridStream(split, grid, seed=0, data_dir=data_dir).fixed(samples, seed=EVAL_SEED)


def predict_tokens(backend, model, images: np.ndarray, batch_size: int = 256, **kwargs) -> np.ndarray:
    return np.concatenate([backend.generate(model, images[i:i + batch_size], **kwargs)
                           for i in range(0, len(images), batch_size)])


def evaluate_model(backend, model, images, tokens, batch_size: int = 256, **generate_kwargs) -> dict:
    pred = predict_tokens(backend, model, images, batch_size, **generate_kwargs)
    return evaluate(decode(pred), decode(tokens))
