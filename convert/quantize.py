"""MLX's affine group quantization, described in numpy: which weights are quantized, their packed shapes, and
dequantization (so torch can run a quantized checkpoint).

Packing (as mx.quantize): each row is split into groups of `group_size` inputs; q = round((w - bias) / scale)
in [0, 2^bits); 32/bits values per uint32 word, the first value in the lowest bits.
"""

from __future__ import annotations

import numpy as np

# Kept in full precision: the embedding, the 13-way output, and kv_b_proj, which absorbed decoding splits
# per head into the matrices it folds into the query and the output.
SKIP = ("token_embed.weight", "head.weight", "kv_b_proj.weight")
BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)  # weights per scale/bias: every group size MLX's quantized matmul takes


def quantizable(name: str, shape: tuple[int, ...], group_size: int) -> bool:
    """Linear weights whose input width splits into whole groups."""
    return name.endswith(".weight") and len(shape) == 2 and not name.endswith(SKIP) and shape[1] % group_size == 0


def quantized_shapes(shapes: dict[str, tuple[int, ...]], bits: int, group_size: int) -> dict:
    out = {}
    for name, shape in shapes.items():
        if quantizable(name, shape, group_size):
            rows, cols = shape
            stem = name[: -len(".weight")]
            out[name] = (rows, cols * bits // 32)
            out[f"{stem}.scales"] = (rows, cols // group_size)
            out[f"{stem}.biases"] = (rows, cols // group_size)
        else:
            out[name] = shape
    return out


def quantized_names(shapes: dict[str, tuple[int, ...]], group_size: int) -> set[str]:
    """Module paths (without .weight) that become QuantizedLinear."""
    return {n[: -len(".weight")] for n, s in shapes.items() if quantizable(n, s, group_size)}


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    per = 32 // bits
    words = packed.astype(np.uint32)
    vals = np.stack([(words >> np.uint32(bits * j)) & np.uint32((1 << bits) - 1) for j in range(per)], axis=-1)
    return vals.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def dequantize(weights: dict[str, np.ndarray], bits: int, group_size: int) -> dict[str, np.ndarray]:
    """Quantized checkpoint weights -> ordinary float32 weights (scales * q + biases, per group)."""
    out = {}
    for name, arr in weights.items():
        if name.endswith((".scales", ".biases")):
            continue
        stem = name[: -len(".weight")] if name.endswith(".weight") else None
        if stem is not None and f"{stem}.scales" in weights:
            q = unpack(arr, bits).astype(np.float32)
            rows, cols = q.shape
            scales = weights[f"{stem}.scales"].astype(np.float32)
            biases = weights[f"{stem}.biases"].astype(np.float32)
            q = q.reshape(rows, cols // group_size, group_size)
            out[name] = (q * scales[..., None] + biases[..., None]).reshape(rows, cols)
        else:
            out[name] = arr
    return out
