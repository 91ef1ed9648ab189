"""Multi-head latent attention (DeepSeek-V2 style) and the full-rank baselines (MHA, grouped-query GQA).

MLA self-attention keeps two forms of the same function:
- expanded (`__call__`): kv_b_proj turns the latent c into per-head K/V, then ordinary attention (training,
  prefill, and decoding when the expanded form is asked for);
- absorbed (`step`): the k half of kv_b_proj is folded into the query and the v half into the output, so
  attention runs directly over the cached latent c and shared k_pe (one-token decoding: nothing per-head is ever
  expanded). The folded matrices are derived once, when a decoding cache is made (`new_cache`).

A variant is a pair of modules in VARIANTS, its parameters in convert.schema.ATTENTION, its cache from its
self-attention's `new_cache`; `absorbed` says whether it has the one-token latent step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cache import KVCache, LatentCache, QuantizedLatentCache

_ROPE_TABLES: dict = {}
_ROPE_TABLES_KEPT = 8  # (dim, base, dtype) combinations: a process uses one or two


def rope_table(length: int, dim: int, base: float, dtype):
    """(cos, sin [positions, dim // 2], rotation [positions, dim, dim]) for at least `length` positions, kept for
    the last few (dim, base, dtype). Computed in numpy: a table first asked for inside mx.compile is then a
    constant, not a value of the trace."""
    key = (dim, base, dtype)
    table = _ROPE_TABLES.pop(key, None)
    if table is None or table[0].shape[0] < length:
        n = max(1024, 1 << (length - 1).bit_length())
        inv_freq = np.float32(base) ** (-np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
        angles = np.arange(n, dtype=np.float32)[:, None] * inv_freq
        cos, sin = np.cos(angles), np.sin(angles)
        # The same rotation as a matrix, for x @ rotation: pair (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos).
        rotation = np.zeros((n, dim, dim), dtype=np.float32)
        i = np.arange(0, dim, 2)
        rotation[:, i, i], rotation[:, i + 1, i + 1] = cos, cos
        rotation[:, i, i + 1], rotation[:, i + 1, i] = sin, -sin
        table = tuple(mx.array(a).astype(dtype) for a in (cos, sin, rotation))
    _ROPE_TABLES[key] = table
    while len(_ROPE_TABLES) > _ROPE_TABLES_KEPT:
        _ROPE_TABLES.pop(next(iter(_ROPE_TABLES)))
    return table


def rope_plain(x: mx.array, offset: int, base: float) -> mx.array:
    """rope() in plain ops over a cached table. MLX's CUDA backend fails to capture mx.fast.rope in its graphs at
    batch >= 64 (ml-explore/mlx#3659); these ops work at any batch. One decoding position is one small matmul,
    not a dozen elementwise ops (a step makes two per layer)."""
    t, dim = x.shape[-2], x.shape[-1]
    cos, sin, rotation = rope_table(offset + t, dim, base, x.dtype)
    if t == 1:
        return x @ rotation[offset]
    if x.dtype != mx.float32:
        # The compiled bf16 training step: every position's rotation as one batched matmul over positions, so
        # that forward and backward are matmuls and copies, kernels the CUDA backend ships built; the
        # elementwise form below is four fused kernels that it compiles at run time (2-6 s each, every cold
        # start). float32 keeps the elementwise form, whose rounding inference's read-outs were checked with.
        xt = mx.swapaxes(x.reshape(-1, t, dim), 0, 1)  # [t, N, dim]
        return mx.swapaxes(xt @ rotation[offset : offset + t], 0, 1).reshape(x.shape)
    cos, sin = cos[offset : offset + t], sin[offset : offset + t]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return mx.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(x.shape)


def on_cuda_backend() -> bool:
    """Whether arrays land on MLX's CUDA backend (a GPU that is not Metal), whose kernels differ from Metal's."""
    return mx.default_device() == mx.gpu and not mx.metal.is_available()


def rope(x: mx.array, offset: int, base: float) -> mx.array:
    """Rotary embedding on interleaved pairs (0,1),(2,3)... of the last axis; positions run along axis -2."""
    if on_cuda_backend():  # see rope_plain
        return rope_plain(x, offset, base)
    return mx.fast.rope(x, x.shape[-1], traditional=True, base=base, scale=1.0, offset=offset)


def causal_mask(t: int, length: int) -> mx.array | None:
    """Boolean mask (True = attend) for t queries ending at key `length` (bottom-right aligned)."""
    if t == 1:
        return None
    return mx.arange(length)[None, :] <= mx.arange(length - t, length)[:, None]


# The training step sets this (`backward_layout`) while it is traced; inference never pads.
_PAD_QUERIES_TO = 0


@contextlib.contextmanager
def backward_layout(enabled: bool = True):
    """Inside, attention on MLX's CUDA backend pads its queries to a multiple of 128 rows in bf16/fp16, because
    only then does the backward of mx.fast.scaled_dot_product_attention run cuDNN's fused kernel; at other lengths
    it recomputes attention in unfused ops (softmax over rows of 17 keys: most of the small model's step there).
    Padded query rows attend like any other and are dropped, so the function and its gradients are unchanged."""
    global _PAD_QUERIES_TO
    before = _PAD_QUERIES_TO
    _PAD_QUERIES_TO = 128 if enabled and on_cuda_backend() else 0
    try:
        yield
    finally:
        _PAD_QUERIES_TO = before


def _pad_rows(x, rows: int):
    return mx.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, rows), (0, 0)]) if rows else x


def attend(q, k, v, scale, causal=False):
    """Fused attention over per-head q [B, H, T, D] and k, v [B, H_kv, L, D] (H_kv divides H)."""
    t = q.shape[-2]
    pad = -t % _PAD_QUERIES_TO if _PAD_QUERIES_TO and t > 1 and q.dtype in (mx.bfloat16, mx.float16) else 0
    if pad and (not causal or t == k.shape[-2]):
        # Causal self-attention pads its keys too (zeros after the last key: every real query's causal window
        # ends before them); other attention keeps its keys, so padded queries need no mask.
        if causal:
            k, v = _pad_rows(k, pad), _pad_rows(v, pad)
        return _fused_attention(_pad_rows(q, pad), k, v, scale, causal)[..., :t, :]
    return _fused_attention(q, k, v, scale, causal)


def _fused_attention(q, k, v, scale, causal):
    t = q.shape[-2]
    if causal and t > 1:
        if t == k.shape[-2]:
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=causal_mask(t, k.shape[-2]))
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)


def latent_attention(q, keys, values, heads: int):
    """Attention of q [B, T, H, D] over one key/value "head" shared by all query heads (the latent).

    Heads fold into the query axis (row t*H + h), so the latent is never copied per head; the scale is already
    in q. MLX's fused attention takes a value dim different from the key dim (keys r + rope, values r).
    """
    b, t = q.shape[:2]
    out = mx.fast.scaled_dot_product_attention(
        q.reshape(b, 1, t * heads, -1), keys[:, None], values[:, None], scale=1.0
    )
    return out.reshape(b, t, -1)


def dense_weight(layer) -> mx.array:
    """A Linear's weight in full precision (a quantized layer is dequantized)."""
    if isinstance(layer, nn.QuantizedLinear):
        return mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
    return layer.weight


@dataclass
class Absorbed:
    """The absorbed projections of one attention module, input-major (x @ w). w_q [in, H*(r + pe)] maps the input
    to latent-space queries (the softmax scale folded in); w_o [H*r, d] maps the attended latents to the output."""

    w_q: mx.array
    w_o: mx.array


def absorb(module, q_layer, k_dim: int) -> Absorbed:
    """Fold kv_b_proj into the query and output projections.

    q: per head, the k half of kv_b_proj (w_uk [k_dim, r]) folded into the query's first k_dim rows, the
    remaining (rotary) rows kept. o: the v half (w_uv [hd, r]) folded into o_proj. Computed in float32 and cast
    back to the weights' dtype.
    """
    h, dtype = module.heads, module.kv_b_proj.weight.dtype
    wq, wkv, wo = (dense_weight(m).astype(mx.float32) for m in (q_layer, module.kv_b_proj, module.o_proj))
    wkv = wkv.reshape(h, -1, wkv.shape[1])  # [H, k_dim + hd, r]
    wq = wq.reshape(h, -1, wq.shape[1])  # [H, hd, in]
    q_lat = mx.einsum("hkr,hki->hri", wkv[:, :k_dim], wq[:, :k_dim])
    w_q = mx.concatenate([q_lat, wq[:, k_dim:]], axis=1).reshape(-1, wq.shape[2]) * module.scale
    w_o = mx.einsum("dhv,hvr->dhr", wo.reshape(wo.shape[0], h, -1), wkv[:, k_dim:]).reshape(wo.shape[0], -1)
    return Absorbed(w_q.T.astype(dtype), w_o.T.astype(dtype))


def split_heads(x, heads):
    b, t, _ = x.shape
    return x.reshape(b, t, heads, -1).transpose(0, 2, 1, 3)


def merge_heads(x):
    b, h, t, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * d)


@dataclass
class LatentMemory:
    """Cross-attention memory in latent form: the encoder latent c [B, N, r] and the absorbed projections."""

    c: mx.array
    absorbed: Absorbed

    @property
    def nbytes(self) -> int:
        return self.c.nbytes


@dataclass
class KVMemory:
    """Cross-attention memory as per-head K/V [B, H_kv, N, hd], computed once per image."""

    k: mx.array
    v: mx.array

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


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
        kind = QuantizedLatentCache if quantized else LatentCache
        cache = kind(batch, max_length, self.kv_rank, self.rope_dim, self.kv_b_proj.weight.dtype)
        cache.absorbed = absorb(self, self.q_b_proj, self.nope_dim) if absorbed else None
        return cache

    def __call__(self, x, offset: int = 0, cache=None, causal: bool = False):
        """The expanded form: x [B, T, d] -> [B, T, d]; with a cache, x continues the cached prefix."""
        r, h = self.kv_rank, self.heads
        q_a = self.q_a_norm(self.q_a_proj(x))
        c, k_pe = mx.split(self.kv_a_proj(x), [r], axis=-1)
        c = self.kv_a_norm(c)
        k_pe = rope(k_pe, offset, self.base)  # [B, T, rope]: one rotary key shared by all heads
        if cache is not None:
            keys = cache.update(c, k_pe)  # [B, L, r + rope]: the latent and the rotary key, side by side
            c, k_pe = keys[..., :r], keys[..., r:]
        b, length = c.shape[0], c.shape[1]
        q_nope, q_pe = mx.split(split_heads(self.q_b_proj(q_a), h), [self.nope_dim], axis=-1)
        q = mx.concatenate([q_nope, rope(q_pe, offset, self.base)], axis=-1)
        k_nope, v = mx.split(split_heads(self.kv_b_proj(c), h), [self.nope_dim], axis=-1)
        k = mx.concatenate([k_nope, mx.broadcast_to(k_pe[:, None], (b, h, length, self.rope_dim))], axis=-1)
        return self.o_proj(merge_heads(attend(q, k, v, self.scale, causal=causal)))

    def step(self, x, cache):
        """The absorbed form for one new position: x [B, 1, d] -> [B, 1, d]. Only the new position's latent c and
        k_pe are computed; the query moves into latent space and attends over the cache as it is stored."""
        r, b, offset, w = self.kv_rank, x.shape[0], cache.length, cache.absorbed
        q_a = self.q_a_norm(self.q_a_proj(x))
        c, k_pe = mx.split(self.kv_a_proj(x), [r], axis=-1)
        keys = cache.update(self.kv_a_norm(c), rope(k_pe, offset, self.base))  # [B, L, r + rope]
        q = (q_a @ w.w_q).reshape(b, self.heads, 1, -1)  # per head: [q_nope·w_uk (latent), q_pe] * scale
        q = mx.concatenate([q[..., :r], rope(q[..., r:], offset, self.base)], axis=-1)
        out = latent_attention(q.reshape(b, 1, self.heads, -1), keys, keys[..., :r], self.heads)  # [B, 1, H*r]
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
            return LatentMemory(c, absorb(self, self.q_proj, self.head_dim))
        k, v = mx.split(split_heads(self.kv_b_proj(c), self.heads), [self.head_dim], axis=-1)
        return KVMemory(k, v)

    def __call__(self, x, memory: LatentMemory | KVMemory):
        if isinstance(memory, LatentMemory):
            b, t, _ = x.shape
            q = (x @ memory.absorbed.w_q).reshape(b, t, self.heads, -1)  # per head: q·w_uk (latent space) * scale
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
        return KVCache(batch, max_length, self.kv_heads, self.head_dim, self.o_proj.weight.dtype)

    def _rope_heads(self, x, offset):
        nope, pe = mx.split(x, [self.nope_dim], axis=-1)
        return mx.concatenate([nope, rope(pe, offset, self.base)], axis=-1)

    def __call__(self, x, offset: int = 0, cache=None, causal: bool = False):
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
        return KVMemory(split_heads(self.k_proj(enc), self.kv_heads), split_heads(self.v_proj(enc), self.kv_heads))

    def __call__(self, x, memory: KVMemory):
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
