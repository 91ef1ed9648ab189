"""Greedy absorbed decoding at fixed shapes, so one compiled step serves every position.

generate()'s loop grows a slice of the cache and reads the position as a Python int, so each position is a new
graph. Here the latent caches are full length, the position is an array, attention masks the rows not written
yet and RoPE reads its row of a table: every step has the same shapes and mx.compile builds it once.
"""

from __future__ import annotations

import mlx.core as mx

from mnist_grid.tokens import FINISH, PAD, START

from . import fused_step
from .attention import absorb, dense_weight, latent_attention, rope_table

HOWS = ("eager", "graph", "compiled", "fused")
_KEPT = 4  # decoders per model: one per eval batch shape, each with its compiled step


class StaticDecoder:
    """Greedy decoding of an MLA model in the absorbed form at fixed shapes, for one (batch, max_length, dtype)."""

    def __init__(self, model, batch: int, max_length: int, how: str):
        if how == "graph":
            raise ValueError("MLX has no explicit graph capture; its CUDA backend builds graphs itself: use compiled")
        if how not in HOWS:
            raise ValueError(f"how must be one of {', '.join(HOWS)}, got {how!r}")
        if "absorbed" not in model.decode_modes:
            raise ValueError(f"static decoding needs an MLA model (the absorbed step), not {model.config.attention}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        if how == "fused" and fused_step.blocker(model, batch, max_length) is not None:
            raise ValueError(fused_step.blocker(model, batch, max_length))
        cfg = model.config
        self.model, self.batch, self.max_length, self.how = model, batch, max_length, how
        self.dtype = dtype = model.decoder[0].self_attn.kv_b_proj.weight.dtype  # as LatentCache
        self.q_rank, self.kv_rank = cfg.dec_q_rank, cfg.dec_kv_rank
        b, length, layers = batch, max_length, cfg.dec_layers
        # Masking without a mask, as in torch: each cached key carries one more column, -inf until its row is
        # written (then 0), and each head's query a constant 1 there (a bias), so unwritten rows score -inf.
        self.width = cfg.dec_kv_rank + cfg.rope_dim
        self.caches = [self._empty_cache() for _ in range(layers)]
        q_bias = mx.zeros((cfg.heads, self.width + 1), dtype=dtype)
        self.q_bias = mx.where(mx.arange(self.width + 1) == self.width, 1, q_bias).astype(dtype).reshape(-1)
        self.memories = [mx.zeros((b, cfg.enc_tokens, cfg.cross_kv_rank), dtype=dtype) for _ in range(layers)]
        self.weights = None  # per layer the fused q_a | kv_a projection and the absorbed ones: set by run()
        # The same table rope() reads, so each position's rotation is the one the loop applies on CUDA.
        self.rotation = rope_table(length, cfg.rope_dim, cfg.rope_base, dtype)[2][:length]
        self.tokens = mx.full((b, length), PAD, dtype=mx.int32)
        self.finished = mx.zeros((b,), dtype=mx.bool_)
        self.position = mx.array(0, dtype=mx.int32)
        # The model's own parameters (norms, MLPs, embedding, head) are read through inputs=, so a model trained
        # since the last run is seen without a recompile; everything else is an explicit input.
        self.step = mx.compile(self._step, inputs=model.state) if how == "compiled" else self._step
        if how == "fused":
            self.fused = fused_step.FusedStep(cfg, batch, max_length, model.decoder_norm is not None)

    def _empty_cache(self):
        b, length = self.batch, self.max_length
        unwritten = mx.full((b, length, 1), -mx.inf, dtype=self.dtype)
        return mx.concatenate([mx.zeros((b, length, self.width), dtype=self.dtype), unwritten], axis=-1)

    def _prepare(self, memories):
        """Per layer the fused and absorbed projections of the current parameters (the model may have been
        trained since the last run); the cross-attention's come with its memory."""
        weights = []
        for layer, memory in zip(self.model.decoder, memories):
            attn = layer.self_attn
            w_a = mx.concatenate([dense_weight(attn.q_a_proj), dense_weight(attn.kv_a_proj)], axis=0).T
            absorbed = absorb(attn, attn.q_b_proj, attn.nope_dim)
            q_rank = absorbed.w_q.shape[0]
            self_q = absorbed.w_q.reshape(q_rank, attn.heads, self.width)  # one zero column more per head
            self_q = mx.concatenate([self_q, mx.zeros((q_rank, attn.heads, 1), dtype=self_q.dtype)], axis=-1)
            weights.append(
                {
                    "w_a": w_a.astype(self.dtype),
                    "self_q": self_q.reshape(q_rank, -1),
                    "self_o": absorbed.w_o,
                    "cross_q": memory.absorbed.w_q,
                    "cross_o": memory.absorbed.w_o,
                }
            )
        return weights

    def _step(self, weights, memories, caches, tokens, finished, position):
        """One position p: reads tokens[:, p], writes cache row p and tokens[:, p + 1]. State in, state out."""
        model, r = self.model, self.kv_rank
        rows = mx.arange(self.max_length)
        write = (rows == position)[None, :, None]  # the cache row of this position
        rotation = mx.take(self.rotation, position, axis=0)  # [rope, rope]
        x = model.token_embed(mx.take(tokens, position[None], axis=1))  # [B, 1, d]
        new_caches = []
        for layer, w, memory, cache in zip(model.decoder, weights, memories, caches):
            attn, b = layer.self_attn, x.shape[0]
            q_a, c, k_pe = mx.split(layer.norm1(x) @ w["w_a"], [self.q_rank, self.q_rank + r], axis=-1)
            written = mx.zeros((b, 1, 1), dtype=c.dtype)
            kv = mx.concatenate([attn.kv_a_norm(c), k_pe @ rotation, written], axis=-1)
            cache = mx.where(write, kv, cache)
            new_caches.append(cache)
            q = mx.addmm(self.q_bias, attn.q_a_norm(q_a).reshape(b, -1), w["self_q"]).reshape(b, 1, attn.heads, -1)
            q = mx.concatenate([q[..., :r], q[..., r : self.width] @ rotation, q[..., self.width :]], axis=-1)
            # latent_attention over all rows (the unwritten ones score -inf): heads on the query axis, one shared key
            out = mx.fast.scaled_dot_product_attention(q, cache[:, None], cache[:, None, :, :r], scale=1.0)
            x = mx.addmm(x.reshape(b, -1), out.reshape(b, -1), w["self_o"]).reshape(b, 1, -1)
            q = (layer.norm2(x) @ w["cross_q"]).reshape(b, 1, attn.heads, -1)
            out = latent_attention(q, memory, memory, attn.heads)
            x = mx.addmm(x.reshape(b, -1), out.reshape(b, -1), w["cross_o"]).reshape(b, 1, -1)
            x = x + layer.mlp(layer.norm3(x))
        if model.decoder_norm is not None:
            x = model.decoder_norm(x)
        nxt = model.head(x)[:, -1].argmax(-1).astype(mx.int32)
        nxt = mx.where(finished, PAD, nxt)
        tokens = mx.where(rows == position + 1, nxt[:, None], tokens)
        return new_caches, tokens, finished | (nxt == FINISH), position + 1

    def run(self, enc, stop: bool = True, check_every: int = 8):
        """enc [batch, 1 + N, d] -> greedy tokens [batch, max_length], as generate(mode="absorbed") gives them."""
        if enc.shape[0] != self.batch:
            raise ValueError(f"this StaticDecoder decodes batches of {self.batch}, got {enc.shape[0]}")
        if self.how == "fused":
            return self._run_fused(enc, stop, check_every)
        memories = self.model.memories(enc, absorbed=True)
        self.memories = [m.c for m in memories]
        self.weights = self._prepare(memories)
        self.caches = [self._empty_cache() for _ in self.caches]
        self.tokens = mx.full((self.batch, self.max_length), PAD, dtype=mx.int32)
        self.tokens[:, 0] = START
        self.finished = mx.zeros((self.batch,), dtype=mx.bool_)
        self.position = mx.array(0, dtype=mx.int32)
        for t in range(1, self.max_length):
            self.caches, self.tokens, self.finished, self.position = self.step(
                self.weights, self.memories, self.caches, self.tokens, self.finished, self.position
            )
            if stop and t % check_every == 0 and self.finished.all().item():  # the only host sync
                break
            mx.async_eval(self.caches, self.tokens, self.finished, self.position)
        return self.tokens

    def _run_fused(self, enc, stop: bool, check_every: int):
        """run() with the whole step as one kernel (fused_step): the same state, the caches as one array."""
        cfg, b, length = self.model.config, self.batch, self.max_length
        packed = fused_step.pack(self.model, self.model.memories(enc, absorbed=True), self.rotation)
        cache = mx.zeros((cfg.dec_layers, b, length, self.width), dtype=mx.float32)
        tokens = mx.full((b, length), PAD, dtype=mx.int32)
        tokens[:, 0] = START
        finished = mx.zeros((b,), dtype=mx.int32)
        position = mx.zeros((1,), dtype=mx.int32)
        for t in range(1, length):
            cache, tokens, finished, position = self.fused(packed, cache, tokens, finished, position)
            if stop and t % check_every == 0 and finished.astype(mx.bool_).all().item():  # the only host sync
                break
            mx.async_eval(cache, tokens, finished, position)
        self.tokens = tokens
        return tokens


def static_decoder(model, batch: int, max_length: int, how: str) -> StaticDecoder:
    """The model's StaticDecoder for (batch, max_length, dtype, how), made on first use; at most _KEPT are
    kept, the oldest dropped. They live in the instance __dict__, outside the module's parameter tree."""
    decoders = model.__dict__.setdefault("_static_decoders", {})
    key = (batch, max_length, model.decoder[0].self_attn.kv_b_proj.weight.dtype, how)
    if key not in decoders:
        if len(decoders) >= _KEPT:
            decoders.pop(next(iter(decoders)))
        decoders[key] = StaticDecoder(model, batch, max_length, how)
    return decoders[key]
