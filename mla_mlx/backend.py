"""The one surface the application layer uses to run MLX: numpy in, numpy out.

mla_torch/backend.py has the same class with the same methods and signatures (a test checks it).
"""

from __future__ import annotations

import contextlib
import statistics
import time

import mlx.core as mx
import numpy as np

from convert.errors import UserError

from . import checkpoint, fused_step
from .generate import cross_attention_weights, generate
from .render import DeviceRenderer
from .train import Trainer

DEVICES = "auto, cpu or gpu (cuda and mps mean gpu)"


def _device(device: str) -> str:
    if device in ("cuda", "mps"):  # one --device for both frameworks: MLX calls every accelerator gpu
        device = "gpu"
    if device not in ("auto", "cpu", "gpu"):
        raise UserError(f"device {device!r} is not an MLX device: use {DEVICES}")
    if device == "gpu" and not mx.is_available(mx.gpu):
        raise UserError(
            "device gpu asked for, but this MLX has no GPU backend (on Linux, mlx[cpu] is CPU only; "
            "mlx[cuda] runs on NVIDIA GPUs): use device cpu"
        )
    if device != "auto":
        mx.set_default_device(mx.cpu if device == "cpu" else mx.gpu)
    return "gpu" if mx.default_device() == mx.gpu else "cpu"


