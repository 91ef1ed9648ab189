"""Parameter names and shapes derived from a ModelConfig: the contract both frameworks' modules obey.

The same names appear in torch `state_dict()`, MLX `tree_flatten(model.parameters())` and model.safetensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .config import ModelConfig
from .errors import UserError


def _linear(prefix, n_in, n_out, bias=False):
    out = {f"{prefix}.weight": (n_out, n_in)}
    if bias:
        out[f"{prefix}.bias"] = (n_out,)
    return out


def _norm(prefix, n):
    return {f"{prefix}.weight": (n,), f"{prefix}.bias": (n,)}


def _mla_self(prefix: str, cfg: ModelConfig, q_rank: int, kv_rank: int) -> dict:
    d, h, hd, r = cfg.d_model, cfg.heads, cfg.head_dim, cfg.rope_dim
    return {
        **_linear(f"{prefix}.q_a_proj", d, q_rank),
        **_norm(f"{prefix}.q_a_norm", q_rank),
        **_linear(f"{prefix}.q_b_proj", q_rank, h * hd),
        **_linear(f"{prefix}.kv_a_proj", d, kv_rank + r),  # [latent | shared k_pe]
        **_norm(f"{prefix}.kv_a_norm", kv_rank),
        **_linear(f"{prefix}.kv_b_proj", kv_rank, h * (hd - r + hd)),  # per head [k_nope | v]
        **_linear(f"{prefix}.o_proj", h * hd, d),
    }


def _mla_cross(prefix: str, cfg: ModelConfig) -> dict:
    d, h, hd, r = cfg.d_model, cfg.heads, cfg.head_dim, cfg.cross_kv_rank
    return {
        **_linear(f"{prefix}.q_proj", d, h * hd),
        **_linear(f"{prefix}.kv_a_proj", d, r),
        **_norm(f"{prefix}.kv_a_norm", r),
        **_linear(f"{prefix}.kv_b_proj", r, h * 2 * hd),  # per head [k | v]
        **_linear(f"{prefix}.o_proj", h * hd, d),
    }


def _grouped(prefix: str, cfg: ModelConfig, kv_heads: int) -> dict:
    """Full-rank Q/O and K/V for `kv_heads` heads: MHA when kv_heads == heads, GQA when fewer."""
    d, kv = cfg.d_model, kv_heads * cfg.head_dim
    return {
        **_linear(f"{prefix}.q_proj", d, d),
        **_linear(f"{prefix}.k_proj", d, kv),
        **_linear(f"{prefix}.v_proj", d, kv),
        **_linear(f"{prefix}.o_proj", d, d),
    }


@dataclass(frozen=True)
class Attention:
    """An attention variant's parameters: its self-attention (prefix, cfg, q_rank, kv_rank) and cross-attention
    (prefix, cfg) schemas. Each framework's attention.py maps the same names to its modules."""

    self_attention: Callable[..., dict]
    cross_attention: Callable[..., dict]


ATTENTION: dict[str, Attention] = {
    "mla": Attention(_mla_self, _mla_cross),
    "mha": Attention(
        lambda prefix, cfg, q_rank, kv_rank: _grouped(prefix, cfg, cfg.heads),
        lambda prefix, cfg: _grouped(prefix, cfg, cfg.heads),
    ),
    "gqa": Attention(
        lambda prefix, cfg, q_rank, kv_rank: _grouped(prefix, cfg, cfg.kv_heads),
        lambda prefix, cfg: _grouped(prefix, cfg, cfg.kv_heads),
    ),
}


def self_attention_schema(prefix: str, cfg: ModelConfig, q_rank: int, kv_rank: int) -> dict:
    return ATTENTION[cfg.attention].self_attention(prefix, cfg, q_rank, kv_rank)


def cross_attention_schema(prefix: str, cfg: ModelConfig) -> dict:
    return ATTENTION[cfg.attention].cross_attention(prefix, cfg)


def _mlp(prefix, cfg):
    d, hidden = cfg.d_model, cfg.d_model * cfg.mlp_ratio
    return {**_linear(f"{prefix}.fc1", d, hidden, bias=True), **_linear(f"{prefix}.fc2", hidden, d, bias=True)}


def schema(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter name of the model, mapped to its shape, in module order."""
    s = _float_schema(cfg)
    if cfg.quantization:
        from .quantize import quantized_shapes

        s = quantized_shapes(s, cfg.quantization["bits"], cfg.quantization["group_size"])
    return s


def _float_schema(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d = cfg.d_model
    s = {**_linear("patch_embed", cfg.patch * cfg.patch, d, bias=True), "cls_token": (1, 1, d)}
    for i in range(cfg.enc_layers):
        p = f"encoder.{i}"
        s.update(_norm(f"{p}.norm1", d))
        s.update(self_attention_schema(f"{p}.attn", cfg, cfg.enc_q_rank, cfg.enc_kv_rank))
        s.update(_norm(f"{p}.norm2", d))
        s.update(_mlp(f"{p}.mlp", cfg))
    if cfg.final_norm:
        s.update(_norm("encoder_norm", d))
    s["token_embed.weight"] = (cfg.vocab, d)
    for i in range(cfg.dec_layers):
        p = f"decoder.{i}"
        s.update(_norm(f"{p}.norm1", d))
        s.update(self_attention_schema(f"{p}.self_attn", cfg, cfg.dec_q_rank, cfg.dec_kv_rank))
        s.update(_norm(f"{p}.norm2", d))
        s.update(cross_attention_schema(f"{p}.cross_attn", cfg))
        s.update(_norm(f"{p}.norm3", d))
        s.update(_mlp(f"{p}.mlp", cfg))
    if cfg.final_norm:
        s.update(_norm("decoder_norm", d))
    s.update(_linear("head", d, cfg.vocab, bias=True))
    return s


def numel(shape) -> int:
    """Elements of a shape, in Python integers (no int64 wrap-around)."""
    n = 1
    for x in shape:
        n *= int(x)
    return n


def parameter_count(cfg: ModelConfig) -> int:
    return sum(numel(shape) for shape in _float_schema(cfg).values())  # Python ints: exact however large


def check(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], what: str = "weights") -> None:
    """Raise one UserError listing every missing, extra and wrongly shaped tensor at once."""
    want = schema(cfg)
    problems = []
    missing = [k for k in want if k not in shapes]
    extra = [k for k in shapes if k not in want]
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    if extra:
        problems.append(f"unexpected {len(extra)}: {', '.join(extra[:6])}{' ...' if len(extra) > 6 else ''}")
    wrong = [f"{k} {tuple(shapes[k])} != {want[k]}" for k in want if k in shapes and tuple(shapes[k]) != want[k]]
    if wrong:
        problems.append(f"wrong shape {len(wrong)}: {'; '.join(wrong[:6])}{' ...' if len(wrong) > 6 else ''}")
    if problems:
        raise UserError(
            f"{what} do not match the config ({cfg.attention}, d_model={cfg.d_model}): "
            + " | ".join(problems)
            + " -- check --preset/--config or the checkpoint's config.json"
        )
