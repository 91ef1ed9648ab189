"""`mla-mnist convert`: read weights in any supported format, check them against the schema, write another.

Numpy only: torch is imported just to read or write a .pt file, MLX just to quantize. Sources: a checkpoint
directory, a torch .pt/.pth state_dict (ours or the original implementation's), an MLX .npz/.safetensors weights
file. Destinations: a checkpoint directory, or a bare weights file (.pt/.pth, .npz, .safetensors), written
atomically. --quantize writes a checkpoint directory in MLX's affine group format (see convert.quantize).
"""

from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import checkpoint, original, safetensors_np
from .checkpoint import FLOAT_DTYPES
from .config import ModelConfig
from .errors import UserError, quote
from .files import atomic_write
from .quantize import GROUP_SIZES, quantizable
from .schema import parameter_count

FILE_KINDS = {".pt": "torch", ".pth": "torch", ".npz": "npz", ".safetensors": "safetensors"}
ACCEPTED = "a checkpoint directory, a torch .pt/.pth state_dict, or an MLX .npz/.safetensors weights file"
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")  # wrappers training scripts save around it
# torch dtypes numpy can hold (bfloat16 goes through float32); float8, complex and quantized ones are refused.
TORCH_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
# An .npz may inflate to at most this many times its size on disk plus a margin: weights hardly compress, so
# more is a zip bomb, refused from the zip directory before anything is inflated.
NPZ_INFLATION = 50
NPZ_MARGIN = 64 * 2**20
NPZ_DTYPE_KINDS = "fiub"


@dataclass
class Source:
    config: ModelConfig
    weights: dict[str, np.ndarray]
    what: str
    dtype: str | None = None  # the one float dtype of every tensor, if there is one
    preset: str | None = None
    notes: list[str] = field(default_factory=list)


def _torch(action: str):
    try:
        import torch
    except ImportError:
        raise UserError(f"{action} .pt needs torch: pip install 'mla-mnist[torch]'") from None
    return torch


def _uniform(dtypes) -> str | None:
    kinds = set(dtypes)
    return kinds.pop() if len(kinds) == 1 and kinds <= set(FLOAT_DTYPES) else None


def _floats(arr: np.ndarray) -> np.ndarray:
    return arr.astype(np.float32) if arr.dtype == np.float64 else arr


# ---- reading -----------------------------------------------------------------------------------------------
def _read_torch(path: Path) -> tuple[dict, dict]:
    torch = _torch("reading")
    try:
        with warnings.catch_warnings():  # torch warns about pickles on stderr: the error line must be alone
            warnings.simplefilter("ignore")
            obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # UnpicklingError for code-running pickles; others for truncated or foreign files
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        detail = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0])[:200]
        raise UserError(
            f"refused to load {quote(path)}: it is not a plain tensor state_dict ({detail}); loading it "
            "could run code or it is corrupt -- re-export it with torch.save(model.state_dict(), path)"
        ) from None
    state = obj
    if isinstance(obj, dict):
        state = next((obj[k] for k in STATE_DICT_KEYS if isinstance(obj.get(k), dict)), obj)
    if not isinstance(state, dict) or not state:
        raise UserError(
            f"{quote(path)} holds a {type(state).__name__}, not a state_dict of tensors: "
            "save model.state_dict() with torch.save"
        )
    not_names = [quote(repr(k))[:40] for k in state if not isinstance(k, str)]
    if not_names:
        raise UserError(
            f"{quote(path)}: keys {', '.join(not_names[:4])} are not strings: a state_dict maps "
            "parameter names to tensors; save model.state_dict()"
        )
    not_tensors = [quote(k)[:80] for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UserError(f"{quote(path)}: entries {', '.join(not_tensors[:4])} are not tensors: save model.state_dict()")
    odd = []
    for name, t in state.items():
        kind = str(t.dtype).removeprefix("torch.")
        if t.layout != torch.strided:
            odd.append(f"{quote(name)[:80]} ({str(t.layout).removeprefix('torch.')})")
        elif t.is_quantized or kind not in TORCH_DTYPES:
            odd.append(f"{quote(name)[:80]} ({kind})")
        elif t.is_meta:
            odd.append(f"{quote(name)[:80]} (meta, no data)")
    if odd:
        raise UserError(
            f"{quote(path)}: tensors {', '.join(odd[:4])} are not dense {'/'.join(TORCH_DTYPES[:3])} "
            "(or integer) tensors: convert them to float32 (t.to_dense().float()) and save again"
        )
    tensors, dtypes = {}, {}
    for name, t in state.items():
        t = t.detach().cpu()
        dtypes[name] = str(t.dtype).removeprefix("torch.")
        tensors[name] = _floats((t.float() if t.dtype == torch.bfloat16 else t).numpy())
    return tensors, dtypes


def _check_npz(path: Path) -> None:
    """Every member's dtype and shape from its .npy header, its size from the zip directory, before inflating."""

    def bad(why):
        return UserError(f"{quote(path)} is not a readable .npz weights file ({why}): re-export it with mx.savez")

    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
            total = sum(m.file_size for m in members)
            if total > NPZ_INFLATION * size + NPZ_MARGIN:
                raise bad(f"its members inflate to {total:,} bytes from {size:,}: not a weights archive")
            for m in members:
                label = quote(m.filename)[:80]
                if not m.filename.endswith(".npy"):
                    raise bad(f"member {label} is not a .npy array")
                with z.open(m) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                    elif version in ((2, 0), (3, 0)):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                    else:
                        raise bad(f"member {label} has .npy format {version}")
                    header_bytes = f.tell()
                count = 1
                for n in shape:
                    count *= int(n)
                if dtype.hasobject or not (
                    dtype.kind in NPZ_DTYPE_KINDS or (dtype.kind == "V" and dtype.itemsize == 2)
                ):
                    raise bad(f"member {label} has dtype {dtype}: expected floating point or integer arrays")
                if header_bytes + count * dtype.itemsize != m.file_size:
                    raise bad(f"member {label} holds {m.file_size:,} bytes, not the {count:,} values of its shape")
    except UserError:
        raise
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        ValueError,
        EOFError,
        OSError,
        NotImplementedError,
        RuntimeError,
        TypeError,
        SyntaxError,
    ) as e:
        raise bad(str(e).splitlines()[0][:200] if str(e) else type(e).__name__) from None


