"""Data-parallel training under a framework's own launcher; one process needs nothing.

torchrun --standalone --nproc_per_node N -m mla_mnist train --framework torch ...
mlx.launch -n N -- mla-mnist train --framework mlx ...
"""

from __future__ import annotations

from convert.errors import UserError

from .backends import LAUNCHERS, launched_by


def launcher_world(backend) -> tuple[int, int]:
    """(rank, world size) as set by the framework's own launcher, initialising its process group."""
    framework = launched_by()
    if framework is None:
        return 0, 1
    if framework != backend.name:  # every rank would train alone and write the same checkpoint
        raise UserError(
            f"{LAUNCHERS[framework]} started this --framework {backend.name} run: launch "
            f"--framework {backend.name} with {LAUNCHERS[backend.name]}, or pass --framework {framework}"
        )
    return backend.init_distributed()
