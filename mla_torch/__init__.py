"""PyTorch implementation of the MLA encoder-decoder (mirrored file for file by mla_mlx)."""

from .checkpoint import build, load, save
from .generate import generate
from .model import EncoderDecoder

__all__ = ["EncoderDecoder", "build", "generate", "load", "save"]
