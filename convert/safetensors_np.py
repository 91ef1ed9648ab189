"""A numpy reader/writer for the safetensors format, bfloat16 included (numpy has no bf16 dtype).

The project keeps its own reader and does not depend on the `safetensors` package, for three reasons:
- a numpy-only ground floor: convert/ and every checkpoint read work with numpy alone, no framework;
- bfloat16 without ml_dtypes: bf16 tensors come back as exact float32, no extra dtype package;
- our own size and type limits with one-line errors: the header is capped (HEADER_LIMIT, as safetensors
  itself), every header field is type-checked, shapes are multiplied as Python ints (no int64 wrap-around)
  and checked against the bytes present before anything is allocated, and each way a file can be broken is
  one UserError naming the file.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from .errors import UserError, quote

HEADER_LIMIT = 100_000_000  # bytes of JSON header, the limit safetensors itself enforces

_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "U16": np.uint16,
    "U32": np.uint32,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even, NaN kept NaN."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def write(path: Path, tensors: dict[str, np.ndarray], dtype: str | None = None, metadata: dict | None = None):
    """Write tensors; floating arrays are cast to `dtype` ('float32' | 'float16' | 'bfloat16') when given."""
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        if dtype and arr.dtype.kind == "f":
            if dtype == "bfloat16":
                code, arr = "BF16", bf16_bits(arr)
            else:
                code, arr = DTYPE_NAMES[dtype], arr.astype(dtype)
        else:
            code = _NAMES.get(arr.dtype)
            if code is None:
                raise UserError(f"cannot store {name} of dtype {arr.dtype} in safetensors")
        data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read(path: Path, upcast_bf16: bool = True) -> tuple[dict[str, np.ndarray], dict[str, str], dict]:
    """Returns (tensors, dtype name per tensor, metadata). bf16 tensors come back as exact float32."""
    path = Path(path)
    name_q = quote(path)

    def corrupt(why):
        return UserError(
            f"{name_q} is not a valid safetensors file ({why}): the file is truncated or corrupt, "
            "re-export or re-download it"
        )

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            first = f.read(8)
            if len(first) < 8:
                raise corrupt("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", first)
            if n > HEADER_LIMIT:
                raise corrupt(f"header of {n:,} bytes is over the {HEADER_LIMIT:,}-byte limit")
            if n > size - 8:
                raise corrupt("header runs past the end of the file")
            head = f.read(n)
            header = _parse_header(head, corrupt)
            entries = _check_entries(header, size - 8 - n, corrupt)
            body = f.read()
    except FileNotFoundError:
        raise UserError(f"{name_q} does not exist: give the path of a model.safetensors file or checkpoint") from None
    except IsADirectoryError:
        raise UserError(f"{name_q} is a directory, not a safetensors file") from None
    except OSError as e:
        raise UserError(f"cannot read {name_q}: {e.strerror or e}") from None
    if len(body) != size - 8 - n:
        raise corrupt("the file changed while it was read")
    meta = header.get("__metadata__") or {}
    out, dtypes = {}, {}
    view = memoryview(body)
    for name, code, shape, a, b in entries:
        np_dtype = np.dtype(np.uint16 if code == "BF16" else _DTYPES[code])
        arr = np.frombuffer(view[a:b], dtype=np_dtype.newbyteorder("<")).reshape(shape)
        if code == "BF16":
            arr = bf16_to_f32(arr) if upcast_bf16 else arr
        out[name] = arr.astype(arr.dtype.newbyteorder("="), copy=True)
        dtypes[name] = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(code, str(np_dtype))
    return out, dtypes, meta


def _parse_header(head: bytes, corrupt) -> dict:
    try:
        header = json.loads(head)
    except RecursionError:
        raise corrupt("header JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise corrupt("header is not JSON") from None
    if not isinstance(header, dict):
        raise corrupt(f"header is a JSON {type(header).__name__}, not an object")
    meta = header.get("__metadata__")
    if meta is not None and (not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())):
        raise corrupt("__metadata__ is not an object of strings")
    return header


def _check_entries(header: dict, body_size: int, corrupt) -> list:
    """(name, dtype code, shape, start, end) of every tensor, every field type- and range-checked."""
    entries = []
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        label = quote(name)[:80]
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise corrupt(f"bad entry for {label}: expected an object with dtype, shape and data_offsets")
        code, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
        if not isinstance(code, str) or not (code == "BF16" or code in _DTYPES):
            raise corrupt(
                f"unknown dtype {quote(code)[:40] if isinstance(code, str) else type(code).__name__} for {label}"
            )
        if not isinstance(shape, list) or len(shape) > 16 or not all(_is_int(s) and s >= 0 for s in shape):
            raise corrupt(f"shape of {label} is not a list of at most 16 non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise corrupt(f"data_offsets of {label} are not two integers")
        a, b = offsets
        count = 1
        for s in shape:  # Python ints: a product that would wrap in int64 stays huge and fails the check below
            count *= s
        itemsize = 2 if code == "BF16" else np.dtype(_DTYPES[code]).itemsize
        if not (0 <= a <= b <= body_size) or b - a != count * itemsize:
            raise corrupt(f"data of {label} is out of range")
        entries.append((name, code, tuple(shape), a, b))
    return entries
