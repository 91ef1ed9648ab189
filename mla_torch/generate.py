"""Batched autoregressive decoding: greedy or sampled, with the latent cache or the original full re-run."""

from __future__ import annotations

import torch

from mnist_grid.tokens import FINISH, PAD, START

from .static_decode import HOWS, static_decoder


def sample(logits, temperature: float, top_k: int | None, generator):
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def decode_mode(model, mode: str | None, quantize_cache: bool = False) -> str:
    """The mode asked for, checked against what the model can do (None: the model's best)."""
    modes = model.decode_modes
    mode = modes[0] if mode is None else mode
    if mode not in modes:
        raise ValueError(
            f"decoding mode {mode!r} is not one of this {model.config.attention} model's: {', '.join(modes)}"
        )
    if quantize_cache and (mode == "uncached" or "absorbed" not in modes):
        raise ValueError("the int8 cache is MLA's latent cache: it needs an MLA model and a cached mode")
    return mode


def _static_blocker(mode: str, temperature: float, quantize_cache: bool, return_cache: bool) -> str | None:
    """Why the static decoder cannot serve this call, or None."""
    if mode != "absorbed":
        return f"mode {mode!r} (it is the absorbed step)"
    if temperature > 0:
        return "temperature > 0 (it is greedy)"
    if quantize_cache:
        return "quantize_cache (its cache is float)"
    if return_cache:
        return "return_cache (it keeps no DecoderCache)"
    return None


def static_how(model, static: str | None, mode: str, temperature: float, quantize_cache: bool, return_cache: bool):
    """How this call decodes: "off" (the loop below) or the StaticDecoder's `how`; None picks "graph" on CUDA
    where it applies, else "off"."""
    if static not in (None, "off", *HOWS):
        raise ValueError(f"static must be None, 'off' or one of {', '.join(HOWS)}, got {static!r}")
    blocker = _static_blocker(mode, temperature, quantize_cache, return_cache)
    if static is None:
        return "graph" if blocker is None and model.head.weight.device.type == "cuda" else "off"
    if static != "off" and blocker is not None:
        raise ValueError(f"static={static!r} does not apply with {blocker}: use static='off'")
    return static


def _next_logits(model, tokens, t, mode, enc, cache):
    """Logits [B, vocab] for position t, given tokens[:, :t]."""
    if mode == "uncached":  # the original algorithm: the whole prefix, cross-attention K/V expanded again
        return model.decode(tokens[:, :t], model.memories(enc))[:, -1]
    last = tokens[:, t - 1 : t]
    return (model.step(last, cache) if mode == "absorbed" else model.decode(last, cache.memories, cache))[:, -1]


@torch.no_grad()
def generate(
    model,
    images=None,
    max_length: int | None = None,
    mode: str | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
    stop: bool = True,
    return_cache: bool = False,
    quantize_cache: bool = False,
    encoded=None,
    static: str | None = None,
):
    """images [B, H, W] -> tokens [B, max_length]: <start> digits <finish> <pad>...

    mode: "absorbed" (the latent cache, attention in latent space: MLA), "expanded" (a cache, K/V expanded from
    it: MLA's expanded form, or MHA/GQA's K/V cache) or "uncached" (the original algorithm: every step re-runs
    the whole prefix); default the first of `model.decode_modes`. stop=False forces every row to run max_length
    steps (benchmarks). quantize_cache stores MLA's latent as int8 with a per-token scale. encoded: the encoder
    output of these images, if already computed (then images may be None). static: greedy absorbed decoding at
    fixed shapes (mla_torch.static_decode): "eager", "graph" (a CUDA graph replayed per token), "compiled"
    (torch.compile, then a CUDA graph on CUDA), "fused" (mla_torch.fused_step: the step's products written for
    torch.compile to fuse, then a CUDA graph) or "off" (this loop); None: "graph" on CUDA where it applies
    (absorbed, greedy, float cache, no return_cache), else "off". The tokens are the same either way.
    """
    mode = decode_mode(model, mode, quantize_cache)
    max_length = model.config.max_tokens if max_length is None else max_length
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    how = static_how(model, static, mode, temperature, quantize_cache, return_cache)
    was_training = model.training
    model.eval()
    device = model.head.weight.device
    enc = model.encode(torch.as_tensor(images, device=device)) if encoded is None else encoded
    b = enc.shape[0]
    if how != "off":
        tokens = static_decoder(model, b, max_length, how).run(enc, stop=stop)
        model.train(was_training)
        return tokens
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    tokens = torch.full((b, max_length), PAD, dtype=torch.long, device=device)
    tokens[:, 0] = START
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    cache = None
    if mode != "uncached":
        absorbed = mode == "absorbed"
        cache = model.new_cache(b, max_length, model.memories(enc, absorbed), absorbed, quantize_cache)
    for t in range(1, max_length):
        nxt = sample(_next_logits(model, tokens, t, mode, enc, cache), temperature, top_k, generator)
        nxt = torch.where(finished, torch.full_like(nxt, PAD), nxt)
        tokens[:, t] = nxt
        finished |= nxt == FINISH
        if stop and bool(finished.all()):
            break
    model.train(was_training)
    return (tokens, cache) if return_cache else tokens


@torch.no_grad()
def step_logits(model, images, tokens, mode: str | None = None):
    """Teacher-forced per-step logits [B, T, vocab] through the decoding path of `mode` (for cache tests)."""
    mode = decode_mode(model, mode)
    model.eval()
    enc = model.encode(images)
    cache = None
    if mode != "uncached":
        absorbed = mode == "absorbed"
        cache = model.new_cache(tokens.shape[0], tokens.shape[1], model.memories(enc, absorbed), absorbed)
    padded = torch.cat([tokens, tokens[:, -1:]], dim=1)  # position t reads tokens[:, :t + 1]
    return torch.stack([_next_logits(model, padded, t + 1, mode, enc, cache) for t in range(tokens.shape[1])], dim=1)


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
        attn = layer.cross_attn
        q = split_heads(attn.q_proj(h), attn.heads)
        k = memory.k.repeat_interleave(attn.heads // memory.k.shape[1], dim=1)  # GQA: each group's shared keys
        weights.append(((q @ k.transpose(-1, -2)) * attn.scale).float().softmax(-1))
        x = x + attn(h, memory)
        x = x + layer.mlp(layer.norm3(x))
    return torch.stack(weights, dim=1)
