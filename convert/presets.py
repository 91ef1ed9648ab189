"""One record per preset: the model it builds and the training recipe `train` uses when a flag is not given.

A preset added here works everywhere: `--preset` choices, `ModelConfig.preset`, `train`'s defaults and `bench`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    description: str
    model: dict  # ModelConfig fields; the rest take ModelConfig's defaults
    epochs: int
    batch_size: int
    lr: float
    train_samples: int  # grids per epoch
    warmup: int  # learning-rate warm-up steps
    weight_decay: float = 0.01
    label_smoothing: float = 0.0
    ema: float = 0.0  # decay of the weight average that validation and the checkpoint use (0: off)
    augment: str | bool = False  # False, "shift" or "affine" (mnist_grid.GridStream)
    full_grid_steps: int = 0  # the first steps draw every cell occupied (the k-th digit in the k-th cell)
    extra: dict = field(default_factory=dict)


DEFAULT_PRESET = "small"

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "tests and quick checks: 2x2 grids (56 px), 16 patches, a few thousand parameters per layer",
        dict(
            grid=2,
            patch=14,
            d_model=32,
            enc_layers=2,
            dec_layers=2,
            heads=4,
            dropout=0.0,
            enc_kv_rank=16,
            enc_q_rank=24,
            dec_kv_rank=12,
            dec_q_rank=16,
            cross_kv_rank=8,
        ),
        epochs=1,
        batch_size=32,
        lr=3e-3,
        train_samples=2000,
        warmup=50,
    ),
    "small": Preset(
        "what users train: 4x4 grids (112 px), 7-px patches (16 per digit)",
        dict(grid=4, patch=7, d_model=128, enc_layers=6, dec_layers=3, heads=8, dropout=0.0),
        # Sized for five minutes of one H200: affine digits from the start, batch 1024 (the compiled bf16 step's
        # best rate), 3.6 M grids in 3,500 steps, a weight average over roughly the last 500. The first 500 steps
        # fill every cell: there the k-th digit is in the k-th cell, which ends the plateau where the decoder has
        # not yet learnt where the next digit is 500-1,000 steps sooner. No dropout: it slowed the first epochs
        # more than it helped the last (docs/training.md).
        epochs=7,
        batch_size=1024,
        lr=2e-3,
        train_samples=512_000,
        warmup=300,
        weight_decay=0.05,
        augment="affine",
        ema=0.998,
        full_grid_steps=500,
    ),
    "seed": Preset(
        "the original benchmark model: 10x10 grids (280 px), up to 100 digits, 16+16 layers",
        dict(grid=10, patch=14, d_model=128, enc_layers=16, dec_layers=16, heads=16, dropout=0.0, final_norm=False),
        # For one GPU: 1.6 M grids (~79 M digits) at batch 256, affine digits from the start, ~17.5 minutes of
        # training on an H200 (run in parts with --max-minutes and --resume). No dropout: every grid is new and the
        # run ends long before it could overfit; the weight average smooths its end.
        epochs=12,
        batch_size=256,
        lr=8e-4,
        train_samples=131_072,
        warmup=500,
        weight_decay=0.05,
        augment="affine",
        ema=0.999,
    ),
}


def preset_help() -> str:
    return "; ".join(f"{name}: {p.description}" for name, p in PRESETS.items())
