"""Framework dispatch: the CLI talks to mla_torch or mla_mlx through this one small surface."""
from __future__ import annotations

import atexit
import datetime
import importlib.util
import os
from pathlib import Path

import numpy as np

from convert.errors import UserError

FRAMEWORKS = ("torch", "mlx")
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "small"


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


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def default_framework(prefer: tuple[str, ...] = ("mlx", "torch")) -> str:
    for fw in prefer:
        if installed(fw):
            return fw
    raise UserError("neither torch nor mlx is installed: pip install 'mla-mnist[mlx]' or 'mla-mnist[torch]'")


class Backend:
    """Numpy in, numpy out, whichever framework runs underneath."""

    def __init__(self, framework: str, device: str = "auto"):
        if framework not in FRAMEWORKS:
            raise UserError(f"unknown framework {framework!r}: choose torch or mlx")
        if not installed(framework):
            raise UserError(f"--framework {framework} needs {framework}: pip install 'mla-mnist[{framework}]'")
        self.name = framework
        self.rank, self.world = 0, 1  # init_distributed() sets them under a launcher
        if framework == "torch":
            import torch

            import mla_torch as fw
            from mla_torch.train import Trainer

            self.torch = torch
            self.device = self._torch_device(device)
        else:
            import mlx.core as mx

            import mla_mlx as fw
            from mla_mlx.train import Trainer

            self.mx = mx
            if device not in ("auto", "cpu", "gpu"):
                raise UserError(f"--device {device} is not an MLX device: use auto, cpu or gpu")
            if device != "auto":
                mx.set_default_device(mx.cpu if device == "cpu" else mx.gpu)
            self.device = str(mx.default_device())
        self.fw, self.Trainer = fw, Trainer

    def _torch_device(self, device):
        torch = self.torch
        if device == "auto":
            if torch.cuda.is_available():
                return "cuda"
            return "mps" if torch.backends.mps.is_available() else "cpu"
        if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
            raise UserError(f"--device {device} is not a torch device: use auto, cpu, cuda or mps")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("--device cuda asked for, but torch sees no CUDA GPU: use --device cpu")
        if device == "mps" and not torch.backends.mps.is_available():
            raise UserError("--device mps asked for, but MPS is not available: use --device cpu")
        return device

    # ---- data parallel ------------------------------------------------------------------------
    def init_distributed(self) -> tuple[int, int]:
        """Join the process group the framework's launcher set up: (rank, world size)."""
        if self.name == "torch":  # torchrun: env:// rendezvous (MASTER_ADDR, RANK, WORLD_SIZE, LOCAL_RANK)
            import torch.distributed as dist

            if str(self.device).startswith("cuda"):
                local = int(os.environ.get("LOCAL_RANK", 0))
                self.device = f"cuda:{local}"
                self.torch.cuda.set_device(local)
                dist.init_process_group("nccl", device_id=self.torch.device(self.device))
            elif self.device == "cpu":
                dist.init_process_group("gloo")
            else:
                raise UserError(f"data-parallel training on {self.device} is not supported: use --device cpu or cuda")
            atexit.register(_leave_process_group, dist)
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        else:  # mlx.launch: ring (MLX_HOSTFILE, MLX_RANK), MPI, or NCCL on CUDA, whichever it started
            group = self.mx.distributed.init()
            self.rank, self.world = group.rank(), group.size()
        return self.rank, self.world

    def all_sum(self, x) -> np.ndarray:
        """Elementwise sum of a numpy array over the ranks (itself in a single process)."""
        x = np.asarray(x, dtype=np.float64)
        if self.world == 1:
            return x
        if self.name == "torch":
            t = self.torch.from_numpy(x).to(self.device)
            self.torch.distributed.all_reduce(t)
            return t.cpu().numpy()
        # float32: MLX has float64 on the CPU only
        return np.array(self.mx.distributed.all_sum(self.mx.array(x.astype(np.float32))), dtype=np.float64)

    # ---- models -----------------------------------------------------------------------------
    def build(self, config, seed=0):
        model = self.fw.build(config, seed)
        return model.to(self.device) if self.name == "torch" else model

    def load(self, path, weights="model.safetensors", dtype="float32"):
        if self.name == "torch":
            return self.fw.load(path, device=self.device, dtype=getattr(self.torch, dtype), weights=weights)
        return self.fw.load(path, dtype=getattr(self.mx, dtype), weights=weights)

    def save(self, model, path, **kwargs):
        return self.fw.save(model, path, **kwargs)

    def weights(self, model) -> dict[str, np.ndarray]:
        from importlib import import_module

        return import_module(f"{self.fw.__name__}.checkpoint").to_numpy(model)

    def load_weights(self, model, weights: dict[str, np.ndarray]):
        from importlib import import_module

        import_module(f"{self.fw.__name__}.checkpoint").from_numpy(model, weights)
        if self.name == "torch":
            model.to(self.device)
        return model

    def generate(self, model, images: np.ndarray, **kwargs) -> np.ndarray:
        out = self.fw.generate(model, self.array(images), **kwargs)
        return self.numpy(out)

    def array(self, x: np.ndarray):
        if self.name == "torch":
            return self.torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        return self.mx.array(x)

    def numpy(self, x) -> np.ndarray:
        if self.name == "torch":
            return x.detach().float().cpu().numpy() if x.is_floating_point() else x.cpu().numpy()
        return np.array(x.astype(self.mx.float32) if x.dtype in (self.mx.bfloat16, self.mx.float16) else x)

    def synchronize(self):
        if self.name == "torch":
            if str(self.device).startswith("cuda"):
                self.torch.cuda.synchronize()
        else:
            self.mx.synchronize()
