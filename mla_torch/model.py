"""The encoder-decoder: patch embedding + class token -> MLA encoder -> MLA decoder with cross-attention."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from convert.config import MNIST_MEAN, MNIST_STD, ModelConfig

from .attention import cross_attention, layer_norm, self_attention
from .cache import DecoderCache


def normalized(images: torch.Tensor, dtype) -> torch.Tensor:
    """Pixels in [0, 1] (or uint8 0-255: a quarter of the bytes to move to a GPU, scaled here) -> the model's input."""
    if images.dtype == torch.uint8:
        images = images.float() / 255
    return (images.to(dtype) - MNIST_MEAN) / MNIST_STD


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """[B, H, W] -> [B, N, p*p]: non-overlapping patches in raster order, each flattened row-major."""
    b, h, w = images.shape
    x = images.reshape(b, h // p, p, w // p, p).permute(0, 1, 3, 2, 4)
    return x.reshape(b, (h // p) * (w // p), p * p)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_model * cfg.mlp_ratio)
        self.fc2 = nn.Linear(cfg.d_model * cfg.mlp_ratio, cfg.d_model)

    def forward(self, x):
        # Functional, so the decoding step can call forward() without the module-call overhead and share the math.
        return F.linear(F.gelu(F.linear(x, self.fc1.weight, self.fc1.bias)), self.fc2.weight, self.fc2.bias)


class EncoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = self_attention(cfg, cfg.enc_q_rank, cfg.enc_kv_rank)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
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

    def forward(self, x, memory, offset=0, cache=None):
        x = x + self.dropout(self.self_attn(self.norm1(x), offset, cache, causal=True))
        x = x + self.dropout(self.cross_attn(self.norm2(x), memory))
        return x + self.dropout(self.mlp(self.norm3(x)))

    def step(self, x, memory, cache):
        """One new position in the absorbed form (inference): x [B, 1, d] -> [B, 1, d]. Norms, cross-attention
        and the MLP skip the module call (forward() directly): this runs once per layer per generated token."""
        x = x + self.self_attn.step(layer_norm(self.norm1, x), cache)
        x = x + self.cross_attn.forward(layer_norm(self.norm2, x), memory)
        return x + self.mlp.forward(layer_norm(self.norm3, x))


class EncoderDecoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        self.patch_embed = nn.Linear(cfg.patch * cfg.patch, cfg.d_model)
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.d_model) * 0.02)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        self.encoder_norm = nn.LayerNorm(cfg.d_model) if cfg.final_norm else None
        self.token_embed = nn.Embedding(cfg.vocab, cfg.d_model)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        self.decoder_norm = nn.LayerNorm(cfg.d_model) if cfg.final_norm else None
        self.head = nn.Linear(cfg.d_model, cfg.vocab)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, H, W] in [0, 1] (or uint8) -> encoder output [B, 1 + N, d] (class token at position 0)."""
        x = normalized(images, self.head.weight.dtype)
        x = self.patch_embed(patchify(x, self.config.patch))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        for layer in self.encoder:
            x = layer(x)
        return self.encoder_norm(x) if self.encoder_norm is not None else x

    @property
    def decode_modes(self) -> tuple[str, ...]:
        """What `generate(mode=...)` can do with this model; the first is the default."""
        absorbed = all(layer.self_attn.absorbed for layer in self.decoder)
        return ("absorbed", "expanded", "uncached") if absorbed else ("expanded", "uncached")

    def memories(self, enc: torch.Tensor, absorbed: bool = False) -> list:
        """Cross-attention memory of every decoder layer, computed once per image."""
        return [layer.cross_attn.memory(enc, absorbed) for layer in self.decoder]

    def decode(self, tokens, memories, cache=None):
        """tokens [B, T] -> logits [B, T, vocab] (expanded form); with a cache, tokens continue the cached prefix."""
        offset = cache.offset if cache is not None else 0
        x = self.token_embed(tokens)
        for i, layer in enumerate(self.decoder):
            x = layer(x, memories[i], offset, cache.layers[i] if cache is not None else None)
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        return self.head(x)

    def step(self, tokens, cache):
        """tokens [B, 1] continuing the cached prefix -> logits [B, 1, vocab], in the absorbed form; the cache is
        `new_cache(..., absorbed=True)`, with the latent memories (`memories(enc, absorbed=True)`)."""
        x = F.embedding(tokens, self.token_embed.weight)
        for layer, memory, layer_cache in zip(self.decoder, cache.memories, cache.layers):
            x = layer.step(x, memory, layer_cache)
        if self.decoder_norm is not None:
            x = layer_norm(self.decoder_norm, x)
        return F.linear(x, self.head.weight, self.head.bias)

    def forward(self, images, tokens):
        return self.decode(tokens, self.memories(self.encode(images)))

    def trace(self, images, tokens) -> dict:
        """The activations at every boundary, teacher-forced on tokens [B, T] (expanded form, as forward()):
        patch_embed (class token + patches), encoder.<i>, encoder_out, decoder.<i>, logits; in boundary order.
        mla_mlx's EncoderDecoder.trace is the same code (mla-mnist parity compares the two)."""
        out = {}
        x = normalized(images, self.head.weight.dtype)
        x = self.patch_embed(patchify(x, self.config.patch))
        x = out["patch_embed"] = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
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
