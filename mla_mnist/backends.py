"""The one place the application layer picks a framework: `get_backend` imports mla_torch.backend or
mla_mlx.backend, whose `Backend` classes share one set of methods. Nothing else in mla_mnist names a framework."""

from __future__ import annotations

import importlib.util
import os
from importlib import import_module

from convert.checkpoint import SHIPPED
from convert.errors import UserError

FRAMEWORKS = ("torch", "mlx")
TRAINING_FIRST = ("torch", "mlx")  # the default framework for training, where both are installed
INFERENCE_FIRST = ("mlx", "torch")  # ... and for reading grids: MLX is the Mac's native framework
LAUNCHERS = {"torch": "torchrun", "mlx": "mlx.launch"}
DEFAULT_CHECKPOINT = SHIPPED


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def default_framework(prefer: tuple[str, ...] = INFERENCE_FIRST) -> str:
    for framework in prefer:
        if installed(framework):
            return framework
    raise UserError("neither torch nor mlx is installed: pip install 'mla-mnist[mlx]' or 'mla-mnist[torch]'")


def get_backend(framework: str, device: str = "auto", threads: int | None = None):
    if framework not in FRAMEWORKS:
        raise UserError(f"unknown framework {framework!r}: choose {' or '.join(FRAMEWORKS)}")
    if not installed(framework):
        raise UserError(f"--framework {framework} needs {framework}: pip install 'mla-mnist[{framework}]'")
    return import_module(f"mla_{framework}.backend").Backend(device, threads)


def launched_by() -> str | None:
    """Which framework's launcher started this process with more than one rank, if any (read from the
    environment, so that neither framework is imported to find out)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun (also torch.distributed.run)
        return "torch"
    if any(k in os.environ for k in ("MLX_RANK", "OMPI_COMM_WORLD_RANK")):  # mlx.launch: ring/NCCL, MPI
        return "mlx"
    return None
