"""Batched autoregressive decoding: greedy or sampled, with the latent cache or the original full re-run."""
from __future__ import annotations

import torch

from mnist_grid.tokens import FINISH, PAD, START


def sample(logits, temperature: float, top_k: int | None, generator):
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, images, max_length: int | None = None, temperature: float = 0.0, top_k: int | None = None,
             seed: int | None = None, cache: bool = True, absorb: bool = True, stop: bool = True,
             return_cache: bool = False, quantize_cache: bool = False):
    """images [B, H, W] -> tokens [B, max_length]: <start> digits <finish> <pad>...

    cache=False is the original algorithm (every step re-runs the whole prefix and re-expands the
    cross-attention K/V). absorb picks the absorbed (latent-space) or expanded form for cached MLA decoding.
    stop=False forces every row to run max_length steps (benchmarks). quantize_cache stores the MLA latent
    as int8 with a per-token scale.
    """
    cfg = model.config
    max_length = cfg.max_tokens if max_length is None else max_length
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    was_training = model.training
    model.eval()
    device = model.head.weight.device
    images = torch.as_tensor(images, device=device)
    b = images.shape[0]
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    absorb = absorb and cfg.attention == "mla"
    enc = model.encode(images)
    tokens = torch.full((b, max_length), PAD, dtype=torch.long, device=device)
    tokens[:, 0] = START
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    dc = model.new_cache(b, max_length, model.memories(enc, absorb), quantize_cache) if cache else None
    for t in range(1, max_length):
        if dc is not None:
            last = tokens[:, t - 1:t]
            logits = (model.step(last, dc) if absorb else model.decode(last, dc.memories, dc))[:, -1]
        else:
            logits = model.decode(tokens[:, :t], model.memories(enc))[:, -1]
        nxt = sample(logits, temperature, top_k, generator)
        nxt = torch.where(finished, torch.full_like(nxt, PAD), nxt)
        tokens[:, t] = nxt
        finished |= nxt == FINISH
        if stop and bool(finished.all()):
            break
    model.train(was_training)
    return (tokens, dc) if return_cache else tokens


@torch.no_grad()
def step_logits(model, images, tokens, cache: bool = True, absorb: bool = True):
    """Teacher-forced per-step logits [B, T, vocab] through the decoding path (for cache tests)."""
    model.eval()
    enc = model.encode(images)
    if not cache:
        return torch.stack([model.decode(tokens[:, : t + 1], model.memories(enc))[:, -1]
                            for t in range(tokens.shape[1])], dim=1)
    absorb = absorb and model.config.attention == "mla"
    dc = model.new_cache(tokens.shape[0], tokens.shape[1], model.memories(enc, absorb))
    steps = (tokens[:, t:t + 1] for t in range(tokens.shape[1]))
    return torch.cat([model.step(s, dc) if absorb else model.decode(s, dc.memories, dc) for s in steps], dim=1)


@torch.no_grad()
def cross_attention_weights(model, images, tokens):
    """Cross-attention softmax weights [B, dec_layers, heads, T, 1 + N], teacher-forced on tokens.

    Query t is the step that predicts token t + 1; key 0 is the class token, then the patches in raster
    order. Fused attention never materialises the weights, so the decoder is re-run layer by layer (eval
    mode, expanded memory) and each layer's softmax is recomputed from its query and memory keys.
    """
    from .attention import split_heads

    model.eval()
    device = model.head.weight.device
    images, tokens = torch.as_tensor(images, device=device), torch.as_tensor(tokens, device=device).long()
    enc = model.encode(images)
    x = model.token_embed(tokens)
    weights = []
    for layer in model.decoder:
        memory = layer.cross_attn.memory(enc)
        x = x + layer.self_attn(layer.norm1(x), 0, None, causal=True)
        h = layer.norm2(x)
        q = split_heads(layer.cross_attn.q_proj(h), layer.cross_attn.heads)
        weights.append(((q @ memory["k"].transpose(-1, -2)) * layer.cross_attn.scale).float().softmax(-1))
        x = x + layer.cross_attn(h, memory)
        x = x + layer.mlp(layer.norm3(x))
    return torch.stack(weights, dim=1)
