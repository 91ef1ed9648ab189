"""Multi-head latent attention (DeepSeek-V2 style) and the standard multi-head baseline.

Self-attention keeps two forms of the same function:
- expanded: kv_b_proj turns the latent c into per-head K/V, then ordinary attention (training, prefill);
- absorbed: the k half of kv_b_proj is folded into the query and the v half into the output, so attention runs
  directly over the cached latent c and shared k_pe (one-token decoding: nothing per-head is ever expanded).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


_ROPE_TABLES: dict = {}


def rope_table(length: int, dim: int, base: float, device, dtype):
    """cos, sin [positions, dim // 2] for at least `length` positions, computed once per (dim, base, device, dtype):
    decoding asks for one position per layer per step, and recomputing them cost more than the rotation."""
    key = (dim, base, str(device), dtype)
    table = _ROPE_TABLES.get(key)
    if table is None or table[0].shape[0] < length:
        n = max(1024, 1 << (length - 1).bit_length())
        inv_freq = base ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
        angles = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv_freq
        table = _ROPE_TABLES[key] = (angles.cos().to(dtype), angles.sin().to(dtype))
    return table


def rope(x: torch.Tensor, offset: int, base: float) -> torch.Tensor:
    """Rotary embedding on interleaved pairs (0,1),(2,3)... of the last axis; positions run along axis -2."""
    t, dim = x.shape[-2], x.shape[-1]
    cos, sin = rope_table(offset + t, dim, base, x.device, x.dtype)
    cos, sin = cos[offset:offset + t], sin[offset:offset + t]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def causal_mask(t: int, length: int, device) -> torch.Tensor | None:
    """Boolean mask (True = attend) for t queries ending at key `length` (bottom-right aligned)."""
    if t == 1:
        return None
    return torch.arange(length, device=device)[None, :] <= torch.arange(length - t, length, device=device)[:, None]


def attend(q, k, v, scale, causal=False):
    """Fused attention; k/v may have one head shared by all query heads (the absorbed latent)."""
    b, h, t, _ = q.shape
    if k.shape[1] == 1 and h > 1:
        # One shared head: fold the query heads into the query axis, so k/v are never copied per head.
        mask = causal_mask(t, k.shape[-2], q.device) if causal else None
        out = F.scaled_dot_product_attention(q.reshape(b, 1, h * t, -1), k, v, scale=scale,
                                             attn_mask=None if mask is None else mask.repeat(h, 1))
        return out.view(b, h, t, -1)
    if causal and t > 1:
        if t == k.shape[-2]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(t, k.shape[-2], q.device), scale=scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def absorbed_weights(module, k_dim: int):
    """kv_b_proj split per head into (w_uk [H, k_dim, r], w_uv [H, hd, r]).

    Derived once per weight version (optimiser steps bump it), never per decoding step.
    """
    w = module.kv_b_proj.weight
    key = (w.data_ptr(), w._version, w.dtype)
    if module._absorbed is None or module._absorbed[0] != key:
        w3 = w.detach().view(module.heads, -1, w.shape[1])
        module._absorbed = (key, w3[:, :k_dim].contiguous(), w3[:, k_dim:].contiguous())
    return module._absorbed[1:]


def split_heads(x, heads):
    b, t, _ = x.shape
    return x.view(b, t, heads, -1).transpose(1, 2)


def merge_heads(x):
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


class MLASelfAttention(nn.Module):
    def __init__(self, cfg, q_rank: int, kv_rank: int):
        super().__init__()
        self.heads, self.head_dim, self.rope_dim, self.kv_rank = cfg.heads, cfg.head_dim, cfg.rope_dim, kv_rank
        self.nope_dim, self.base = cfg.head_dim - cfg.rope_dim, cfg.rope_base
        self.scale = cfg.head_dim ** -0.5
        d, h = cfg.d_model, cfg.heads
        self.q_a_proj = nn.Linear(d, q_rank, bias=False)
        self.q_a_norm = nn.LayerNorm(q_rank)
        self.q_b_proj = nn.Linear(q_rank, h * cfg.head_dim, bias=False)
        self.kv_a_proj = nn.Linear(d, kv_rank + cfg.rope_dim, bias=False)
        self.kv_a_norm = nn.LayerNorm(kv_rank)
        self.kv_b_proj = nn.Linear(kv_rank, h * (self.nope_dim + cfg.head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.head_dim, d, bias=False)
        self._absorbed = None

    def forward(self, x, offset: int = 0, cache=None, causal: bool = False, absorb: bool = False):
        b, t, _ = x.shape
        q = split_heads(self.q_b_proj(self.q_a_norm(self.q_a_proj(x))), self.heads)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = rope(q_pe, offset, self.base)
        c, k_pe = self.kv_a_proj(x).split([self.kv_rank, self.rope_dim], dim=-1)
        c = self.kv_a_norm(c)
        k_pe = rope(k_pe, offset, self.base)  # [B, T, rope]: one rotary key shared by all heads
        if cache is not None:
            c, k_pe = cache.update(c, k_pe)
        if absorb:
            out = self._absorbed_attention(q_nope, q_pe, c, k_pe, causal)
        else:
            out = self._expanded_attention(q_nope, q_pe, c, k_pe, causal)
        return self.o_proj(merge_heads(out))

    def _expanded_attention(self, q_nope, q_pe, c, k_pe, causal):
        b, h, length = c.shape[0], self.heads, c.shape[1]
        k_nope, v = split_heads(self.kv_b_proj(c), h).split([self.nope_dim, self.head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None].expand(b, h, length, self.rope_dim)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        return attend(q, k, v, self.scale, causal=causal)

    def _absorbed_attention(self, q_nope, q_pe, c, k_pe, causal):
        w_uk, w_uv = absorbed_weights(self, self.nope_dim)
        q_lat = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)
        q = torch.cat([q_lat, q_pe], dim=-1)  # [B, H, T, r + rope]
        k = torch.cat([c, k_pe], dim=-1)[:, None]  # [B, 1, L, r + rope]: one latent "head" for all
        o_lat = attend(q, k, c[:, None], self.scale, causal=causal)  # [B, H, T, r]
        return torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv)


class MLACrossAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads, self.head_dim, self.kv_rank = cfg.heads, cfg.head_dim, cfg.cross_kv_rank
        self.scale = cfg.head_dim ** -0.5
        d, h = cfg.d_model, cfg.heads
        self.q_proj = nn.Linear(d, h * cfg.head_dim, bias=False)
        self.kv_a_proj = nn.Linear(d, self.kv_rank, bias=False)
        self.kv_a_norm = nn.LayerNorm(self.kv_rank)
        self.kv_b_proj = nn.Linear(self.kv_rank, h * 2 * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(h * cfg.head_dim, d, bias=False)
        self._absorbed = None

    def memory(self, enc, absorb: bool = False) -> dict:
        """What every decoding step reuses: the encoder latent c, or K/V expanded from it once."""
        c = self.kv_a_norm(self.kv_a_proj(enc))
        if absorb:
            return {"c": c}
        k, v = split_heads(self.kv_b_proj(c), self.heads).split([self.head_dim, self.head_dim], dim=-1)
        return {"k": k, "v": v}

    def forward(self, x, memory: dict):
        q = split_heads(self.q_proj(x), self.heads)
        if "c" in memory:
            c = memory["c"]
            w_uk, w_uv = absorbed_weights(self, self.head_dim)
            q_lat = torch.einsum("bhtn,hnr->bhtr", q, w_uk)
            o_lat = attend(q_lat, c[:, None], c[:, None], self.scale)
            out = torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv)
        else:
            out = attend(q, memory["k"], memory["v"], self.scale)
        return self.o_proj(merge_heads(out))


class MHASelfAttention(nn.Module):
    """The baseline MLA replaces: full-rank Q/K/V, RoPE on the last rope_dim of every head, K/V cache."""

    def __init__(self, cfg, q_rank=None, kv_rank=None):
        super().__init__()
        self.heads, self.head_dim, self.rope_dim, self.base = cfg.heads, cfg.head_dim, cfg.rope_dim, cfg.rope_base
        self.nope_dim, self.scale = cfg.head_dim - cfg.rope_dim, cfg.head_dim ** -0.5
        d = cfg.d_model
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def _rope_heads(self, x, offset):
        nope, pe = x.split([self.nope_dim, self.rope_dim], dim=-1)
        return torch.cat([nope, rope(pe, offset, self.base)], dim=-1)

    def forward(self, x, offset: int = 0, cache=None, causal: bool = False, absorb: bool = False):
        q = self._rope_heads(split_heads(self.q_proj(x), self.heads), offset)
        k = self._rope_heads(split_heads(self.k_proj(x), self.heads), offset)
        v = split_heads(self.v_proj(x), self.heads)
        if cache is not None:
            k, v = cache.update(k, v)
        return self.o_proj(merge_heads(attend(q, k, v, self.scale, causal=causal)))


class MHACrossAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads, self.scale = cfg.heads, cfg.head_dim ** -0.5
        d = cfg.d_model
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def memory(self, enc, absorb: bool = False) -> dict:
        return {"k": split_heads(self.k_proj(enc), self.heads), "v": split_heads(self.v_proj(enc), self.heads)}

    def forward(self, x, memory: dict):
        q = split_heads(self.q_proj(x), self.heads)
        return self.o_proj(merge_heads(attend(q, memory["k"], memory["v"], self.scale)))


def self_attention(cfg, q_rank, kv_rank):
    return (MLASelfAttention if cfg.attention == "mla" else MHASelfAttention)(cfg, q_rank, kv_rank)


def cross_attention(cfg):
    return (MLACrossAttention if cfg.attention == "mla" else MHACrossAttention)(cfg)
