"""Save/load the shared checkpoint directory from an MLX model (weights go through numpy)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from convert import checkpoint
from convert.config import ModelConfig
from convert.schema import check

from .model import EncoderDecoder


def to_numpy(model) -> dict[str, np.ndarray]:
    # Packed quantized weights stay uint32; everything else goes out as float32.
    return {
        k: np.array(v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v)
        for k, v in tree_flatten(model.parameters())
    }


def quantize(model, bits: int, group_size: int):
    """Swap the Linear layers convert.quantize selects for QuantizedLinear (MLX's quantized matmuls)."""
    from mlx import nn

    from convert.quantize import quantized_names
    from convert.schema import schema

    names = quantized_names(schema(model.config.replace(quantization=None)), group_size)
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=lambda path, m: path in names)
    model.config = model.config.replace(quantization={"bits": bits, "group_size": group_size})
    return model


def from_numpy(model, weights: dict[str, np.ndarray]):
    check(model.config, {k: v.shape for k, v in weights.items()})
    # Keep each parameter's dtype, as torch's load_state_dict copies into the existing tensors.
    dtypes = {k: v.dtype for k, v in tree_flatten(model.parameters())}
    model.load_weights(
        [(k, mx.array(np.ascontiguousarray(v)).astype(dtypes[k])) for k, v in weights.items()], strict=True
    )
    return model


def save(model, path, dtype: str | None = None, **kwargs):
    return checkpoint.save(path, model.config, to_numpy(model), dtype=dtype, **kwargs)


def load(path=checkpoint.SHIPPED, dtype: mx.Dtype = mx.float32, weights: str = checkpoint.WEIGHTS) -> EncoderDecoder:
    config, arrays, _ = checkpoint.load(path, weights)
    q = config.quantization
    model = EncoderDecoder(config.replace(quantization=None))
    if q:
        quantize(model, q["bits"], q["group_size"])
    model = from_numpy(model, arrays)
    model.set_dtype(dtype)
    return model.eval()


def build(config: ModelConfig, seed: int = 0) -> EncoderDecoder:
    mx.random.seed(seed)
    return EncoderDecoder(config)