def _read_npz(path: Path) -> tuple[dict, dict]:
    if zipfile.is_zipfile(path):
        _check_npz(path)
    try:
        archive = np.load(path, allow_pickle=False)
        if not hasattr(archive, "files"):
            raise ValueError("a single .npy array, not an archive of named arrays")
        with archive:
            arrays = {name: archive[name] for name in archive.files}
    except Exception as e:
        detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(
            f"{quote(path)} is not a readable .npz weights file ({detail}): re-export it with mx.savez"
        ) from None
    tensors, dtypes = {}, {}
    for name, arr in arrays.items():
        if arr.dtype.kind == "V" and arr.dtype.itemsize == 2:  # mx.savez writes bfloat16 as raw 2-byte values
            arr = safetensors_np.bf16_to_f32(np.frombuffer(arr.tobytes(), dtype="<u2").reshape(arr.shape))
            dtypes[name] = "bfloat16"
        elif arr.dtype.kind not in NPZ_DTYPE_KINDS:
            raise UserError(
                f"{quote(path)}: array {quote(name)[:80]} has dtype {arr.dtype}: expected floating point "
                "or integer arrays; re-export it with mx.savez"
            )
        else:
            dtypes[name] = str(arr.dtype)
        tensors[name] = _floats(arr)
    return tensors, dtypes


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    tensors, dtypes, _ = safetensors_np.read(path)
    return {k: _floats(v) for k, v in tensors.items()}, dtypes


_READERS = {"torch": _read_torch, "npz": _read_npz, "safetensors": _read_safetensors}
_WHAT = {"torch": "torch state_dict", "npz": ".npz weights", "safetensors": "safetensors weights"}


def _neighbour_config(src: Path) -> ModelConfig:
    """The config.json beside a bare weights file: a checkpoint's (with a "model" section) or a bare config."""
    f = src.parent / checkpoint.CONFIG
    if not f.is_file():
        raise UserError(
            f"{quote(src)} carries no model config: pass --preset or --config, or put its config.json beside it"
        )
    try:
        data = checkpoint.read_json(f, "a model config")
        return ModelConfig.from_dict(data.get("model", data) if isinstance(data, dict) else data)
    except UserError as e:
        raise UserError(
            f"cannot use {quote(f)} as the config of {quote(src)} ({e}): pass --preset or --config"
        ) from None