class Backend:
    name = "mlx"

    def __init__(self, device: str = "auto", threads: int | None = None):
        # threads: torch's CPU thread count; MLX's CPU backend picks its own.
        self.device = _device(device)
        self.rank, self.world = 0, 1  # init_distributed() sets them under a launcher

    # ---- the device -----------------------------------------------------------------------------
    @property
    def on_cpu(self) -> bool:
        return self.device == "cpu"

    def device_info(self) -> dict:
        """Framework version, device, and the device's own name where there is one (a GPU's model)."""
        out = {"version": mx.__version__, "device": self.device}
        try:
            out["device_name"] = mx.device_info().get("device_name")
        except (AttributeError, RuntimeError):  # older MLX, or a backend without the query
            pass
        return out

    def synchronize(self, *arrays):
        """Wait until the arrays are computed (MLX is lazy: nothing runs before it is asked for)."""
        mx.eval(*arrays)
        mx.synchronize()

    def peak_memory(self, fn):
        """(fn(), {peak_memory_bytes, peak_memory_method}) from MLX's own allocation counter."""
        mx.reset_peak_memory()
        out = fn()
        return out, {
            "peak_memory_bytes": mx.get_peak_memory(),
            "peak_memory_method": "mx.get_peak_memory (all MLX arrays, weights included)",
        }

    def copy_gbps(self, repeats: int = 3) -> float:
        """Device memory bandwidth, GB/s read + written by a large copy: the yardstick of a memory-bound step."""
        n = (1 << 24) if self.on_cpu else (1 << 28)  # 64 MiB / 1 GiB of float32, well past any cache
        a = mx.ones((n,), dtype=mx.float32)
        self.synchronize(a)
        times = []
        for i in range(repeats + 2):
            start = time.perf_counter()
            self.synchronize(a + 0)  # MLX has no in-place copy: one elementwise pass reads and writes n floats
            if i >= 2:
                times.append(time.perf_counter() - start)
        return 2 * a.nbytes / statistics.median(times) / 1e9

    @property
    def reading_dtype(self) -> str:
        """What `eval --dtype auto` reads in: float32 everywhere (MLX's CUDA backend builds each bfloat16 kernel at
        its first use: the first 10,000-grid read-out in bfloat16 ran at 219 grids/s on the H200)."""
        return "float32"

    @property
    def static_paths(self) -> tuple[str, ...]:
        """generate(static=...) paths on this device: the loop, the fixed-shape step eagerly and compiled (MLX has
        no graph capture of its own to ask for: its CUDA backend builds graphs by itself), and on that backend
        the step as one CUDA kernel (fused_step)."""
        return ("off", "eager", "compiled") + (("fused",) if fused_step.available() is None else ())

    def matmul_gflops(self, repeats: int = 3) -> float:
        """fp32 matmul rate of this device, big enough to fill it: the yardstick for the encoder's FLOP/s."""
        n = 1024 if self.on_cpu else 4096
        a = self.array(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
        times = []
        for i in range(repeats + 2):  # the first two warm up (allocation, kernel choice)
            start = time.perf_counter()
            self.synchronize(a @ a)
            if i >= 2:
                times.append(time.perf_counter() - start)
        return 2 * n**3 / statistics.median(times) / 1e9

    # ---- arrays -------------------------------------------------------------------------------------
    def array(self, x: np.ndarray, dtype: str | None = None):
        a = mx.array(x)
        return a.astype(getattr(mx, dtype)) if dtype else a

    def numpy(self, x) -> np.ndarray:
        return np.array(x.astype(mx.float32) if x.dtype in (mx.bfloat16, mx.float16) else x)

    def no_grad(self):
        return contextlib.nullcontext()  # MLX builds no graph for gradients unless asked

    # ---- models -------------------------------------------------------------------------------------
    def build(self, config, seed: int = 0):
        return checkpoint.build(config, seed)

    def load(self, path=None, weights: str = "model.safetensors", dtype: str = "float32"):
        path = checkpoint.checkpoint.SHIPPED if path is None else path
        return checkpoint.load(path, dtype=getattr(mx, dtype), weights=weights)

    def save(self, model, path, **kwargs):
        return checkpoint.save(model, path, **kwargs)

    def weights(self, model) -> dict[str, np.ndarray]:
        return checkpoint.to_numpy(model)

    def load_weights(self, model, weights: dict[str, np.ndarray]):
        return checkpoint.from_numpy(model, weights)

    def cast(self, model, dtype: str):
        """The model's weights in `dtype` (float32, float16, bfloat16)."""
        model.set_dtype(getattr(mx, dtype))
        return model

    def dtype_of(self, model) -> str:
        return str(model.head.weight.dtype).removeprefix("mlx.core.")

    def trainer(self, model, train_config, bf16: bool = False, world: int = 1) -> Trainer:
        return Trainer(model, train_config, device=self.device, bf16=bf16, world=world)

    def grid_renderer(self, digits: np.ndarray):
        """A renderer of training grids on this device (digits uploaded once as uint8): `.render(draw, rows)`."""
        return DeviceRenderer(digits, self.device)

    # ---- inference ----------------------------------------------------------------------------------
    def encode(self, model, images):
        return model.eval().encode(images)

    def generate(self, model, images, **kwargs) -> np.ndarray:
        """Tokens [B, L] as numpy; images a numpy or device array; kwargs as mla_mlx.generate."""
        images = self.array(images) if isinstance(images, np.ndarray) else images
        out = generate(model, images, **kwargs)
        if kwargs.get("return_cache"):
            return self.numpy(out[0]), out[1]
        return self.numpy(out)

    def attention_weights(self, model, images: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Cross-attention weights [B, dec_layers, heads, T, 1 + N] (mla_mlx.generate.cross_attention_weights)."""
        return self.numpy(cross_attention_weights(model, self.array(images), self.array(tokens)))

    def trace(self, model, images: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """Activations at every boundary, teacher-forced on tokens, as float32 numpy (EncoderDecoder.trace)."""
        out = model.eval().trace(self.array(images), self.array(np.asarray(tokens, dtype=np.int32)))
        mx.eval(out)
        return {k: self.numpy(v) for k, v in out.items()}

    # ---- data parallel ------------------------------------------------------------------------------
    def seed(self, seed: int):
        """Seed MLX's global generator (dropout draws)."""
        mx.random.seed(seed)

    def init_distributed(self) -> tuple[int, int]:
        """Join the group mlx.launch set up: ring (MLX_HOSTFILE, MLX_RANK), MPI, or NCCL on CUDA."""
        group = mx.distributed.init()
        self.rank, self.world = group.rank(), group.size()
        return self.rank, self.world

    def all_sum(self, x) -> np.ndarray:
        """Elementwise sum of a numpy array over the ranks (itself in a single process)."""
        x = np.asarray(x, dtype=np.float64)
        if self.world == 1:
            return x
        # float32: MLX has float64 on the CPU only
        return np.array(mx.distributed.all_sum(mx.array(x.astype(np.float32))), dtype=np.float64)
