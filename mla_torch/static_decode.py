"""Greedy absorbed decoding at fixed shapes, so one step can be captured once (a CUDA graph) and replayed.

The cached loop of generate() launches a few hundred tiny kernels per token from Python, and the shapes grow with
the position (the cache slice, the RoPE row). Here every shape is fixed for (batch, max_length): the latent caches
are full length and attention masks the rows past the position, the position is a device tensor the step advances
itself, and every input lives in a buffer that keeps its address (refreshed with copy_). The math is that of
DecoderLayer.step, so the tokens equal generate(mode="absorbed", temperature=0).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mnist_grid.tokens import FINISH, PAD, START

from . import fused_step
from .attention import absorb, rope_table

HOWS = ("eager", "graph", "compiled", "fused")
_KEPT = 4  # decoders per model: one per eval batch shape, and each may hold a captured graph's memory
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class _Layer:
    """One decoder layer's fixed-address state: the folded weights (refreshed per run), the cross-attention latent
    memory and the full-length latent cache. `params` are the model's own tensors the step reads as they are."""

    w_a: torch.Tensor  # [q_rank + r + rope, d]: q_a_proj and kv_a_proj as one matmul
    self_q: torch.Tensor
    self_o: torch.Tensor
    cross_q: torch.Tensor
    cross_o: torch.Tensor
    memory: torch.Tensor  # [B, N, cross_kv_rank]
    kv: torch.Tensor  # [B, L, r + rope + 1]: the latent, the rotary key, and 0 / -inf for written / not yet
    params: tuple = ()
    output_major: tuple = ()  # the fused step's [out, in] copies of self_q, self_o, cross_q, cross_o


def _norm(norm) -> tuple:
    return norm.weight, norm.bias, norm.eps


def _tensors(*trees):
    for tree in trees:
        if isinstance(tree, torch.Tensor):
            yield tree
        elif isinstance(tree, (tuple, list)):
            yield from _tensors(*tree)


def _layer_norm(x, norm):
    w, b, eps = norm
    return F.layer_norm(x, w.shape, w, b, eps)


