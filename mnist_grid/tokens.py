"""Token vocabulary for the decoder: the ten digits plus three control tokens."""

import numpy as np

from convert.config import VOCAB, max_tokens  # noqa: F401  (one source: the model config's)
from convert.errors import UserError

START, FINISH, PAD = 10, 11, 12  # digits are 0-9; VOCAB counts all 13


def encode(digit_lists, length):
    """Rows `<start> d1..dk <finish> <pad>...` of `length` tokens (int64 [B, length])."""
    out = np.full((len(digit_lists), length), PAD, dtype=np.int64)
    for row, digits in enumerate(digit_lists):
        try:
            seq = [int(d) for d in digits]  # accepts "307" as well as [3, 0, 7]
        except (TypeError, ValueError):
            seq = [-1]
        if any(d < 0 or d > 9 for d in seq):
            raise UserError(f"digit sequence {digits!r} has values outside 0-9; pass digits only")
        if len(seq) + 2 > length:
            raise UserError(
                f"{len(seq)} digits need {len(seq) + 2} tokens but the sequence length is {length}; "
                "use fewer digits or a longer sequence length"
            )
        out[row, 0] = START
        out[row, 1 : len(seq) + 1] = seq
        out[row, len(seq) + 1] = FINISH
    return out


def decode(tokens):
    """Digit strings read after an optional <start> up to the first non-digit token."""
    if isinstance(tokens, np.ndarray) and tokens.ndim == 2 and np.issubdtype(tokens.dtype, np.integer):
        return _decode_array(tokens)
    result = []
    for row in tokens:
        row = [int(t) for t in np.asarray(row).reshape(-1)]
        if row and row[0] == START:
            row = row[1:]
        digits = []
        for t in row:
            if not 0 <= t <= 9:
                break
            digits.append(str(t))
        result.append("".join(digits))
    return result


def _decode_array(tokens: np.ndarray) -> list[str]:
    """decode() of a [B, L] integer array without a Python loop over tokens (10,000 grids in milliseconds)."""
    n, length = tokens.shape
    if length == 0:
        return [""] * n
    first = (tokens[:, 0] == START).astype(np.int64)  # where each row's digits begin
    cols = np.arange(length)[None, :]
    digit = (tokens >= 0) & (tokens <= 9) & (cols >= first[:, None])
    stop = ~digit & (cols >= first[:, None])  # the first non-digit after the start ends the read-out
    end = np.where(stop.any(1), stop.argmax(1), length)
    chars = np.where(digit, tokens + ord("0"), ord("0")).astype(np.uint8)
    return [row[a:b].tobytes().decode() for row, a, b in zip(chars, first, end)]
