"""MLX implementation of the MLA encoder-decoder (mirrors mla_torch file for file)."""

from .checkpoint import build, load, save
from .generate import generate
from .model import EncoderDecoder

__all__ = ["EncoderDecoder", "build", "generate", "load", "save"]
