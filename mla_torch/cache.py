"""Decoding caches. MLA keeps only the latent c and the shared rotary key k_pe per position."""

from __future__ import annotations

import torch


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class LatentCache:
    """One MLA self-attention layer: per position the latent c [kv_rank] and the rotary key k_pe [rope_dim],
    side by side in one buffer [B, L, kv_rank + rope_dim] preallocated for L positions, so the absorbed form
    reads its keys (c | k_pe) and values (c) as views, without a copy per step."""

    def __init__(self, batch, max_length, kv_rank, rope_dim, dtype, device):
        self.kv = torch.zeros(batch, max_length, kv_rank + rope_dim, dtype=dtype, device=device)
        self.kv_rank, self.length = kv_rank, 0
        self.absorbed = None  # the folded projections, set by MLASelfAttention.new_cache for the absorbed step

    def update(self, c, k_pe):
        """Append c [B, T, kv_rank] and k_pe [B, T, rope_dim]; return every cached position [B, L, r + rope]."""
        start, end = self.length, self.length + c.shape[1]
        self.kv[:, start:end, : self.kv_rank] = c
        self.kv[:, start:end, self.kv_rank :] = k_pe
        self.length = end
        return self.kv[:, :end]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.kv)


class QuantizedLatentCache:
    """The latent c stored as int8 with one scale per token (absmax / 127); k_pe stays in the compute dtype,
    since it is small and carries the position."""

    def __init__(self, batch, max_length, kv_rank, rope_dim, dtype, device):
        self.c = torch.zeros(batch, max_length, kv_rank, dtype=torch.int8, device=device)
        self.scale = torch.zeros(batch, max_length, 1, dtype=dtype, device=device)
        self.k_pe = torch.zeros(batch, max_length, rope_dim, dtype=dtype, device=device)
        self.length, self.absorbed = 0, None

    def update(self, c, k_pe):
        start, end = self.length, self.length + c.shape[1]
        scale = c.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 127
        self.c[:, start:end] = torch.round(c / scale).to(torch.int8)
        self.scale[:, start:end] = scale
        self.k_pe[:, start:end] = k_pe
        self.length = end
        return torch.cat([self.c[:, :end].to(k_pe.dtype) * self.scale[:, :end], self.k_pe[:, :end]], dim=-1)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.c, self.scale, self.k_pe)


class KVCache:
    """One MHA/GQA self-attention layer: post-RoPE k and v [B, H_kv, L, head_dim]."""

    def __init__(self, batch, max_length, heads, head_dim, dtype, device):
        self.k = torch.zeros(batch, heads, max_length, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, heads, max_length, head_dim, dtype=dtype, device=device)
        self.length = 0

    def update(self, k, v):
        start, end = self.length, self.length + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.k, self.v)


class DecoderCache:
    """Per decoder layer: a self-attention cache (made by the layer's own attention, `new_cache`) and the
    cross-attention memory computed once per image."""

    def __init__(self, layers: list, memories: list[dict]):
        self.layers, self.memories = layers, memories

    @property
    def offset(self) -> int:
        return self.layers[0].length

    @property
    def self_nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def cross_nbytes(self) -> int:
        return sum(m.nbytes for m in self.memories)

    @property
    def nbytes(self) -> int:
        return self.self_nbytes + self.cross_nbytes
