"""Shared fixtures: the real MNIST directory, a briefly trained tiny torch checkpoint, torch on one thread."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per test process: with -n 2 on two cores, torch's default of one thread per core
    # oversubscribes the machine and its spinning OpenMP threads run 10-100x slower. Subprocesses inherit it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def mnist_candidates() -> list[Path]:
    """Where the tests look for MNIST, in order: $MLA_MNIST_DIR, the CLI's user cache, ../shared/data/mnist.

    MLA_MNIST_TEST_FALLBACK replaces the last one (only the tests of this discovery set it)."""
    from mnist_grid import resolve_data_dir

    env = os.environ.get("MLA_MNIST_DIR")
    found = [Path(env).expanduser()] if env else []
    saved = os.environ.pop("MLA_MNIST_DIR", None)
    try:
        found.append(resolve_data_dir())  # the per-user cache the CLI downloads into
    finally:
        if saved is not None:
            os.environ["MLA_MNIST_DIR"] = saved
    found.append(Path(os.environ.get("MLA_MNIST_TEST_FALLBACK") or ROOT.parent / "shared" / "data" / "mnist"))
    return found


def _complete(d: Path) -> bool:
    from mnist_grid import mnist

    return d.is_dir() and all(mnist._find(d, n) for names in mnist.FILES.values() for n in names)


def mnist_dir() -> Path | None:
    """The first candidate holding the four MNIST files, else None."""
    return next((d for d in mnist_candidates() if _complete(d)), None)


def pytest_configure(config):
    # Checked before any xdist worker starts (and again in each worker): a missing MNIST is one readable
    # line and exit code 2, not a fixture error in every test or a crashed node.
    d = mnist_dir()
    if d is None:
        where = ", ".join(str(p) for p in mnist_candidates())
        pytest.exit(
            f"MNIST not found (looked in {where}): set MLA_MNIST_DIR to the folder with the four IDX files",
            returncode=2,
        )
    os.environ["MLA_MNIST_DIR"] = str(d)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny MLA model trained for 300 torch steps on real grids: reads most 1-4 digit grids."""
    pytest.importorskip("torch")
    from mla_mnist.cli import main

    out = tmp_path_factory.mktemp("tiny") / "ckpt"
    rc = main(
        [
            "train",
            "--framework",
            "torch",
            "--preset",
            "tiny",
            "--epochs",
            "1",
            "--train-samples",
            "9600",
            "--batch-size",
            "32",
            "--lr",
            "3e-3",
            "--val-samples",
            "128",
            "--quiet",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    return out


@pytest.fixture
def one_thread():
    """torch on 1 thread: steady on a shared machine, and the same reduction order in every run."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