class StaticDecoder:
    """Greedy decoding of an MLA model in the absorbed form at fixed shapes, for one (batch, max_length, dtype)."""

    @torch.no_grad()
    def __init__(self, model, batch: int, max_length: int, how: str):
        if how not in HOWS:
            raise ValueError(f"how must be one of {', '.join(HOWS)}, got {how!r}")
        if "absorbed" not in model.decode_modes:
            raise ValueError(f"static decoding needs an MLA model (the absorbed step), not {model.config.attention}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        weight = model.head.weight
        self.device, self.dtype = weight.device, weight.dtype
        if how == "graph" and self.device.type != "cuda":
            raise ValueError(f"how='graph' captures a CUDA graph, but the model is on {self.device}: use 'eager'")
        cfg = model.config
        self.batch, self.max_length, self.how = batch, max_length, how
        self.heads, self.kv_rank, self.rope_dim = cfg.heads, cfg.dec_kv_rank, cfg.rope_dim
        self.q_rank = cfg.dec_q_rank
        self._model = weakref.ref(model)  # the per-model cache holds decoders: no strong cycle back to the model
        dev = dict(device=self.device, dtype=self.dtype)
        self._layers = []
        for layer in model.decoder:
            sa, ca = layer.self_attn, layer.cross_attn
            self._layers.append(
                _Layer(
                    w_a=torch.empty(sa.q_a_proj.weight.shape[0] + sa.kv_a_proj.weight.shape[0], cfg.d_model, **dev),
                    self_q=torch.zeros(self.q_rank, cfg.heads * (self.kv_rank + self.rope_dim + 1), **dev),
                    self_o=torch.empty(cfg.heads * self.kv_rank, cfg.d_model, **dev),
                    cross_q=torch.empty(cfg.d_model, cfg.heads * ca.kv_rank, **dev),
                    cross_o=torch.empty(cfg.heads * ca.kv_rank, cfg.d_model, **dev),
                    memory=torch.empty(batch, cfg.enc_tokens, ca.kv_rank, **dev),
                    kv=torch.zeros(batch, max_length, self.kv_rank + self.rope_dim + 1, **dev),
                )
            )
        # The same table rope() reads, so the rotation of each position is bit-identical to the eager step's.
        table = rope_table(max_length, cfg.rope_dim, cfg.rope_base, self.device, self.dtype)
        self._cos, self._sin, self._rotation = (t[:max_length].clone() for t in table)
        # Masking without a mask: each cached key carries one more column, -inf until its row is written (then 0),
        # and each head's query a constant 1 there (the bias below), so the scores of unwritten rows come out of
        # the matmul as -inf and the written rows' are unchanged (+ 1 * 0): one kernel fewer per layer.
        self._q_bias = torch.zeros(cfg.heads, self.kv_rank + self.rope_dim + 1, **dev)
        self._q_bias[:, -1] = 1
        self._q_bias = self._q_bias.view(-1)
        self._written = torch.zeros(batch, 1, 1, **dev)  # the extra column of a row being written
        self._tokens = torch.full((batch, max_length), PAD, dtype=torch.long, device=self.device)
        self._finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        self._pos = torch.zeros((), dtype=torch.long, device=self.device)
        self._top: tuple = ()
        steps = {"compiled": self._step, "fused": lambda: fused_step.step(self)}
        self._fn = torch.compile(steps[how], fullgraph=True, dynamic=False) if how in steps else self._step
        self._graph = None
        self._captured_from: tuple = ()  # the data pointers the graph was captured with

    @property
    def model(self):
        model = self._model()
        if model is None:
            raise ValueError("the model of this StaticDecoder no longer exists")
        return model

    def _step(self):
        """Decode position p = self._pos: read tokens[:, p], write its latent at cache row p and the greedy
        token at tokens[:, p + 1], advance p. Fixed shapes, no host sync: captured once, replayed per position."""
        b, h, r, pe = self.batch, self.heads, self.kv_rank, self.rope_dim
        at = self._pos.view(1)
        if self.how == "compiled":  # elementwise: Inductor fuses it with its neighbours, two matmuls fewer a layer
            cos, sin = self._cos.index_select(0, at), self._sin.index_select(0, at)

            def rotate(x):
                x1, x2 = x[..., 0::2], x[..., 1::2]
                return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)

        else:  # one small matmul: one kernel where the elementwise form launches half a dozen
            rotation = self._rotation.index_select(0, at).view(pe, pe)

            def rotate(x):
                return x @ rotation

        embed, final_norm, head_w, head_b = self._top
        x = F.embedding(self._tokens.index_select(1, at), embed)  # [B, 1, d]
        residual = x.view(b, -1)  # the same storage: attention outputs add into it inside their matmul (addmm_)
        for s in self._layers:
            norm1, q_a_norm, kv_a_norm, norm2, norm3, fc1_w, fc1_b, fc2_w, fc2_b = s.params
            # Self-attention, absorbed (MLASelfAttention.step).
            q_a, c, k_pe = F.linear(_layer_norm(x, norm1), s.w_a).split([self.q_rank, r, pe], dim=-1)
            kv = torch.cat([_layer_norm(c, kv_a_norm), rotate(k_pe), self._written], dim=-1)
            s.kv.index_copy_(1, at, kv)
            q = torch.addmm(self._q_bias, _layer_norm(q_a, q_a_norm).view(b, -1), s.self_q).view(b, h, 1, -1)
            q[..., r : r + pe] = rotate(q[..., r : r + pe])
            scores = torch.bmm(q.view(b, h, -1), s.kv.transpose(1, 2))  # unwritten rows: -inf
            residual.addmm_(torch.bmm(scores.softmax(-1), s.kv[..., :r]).view(b, -1), s.self_o)
            # Cross-attention over the latent memory (MLACrossAttention.forward with a LatentMemory).
            q = (_layer_norm(x, norm2) @ s.cross_q).view(b, h, -1)
            scores = torch.bmm(q, s.memory.transpose(1, 2))
            residual.addmm_(torch.bmm(scores.softmax(-1), s.memory).view(b, -1), s.cross_o)
            x += F.linear(F.gelu(F.linear(_layer_norm(x, norm3), fc1_w, fc1_b)), fc2_w, fc2_b)
        if final_norm is not None:
            x = _layer_norm(x, final_norm)
        nxt = F.linear(x, head_w, head_b).argmax(-1).masked_fill(self._finished[:, None], PAD)  # [B, 1]
        self._tokens.index_copy_(1, at + 1, nxt)
        self._finished |= nxt[:, 0] == FINISH
        self._pos += 1

    def _refresh(self, enc):
        """Copy this batch's memories and the weights as they are now into the fixed buffers; re-read the model's
        own tensors (their addresses change if it was moved or reloaded by assignment)."""
        model = self.model
        if enc.shape[0] != self.batch:
            raise ValueError(f"this StaticDecoder decodes batches of {self.batch}, got {enc.shape[0]}")
        for s, layer, memory in zip(self._layers, model.decoder, model.memories(enc, absorbed=True)):
            sa, mlp = layer.self_attn, layer.mlp
            s.w_a.copy_(torch.cat([sa.q_a_proj.weight, sa.kv_a_proj.weight]))
            folded = absorb(sa, sa.q_b_proj.weight, sa.nope_dim)
            q_rank, width = folded.w_q.shape[0], self.kv_rank + self.rope_dim
            s.self_q.view(q_rank, self.heads, width + 1)[..., :width].copy_(folded.w_q.view(q_rank, self.heads, width))
            s.self_o.copy_(folded.w_o)
            s.cross_q.copy_(memory.absorbed.w_q)
            s.cross_o.copy_(memory.absorbed.w_o)
            s.memory.copy_(memory.c)
            s.params = (
                _norm(layer.norm1),
                _norm(sa.q_a_norm),
                _norm(sa.kv_a_norm),
                _norm(layer.norm2),
                _norm(layer.norm3),
                mlp.fc1.weight,
                mlp.fc1.bias,
                mlp.fc2.weight,
                mlp.fc2.bias,
            )
            if self.how == "fused":  # into the same buffers each run: a captured graph reads their addresses
                fresh = fused_step.output_major(s)
                if not s.output_major:
                    s.output_major = fresh
                for kept, new in zip(s.output_major, fresh):
                    kept.copy_(new)
        final = None if model.decoder_norm is None else _norm(model.decoder_norm)
        self._top = (model.token_embed.weight, final, model.head.weight, model.head.bias)

    def _reset(self):
        for s in self._layers:
            s.kv.zero_()
            s.kv[..., -1] = float("-inf")
        self._tokens.fill_(PAD)
        self._tokens[:, 0] = START
        self._finished.zero_()
        self._pos.zero_()

    def _read_pointers(self) -> tuple:
        """Addresses of the model tensors the step reads: a captured graph is only valid while they hold."""
        return tuple(t.data_ptr() for t in _tensors([s.params for s in self._layers], self._top))

    def _capture(self):
        """Warm up on a side stream (allocator, cuBLAS handles, Inductor's compile), then capture one step."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._pos.zero_()  # each warm-up step at position 0: never past the end of a short cache
                self._fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._fn()
        self._graph = graph

    @torch.no_grad()
    def run(self, enc, stop: bool = True, check_every: int = 8) -> torch.Tensor:
        """enc [B, 1 + N, d] (model.encode) -> greedy tokens [B, max_length]. stop=True reads `finished` every
        `check_every` steps (the only host sync) and stops once every row is done; stop=False runs all steps."""
        self._refresh(enc)
        if self.device.type == "cuda" and self.how != "eager":
            pointers = self._read_pointers()
            if self._graph is None or pointers != self._captured_from:
                self._capture()
                self._captured_from = pointers
            step = self._graph.replay
        else:
            step = self._fn
        self._reset()
        for i in range(1, self.max_length):
            step()
            if stop and i % check_every == 0 and bool(self._finished.all()):
                break
        return self._tokens.clone()


def static_decoder(model, batch: int, max_length: int, how: str) -> StaticDecoder:
    """The model's StaticDecoder for (batch, max_length, dtype, how), kept for reuse (its captured graph or
    compiled step with it): the last few per model."""
    weight = model.head.weight
    kept = _DECODERS.setdefault(model, {})
    key = (batch, max_length, weight.dtype, how, weight.device)
    decoder = kept.pop(key, None)
    if decoder is None:
        decoder = StaticDecoder(model, batch, max_length, how)
    kept[key] = decoder  # most recently used last
    while len(kept) > _KEPT:
        kept.pop(next(iter(kept)))
    return decoder
