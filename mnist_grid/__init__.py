"""Framework-neutral data for mla-mnist: MNIST loading, grid composition, tokens, metrics, images."""

from .grid import Draw, GridStream, compose, draw, render
from .images import load_image, read_grid_image, readout_warnings, save_image
from .metrics import edit_distance, evaluate, format_table
from .mnist import digits, load_split, resolve_data_dir
from .tokens import FINISH, PAD, START, VOCAB, decode, encode, max_tokens

__all__ = [
    "START",
    "FINISH",
    "PAD",
    "VOCAB",
    "encode",
    "decode",
    "max_tokens",
    "load_split",
    "digits",
    "resolve_data_dir",
    "Draw",
    "compose",
    "draw",
    "render",
    "GridStream",
    "evaluate",
    "edit_distance",
    "format_table",
    "load_image",
    "read_grid_image",
    "readout_warnings",
    "save_image",
]
