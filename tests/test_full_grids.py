"""`train --full-grids STEPS`: the first steps draw every cell occupied, on the host and on the device renderer,
the run records it, and a run saved before the setting existed resumes as it ran (without it)."""

import json

import numpy as np
import pytest

from mla_mnist.cli import main
from mla_mnist.train_loop import batch_source
from mnist_grid.grid import GridStream
from mnist_grid.tokens import FINISH

GRID, BATCH, STEPS_PER_EPOCH = 3, 6, 2


@pytest.fixture(scope="module")
def stream():
    return GridStream("train", GRID, seed=3, augment="affine")


def _digits(tokens):
    return (tokens == FINISH).argmax(1) - 1  # FINISH sits right after the last digit


def test_first_steps_are_full_then_uniform(stream):
    batches = list(batch_source(stream, range(5), STEPS_PER_EPOCH, BATCH, 0, 1, full_steps=3))
    counts = [_digits(t) for _, t in batches]
    assert all((c == GRID * GRID).all() for c in counts[:3])
    later = np.concatenate(counts[3:])
    assert later.min() >= 1 and (later < GRID * GRID).any()
    # Steps after the full ones are the batches a run without them draws: the data order stays the same.
    plain = list(batch_source(stream, range(5), STEPS_PER_EPOCH, BATCH, 0, 1))
    for (x, t), (px, pt) in zip(batches[3:], plain[3:]):
        np.testing.assert_array_equal(x, px)
        np.testing.assert_array_equal(t, pt)
    # A full grid has ink in every cell.
    x = batches[0][0].reshape(BATCH, GRID, 28, GRID, 28)
    assert (x.max(axis=(2, 4)) > 0.5).all()


def test_device_renderer_draws_the_same(stream):
    pytest.importorskip("torch")
    from mla_mnist.backends import get_backend

    renderer = get_backend("torch", "cpu").grid_renderer(stream.images)
    host = list(batch_source(stream, range(3), STEPS_PER_EPOCH, BATCH, 0, 1, full_steps=2))
    device = list(batch_source(stream, range(3), STEPS_PER_EPOCH, BATCH, 0, 1, renderer, full_steps=2))
    for (hx, ht), (dx, dt) in zip(host, device):
        np.testing.assert_allclose(np.asarray(dx), hx, atol=1e-5)
        np.testing.assert_array_equal(dt, ht)


def _train(out, *extra):
    args = ["train", "--framework", "torch", "--device", "cpu", "--preset", "tiny", "--epochs", "2"]
    args += ["--batch-size", "8", "--train-samples", "16", "--val-samples", "8", "--quiet", "--out", str(out)]
    return main([*args, *extra])


def test_recorded_and_resumed(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "run"
    assert _train(out, "--full-grids", "3", "--max-steps", "2") == 0
    state = json.loads((out / "train_state.json").read_text())
    assert state["spec"]["full_grid_steps"] == 3
    assert main(["train", "--resume", str(out), "--quiet", "--val-samples", "8"]) == 0
    assert json.loads((out / "train_state.json").read_text())["step"] == 4


def test_a_run_saved_without_the_setting_resumes(tmp_path, capsys):
    pytest.importorskip("torch")
    out = tmp_path / "old"
    assert _train(out, "--max-steps", "2") == 0
    path = out / "train_state.json"
    state = json.loads(path.read_text())
    del state["spec"]["full_grid_steps"]  # as runs saved before the setting wrote it
    path.write_text(json.dumps(state))
    assert main(["train", "--resume", str(out), "--quiet", "--val-samples", "8"]) == 0
    assert json.loads(path.read_text())["spec"]["full_grid_steps"] == 0
    # Changing it on a resume changes the run's data: refused, like the other run settings.
    assert main(["train", "--resume", str(out), "--full-grids", "5", "--quiet", "--val-samples", "8"]) == 2
    assert "full_grid_steps" in capsys.readouterr().err


@pytest.mark.parametrize("init", [False, True])
def test_the_preset_starts_full_from_scratch_only(tmp_path, init):
    """small's recipe starts with full grids; a fine-tune of trained weights (--init) does not, unless asked."""
    pytest.importorskip("torch")
    out = tmp_path / "small"
    args = ["train", "--framework", "torch", "--device", "cpu", "--preset", "small", "--epochs", "1"]
    args += ["--batch-size", "2", "--train-samples", "2", "--val-samples", "2", "--quiet", "--out", str(out)]
    assert main(args + (["--init", "small"] if init else [])) == 0
    spec = json.loads((out / "train_state.json").read_text())["spec"]
    assert spec["full_grid_steps"] == (0 if init else 500)
