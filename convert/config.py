"""ModelConfig: the single source of truth for every hyper-parameter, shared by both frameworks."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields

from .errors import UserError
from .presets import PRESETS
from .quantize import BITS, GROUP_SIZES

CELL = 28  # MNIST digits are 28x28; a grid image is grid*CELL pixels square
VOCAB = 13  # digits 0-9, start=10, finish=11, pad=12
# Upper bounds on what a config may ask for: past these a model does not fit any one machine, and a hostile
# config.json must fail with a message before anything is allocated.
MAX_GRID = 64
MAX_WIDTH = 65536  # d_model, ranks, head and rope dims
MAX_LAYERS = 1024
MAX_HEADS = 4096
MAX_MLP_RATIO = 64
MAX_PARAMETERS = 2_000_000_000
_INTS = ("grid", "patch", "d_model", "enc_layers", "dec_layers", "heads", "mlp_ratio")
_RANKS = ("enc_kv_rank", "enc_q_rank", "dec_kv_rank", "dec_q_rank", "cross_kv_rank")
_LIMITS = {
    "grid": MAX_GRID,
    "patch": MAX_GRID * CELL,
    "d_model": MAX_WIDTH,
    "enc_layers": MAX_LAYERS,
    "dec_layers": MAX_LAYERS,
    "heads": MAX_HEADS,
    "mlp_ratio": MAX_MLP_RATIO,
    **{name: MAX_WIDTH for name in ("head_dim", "rope_dim", *_RANKS)},
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


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
        self._check_types()  # before the derived sizes below compute with them
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

    def _check_types(self):
        def bad(msg):
            raise UserError(f"invalid model config: {msg}")

        for name in _INTS:
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                bad(f"{name} must be a positive integer, got {v!r}")
        for name in ("head_dim", "rope_dim", *_RANKS):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v <= 0):
                bad(f"{name} must be a positive integer, got {v!r}")
        for name, limit in _LIMITS.items():
            v = getattr(self, name)
            if v is not None and v > limit:
                bad(f"{name} {v} is over the limit of {limit}: no machine holds such a model")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            bad(f"dropout must be in [0, 1) as a number, got {self.dropout!r}")
        if not _is_number(self.rope_base) or not math.isfinite(self.rope_base) or not 1.0 < self.rope_base <= 1e12:
            bad(f"rope_base must be a finite number in (1, 1e12], got {self.rope_base!r}")
        if not isinstance(self.final_norm, bool):
            bad(f"final_norm must be true or false, got {self.final_norm!r}")
        if not isinstance(self.attention, str):
            bad(f"attention must be a name, got {self.attention!r}")
        if not _is_int(self.vocab) or self.vocab != VOCAB:
            bad(f"vocab must be {VOCAB}, got {self.vocab!r}")
        q = self.quantization
        if q is not None and not (
            isinstance(q, dict)
            and set(q) == {"bits", "group_size"}
            and _is_int(q["bits"])
            and q["bits"] in BITS
            and _is_int(q["group_size"])
            and q["group_size"] in GROUP_SIZES
        ):
            bad(
                f'quantization must be {{"bits": {"|".join(map(str, BITS))}, "group_size": '
                f"{'|'.join(map(str, GROUP_SIZES))}}}, got {q!r}"
            )

    def validate(self):
        def bad(msg):
            raise UserError(f"invalid model config: {msg}")

        self._check_types()
        from .schema import ATTENTION  # the variants declare themselves there

        if self.attention not in ATTENTION:
            bad(f"attention must be one of {', '.join(map(repr, ATTENTION))}, got {self.attention!r}")
        if self.attention == "gqa":
            if not _is_int(self.kv_heads) or self.kv_heads <= 0 or self.heads % self.kv_heads:
                bad(f"kv_heads must be a positive integer dividing heads ({self.heads}), got {self.kv_heads!r}")
        elif self.kv_heads is not None:
            bad(f"kv_heads is a gqa setting; attention {self.attention!r} takes none, got {self.kv_heads!r}")
        if self.image_size % self.patch:
            bad(f"patch {self.patch} does not divide the image size {self.image_size} (grid {self.grid} x 28)")
        if self.head_dim is None or self.head_dim * self.heads != self.d_model:
            bad(f"heads ({self.heads}) x head_dim ({self.head_dim}) must equal d_model ({self.d_model})")
        if self.rope_dim is None or self.rope_dim % 2 or not 0 < self.rope_dim < self.head_dim:
            bad(f"rope_dim must be even and in (0, head_dim={self.head_dim}), got {self.rope_dim}")
        from .schema import parameter_count  # Python ints: no overflow, and checked before any allocation

        n = parameter_count(self)
        if n > MAX_PARAMETERS:
            bad(f"{n:,} parameters is over the limit of {MAX_PARAMETERS:,}: lower d_model, layers or ranks")

    # ---- presets and JSON ----------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise UserError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name].model, **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        if not isinstance(d, dict):
            raise UserError(f"model config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(
                f"unknown config field(s) {', '.join(unknown)}: valid fields are {', '.join(sorted(known))}"
            )
        try:
            return cls(**d)
        except (TypeError, ValueError, OverflowError, ZeroDivisionError) as e:
            raise UserError(f"invalid model config: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"config is not valid JSON ({e})") from None
        except RecursionError:
            raise UserError("config JSON is nested too deeply to be a model config") from None
        return cls.from_dict(d)

    def replace(self, **changes) -> ModelConfig:
        return self.from_dict({**self.to_dict(), **changes})


# The model normalises its own input so a checkpoint is self-contained.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
