"""Multi-head latent attention (DeepSeek-V2 style) and the standard multi-head baseline.

Self-attention keeps two forms of the same function:
- expanded (`forward`): kv_b_proj turns the latent c into per-head K/V, then ordinary attention (training,
  prefill, and decoding when the expanded form is forced);
- absorbed (`step`): the k half of kv_b_proj is folded into the query and the v half into the output, so
  attention runs directly over the cached latent c and shared k_pe (one-token decoding: nothing per-head is ever
  expanded).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


_ROPE_TABLES: dict = {}


def rope_table(length: int, dim: int, base: float, device, dtype):
    """(cos, sin [positions, dim // 2], rotation [positions, dim, dim]) for at least `length` positions, computed
    once per (dim, base, device, dtype): decoding asks for one position per layer per step, and recomputing
    them cost more than the rotation."""
    key = (dim, base, str(device), dtype)
    table = _ROPE_TABLES.get(key)
    if table is None or table[0].shape[0] < length:
        n = max(1024, 1 << (length - 1).bit_length())
        inv_freq = base ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
        angles = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv_freq
        cos, sin = angles.cos(), angles.sin()
        # The same rotation as a matrix, for x @ rotation: pair (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos).
        rotation = torch.zeros(n, dim, dim, device=device, dtype=torch.float32)
        i = torch.arange(0, dim, 2, device=device)
        rotation[:, i, i], rotation[:, i + 1, i + 1] = cos, cos
        rotation[:, i, i + 1], rotation[:, i + 1, i] = sin, -sin
        table = _ROPE_TABLES[key] = (cos.to(dtype), sin.to(dtype), rotation.to(dtype))
    return table


def rope(x: torch.Tensor, offset: int, base: float) -> torch.Tensor:
    """Rotary embedding on interleaved pairs (0,1),(2,3)... of the last axis; positions run along axis -2."""
    t, dim = x.shape[-2], x.shape[-1]
    cos, sin, rotation = rope_table(offset + t, dim, base, x.device, x.dtype)
    if t == 1:  # one decoding position: one small matmul instead of a dozen elementwise ops
        return x @ rotation[offset]
    cos, sin = cos[offset:offset + t], sin[offset:offset + t]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def causal_mask(t: int, length: int, device) -> torch.Tensor | None:
    """Boolean mask (True = attend) for t queries ending at key `length` (bottom-right aligned)."""
    if t == 1:
        return None
    return torch.arange(length, device=device)[None, :] <= torch.arange(length - t, length, device=device)[:, None]


def attend(q, k, v, scale, causal=False):
    """Fused attention over per-head q, k, v [B, H, T, D]."""
    t = q.shape[-2]
    if causal and t > 1:
        if t == k.shape[-2]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(t, k.shape[-2], q.device), scale=scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def latent_attention(q, keys, values, heads: int):
    """Attention of q [B, T, H, D] over one key/value "head" shared by all query heads (the latent).

    Heads fold into the query axis (row t*H + h), so the latent is never copied per head; the scale is already
    in q. Two batched matmuls and a softmax: for one decoding step this costs a fraction of a fused-attention
    call, whose fixed cost on a CPU exceeds the work.
    """
    b, t = q.shape[:2]
    scores = torch.bmm(q.reshape(b, t * heads, -1), keys.transpose(1, 2))  # [B, T*H, L]
    return torch.bmm(scores.softmax(-1), values).view(b, t, -1)  # [B, T, H*r]


def layer_norm(norm: nn.LayerNorm, x):
    """norm(x) without the module call: one-token decoding makes a few hundred of these per token, and at batch 4
    on a CPU a module call costs about as much as the op it wraps."""
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def absorbed_weights(module, q_layer, k_dim: int):
    """(w_q [in, H*(r + pe)], w_o [H*r, d]): the absorbed projections, derived once per weight version and
    stored input-major (x @ w: at batch 4 a matmul that streams cold weights row by row is the faster one).

    q: per head, the k half of kv_b_proj (w_uk [k_dim, r]) folded into the query's first k_dim rows, the
    remaining (rotary) rows kept, and the softmax scale folded in. o: the v half (w_uv [hd, r]) folded into
    o_proj. Computed in float32 and cast back; optimiser steps and loads bump the versions and re-derive.
    """
    sources = (q_layer.weight, module.kv_b_proj.weight, module.o_proj.weight)
    key = tuple((w.data_ptr(), w._version, w.dtype) for w in sources)
    if module._absorbed is None or module._absorbed[0] != key:
        h, dtype = module.heads, module.kv_b_proj.weight.dtype
        wq, wkv, wo = (w.detach().float() for w in sources)
        wkv = wkv.view(h, -1, wkv.shape[1])  # [H, k_dim + hd, r]
        wq = wq.view(h, -1, wq.shape[1])  # [H, hd, in]
        q_lat = torch.einsum("hkr,hki->hri", wkv[:, :k_dim], wq[:, :k_dim])
        w_q = torch.cat([q_lat, wq[:, k_dim:]], dim=1).reshape(-1, wq.shape[2]) * module.scale
        w_o = torch.einsum("dhv,hvr->dhr", wo.view(wo.shape[0], h, -1), wkv[:, k_dim:]).reshape(wo.shape[0], -1)
        module._absorbed = (key, w_q.t().contiguous().to(dtype), w_o.t().contiguous().to(dtype))
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

    def forward(self, x, offset: int = 0, cache=None, causal: bool = False):
        """The expanded form: x [B, T, d] -> [B, T, d]; with a cache, x continues the cached prefix."""
        r, h = self.kv_rank, self.heads
        q_a = self.q_a_norm(self.q_a_proj(x))
        c, k_pe = self.kv_a_proj(x).split([r, self.rope_dim], dim=-1)
        c = self.kv_a_norm(c)
        k_pe = rope(k_pe, offset, self.base)  # [B, T, rope]: one rotary key shared by all heads
        if cache is not None:
            keys = cache.update(c, k_pe)  # [B, L, r + rope]: the latent and the rotary key, side by side
            c, k_pe = keys[..., :r], keys[..., r:]
        b, length = c.shape[0], c.shape[1]
        q_nope, q_pe = split_heads(self.q_b_proj(q_a), h).split([self.nope_dim, self.rope_dim], dim=-1)
        q = torch.cat([q_nope, rope(q_pe, offset, self.base)], dim=-1)
        k_nope, v = split_heads(self.kv_b_proj(c), h).split([self.nope_dim, self.head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None].expand(b, h, length, self.rope_dim)], dim=-1)
        return self.o_proj(merge_heads(attend(q, k, v, self.scale, causal=causal)))

    def step(self, x, cache):
        """The absorbed form for one new position: x [B, 1, d] -> [B, 1, d]. Only the new position's latent c and
        k_pe are computed; the query moves into latent space and attends over the cache as it is stored."""
        r, b, offset = self.kv_rank, x.shape[0], cache.length
        w_q, w_o = absorbed_weights(self, self.q_b_proj, self.nope_dim)
        q_a = layer_norm(self.q_a_norm, F.linear(x, self.q_a_proj.weight))
        c, k_pe = F.linear(x, self.kv_a_proj.weight).split([r, self.rope_dim], dim=-1)
        keys = cache.update(layer_norm(self.kv_a_norm, c), rope(k_pe, offset, self.base))  # [B, L, r + rope]
        q = (q_a @ w_q).view(b, self.heads, 1, -1)  # per head: [q_nope·w_uk (latent), q_pe] * scale
        q[..., r:] = rope(q[..., r:], offset, self.base)
        out = latent_attention(q.view(b, 1, self.heads, -1), keys, keys[..., :r], self.heads)  # [B, 1, H*r]
        return out @ w_o


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
        if "c" in memory:
            w_q, w_o = absorbed_weights(self, self.q_proj, self.head_dim)
            b, t, _ = x.shape
            q = (x @ w_q).view(b, t, self.heads, -1)  # per head: q·w_uk (latent space) * scale
            return latent_attention(q, memory["c"], memory["c"], self.heads) @ w_o
        q = split_heads(self.q_proj(x), self.heads)
        return self.o_proj(merge_heads(attend(q, memory["k"], memory["v"], self.scale)))


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

    def forward(self, x, offset: int = 0, cache=None, causal: bool = False):
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