def read(src, config: ModelConfig | None = None, grid: int | None = None) -> Source:
    """Weights and config from `src`, renamed to our names (not yet checked against the schema)."""
    src = Path(src)
    kind = FILE_KINDS.get(src.suffix.lower())
    if src.is_dir() or (kind is None and not src.exists()):  # resolve() may recover an interrupted save
        if config is not None:
            raise UserError(f"{quote(src)} is a checkpoint directory with its own config: drop --preset/--config")
        cfg, weights, meta = checkpoint.load(src)
        return Source(cfg, weights, "checkpoint directory", _uniform(meta["weight_dtypes"]), meta.get("preset"))
    if kind is None:
        raise UserError(f"cannot read {quote(src)}: expected {ACCEPTED}")
    if not src.is_file():
        raise UserError(f"{quote(src)} does not exist: give {ACCEPTED}")
    tensors, dtypes = _READERS[kind](src)
    if original.is_original(tensors):
        cfg, weights, notes = original.to_ours(tensors, grid)
        if config is not None:
            cfg = config
        dtype = _uniform(dtypes[k] for k in tensors if original.our_name(k) is not None)
        return Source(cfg, weights, f"{_WHAT[kind]} of the original implementation", dtype, notes=notes)
    cfg = config if config is not None else _neighbour_config(src)
    return Source(cfg, tensors, _WHAT[kind], _uniform(dtypes.values()))


# ---- writing -----------------------------------------------------------------------------------------------
def _cast(arr: np.ndarray, dtype: str) -> np.ndarray:
    """numpy has no bfloat16: bf16 values come back rounded (to nearest even) and held in float32."""
    if arr.dtype.kind != "f":  # packed quantized weights stay as they are
        return arr
    if dtype == "bfloat16":
        return safetensors_np.bf16_to_f32(safetensors_np.bf16_bits(arr))
    return np.ascontiguousarray(arr, dtype=dtype)


def _write_npz(path, weights, dtype):
    arrays = {k: _cast(v, dtype) for k, v in weights.items()}

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, **arrays)

    atomic_write(path, write)
    return ".npz weights, " + (
        "bfloat16 values stored as float32: numpy has no bfloat16" if dtype == "bfloat16" else dtype
    )


def _write_torch(path, weights, dtype):
    torch = _torch("writing")
    target = getattr(torch, dtype)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    tensors = {k: t.to(target) if t.is_floating_point() else t for k, t in tensors.items()}

    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(tensors, f)

    atomic_write(path, write)
    return f"torch state_dict, {dtype}"


def _write_safetensors(path, weights, dtype):
    atomic_write(path, lambda tmp: safetensors_np.write(tmp, weights, dtype=dtype, metadata={"format": "pt"}))
    return f"safetensors weights, {dtype}"


_WRITERS = {"torch": _write_torch, "npz": _write_npz, "safetensors": _write_safetensors}


def _check_directory_target(src: Path, dst: Path):
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise UserError(f"DST {quote(dst)} is SRC: write the conversion to a new directory")
    if dst.is_file():
        raise UserError(f"{quote(dst)} is a file: give a directory, or a .pt/.npz/.safetensors file name")
    if dst.is_dir() and not (dst / checkpoint.CONFIG).is_file() and any(dst.iterdir()):
        raise UserError(
            f"{quote(dst)} is a non-empty directory that is not a checkpoint: refusing to replace it; choose a new DST"
        )


# ---- quantizing --------------------------------------------------------------------------------------------
def _mlx():
    try:
        import mlx.core as mx
    except ImportError:
        raise UserError(
            "--quantize writes MLX's quantized format and needs MLX: pip install 'mla-mnist[mlx]', or drop --quantize"
        ) from None
    return mx


def _check_quantize(src: Path, dst: Path, bits: int, group_size: int):
    if bits not in (4, 8):
        raise UserError(f"--quantize {bits} is not supported: choose 8 or 4 (bits per weight)")
    if group_size not in GROUP_SIZES:
        raise UserError(f"group size {group_size} is not supported: choose {', '.join(map(str, GROUP_SIZES))}")
    if dst.suffix.lower() in FILE_KINDS:
        raise UserError(
            f"--quantize writes a checkpoint directory (its config records bits and group size), not "
            f"a {dst.suffix} file: give a directory name as DST"
        )
    _mlx()


