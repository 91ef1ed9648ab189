"""State dicts of the original PyTorch implementation this project descends from: detect, infer config, rename.

Its modules match ours one for one: kv_b_proj rows are per head [k_nope | v] (self) and [k | v] (cross), its RoPE
rotates interleaved pairs, and its patches are flattened row-major, so only names (and a Conv2d-shaped patch
weight) change. It normalises images outside the model whereas ours does it inside: no weight changes.
It has no final norms, and its grid is not stored in the weights (it is `--grid`).
"""

from __future__ import annotations

import math
import re

import numpy as np

from .config import ModelConfig
from .errors import UserError

DEFAULT_GRID = 10
DEFAULT_DROPOUT = 0.1  # a training setting, not in the weights

_TOP = {
    "patch_embedding.patch_embedding.weight": "patch_embed.weight",
    "patch_embedding.patch_embedding.bias": "patch_embed.bias",
    "patch_embedding.class_token": "cls_token",
    "decoder_embedding.token_embedding.weight": "token_embed.weight",
    "output_projection.projection.weight": "head.weight",
    "output_projection.projection.bias": "head.bias",
}
_SELF = {
    "q_a_proj": "q_a_proj",
    "q_a_layernorm": "q_a_norm",
    "q_b_proj": "q_b_proj",
    "kv_a_proj_with_rope": "kv_a_proj",
    "kv_a_layernorm": "kv_a_norm",
    "kv_b_proj": "kv_b_proj",
    "out_proj": "o_proj",
}
_CROSS = {
    "q_proj": "q_proj",
    "kv_a_proj": "kv_a_proj",
    "kv_a_layernorm": "kv_a_norm",
    "kv_b_proj": "kv_b_proj",
    "out_proj": "o_proj",
}
_ATTENTION = {
    ("encoder", "attention"): ("attn", _SELF),
    ("decoder", "self_attention"): ("self_attn", _SELF),
    ("decoder", "cross_attention"): ("cross_attn", _CROSS),
}
_MLP = {"mlp_up": "fc1", "mlp_down": "fc2"}
_BLOCK = re.compile(r"(encoder|decoder)_blocks\.(\d+)\.(\w+)\.(.+)")


def is_original(names) -> bool:
    return any(n.startswith(("encoder_blocks.", "decoder_blocks.", "patch_embedding.patch_embedding.")) for n in names)


def our_name(name: str) -> str | None:
    """Our name for an original tensor; None for a RoPE buffer to drop; unknown names come back unchanged so the
    schema check reports them."""
    if name in _TOP:
        return _TOP[name]
    m = _BLOCK.fullmatch(name)
    if not m:
        return name
    side, i, part, rest = m.groups()
    prefix = f"{side}.{i}."
    if part in ("norm1", "norm2", "norm3"):
        return prefix + part + "." + rest
    module, _, leaf = rest.partition(".")
    if part == "mlp" and module in _MLP:
        return f"{prefix}mlp.{_MLP[module]}.{leaf}"
    if (side, part) in _ATTENTION and module == "mla_attention":
        module, _, leaf = leaf.partition(".")
        if module == "rope" and leaf == "inv_freq":
            return None
        ours, table = _ATTENTION[side, part]
        if module in table:
            return f"{prefix}{ours}.{table[module]}.{leaf}"
    return name


def _rope_base(inv_freq: np.ndarray | None, rope_dim: int) -> float:
    """inv_freq[k] = base^(-2k/rope_dim), so inv_freq[1] gives the base back (rounded: it was stored in fp32)."""
    if inv_freq is None or inv_freq.size < 2 or not 0 < float(inv_freq[1]) < 1:
        return 10000.0
    try:
        base = float(inv_freq[1]) ** (-rope_dim / 2)
    except OverflowError:  # a hostile inv_freq: ModelConfig refuses the infinite base with a message
        return math.inf
    return float(round(base)) if abs(base - round(base)) <= 1e-3 * base else base


