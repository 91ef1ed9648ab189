"""ModelConfig: the single source of truth for every hyper-parameter, shared by both frameworks."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields

from .errors import UserError
from .presets import PRESETS

CELL = 28  # MNIST digits are 28x28; a grid image is grid*CELL pixels square
VOCAB = 13  # digits 0-9, start=10, finish=11, pad=12


def max_tokens(grid: int) -> int:
    """Longest target for a grid: <start>, every cell filled, <finish>."""
    return grid * grid + 2


@dataclass
class ModelConfig:
    grid: int = 4
    patch: int = 14
    d_model: int = 128
    enc_layers: int = 4
    dec_layers: int = 4
    heads: int = 16
    mlp_ratio: int = 4
    dropout: float = 0.1
    final_norm: bool = True
    attention: str = "mla"  # a name of convert.schema.ATTENTION: "mla", "mha" (baseline), "gqa" (grouped-query)
    kv_heads: int | None = None  # gqa only: K/V heads shared by groups of query heads (default heads // 4)
    rope_base: float = 10000.0
    # Derived from d_model / heads when left as None (the original design's rules).
    head_dim: int | None = None
    rope_dim: int | None = None
    enc_kv_rank: int | None = None
    enc_q_rank: int | None = None
    dec_kv_rank: int | None = None
    dec_q_rank: int | None = None
    cross_kv_rank: int | None = None
    # Set only on quantized checkpoints: {"bits": 4|8, "group_size": 32|64}.
    quantization: dict | None = None
    vocab: int = field(default=VOCAB, init=True)

    def __post_init__(self):
        d = self.d_model
        if self.head_dim is None and self.heads > 0:
            self.head_dim = d // self.heads
        if self.rope_dim is None and self.head_dim:
            self.rope_dim = min(32, self.head_dim // 2)
        if self.enc_kv_rank is None:
            self.enc_kv_rank = max(d // 2, 64)
        if self.enc_q_rank is None:
            self.enc_q_rank = max(2 * d // 3, 96)
        if self.dec_kv_rank is None:
            self.dec_kv_rank = max(d // 3, 42)
        if self.dec_q_rank is None:
            self.dec_q_rank = max(d // 2, 64)
        if self.cross_kv_rank is None:
            self.cross_kv_rank = max(d // 4, 32)
        if self.kv_heads is None and self.attention == "gqa" and isinstance(self.heads, int) and self.heads > 0:
            self.kv_heads = max(1, self.heads // 4)
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.grid * CELL

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def enc_tokens(self) -> int:
        return self.num_patches + 1  # class token first

    @property
    def max_tokens(self) -> int:
        return max_tokens(self.grid)

    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.rope_dim

    def validate(self):
        def bad(msg):
            raise UserError(f"invalid model config: {msg}")

        for name in ("grid", "patch", "d_model", "enc_layers", "dec_layers", "heads", "mlp_ratio"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(f"{name} must be a positive integer, got {v!r}")
        from .schema import ATTENTION  # the variants declare themselves there

        if self.attention not in ATTENTION:
            bad(f"attention must be one of {', '.join(map(repr, ATTENTION))}, got {self.attention!r}")
        if self.attention == "gqa":
            if not isinstance(self.kv_heads, int) or isinstance(self.kv_heads, bool) or self.kv_heads <= 0 \
                    or self.heads % self.kv_heads:
                bad(f"kv_heads must be a positive integer dividing heads ({self.heads}), got {self.kv_heads!r}")
        elif self.kv_heads is not None:
            bad(f"kv_heads is a gqa setting; attention {self.attention!r} takes none, got {self.kv_heads!r}")
        if self.image_size % self.patch:
            bad(f"patch {self.patch} does not divide the image size {self.image_size} (grid {self.grid} x 28)")
        if not 0.0 <= float(self.dropout) < 1.0:
            bad(f"dropout must be in [0, 1), got {self.dropout}")
        if self.head_dim * self.heads != self.d_model:
            bad(f"heads ({self.heads}) x head_dim ({self.head_dim}) must equal d_model ({self.d_model})")
        if self.rope_dim % 2 or not 0 < self.rope_dim < self.head_dim:
            bad(f"rope_dim must be even and in (0, head_dim={self.head_dim}), got {self.rope_dim}")
        for name in ("enc_kv_rank", "enc_q_rank", "dec_kv_rank", "dec_q_rank", "cross_kv_rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                bad(f"{name} must be a positive integer, got {v!r}")
        if self.vocab != VOCAB:
            bad(f"vocab must be {VOCAB}, got {self.vocab}")
        q = self.quantization
        from .quantize import BITS, GROUP_SIZES

        if q is not None and (not isinstance(q, dict) or q.get("bits") not in BITS
                              or q.get("group_size") not in GROUP_SIZES):
            bad(f"quantization must have bits {'|'.join(map(str, BITS))} and group_size "
                f"{'|'.join(map(str, GROUP_SIZES))}, got {q}")

    # ---- presets and JSON ----------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise UserError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name].model, **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise UserError(f"model config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown config field(s) {', '.join(unknown)}: valid fields are {', '.join(sorted(known))}")
        try:
            return cls(**d)
        except TypeError as e:
            raise UserError(f"invalid model config: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"config is not valid JSON ({e})") from None
        return cls.from_dict(d)

    def replace(self, **changes) -> "ModelConfig":
        return self.from_dict({**self.to_dict(), **changes})


# The model normalises its own input so a checkpoint is self-contained.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
