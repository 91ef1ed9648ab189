"""Multi-head latent attention (DeepSeek-V2 style) and the standard multi-head baseline.

Self-attention keeps two forms of the same function:
- expanded: kv_b_proj turns the latent c into per-head K/V, then ordinary attention (training, prefill);
- absorbed: the k half of kv_b_proj is folded into the query and the v half into the output, so attention runs
  directly over the cached latent c and shared k_pe (one-token decoding: nothing per-head is ever expanded).
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def rope(x: mx.array, offset: int, base: float) -> mx.array:
    """Rotary embedding on interleaved pairs (0,1),(2,3)... of the last axis; positions run along axis -2."""
    return mx.fast.rope(x, x.shape[-1], traditional=True, base=base, scale=1.0, offset=offset)


def causal_mask(t: int, length: int) -> mx.array | None:
    """Boolean mask (True = attend) for t queries ending at key `length` (bottom-right aligned)."""
    if t == 1:
        return None
    return mx.arange(length)[None, :] <= mx.arange(length - t, length)[:, None]


def attend(q, k, v, scale, causal=False):
    """Fused attention; k/v may have one head shared by all query heads (the absorbed latent).

    MLX's SDPA accepts a value dim different from the q/k dim (the absorbed form: q/k r + rope, v r).
    """
    b, h, t, _ = q.shape
    if k.shape[1] == 1 and h > 1:
        # One shared head: fold the query heads into the query axis, so k/v are never copied per head.
        mask = causal_mask(t, k.shape[-2]) if causal else None
        out = mx.fast.scaled_dot_product_attention(q.reshape(b, 1, h * t, -1), k, v, scale=scale,
                                                   mask=None if mask is None else mx.tile(mask, (h, 1)))
        return out.reshape(b, h, t, -1)
    if causal and t > 1:
        if t == k.shape[-2]:
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=causal_mask(t, k.shape[-2]))
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)


def absorbed_weights(module, k_dim: int):
    """kv_b_proj split per head into (w_uk [H, k_dim, r], w_uv [H, hd, r]).

    Derived once per weight version (optimiser steps and loads replace the array), never per decoding step.
    """
    w = module.kv_b_proj.weight
    if module._absorbed is None or module._absorbed[0] is not w:
        w3 = w.reshape(module.heads, -1, w.shape[1])
        # object.__setattr__: a tuple set through Module.__setattr__ would join the module's state tree.
        object.__setattr__(module, "_absorbed", (w, w3[:, :k_dim], w3[:, k_dim:]))
    return module._absorbed[1:]


def split_heads(x, heads):
    b, t, _ = x.shape
    return x.reshape(b, t, heads, -1).transpose(0, 2, 1, 3)


def merge_heads(x):
    b, h, t, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * d)


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

    def __call__(self, x, offset: int = 0, cache=None, causal: bool = False, absorb: bool = False):
        b, t, _ = x.shape
        q = split_heads(self.q_b_proj(self.q_a_norm(self.q_a_proj(x))), self.heads)
        q_nope, q_pe = mx.split(q, [self.nope_dim], axis=-1)
        q_pe = rope(q_pe, offset, self.base)
        c, k_pe = mx.split(self.kv_a_proj(x), [self.kv_rank], axis=-1)
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
        k_nope, v = mx.split(split_heads(self.kv_b_proj(c), h), [self.nope_dim], axis=-1)
        k = mx.concatenate([k_nope, mx.broadcast_to(k_pe[:, None], (b, h, length, self.rope_dim))], axis=-1)
        q = mx.concatenate([q_nope, q_pe], axis=-1)
        return attend(q, k, v, self.scale, causal=causal)

    def _absorbed_attention(self, q_nope, q_pe, c, k_pe, causal):
        w_uk, w_uv = absorbed_weights(self, self.nope_dim)
        q_lat = mx.einsum("bhtn,hnr->bhtr", q_nope, w_uk)
        q = mx.concatenate([q_lat, q_pe], axis=-1)  # [B, H, T, r + rope]
        k = mx.concatenate([c, k_pe], axis=-1)[:, None]  # [B, 1, L, r + rope]: one latent "head" for all
        o_lat = attend(q, k, c[:, None], self.scale, causal=causal)  # [B, H, T, r]
        return mx.einsum("bhtr,hvr->bhtv", o_lat, w_uv)


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
        k, v = mx.split(split_heads(self.kv_b_proj(c), self.heads), [self.head_dim], axis=-1)
        return {"k": k, "v": v}

    def __call__(self, x, memory: dict):
        q = split_heads(self.q_proj(x), self.heads)
        if "c" in memory:
            c = memory["c"]
            w_uk, w_uv = absorbed_weights(self, self.head_dim)
            q_lat = mx.einsum("bhtn,hnr->bhtr", q, w_uk)
            o_lat = attend(q_lat, c[:, None], c[:, None], self.scale)
            out = mx.einsum("bhtr,hvr->bhtv", o_lat, w_uv)
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
        nope, pe = mx.split(x, [self.nope_dim], axis=-1)
        return mx.concatenate([nope, rope(pe, offset, self.base)], axis=-1)

    def __call__(self, x, offset: int = 0, cache=None, causal: bool = False, absorb: bool = False):
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

    def __call__(self, x, memory: dict):
        q = split_heads(self.q_proj(x), self.heads)
        return self.o_proj(merge_heads(attend(q, memory["k"], memory["v"], self.scale)))


def self_attention(cfg, q_rank, kv_rank):
    return (MLASelfAttention if cfg.attention == "mla" else MHASelfAttention)(cfg, q_rank, kv_rank)


def cross_attention(cfg):
    return (MLACrossAttention if cfg.attention == "mla" else MHACrossAttention)(cfg)