def quantize_weights(weights: dict[str, np.ndarray], dtype: str, bits: int, group_size: int) -> tuple[dict, int]:
    """mx.quantize on every weight convert.quantize selects, exactly as mla_mlx.checkpoint.quantize's
    QuantizedLinear layers do it; in `dtype`, so that the scales and biases are the ones saved."""
    mx = _mlx()
    out, n = {}, 0
    for name, arr in weights.items():
        if not quantizable(name, arr.shape, group_size):
            out[name] = arr
            continue
        wq, scales, biases = mx.quantize(mx.array(arr).astype(getattr(mx, dtype)), group_size=group_size, bits=bits)
        stem = name[: -len(".weight")]
        out[name] = np.array(wq)
        out[f"{stem}.scales"] = np.array(scales.astype(mx.float32))
        out[f"{stem}.biases"] = np.array(biases.astype(mx.float32))
        n += 1
    return out, n


def _weights_bytes(path: Path) -> int:
    return (path / checkpoint.WEIGHTS if path.is_dir() else path).stat().st_size


def _write_quantized(src: Path, dst: Path, cfg: ModelConfig, weights, dtype: str, preset, bits, group_size) -> str:
    if cfg.quantization:
        raise UserError(f"{quote(src)} is already quantized ({cfg.quantization['bits']}-bit): convert its float source")
    _check_directory_target(src, dst)
    packed, n = quantize_weights(weights, dtype, bits, group_size)
    cfg = cfg.replace(quantization={"bits": bits, "group_size": group_size})
    checkpoint.save(dst, cfg, packed, dtype=dtype, preset=preset)
    before, after = _weights_bytes(src), (dst / checkpoint.WEIGHTS).stat().st_size
    matrices = sum(name.endswith(".weight") and a.ndim == 2 for name, a in weights.items())
    return (
        f"MLX-quantized checkpoint directory, {bits}-bit groups of {group_size}, scales and the rest {dtype}; "
        f"quantized {n} of {matrices} weight matrices (embedding, output head, kv_b_proj and widths not a "
        f"multiple of {group_size} stay float); weights {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB"
    )


# ---- the command -------------------------------------------------------------------------------------------
def _describe(cfg: ModelConfig) -> str:
    return (
        f"{cfg.attention}, d_model {cfg.d_model}, {cfg.heads} heads (head_dim {cfg.head_dim}, rope "
        f"{cfg.rope_dim}), {cfg.enc_layers}+{cfg.dec_layers} encoder+decoder layers, grid {cfg.grid}, "
        f"patch {cfg.patch}, final_norm {cfg.final_norm}"
    )


def convert(
    src,
    dst,
    *,
    dtype: str | None = None,
    config: ModelConfig | None = None,
    grid: int | None = None,
    quantize: int | None = None,
    group_size: int | None = None,
) -> str:
    """Convert `src` to `dst` (kinds from the paths); returns a short report. Nothing is written on any error."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: choose one of {', '.join(FLOAT_DTYPES)}")
    src, dst = Path(src), Path(dst)
    if quantize is not None:
        group_size = group_size or 64
        _check_quantize(src, dst, quantize, group_size)
    source = read(src, config, grid)
    cfg, preset = source.config, source.preset
    if grid is not None and cfg.grid != grid:  # no weight depends on the grid
        cfg, preset = cfg.replace(grid=grid), None
    checkpoint.validate_weights(source.weights, cfg, src)
    out_dtype = dtype or source.dtype or "float32"
    kind = FILE_KINDS.get(dst.suffix.lower())
    if quantize is not None or kind is None:  # the directory checks first: their messages are the precise ones
        _check_directory_target(src, dst)
        checkpoint.check_writable(dst)
    with checkpoint.run_lock(dst):
        wrote, note = _write(src, dst, kind, cfg, source, out_dtype, preset, quantize, group_size)
    notes = "".join(f"; {n}" for n in source.notes)
    return "\n".join(
        [
            f"read {src} ({source.what}): {len(source.weights)} tensors, {parameter_count(cfg):,} parameters, "
            f"{source.dtype or 'mixed dtypes'}{notes}",
            f"config: {_describe(cfg)}",
            f"wrote {dst} ({wrote}){note}",
        ]
    )


def _write(src, dst, kind, cfg, source, out_dtype, preset, quantize, group_size) -> tuple[str, str]:
    if quantize is not None:
        wrote, note = _write_quantized(src, dst, cfg, source.weights, out_dtype, preset, quantize, group_size), ""
    elif kind is None:
        _check_directory_target(src, dst)
        checkpoint.save(dst, cfg, source.weights, dtype=out_dtype, preset=preset)
        wrote, note = f"checkpoint directory, {out_dtype}", ""
    else:
        wrote = _WRITERS[kind](dst, source.weights, out_dtype)
        note = "; weights only: read it back with --preset/--config or a config.json beside it"
    return wrote, note
