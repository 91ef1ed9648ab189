"""The encoder-decoder: patch embedding + class token -> MLA encoder -> MLA decoder with cross-attention."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from convert.config import MNIST_MEAN, MNIST_STD, ModelConfig

from .attention import cross_attention, self_attention
from .cache import DecoderCache


def normalized(images: mx.array, dtype) -> mx.array:
    """Pixels in [0, 1] (or uint8 0-255: a quarter of the bytes to move to a GPU, scaled here) -> the model's input."""
    if images.dtype == mx.uint8:
        images = images.astype(mx.float32) / 255
    return (images.astype(dtype) - MNIST_MEAN) / MNIST_STD


def patchify(images: mx.array, p: int) -> mx.array:
    """[B, H, W] -> [B, N, p*p]: non-overlapping patches in raster order, each flattened row-major."""
    b, h, w = images.shape
    x = images.reshape(b, h // p, p, w // p, p).transpose(0, 1, 3, 2, 4)
    return x.reshape(b, (h // p) * (w // p), p * p)


@mx.custom_function
def gelu(x: mx.array) -> mx.array:
    """nn.gelu (exact, erf) with its derivative written out. Differentiated through, nn.gelu keeps intermediates
    for its backward and the compiled step splits it into four fused kernels, each built at run time on the CUDA
    backend (2-6 s a kernel, every cold start); this is one kernel each way, from x alone."""
    return nn.gelu(x)


@gelu.vjp
def _gelu_vjp(x, cotangent, output):  # one input: MLX passes the array itself, not a tuple
    x = x.astype(mx.float32)
    slope = 0.5 * (1 + mx.erf(x * (1 / math.sqrt(2)))) + x * mx.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))
    return ((cotangent.astype(mx.float32) * slope).astype(cotangent.dtype),)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_model * cfg.mlp_ratio)
        self.fc2 = nn.Linear(cfg.d_model * cfg.mlp_ratio, cfg.d_model)

    def __call__(self, x):
        return self.fc2(gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = self_attention(cfg, cfg.enc_q_rank, cfg.enc_kv_rank)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def __call__(self, x):
        x = x + self.dropout(self.attn(self.norm1(x)))
        return x + self.dropout(self.mlp(self.norm2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.self_attn = self_attention(cfg, cfg.dec_q_rank, cfg.dec_kv_rank)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.cross_attn = cross_attention(cfg)
        self.norm3 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def __call__(self, x, memory, offset=0, cache=None):
        x = x + self.dropout(self.self_attn(self.norm1(x), offset, cache, causal=True))
        x = x + self.dropout(self.cross_attn(self.norm2(x), memory))
        return x + self.dropout(self.mlp(self.norm3(x)))

    def step(self, x, memory, cache):
        """One new position in the absorbed form (inference): x [B, 1, d] -> [B, 1, d]."""
        x = x + self.self_attn.step(self.norm1(x), cache)
        x = x + self.cross_attn(self.norm2(x), memory)
        return x + self.mlp(self.norm3(x))


class EncoderDecoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        self.patch_embed = nn.Linear(cfg.patch * cfg.patch, cfg.d_model)
        self.cls_token = mx.random.normal((1, 1, cfg.d_model)) * 0.02
        self.encoder = [EncoderLayer(cfg) for _ in range(cfg.enc_layers)]
        self.encoder_norm = nn.LayerNorm(cfg.d_model) if cfg.final_norm else None
        self.token_embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.token_embed.weight = mx.random.normal((cfg.vocab, cfg.d_model)) * 0.02  # torch's N(0, 0.02)
        self.decoder = [DecoderLayer(cfg) for _ in range(cfg.dec_layers)]
        self.decoder_norm = nn.LayerNorm(cfg.d_model) if cfg.final_norm else None
        self.head = nn.Linear(cfg.d_model, cfg.vocab)

    def encode(self, images: mx.array) -> mx.array:
        """images [B, H, W] in [0, 1] (or uint8) -> encoder output [B, 1 + N, d] (class token at position 0)."""
        x = normalized(images, self.head.weight.dtype)
        x = self.patch_embed(patchify(x, self.config.patch))
        cls = mx.broadcast_to(self.cls_token, (x.shape[0], 1, x.shape[2])).astype(x.dtype)
        x = mx.concatenate([cls, x], axis=1)
        for layer in self.encoder:
            x = layer(x)
        return self.encoder_norm(x) if self.encoder_norm is not None else x

    @property
    def decode_modes(self) -> tuple[str, ...]:
        """What `generate(mode=...)` can do with this model; the first is the default."""
        absorbed = all(layer.self_attn.absorbed for layer in self.decoder)
        return ("absorbed", "expanded", "uncached") if absorbed else ("expanded", "uncached")

    def memories(self, enc: mx.array, absorbed: bool = False) -> list:
        """Cross-attention memory of every decoder layer, computed once per image."""
        return [layer.cross_attn.memory(enc, absorbed) for layer in self.decoder]

    def decode(self, tokens, memories, cache=None):
        """tokens [B, T] -> logits [B, T, vocab] (expanded form); with a cache, tokens continue the cached prefix."""
        offset = cache.offset if cache is not None else 0
        x = self.embed_tokens(tokens)
        for i, layer in enumerate(self.decoder):
            x = layer(x, memories[i], offset, cache.layers[i] if cache is not None else None)
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        return self.head(x)

    def embed_tokens(self, tokens):
        """token_embed(tokens); while training as a one-hot product (the same values), whose gradient is a
        matmul: a lookup's is a scatter-add, 8 ms of a 78 ms `small` step at batch 1,024 on the CUDA backend."""
        if not self.training:
            return self.token_embed(tokens)
        w = self.token_embed.weight
        return (tokens[..., None] == mx.arange(w.shape[0])).astype(w.dtype) @ w

    def step(self, tokens, cache):
        """tokens [B, 1] continuing the cached prefix -> logits [B, 1, vocab], in the absorbed form; the cache is
        `new_cache(..., absorbed=True)`, with the latent memories (`memories(enc, absorbed=True)`)."""
        x = self.token_embed(tokens)
        for layer, memory, layer_cache in zip(self.decoder, cache.memories, cache.layers):
            x = layer.step(x, memory, layer_cache)
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        return self.head(x)

    def __call__(self, images, tokens):
        return self.decode(tokens, self.memories(self.encode(images)))

    def trace(self, images, tokens) -> dict:
        """The activations at every boundary, teacher-forced on tokens [B, T] (expanded form, as __call__):
        patch_embed (class token + patches), encoder.<i>, encoder_out, decoder.<i>, logits; in boundary order.
        mla_torch's EncoderDecoder.trace is the same code (mla-mnist parity compares the two)."""
        out = {}
        x = normalized(images, self.head.weight.dtype)
        x = self.patch_embed(patchify(x, self.config.patch))
        cls = mx.broadcast_to(self.cls_token, (x.shape[0], 1, x.shape[2])).astype(x.dtype)
        x = out["patch_embed"] = mx.concatenate([cls, x], axis=1)
        for i, layer in enumerate(self.encoder):
            x = out[f"encoder.{i}"] = layer(x)
        enc = out["encoder_out"] = self.encoder_norm(x) if self.encoder_norm is not None else x
        memories = self.memories(enc)
        x = self.token_embed(tokens)
        for i, layer in enumerate(self.decoder):
            x = out[f"decoder.{i}"] = layer(x, memories[i])
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        out["logits"] = self.head(x)
        return out

    def new_cache(self, batch, max_length, memories, absorbed: bool = False, quantized: bool = False):
        """Each decoder layer's self-attention cache for `max_length` positions, with the memories; absorbed=True
        derives the folded projections the absorbed step uses, once, now."""
        layers = [layer.self_attn.new_cache(batch, max_length, absorbed, quantized) for layer in self.decoder]
        return DecoderCache(layers, memories)
