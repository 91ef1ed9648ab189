"""Shared fixtures: the real MNIST directory and a briefly trained tiny torch checkpoint."""
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


def mnist_dir() -> Path:
    env = os.environ.get("MLA_MNIST_DIR")
    return Path(env) if env else ROOT.parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="session", autouse=True)
def _data_env():
    d = mnist_dir()
    if not d.is_dir():
        pytest.exit(f"MNIST not found at {d}: set MLA_MNIST_DIR to the folder with the four IDX files", 2)
    os.environ["MLA_MNIST_DIR"] = str(d)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny MLA model trained for 300 torch steps on real grids: reads most 1-4 digit grids."""
    pytest.importorskip("torch")
    from mla_mnist.cli import main

    out = tmp_path_factory.mktemp("tiny") / "ckpt"
    rc = main(["train", "--framework", "torch", "--preset", "tiny", "--epochs", "1", "--train-samples", "9600",
               "--batch-size", "32", "--lr", "3e-3", "--val-samples", "128", "--quiet", "--out", str(out),
               "--device", "cpu"])
    assert rc == 0
    return out
