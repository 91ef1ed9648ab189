"""Optimiser settings and the learning-rate schedule, shared so both trainers step identically."""
from __future__ import annotations

import math
from dataclasses import dataclass, asdict

from .errors import UserError


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

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if not self.lr > 0:
            raise ConfigError("lr", f"the learning rate must be > 0, got {self.lr}")
        if self.total_steps <= 0:
            raise ConfigError("total_steps", f"training needs at least one step, got {self.total_steps}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError("label_smoothing", f"label smoothing must be in [0, 1), got {self.label_smoothing}")

    def lr_at(self, step: int) -> float:
        """Linear warm-up to lr, then cosine decay to lr*min_lr_ratio at total_steps (held after)."""
        warm = min(self.warmup_steps, max(self.total_steps // 10, 1))
        if step < warm:
            return self.lr * (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, self.total_steps - warm))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    def to_dict(self):
        return asdict(self)