def infer_config(tensors: dict[str, np.ndarray], grid: int | None = None) -> ModelConfig:
    """Every dimension from tensor shapes; grid from the argument (default 10); final_norm off."""

    def shape(name):
        if name not in tensors:
            raise UserError(
                f"original state_dict lacks {name}: it is incomplete, or not from the original "
                "implementation (pass --preset/--config if its names are ours)"
            )
        return tuple(tensors[name].shape)

    def layers(side):
        return len({int(m.group(2)) for n in tensors if (m := _BLOCK.fullmatch(n)) and m.group(1) == side})

    patch_w = shape("patch_embedding.patch_embedding.weight")
    d = patch_w[0]
    if len(patch_w) == 4 and patch_w[1] == 1 and patch_w[2] == patch_w[3]:  # Conv2d [d, 1, p, p]
        patch = patch_w[2]
    elif len(patch_w) == 2 and math.isqrt(patch_w[1]) ** 2 == patch_w[1]:  # Linear [d, p*p]
        patch = math.isqrt(patch_w[1])
    else:
        raise UserError(
            f"patch_embedding.patch_embedding.weight has shape {patch_w}: expected Linear [d, p*p] or "
            "Conv2d [d, 1, p, p] over one-channel square patches"
        )
    enc = "encoder_blocks.0.attention.mla_attention."
    dec = "decoder_blocks.0.self_attention.mla_attention."
    cross = "decoder_blocks.0.cross_attention.mla_attention."
    enc_kv_rank = shape(enc + "kv_a_layernorm.weight")[0]
    rope_dim = shape(enc + "kv_a_proj_with_rope.weight")[0] - enc_kv_rank
    inv_freq = tensors.get(enc + "rope.inv_freq")
    if inv_freq is not None and 2 * inv_freq.size != rope_dim:
        raise UserError(
            f"{enc}rope.inv_freq has {inv_freq.size} frequencies but kv_a_proj_with_rope has "
            f"{rope_dim} RoPE rows (2 per frequency expected): the state_dict is inconsistent"
        )
    # self-attention kv_b rows = heads * (2 * head_dim - rope_dim) = 2 * d - heads * rope_dim
    kv_b_rows = shape(enc + "kv_b_proj.weight")[0]
    heads = (2 * d - kv_b_rows) // rope_dim if rope_dim > 0 else 0
    if heads <= 0 or heads * rope_dim != 2 * d - kv_b_rows or d % heads:
        raise UserError(
            f"cannot infer the head count from {enc}kv_b_proj.weight ({kv_b_rows} rows, d_model {d}, "
            f"rope_dim {rope_dim}): the state_dict is inconsistent"
        )
    mlp_rows = shape("encoder_blocks.0.mlp.mlp_up.weight")[0]
    if mlp_rows % d:
        raise UserError(f"encoder_blocks.0.mlp.mlp_up.weight has {mlp_rows} rows, not a multiple of d_model {d}")
    return ModelConfig(
        grid=grid or DEFAULT_GRID,
        patch=patch,
        d_model=d,
        enc_layers=layers("encoder"),
        dec_layers=layers("decoder"),
        heads=heads,
        mlp_ratio=mlp_rows // d,
        dropout=DEFAULT_DROPOUT,
        final_norm=False,
        attention="mla",
        rope_base=_rope_base(inv_freq, rope_dim),
        head_dim=d // heads,
        rope_dim=rope_dim,
        enc_kv_rank=enc_kv_rank,
        enc_q_rank=shape(enc + "q_a_proj.weight")[0],
        dec_kv_rank=shape(dec + "kv_a_layernorm.weight")[0],
        dec_q_rank=shape(dec + "q_a_proj.weight")[0],
        cross_kv_rank=shape(cross + "kv_a_layernorm.weight")[0],
    )


def to_ours(tensors: dict[str, np.ndarray], grid: int | None = None) -> tuple[ModelConfig, dict, list[str]]:
    """(inferred config, tensors under our names, notes for the report)."""
    config = infer_config(tensors, grid)
    out, dropped, notes = {}, 0, []
    for name, arr in tensors.items():
        new = our_name(name)
        if new is None:
            dropped += 1
            continue
        if new == "patch_embed.weight" and arr.ndim == 4:  # Conv2d over one channel == Linear on row-major patches
            arr = arr.reshape(arr.shape[0], -1)
            notes.append("Conv2d patch weight flattened")
        out[new] = arr
    if dropped:
        notes.append(f"dropped {dropped} rope.inv_freq buffers")
    return config, out, notes
