"""Multi-head latent attention (DeepSeek-V2 style) and the full-rank baselines (MHA, grouped-query GQA).

MLA self-attention keeps two forms of the same function:
- expanded (`forward`): kv_b_proj turns the latent c into per-head K/V, then ordinary attention (training,
  prefill, and decoding when the expanded form is asked for);
- absorbed (`step`): the k half of kv_b_proj is folded into the query and the v half into the output, so
  attention runs directly over the cached latent c and shared k_pe (one-token decoding: nothing per-head is ever
  expanded). The folded matrices are derived once, when a decoding cache is made (`new_cache`).

A variant is a pair of modules in VARIANTS, its parameters in convert.schema.ATTENTION, its cache from its
self-attention's `new_cache`; `absorbed` says whether it has the one-token latent step.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import KVCache, LatentCache, QuantizedLatentCache

_ROPE_TABLES: OrderedDict = OrderedDict()
_ROPE_TABLES_KEPT = 8  # (dim, base, device, dtype) combinations: a process uses one or two


def rope_table(length: int, dim: int, base: float, device, dtype):
    """(cos, sin [positions, dim // 2], rotation [positions, dim, dim]) for at least `length` positions, kept for
    the last few (dim, base, device, dtype): decoding asks for one position per layer per step, and recomputing
    them cost more than the rotation."""
    key = (dim, base, str(device), dtype)
    table = _ROPE_TABLES.pop(key, None)
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
        table = (cos.to(dtype), sin.to(dtype), rotation.to(dtype))
    _ROPE_TABLES[key] = table
    while len(_ROPE_TABLES) > _ROPE_TABLES_KEPT:
        _ROPE_TABLES.popitem(last=False)
    return table


def rope(x: torch.Tensor, offset: int, base: float) -> torch.Tensor:
    """Rotary embedding on interleaved pairs (0,1),(2,3)... of the last axis; positions run along axis -2."""
    t, dim = x.shape[-2], x.shape[-1]
    cos, sin, rotation = rope_table(offset + t, dim, base, x.device, x.dtype)
    if t == 1:  # one decoding position: one small matmul instead of a dozen elementwise ops
        return x @ rotation[offset]
    cos, sin = cos[offset : offset + t], sin[offset : offset + t]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def causal_mask(t: int, length: int, device) -> torch.Tensor | None:
    """Boolean mask (True = attend) for t queries ending at key `length` (bottom-right aligned)."""
    if t == 1:
        return None
    return torch.arange(length, device=device)[None, :] <= torch.arange(length - t, length, device=device)[:, None]


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """x, or a contiguous copy where x starts or steps off a 16-byte boundary.

    cuDNN's fused attention, which SDPA picks for bfloat16 on Hopper, reads such a view (MLA's v, sliced at
    nope_dim out of kv_b's output) wrongly and without an error (torch 2.11, H200: outputs off by up to 4 on
    unit-scale inputs; a model trained through it learns the wrong function). A copy starts on an allocator
    boundary and is cheap beside the attention it feeds; aligned views (a cache's first L positions) pass as
    they are."""
    if torch.compiler.is_compiling():  # offsets cannot be traced; the compiler's buffers start aligned
        return x.contiguous()
    size = x.element_size()
    steps = [st * size for st, n in zip(x.stride()[:-1], x.shape[:-1]) if n > 1]
    if x.stride(-1) == 1 and (x.storage_offset() * size) % 16 == 0 and all(st % 16 == 0 for st in steps):
        return x
    return x.clone(memory_format=torch.contiguous_format)


def attend(q, k, v, scale, causal=False):
    """Fused attention over per-head q [B, H, T, D] and k, v [B, H_kv, L, D] (H_kv divides H)."""
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    t, grouped = q.shape[-2], k.shape[1] != q.shape[1]
    mask = None
    if causal and t > 1:
        if t == k.shape[-2]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=grouped)
        mask = causal_mask(t, k.shape[-2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=grouped)


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


@dataclass
class Absorbed:
    """The absorbed projections of one attention module, input-major (x @ w: at batch 4 a matmul that streams
    cold weights row by row is the faster one). w_q [in, H*(r + pe)] maps the input to latent-space queries (the
    softmax scale folded in); w_o [H*r, d] maps the attended latents to the output."""

    w_q: torch.Tensor
    w_o: torch.Tensor


@torch.no_grad()
def absorb(module, q_weight, k_dim: int) -> Absorbed:
    """Fold kv_b_proj into the query and output projections.

    q: per head, the k half of kv_b_proj (w_uk [k_dim, r]) folded into the query's first k_dim rows, the
    remaining (rotary) rows kept. o: the v half (w_uv [hd, r]) folded into o_proj. Computed in float32 and cast
    back to the weights' dtype.
    """
    h, dtype = module.heads, module.kv_b_proj.weight.dtype
    wq, wkv, wo = (w.float() for w in (q_weight, module.kv_b_proj.weight, module.o_proj.weight))
    wkv = wkv.view(h, -1, wkv.shape[1])  # [H, k_dim + hd, r]
    wq = wq.view(h, -1, wq.shape[1])  # [H, hd, in]
    q_lat = torch.einsum("hkr,hki->hri", wkv[:, :k_dim], wq[:, :k_dim])
    w_q = torch.cat([q_lat, wq[:, k_dim:]], dim=1).reshape(-1, wq.shape[2]) * module.scale
    w_o = torch.einsum("dhv,hvr->dhr", wo.view(wo.shape[0], h, -1), wkv[:, k_dim:]).reshape(wo.shape[0], -1)
    return Absorbed(w_q.t().contiguous().to(dtype), w_o.t().contiguous().to(dtype))


def split_heads(x, heads):
    b, t, _ = x.shape
    return x.view(b, t, heads, -1).transpose(1, 2)


def merge_heads(x):
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


@dataclass
class LatentMemory:
    """Cross-attention memory in latent form: the encoder latent c [B, N, r] and the absorbed projections."""

    c: torch.Tensor
    absorbed: Absorbed

    @property
    def nbytes(self) -> int:
        return self.c.numel() * self.c.element_size()


@dataclass
class KVMemory:
    """Cross-attention memory as per-head K/V [B, H_kv, N, hd], computed once per image."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v))


class MLASelfAttention(nn.Module):
    absorbed = True  # has the one-token latent-space step

    def __init__(self, cfg, q_rank: int, kv_rank: int):
        super().__init__()
        self.heads, self.head_dim, self.rope_dim, self.kv_rank = cfg.heads, cfg.head_dim, cfg.rope_dim, kv_rank
        self.nope_dim, self.base = cfg.head_dim - cfg.rope_dim, cfg.rope_base
        self.scale = cfg.head_dim**-0.5
        d, h = cfg.d_model, cfg.heads
        self.q_a_proj = nn.Linear(d, q_rank, bias=False)
        self.q_a_norm = nn.LayerNorm(q_rank)
        self.q_b_proj = nn.Linear(q_rank, h * cfg.head_dim, bias=False)
        self.kv_a_proj = nn.Linear(d, kv_rank + cfg.rope_dim, bias=False)
        self.kv_a_norm = nn.LayerNorm(kv_rank)
        self.kv_b_proj = nn.Linear(kv_rank, h * (self.nope_dim + cfg.head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.head_dim, d, bias=False)

    def new_cache(self, batch, max_length, absorbed: bool, quantized: bool = False):
        """The latent cache (c | k_pe per position); for the absorbed step it carries the folded projections."""
        w = self.o_proj.weight
        kind = QuantizedLatentCache if quantized else LatentCache
        cache = kind(batch, max_length, self.kv_rank, self.rope_dim, w.dtype, w.device)
        cache.absorbed = absorb(self, self.q_b_proj.weight, self.nope_dim) if absorbed else None
        return cache

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
        r, b, offset, w = self.kv_rank, x.shape[0], cache.length, cache.absorbed
        q_a = layer_norm(self.q_a_norm, F.linear(x, self.q_a_proj.weight))
        c, k_pe = F.linear(x, self.kv_a_proj.weight).split([r, self.rope_dim], dim=-1)
        keys = cache.update(layer_norm(self.kv_a_norm, c), rope(k_pe, offset, self.base))  # [B, L, r + rope]
        q = (q_a @ w.w_q).view(b, self.heads, 1, -1)  # per head: [q_nope·w_uk (latent), q_pe] * scale
        q[..., r:] = rope(q[..., r:], offset, self.base)
        out = latent_attention(q.view(b, 1, self.heads, -1), keys, keys[..., :r], self.heads)  # [B, 1, H*r]
        return out @ w.w_o


class MLACrossAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads, self.head_dim, self.kv_rank = cfg.heads, cfg.head_dim, cfg.cross_kv_rank
        self.scale = cfg.head_dim**-0.5
        d, h = cfg.d_model, cfg.heads
        self.q_proj = nn.Linear(d, h * cfg.head_dim, bias=False)
        self.kv_a_proj = nn.Linear(d, self.kv_rank, bias=False)
        self.kv_a_norm = nn.LayerNorm(self.kv_rank)
        self.kv_b_proj = nn.Linear(self.kv_rank, h * 2 * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(h * cfg.head_dim, d, bias=False)

    def memory(self, enc, absorbed: bool = False) -> LatentMemory | KVMemory:
        """What every decoding step reuses: the encoder latent c, or K/V expanded from it once."""
        c = self.kv_a_norm(self.kv_a_proj(enc))
        if absorbed:
            return LatentMemory(c, absorb(self, self.q_proj.weight, self.head_dim))
        k, v = split_heads(self.kv_b_proj(c), self.heads).split([self.head_dim, self.head_dim], dim=-1)
        return KVMemory(k.contiguous(), v.contiguous())  # once, not in every decoding step's attend()

    def forward(self, x, memory: LatentMemory | KVMemory):
        if isinstance(memory, LatentMemory):
            b, t, _ = x.shape
            q = (x @ memory.absorbed.w_q).view(b, t, self.heads, -1)  # per head: q·w_uk (latent space) * scale
            return latent_attention(q, memory.c, memory.c, self.heads) @ memory.absorbed.w_o
        q = split_heads(self.q_proj(x), self.heads)
        return self.o_proj(merge_heads(attend(q, memory.k, memory.v, self.scale)))


class GroupedSelfAttention(nn.Module):
    """Full-rank attention with K/V heads shared by groups of query heads: MHA (kv_heads == heads, the baseline
    MLA replaces) or GQA (fewer); RoPE on the last rope_dim of every head; a K/V cache of kv_heads heads."""

    absorbed = False

    def __init__(self, cfg, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, kv_heads, cfg.head_dim
        self.rope_dim, self.base = cfg.rope_dim, cfg.rope_base
        self.nope_dim, self.scale = cfg.head_dim - cfg.rope_dim, cfg.head_dim**-0.5
        d, kv = cfg.d_model, kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def new_cache(self, batch, max_length, absorbed: bool, quantized: bool = False):
        if absorbed or quantized:
            raise ValueError("only MLA has an absorbed step and an int8 latent cache")
        w = self.o_proj.weight
        return KVCache(batch, max_length, self.kv_heads, self.head_dim, w.dtype, w.device)

    def _rope_heads(self, x, offset):
        nope, pe = x.split([self.nope_dim, self.rope_dim], dim=-1)
        return torch.cat([nope, rope(pe, offset, self.base)], dim=-1)

    def forward(self, x, offset: int = 0, cache=None, causal: bool = False):
        q = self._rope_heads(split_heads(self.q_proj(x), self.heads), offset)
        k = self._rope_heads(split_heads(self.k_proj(x), self.kv_heads), offset)
        v = split_heads(self.v_proj(x), self.kv_heads)
        if cache is not None:
            k, v = cache.update(k, v)
        return self.o_proj(merge_heads(attend(q, k, v, self.scale, causal=causal)))


class GroupedCrossAttention(nn.Module):
    def __init__(self, cfg, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.scale = cfg.heads, kv_heads, cfg.head_dim**-0.5
        d, kv = cfg.d_model, kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def memory(self, enc, absorbed: bool = False) -> KVMemory:
        if absorbed:
            raise ValueError("only MLA has an absorbed (latent) cross-attention memory")
        k, v = split_heads(self.k_proj(enc), self.kv_heads), split_heads(self.v_proj(enc), self.kv_heads)
        return KVMemory(k.contiguous(), v.contiguous())  # once, not in every decoding step's attend()

    def forward(self, x, memory: KVMemory):
        q = split_heads(self.q_proj(x), self.heads)
        return self.o_proj(merge_heads(attend(q, memory.k, memory.v, self.scale)))


# name -> (self-attention(cfg, q_rank, kv_rank), cross-attention(cfg)); parameters in convert.schema.ATTENTION
VARIANTS = {
    "mla": (MLASelfAttention, MLACrossAttention),
    "mha": (
        lambda cfg, q_rank, kv_rank: GroupedSelfAttention(cfg, cfg.heads),
        lambda cfg: GroupedCrossAttention(cfg, cfg.heads),
    ),
    "gqa": (
        lambda cfg, q_rank, kv_rank: GroupedSelfAttention(cfg, cfg.kv_heads),
        lambda cfg: GroupedCrossAttention(cfg, cfg.kv_heads),
    ),
}


def self_attention(cfg, q_rank, kv_rank):
    return VARIANTS[cfg.attention][0](cfg, q_rank, kv_rank)


def cross_attention(cfg):
    return VARIANTS[cfg.attention][1](cfg)
