"""Optimiser settings and the learning-rate schedule, shared so both trainers step identically."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from .errors import UserError, quote

MAX_SAMPLES = 10_000_000
MAX_BATCH = 65_536
MAX_EPOCHS = 1_000_000
MAX_STEPS = 2**53


class ConfigError(UserError):
    """A bad TrainConfig field; `field` names it, so a CLI can say which flag set it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass
class TrainConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    warmup_steps: int = 200
    total_steps: int = 1000
    min_lr_ratio: float = 0.05
    clip: float = 1.0
    label_smoothing: float = 0.0
    ema: float = 0.0  # decay of the weight average that validation and checkpoints use (0: off)

    def __post_init__(self):
        for name in ("lr", "weight_decay", "eps", "min_lr_ratio", "clip", "label_smoothing", "ema"):
            v = getattr(self, name)
            if not _is_number(v) or not math.isfinite(v) or v < 0:
                raise UserError(f"training setting {name} must be a finite number >= 0, got {v!r}")
        for name in ("warmup_steps", "total_steps"):
            v = getattr(self, name)
            if not _is_int(v) or not 0 <= v <= MAX_STEPS:
                raise UserError(f"training setting {name} must be an integer in [0, {MAX_STEPS}], got {v!r}")
        if not (
            isinstance(self.betas, (tuple, list))
            and len(self.betas) == 2
            and all(_is_number(b) and 0 <= b < 1 for b in self.betas)
        ):
            raise UserError(f"training setting betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = tuple(self.betas)
        if not self.lr > 0:
            raise ConfigError("lr", f"the learning rate must be > 0, got {self.lr}")
        if self.total_steps <= 0:
            raise ConfigError("total_steps", f"training needs at least one step, got {self.total_steps}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError("label_smoothing", f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.ema < 1:
            raise ConfigError("ema", f"the weight-average decay must be in [0, 1), got {self.ema}")

    def lr_at(self, step: int) -> float:
        """Linear warm-up to lr, then cosine decay to lr*min_lr_ratio at total_steps (held after)."""
        warm = min(self.warmup_steps, max(self.total_steps // 10, 1))
        if step < warm:
            return self.lr * (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, self.total_steps - warm))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    def ema_weight(self, step: int) -> float:
        """How far the weight average moves toward the weights after step `step` (0-based): 1 - decay.

        The decay ramps up as (1 + step) / (10 + step) to `ema`, so that a short run (or the first thousand steps
        at 0.999) averages trained weights rather than the random ones it started from."""
        return 1.0 - min(self.ema, (1 + step) / (10 + step))

    def to_dict(self):
        return asdict(self)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_SPEC_INTS = {
    "epochs": (1, MAX_EPOCHS),
    "batch_size": (1, MAX_BATCH),
    "train_samples": (1, MAX_SAMPLES),
    "seed": (0, 2**63 - 1),
}
_RECORD_NUMBERS = ("val_exact_match",)


def check_run_state(state, where) -> None:
    """Refuse a train_state.json whose fields a resume would trip over: every field a resume reads, typed."""

    def bad(why):
        raise UserError(f"{quote(where)} is corrupt ({why}); resume from an intact checkpoint or start a new run")

    if not isinstance(state, dict):
        bad("not a JSON object")
    spec = state.get("spec")
    if not isinstance(spec, dict):
        bad("no spec object")
    for key, (lo, hi) in _SPEC_INTS.items():
        v = spec.get(key)
        if not _is_int(v) or not lo <= v <= hi:
            bad(f"spec.{key} is {v!r}, not an integer in [{lo}, {hi}]")
    full = spec.get("full_grid_steps", 0)  # absent in runs saved before the setting: they ran without
    if not _is_int(full) or not 0 <= full <= MAX_STEPS:
        bad(f"spec.full_grid_steps is {full!r}, not an integer in [0, {MAX_STEPS}]")
    if spec.get("augment") not in (False, True, "shift", "affine"):
        bad(f"spec.augment is {spec.get('augment')!r}")
    train = spec.get("train")
    known = {f.name for f in fields(TrainConfig)}
    if not isinstance(train, dict) or not set(train) <= known:
        bad("spec.train is not an object of training settings")
    try:
        TrainConfig(**train)
    except UserError as e:
        bad(str(e))
    if "step" in state and (not _is_int(state["step"]) or state["step"] < 0):
        bad(f"step is {state['step']!r}")
    history = state.get("history", [])
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        bad("history is not a list of records")
    best = state.get("best")
    if best is not None and not (
        isinstance(best, dict) and all(_is_number(best.get(k)) for k in _RECORD_NUMBERS) and _is_int(best.get("step"))
    ):
        bad("best is not a validation record")


# Per-parameter arrays of the optimizer state file: Adam moments, and with a weight average the average and the
# raw weights (the checkpoint's model weights are then the average, so a resume needs the raw ones from here).
STATE_PREFIXES = ("m.", "v.", "ema.", "raw.")


def check_optimizer_state(arrays, where) -> None:
    """The step counter must be one non-negative integer and the per-parameter arrays finite."""
    step = arrays.get("step")
    if step is not None:
        value = float(step.reshape(-1)[0]) if step.size == 1 else float("nan")
        if not (math.isfinite(value) and value >= 0 and value == int(value) and value <= MAX_STEPS):
            raise UserError(
                f"{quote(where)} has step {step.tolist()!r}, not a step count: it is corrupt; resume "
                "from an intact checkpoint or start a new run"
            )
    bad = [
        k
        for k, v in arrays.items()
        if k.startswith(STATE_PREFIXES) and (v.dtype.kind != "f" or not np.isfinite(v).all())
    ]
    if bad:
        raise UserError(
            f"{quote(where)} holds non-finite or non-float optimizer state ({', '.join(bad[:3])}): it "
            "is corrupt; resume from an intact checkpoint or start a new run"
        )
