"""Save/load the shared checkpoint directory from a torch model (weights go through numpy)."""

from __future__ import annotations

import numpy as np
import torch

from convert import checkpoint
from convert.config import ModelConfig
from convert.quantize import dequantize

from .model import EncoderDecoder


def to_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}


def from_numpy(model, weights: dict[str, np.ndarray]):
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    model.load_state_dict(state, strict=True)
    return model


def save(model, path, dtype: str | None = None, **kwargs):
    return checkpoint.save(path, model.config, to_numpy(model), dtype=dtype, **kwargs)


def load(
    path=checkpoint.SHIPPED,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    weights: str = checkpoint.WEIGHTS,
) -> EncoderDecoder:
    config, arrays, _ = checkpoint.load(path, weights)
    if config.quantization:  # torch runs a quantized checkpoint dequantized (in numpy, exactly as MLX would)
        q = config.quantization
        arrays = dequantize(arrays, q["bits"], q["group_size"])
        config = config.replace(quantization=None)
    model = from_numpy(EncoderDecoder(config), arrays)
    return model.to(device=device, dtype=dtype).eval()


def build(config: ModelConfig, seed: int = 0) -> EncoderDecoder:
    torch.manual_seed(seed)
    return EncoderDecoder(config)
