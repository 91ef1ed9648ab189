"""MLX implementation of the MLA encoder-decoder (mirrors mla_torch file for file)."""

import os

# float32 means float32, as in torch: MLX's CUDA backend otherwise runs float32 matmuls and attention as TF32
# (10-bit mantissa, ~1e-4 relative error), which flips near-tie greedy tokens between two orderings of the same
# sum. Read at MLX's first operation; a user who set it keeps their choice; bfloat16 is the fast path.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

from .checkpoint import build, load, save
from .generate import generate
from .model import EncoderDecoder

__all__ = ["EncoderDecoder", "build", "generate", "load", "save"]
