"""`train --max-steps N` then `--resume` to 2N continues exactly as an uninterrupted 2N-step run.

Dropout is on, so the saved RNG state matters: a control run resumed without it must come out different.
"""

import json
import shutil

import numpy as np
import pytest

from convert import safetensors_np
from convert.config import ModelConfig
from mla_mnist.cli import main

STEPS_PER_EPOCH, EPOCHS, STOP = 2, 3, 3  # 6 steps in all, interrupted mid-epoch after step 3


def _train(framework, tmp_path, *args):
    config = tmp_path / "tiny_dropout.json"
    if not config.exists():
        config.write_text(json.dumps({**ModelConfig.preset("tiny").to_dict(), "dropout": 0.1}))
    common = ["train", "--framework", framework, "--device", "cpu", "--val-samples", "8", "--quiet"]
    if "--resume" not in args:
        common += [
            "--config",
            str(config),
            "--epochs",
            str(EPOCHS),
            "--batch-size",
            "8",
            "--train-samples",
            str(8 * STEPS_PER_EPOCH),
            "--lr",
            "3e-3",
            "--warmup",
            "2",
        ]
    assert main(common + list(args)) == 0


def _tensors(ck):
    weights, _, _ = safetensors_np.read(ck / "model.safetensors")
    state, _, _ = safetensors_np.read(ck / "optimizer.safetensors")
    return weights, state, json.loads((ck / "train_state.json").read_text())["history"]


def _assert_same(a, b, exact):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6, err_msg=k)


def _check_resume(framework, tmp_path, exact):
    _train(framework, tmp_path, "--out", str(tmp_path / "whole"))
    part = tmp_path / "part"
    _train(framework, tmp_path, "--out", str(part), "--max-steps", str(STOP))
    control = tmp_path / "control"
    shutil.copytree(part, control)
    _train(framework, tmp_path, "--resume", str(part))

    whole_w, whole_opt, whole_hist = _tensors(tmp_path / "whole")
    part_w, part_opt, part_hist = _tensors(part)
    assert int(part_opt["step"]) == EPOCHS * STEPS_PER_EPOCH
    _assert_same(whole_w, part_w, exact)
    _assert_same(whole_opt, part_opt, exact)  # Adam moments, step and the dropout RNG state
    # Losses: validation at every epoch end, and the training loss of each window both runs average alike
    # (the record at the stop point and the one after it cover different windows).
    resumed = {r["step"]: r for r in part_hist}
    assert sorted(resumed) == [2, 3, 4, 6] and [r["step"] for r in whole_hist] == [2, 4, 6]
    for r in whole_hist:
        keys = ["lr", "val_loss", "val_exact_match", "val_digit_accuracy"] + (["train_loss"] if r["step"] != 4 else [])
        got, want = [resumed[r["step"]][k] for k in keys], [r[k] for k in keys]
        assert got == want if exact else np.allclose(got, want, rtol=1e-6, atol=1e-6), (r["step"], keys, got, want)

    # Control: the same resume without the saved RNG state draws other dropout masks.
    opt = control / "optimizer.safetensors"
    arrays, _, _ = safetensors_np.read(opt)
    safetensors_np.write(opt, {k: v for k, v in arrays.items() if not k.startswith("rng.")})
    _train(framework, tmp_path, "--resume", str(control))
    control_w, _, _ = _tensors(control)
    assert max(float(np.abs(control_w[k] - whole_w[k]).max()) for k in whole_w) > 1e-4


def test_resume_is_bit_exact_torch(tmp_path, one_thread):
    _check_resume("torch", tmp_path, exact=True)


def test_resume_matches_mlx(tmp_path):
    pytest.importorskip("mlx.core")
    _check_resume("mlx", tmp_path, exact=False)


def test_max_minutes_stops_with_a_checkpoint_that_resumes(tmp_path):
    # 0.0001 min = 6 ms: long past after 20 steps; the clock is read every 20 steps.
    out = tmp_path / "timed"
    common = ["train", "--framework", "torch", "--device", "cpu", "--preset", "tiny", "--val-samples", "8", "--quiet"]
    args = ["--epochs", "1", "--batch-size", "8", "--train-samples", str(8 * 50), "--warmup", "2"]
    assert main([*common, *args, "--out", str(out), "--max-minutes", "0.0001"]) == 0
    _, state, history = _tensors(out)
    assert int(state["step"]) == 20 and history[-1]["step"] == 20
    assert main(["train", "--resume", str(out), "--quiet", "--val-samples", "8"]) == 0
    _, state, history = _tensors(out)
    assert int(state["step"]) == 50 and [r["step"] for r in history] == [20, 50]
