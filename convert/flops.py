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
