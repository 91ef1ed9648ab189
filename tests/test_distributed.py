"""Data-parallel training on each framework's own launcher: torchrun (DDP over gloo) and mlx.launch (ring).

The workers are this file run as a script under the launcher (see the bottom), so the tests exercise the
real launch path: environment detection, process-group set-up, gradient and validation all-reduces.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BATCH, STEPS, VAL = 8, 10, 24  # global batch of 8 tiny 2x2 grids: ranks' target counts differ


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(framework, nproc, command, timeout=120):
    """Run `command` (arguments after `python`) in `nproc` processes with the framework's launcher."""
    if framework == "torch":
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        args = [*launcher, *command]
    else:
        if shutil.which("mlx.launch") is None:
            pytest.skip("mlx.launch is not on PATH")
        # mlx.launch listens on port, port + 1, ...: a free one keeps parallel test workers apart
        args = ["mlx.launch", "-n", str(nproc), "--starting-port", str(_free_port()), "--", sys.executable, *command]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_steps(framework, out=None) -> dict:
    """Ten steps of the tiny model on this process's share of each global batch (all of it alone), then the
    validation record; under a launcher, rank 0 writes them to `out`."""
    from convert.config import ModelConfig
    from convert.training import TrainConfig
    from mla_mnist.backends import get_backend
    from mla_mnist.distributed import launcher_world
    from mla_mnist.evaluation import EVAL_SEED
    from mla_mnist.train_loop import RunSpec, _validate
    from mnist_grid import GridStream

    backend = get_backend(framework, "cpu")
    rank, world = launcher_world(backend)
    config = ModelConfig.preset("tiny").replace(dropout=0.0)
    tc = TrainConfig(lr=3e-3, warmup_steps=2, total_steps=STEPS)
    trainer = backend.trainer(backend.build(config, seed=0), tc, world=world)
    stream = GridStream("train", config.grid, 0)
    batches = [stream.batch(0, i, BATCH, rank, world) for i in range(STEPS)]
    losses = [float(trainer.step(x, y)[0]) for x, y in batches]
    counts = [int((y[:, 1:] != 12).sum()) for _, y in batches]  # 12: PAD
    val_x, val_y = GridStream("val", config.grid, 0).fixed(VAL, seed=EVAL_SEED)
    spec = RunSpec(epochs=1, batch_size=BATCH, train_samples=BATCH * STEPS, seed=0, augment=False, train=tc)
    record = _validate(
        backend, trainer.model, trainer, val_x, val_y, 1.0, STEPS, float(np.mean(losses)), spec, 1.0, STEPS, rank, world
    )
    result = {
        "world": world,
        "losses": losses,
        "counts": backend.all_sum(counts).tolist(),
        "local_counts": counts,
        "val": {k: record[k] for k in ("val_loss", "val_exact_match", "val_digit_accuracy")},
    }
    if out is not None and rank == 0:
        Path(out).write_text(json.dumps(result))
    return result


@pytest.mark.parametrize("framework", ["torch", "mlx"])
def test_two_ranks_take_the_same_steps_as_one_process(framework, tmp_path):
    pytest.importorskip(framework)
    out = tmp_path / "two.json"
    _launch(framework, 2, [str(Path(__file__)), framework, str(out)])
    two = json.loads(out.read_text())
    one = run_steps(framework)
    assert two["world"] == 2 and one["world"] == 1
    assert two["counts"] == one["local_counts"]  # the ranks' shards make up the whole global batch
    # the ranks' shards hold different numbers of targets, so an unweighted mean of rank means would differ
    assert any(2 * c != t for c, t in zip(two["local_counts"], two["counts"]))
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=0, atol=1e-5)
    for key, value in one["val"].items():
        assert two["val"][key] == pytest.approx(value, abs=1e-5), key


@pytest.mark.parametrize("framework", ["torch", "mlx"])
def test_cli_under_the_launcher_writes_one_ordinary_checkpoint(framework, tmp_path, capsys):
    pytest.importorskip(framework)
    from mla_mnist.cli import main

    ckpt = tmp_path / "ckpt"
    train = [
        "-m",
        "mla_mnist",
        "train",
        "--framework",
        framework,
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--train-samples",
        "64",
        "--batch-size",
        "16",
        "--val-samples",
        "16",
        "--quiet",
        "--out",
        str(ckpt),
    ]
    proc = _launch(framework, 2, [*train, "--max-steps", "2"])
    assert proc.stdout.count(f"saved {ckpt}") == 1  # rank 0 alone reports (and writes)
    state = json.loads((ckpt / "train_state.json").read_text())
    assert state["step"] == 2 and len(state["history"]) == 1
    val = state["history"][0]
    assert np.isfinite(val["val_loss"]) and 0 <= val["val_digit_accuracy"] <= 1

    assert main(["eval", str(ckpt), "--framework", framework, "--device", "cpu", "--samples", "12", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 12
    # the same global batch in one process continues the run (the data order is the global batch's)
    assert (
        main(
            [
                "train",
                "--framework",
                framework,
                "--resume",
                str(ckpt),
                "--device",
                "cpu",
                "--quiet",
                "--val-samples",
                "16",
            ]
        )
        == 0
    )
    assert json.loads((ckpt / "train_state.json").read_text())["step"] == 4


def test_a_launcher_for_the_other_framework_is_refused(monkeypatch):
    from convert.errors import UserError
    from mla_mnist.distributed import launcher_world

    class Stub:
        name = "mlx"

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="torchrun started this --framework mlx run"):
        launcher_world(Stub())


if __name__ == "__main__":  # a worker under torchrun / mlx.launch: python tests/test_distributed.py FRAMEWORK OUT
    sys.path.insert(0, str(ROOT))
    run_steps(sys.argv[1], sys.argv[2])
