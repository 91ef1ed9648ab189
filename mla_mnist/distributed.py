"""Launcher detection for data-parallel training (torchrun / mlx.launch); one process needs nothing.

    torchrun --standalone --nproc_per_node N -m mla_mnist train --framework torch ...
    mlx.launch -n N -- mla-mnist train --framework mlx ...
"""
from __future__ import annotations

import os

from convert.errors import UserError

LAUNCHERS = {"torch": "torchrun", "mlx": "mlx.launch"}


def launched_by() -> str | None:
    """Which framework's launcher started this process with more than one rank, if any."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun (also torch.distributed.run)
        return "torch"
    if any(k in os.environ for k in ("MLX_RANK", "OMPI_COMM_WORLD_RANK")):  # mlx.launch: ring/NCCL, MPI
        return "mlx"
    return None


def launcher_world(backend) -> tuple[int, int]:
    """(rank, world size) as set by the framework's own launcher, initialising its process group."""
    framework = launched_by()
    if framework is None:
        return 0, 1
    if framework != backend.name:  # every rank would train alone and write the same checkpoint
        raise UserError(f"{LAUNCHERS[framework]} started this --framework {backend.name} run: launch "
                        f"--framework {backend.name} with {LAUNCHERS[backend.name]}, or pass --framework {framework}")
    return backend.init_distributed()
