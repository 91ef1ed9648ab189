"""Analytic FLOPs of the encoder, read off the weight schema, so every attention variant is counted the same way.

Multiply-adds count 2 FLOPs; norms, softmax and GELU are not counted. For one image of T = enc_tokens tokens:
  patch embed   2 * patches * patch^2 * d
  per layer     2T * (sum of in*out over the layer's Linear weights)      (projections and MLP)
              + 2 * 2 * H * T * T * hd                                      (Q K^T and P V)
The layer's Linear weights come from `schema`, so MLA's low-rank projections, MHA's and GQA's full-rank ones
are each counted as they are built.
"""

from __future__ import annotations

from .config import ModelConfig
from .schema import schema


def encoder_flops(cfg: ModelConfig) -> int:
    cfg = cfg.replace(quantization=None)
    shapes = schema(cfg)
    t = cfg.enc_tokens
    per_layer = sum(
        n_out * n_in
        for name, (n_out, *rest) in shapes.items()
        for n_in in rest[:1]
        if name.startswith("encoder.0.") and name.endswith(".weight") and len(rest) == 1
    )
    attention = 2 * 2 * cfg.heads * t * t * cfg.head_dim
    patch_embed = 2 * cfg.num_patches * cfg.patch**2 * cfg.d_model
    return patch_embed + cfg.enc_layers * (2 * t * per_layer + attention)


def decode_step_cost(cfg: ModelConfig, batch: int, length: int, itemsize: int = 4) -> dict:
    """What one absorbed decoding step of an MLA model must read and compute, averaged over the positions of a
    `length`-token generation (the self-attention cache holds length / 2 rows on average).

    bytes: every weight the step multiplies with (the absorbed projections: q_a, kv_a, the folded query and output
    of self- and cross-attention, the MLP, the norms and the head), the self-attention latent cache rows up to the
    position, and the cross-attention latent memory; once each, in `itemsize`-byte elements. flops: 2 per
    multiply-add of those weights for each of the batch's rows, plus the attention scores and weighted sums.
    A step can take no less than max(bytes / bandwidth, flops / peak): the bound bench prints beside it.
    """
    d, h, pe, n = cfg.d_model, cfg.heads, cfg.rope_dim, cfg.enc_tokens
    q_rank, r, rc = cfg.dec_q_rank, cfg.dec_kv_rank, cfg.cross_kv_rank
    per_layer = (
        d * q_rank
        + d * (r + pe)
        + q_rank * h * (r + pe)
        + h * r * d  # self-attention, absorbed
        + d * h * rc
        + h * rc * d  # cross-attention, absorbed
        + 2 * d * d * cfg.mlp_ratio
        + d * cfg.mlp_ratio
        + d  # MLP weights and biases
    )
    norms = 2 * (3 * d + q_rank + r)
    weights = cfg.dec_layers * (per_layer + norms) + d * cfg.vocab + cfg.vocab + batch * d
    rows = length / 2
    cache = cfg.dec_layers * batch * (rows * (r + pe) + n * rc)
    attention = cfg.dec_layers * batch * h * (2 * rows * (2 * r + pe) + 2 * n * 2 * rc)
    return {
        "bytes": int(itemsize * (weights + cache)),
        "flops": int(2 * batch * (weights - batch * d) + attention),
        "weight_bytes": int(itemsize * weights),
        "cache_bytes": int(itemsize * cache),
    }
