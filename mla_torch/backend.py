"""The one surface the application layer uses to run PyTorch: numpy in, numpy out.

mla_mlx/backend.py has the same class with the same methods and signatures (a test checks it).
"""

from __future__ import annotations

import atexit
import datetime
import os
import statistics
import time

import numpy as np
import torch

from convert.errors import UserError

from . import checkpoint
from .generate import cross_attention_weights, generate
from .render import DeviceRenderer
from .train import Trainer

DEVICES = "auto, cpu, gpu, cuda, cuda:N or mps"


def _leave_process_group(dist):
    """Tear the group down together: a rank that destroys it while another still talks to it can abort inside
    gloo's threads (seen as "terminate called without an active exception"). The wait is bounded, since a
    rank that failed alone never arrives."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        try:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
        except RuntimeError:  # another rank is gone: nothing left to wait for
            pass
    dist.destroy_process_group()


def _device(device: str) -> str:
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if device == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if device == "gpu":
        if not (cuda or mps):
            raise UserError("device gpu asked for, but torch sees no CUDA or MPS GPU: use device cpu")
        return "cuda" if cuda else "mps"
    if device not in ("cpu", "cuda", "mps") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise UserError(f"device {device!r} is not a torch device: use {DEVICES}")
    if device.startswith("cuda") and not cuda:
        raise UserError("device cuda asked for, but torch sees no CUDA GPU: use device cpu")
    if device == "mps" and not mps:
        raise UserError("device mps asked for, but MPS is not available: use device cpu")
    return device


class Backend:
    name = "torch"

    def __init__(self, device: str = "auto", threads: int | None = None):
        self.device = _device(device)
        if threads:
            torch.set_num_threads(threads)
        self.rank, self.world = 0, 1  # init_distributed() sets them under a launcher

    # ---- the device -----------------------------------------------------------------------------
    @property
    def on_cpu(self) -> bool:
        return self.device == "cpu"

    def device_info(self) -> dict:
        """Framework version, device, and the device's own name where there is one (a GPU's model)."""
        out = {"version": torch.__version__, "device": self.device, "threads": torch.get_num_threads()}
        if self.device.startswith("cuda"):
            out["device_name"] = torch.cuda.get_device_name(self.device)
        return out

    def synchronize(self, *arrays):
        """Wait until the device has computed everything queued (the arrays need no more)."""
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        elif self.device == "mps":
            torch.mps.synchronize()

    def peak_memory(self, fn):
        """(fn(), {peak_memory_bytes, peak_memory_method}); None in place of the dict where torch keeps no count
        (the CPU: the caller measures the process instead)."""
        if not self.device.startswith("cuda"):
            return fn(), None
        torch.cuda.reset_peak_memory_stats(self.device)
        out = fn()
        return out, {
            "peak_memory_bytes": torch.cuda.max_memory_allocated(self.device),
            "peak_memory_method": "torch.cuda.max_memory_allocated (weights included)",
        }

    def copy_gbps(self, repeats: int = 3) -> float:
        """Device memory bandwidth, GB/s read + written by a large copy: the yardstick of a memory-bound step."""
        n = (1 << 24) if self.on_cpu else (1 << 28)  # 64 MiB / 1 GiB of float32, well past any cache
        a = torch.empty(n, dtype=torch.float32, device=self.device).fill_(1.0)
        b = torch.empty_like(a)
        times = []
        for i in range(repeats + 2):
            start = time.perf_counter()
            b.copy_(a)
            self.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - start)
        return 2 * a.nbytes / statistics.median(times) / 1e9

    @property
    def reading_dtype(self) -> str:
        """What `eval --dtype auto` reads in: bfloat16 on a GPU (the shipped small model on the H200: exact match
        96.05% against float32's 96.03%, digits 99.53% both, 2.2x float32's grids/s), float32 on a CPU."""
        cuda = self.device.startswith("cuda")
        return "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32"

    @property
    def static_paths(self) -> tuple[str, ...]:
        """generate(static=...) paths on this device: the loop, the fixed-shape step eagerly, and on CUDA in a
        CUDA graph, compiled by torch.compile into one, or fused (fused_step: its products as Inductor kernels);
        compiling for a CPU costs minutes and gains nothing."""
        cuda = ("off", "eager", "graph", "compiled", "fused")
        return cuda if self.device.startswith("cuda") else ("off", "eager")

    def matmul_gflops(self, repeats: int = 3) -> float:
        """fp32 matmul rate of this device, big enough to fill it: the yardstick for the encoder's FLOP/s."""
        n = 1024 if self.on_cpu else 4096
        a = self.array(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
        times = []
        for i in range(repeats + 2):  # the first two warm up (allocation, kernel choice)
            start = time.perf_counter()
            a @ a
            self.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - start)
        return 2 * n**3 / statistics.median(times) / 1e9

    # ---- arrays -------------------------------------------------------------------------------------
    def array(self, x: np.ndarray, dtype: str | None = None):
        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        return t.to(getattr(torch, dtype)) if dtype else t

    def numpy(self, x) -> np.ndarray:
        return x.detach().float().cpu().numpy() if x.is_floating_point() else x.cpu().numpy()

    def no_grad(self):
        return torch.no_grad()

    # ---- models -------------------------------------------------------------------------------------
    def build(self, config, seed: int = 0):
        return checkpoint.build(config, seed).to(self.device)

    def load(self, path=None, weights: str = "model.safetensors", dtype: str = "float32"):
        path = checkpoint.checkpoint.SHIPPED if path is None else path
        return checkpoint.load(path, device=self.device, dtype=getattr(torch, dtype), weights=weights)

    def save(self, model, path, **kwargs):
        return checkpoint.save(model, path, **kwargs)

    def weights(self, model) -> dict[str, np.ndarray]:
        return checkpoint.to_numpy(model)

    def load_weights(self, model, weights: dict[str, np.ndarray]):
        checkpoint.from_numpy(model, weights)
        return model.to(self.device)

    def cast(self, model, dtype: str):
        """The model's weights in `dtype` (float32, float16, bfloat16)."""
        return model.to(dtype=getattr(torch, dtype))

    def dtype_of(self, model) -> str:
        return str(model.head.weight.dtype).removeprefix("torch.")

    def trainer(self, model, train_config, bf16: bool = False, world: int = 1) -> Trainer:
        # On CUDA the step is compiled (paid once, minutes saved), as MLX always compiles its step: the whole
        # model as one graph, 1.3x the per-layer graphs' samples/s for a ~10 s longer cold start (small, batch
        # 512, bf16, H200: 13,227 against 10,209; scripts/train_step_ab.py).
        compile = "model" if self.device.startswith("cuda") else False
        return Trainer(model, train_config, device=self.device, bf16=bf16, world=world, compile=compile)

    def grid_renderer(self, digits: np.ndarray):
        """A renderer of training grids on this device (digits uploaded once as uint8): `.render(draw, rows)`."""
        return DeviceRenderer(digits, self.device)

    # ---- inference ----------------------------------------------------------------------------------
    def encode(self, model, images):
        with torch.no_grad():
            return model.eval().encode(images)

    def generate(self, model, images, **kwargs) -> np.ndarray:
        """Tokens [B, L] as numpy; images a numpy or device array; kwargs as mla_torch.generate."""
        images = self.array(images) if isinstance(images, np.ndarray) else images
        out = generate(model, images, **kwargs)
        if kwargs.get("return_cache"):
            return self.numpy(out[0]), out[1]
        return self.numpy(out)

    def attention_weights(self, model, images: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Cross-attention weights [B, dec_layers, heads, T, 1 + N] (mla_torch.generate.cross_attention_weights)."""
        return self.numpy(cross_attention_weights(model, self.array(images), self.array(tokens)))

    def trace(self, model, images: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """Activations at every boundary, teacher-forced on tokens, as float32 numpy (EncoderDecoder.trace)."""
        with torch.no_grad():
            out = model.eval().trace(self.array(images), self.array(np.asarray(tokens, dtype=np.int64)))
        return {k: self.numpy(v) for k, v in out.items()}

    # ---- data parallel ------------------------------------------------------------------------------
    def seed(self, seed: int):
        """Seed torch's global generators (dropout draws; CUDA's too)."""
        torch.manual_seed(seed)

    def init_distributed(self) -> tuple[int, int]:
        """Join the group torchrun set up (env:// rendezvous: MASTER_ADDR, RANK, WORLD_SIZE, LOCAL_RANK)."""
        import torch.distributed as dist

        if self.device.startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", 0))
            self.device = f"cuda:{local}"
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device(self.device))
        elif self.device == "cpu":
            dist.init_process_group("gloo")
        else:
            raise UserError(f"data-parallel training on {self.device} is not supported: use device cpu or cuda")
        atexit.register(_leave_process_group, dist)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        return self.rank, self.world

    def all_sum(self, x) -> np.ndarray:
        """Elementwise sum of a numpy array over the ranks (itself in a single process)."""
        x = np.asarray(x, dtype=np.float64)
        if self.world == 1:
            return x
        t = torch.from_numpy(x).to(self.device)
        torch.distributed.all_reduce(t)
        return t.cpu().numpy()
