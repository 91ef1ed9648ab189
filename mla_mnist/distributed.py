"""Launcher detection for data-parallel training (torchrun / mlx.launch); one process needs nothing."""
from __future__ import annotations

import os


def launcher_world(backend) -> tuple[int, int]:
    """(rank, world size) as set by the framework's own launcher, initialising its process group."""
    if backend.name == "torch" and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        return backend.init_distributed()
    if backend.name == "mlx" and any(k in os.environ for k in ("MLX_RANK", "OMPI_COMM_WORLD_RANK")):
        return backend.init_distributed()
    return 0, 1
