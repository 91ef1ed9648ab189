"""A numpy reader/writer for the safetensors format, bfloat16 included (numpy has no bf16 dtype).

Written here rather than taken from the `safetensors` package so that bf16 works without a framework and
every way a file can be broken turns into one clear UserError.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from .errors import UserError

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "U32": np.uint32, "BOOL": np.bool_}
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


def read(path: Path, upcast_bf16: bool = True) -> tuple[dict[str, np.ndarray], dict[str, str], dict]:
    """Returns (tensors, dtype name per tensor, metadata). bf16 tensors come back as exact float32."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path} does not exist: give the path of a model.safetensors file or checkpoint") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None

    def corrupt(why):
        return UserError(f"{path} is not a valid safetensors file ({why}): the file is truncated or corrupt, "
                         "re-export or re-download it")

    if len(raw) < 8:
        raise corrupt("shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise corrupt("header runs past the end of the file")
    try:
        header = json.loads(raw[8:8 + n])
        assert isinstance(header, dict)
    except Exception:
        raise corrupt("header is not JSON") from None
    meta = header.pop("__metadata__", {}) or {}
    body = memoryview(raw)[8 + n:]
    out, dtypes = {}, {}
    for name, spec in header.items():
        try:
            code, shape, (a, b) = spec["dtype"], tuple(int(s) for s in spec["shape"]), spec["data_offsets"]
        except Exception:
            raise corrupt(f"bad entry for {name}") from None
        np_dtype = np.uint16 if code == "BF16" else _DTYPES.get(code)
        if np_dtype is None:
            raise corrupt(f"unknown dtype {code} for {name}")
        count = int(np.prod(shape, dtype=np.int64))
        if not (0 <= a <= b <= len(body)) or b - a != count * np.dtype(np_dtype).itemsize:
            raise corrupt(f"data of {name} is out of range")
        arr = np.frombuffer(body[a:b], dtype=np.dtype(np_dtype).newbyteorder("<")).reshape(shape)
        if code == "BF16":
            arr = bf16_to_f32(arr) if upcast_bf16 else arr
        out[name] = arr.astype(arr.dtype.newbyteorder("="), copy=True)
        dtypes[name] = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(code, str(np.dtype(np_dtype)))
    return out, dtypes, meta
