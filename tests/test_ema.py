"""The weight average (`--ema`): its arithmetic in both trainers, their agreement, what the checkpoint holds, and
an exact resume."""

import dataclasses
import importlib
import json
import shutil

import numpy as np
import pytest

from convert import safetensors_np
from convert.config import ModelConfig
from convert.training import TrainConfig
from mla_mnist.cli import main
from mnist_grid.grid import GridStream

CFG = ModelConfig.preset("tiny")
TC = TrainConfig(lr=3e-3, warmup_steps=2, total_steps=8, ema=0.9)
STEPS = 5


@pytest.fixture(scope="module")
def batches():
    stream = GridStream("train", CFG.grid, seed=0)
    return [stream.batch(0, i, 8) for i in range(STEPS)]


def _trainer(framework, weights=None, tc=TC):
    """A Trainer of the tiny model (seed 1, or these weights) in `framework`, and a reader of its weights."""
    pytest.importorskip({"torch": "torch", "mlx": "mlx.core"}[framework])
    checkpoint = importlib.import_module(f"mla_{framework}.checkpoint")
    trainer = importlib.import_module(f"mla_{framework}.train").Trainer

    model = checkpoint.build(CFG, seed=1)
    if weights is not None:
        checkpoint.from_numpy(model, weights)
    return trainer(model, tc), lambda: checkpoint.to_numpy(model)


def _copy(weights):
    return {k: np.array(v, copy=True) for k, v in weights.items()}


@pytest.mark.parametrize("framework", ["torch", "mlx"])
def test_average_follows_the_reference(framework, batches):
    """ema <- ema + w_t (weights after step t - ema), from the weights the first step started from."""
    trainer, weights = _trainer(framework)
    ref = {k: v.astype(np.float32) for k, v in _copy(weights()).items()}
    for t, (x, y) in enumerate(batches):
        trainer.step(x, y)
        w = np.float32(TC.ema_weight(t))
        ref = {k: e + w * (weights()[k] - e) for k, e in ref.items()}
    state = trainer.state()
    raw = _copy(weights())
    for k in ref:
        np.testing.assert_allclose(state[f"ema.{k}"], ref[k], rtol=1e-6, atol=1e-7, err_msg=k)
        np.testing.assert_array_equal(state[f"raw.{k}"], raw[k], err_msg=k)
    with trainer.averaged():
        inside = _copy(weights())
        assert trainer.state()[f"raw.{k}"].tobytes() == raw[k].tobytes()  # the raw weights, even in here
    for k in ref:
        np.testing.assert_array_equal(inside[k], state[f"ema.{k}"], err_msg=k)
        np.testing.assert_array_equal(weights()[k], raw[k], err_msg=k)  # put back
    assert max(float(np.abs(inside[k] - raw[k]).max()) for k in raw) > 1e-4  # the average is not the weights


def test_torch_and_mlx_averages_agree(batches):
    # AdamW's first steps move a weight by ~lr * g / (|g| + eps): where g is ~1e-9, the frameworks' rounding
    # decides a whole 3e-3 step (seen: one q_a_proj element, 1.8e-4 apart in the raw weights as in the average).
    # An eps of 1e-6 keeps such gradients from deciding anything; every other element agrees to ~6e-6.
    tc = dataclasses.replace(TC, eps=1e-6)
    t, t_weights = _trainer("torch", tc=tc)
    m, _ = _trainer("mlx", t_weights(), tc=tc)
    for x, y in batches:
        t.step(x, y)
        m.step(x, y)
    ts, ms = t.state(), m.state()
    keys = [k for k in ts if k.startswith(("ema.", "raw."))]
    assert keys and set(keys) == {k for k in ms if k.startswith(("ema.", "raw."))}
    for k in keys:
        np.testing.assert_allclose(ms[k], ts[k], rtol=0, atol=1e-4, err_msg=k)


def test_off_keeps_no_average(batches):
    from mla_torch import checkpoint
    from mla_torch.train import Trainer

    trainer = Trainer(checkpoint.build(CFG), TrainConfig(lr=3e-3, total_steps=8))
    trainer.step(*batches[0])
    before = checkpoint.to_numpy(trainer.model)
    with trainer.averaged():
        assert all(np.array_equal(v, before[k]) for k, v in checkpoint.to_numpy(trainer.model).items())
    assert not any(k.startswith(("ema.", "raw.")) for k in trainer.state())


# ---- through the CLI: the checkpoint, and --resume ----------------------------------------------------
STEPS_PER_EPOCH, EPOCHS, STOP = 2, 3, 3


def _train(framework, tmp_path, *args):
    config = tmp_path / "tiny_dropout.json"
    if not config.exists():
        config.write_text(json.dumps({**CFG.to_dict(), "dropout": 0.1}))
    common = ["train", "--framework", framework, "--device", "cpu", "--val-samples", "8", "--quiet"]
    if "--resume" not in args:
        common += ["--config", str(config), "--epochs", str(EPOCHS), "--batch-size", "8"]
        common += ["--train-samples", str(8 * STEPS_PER_EPOCH), "--lr", "3e-3", "--warmup", "2", "--ema", "0.9"]
    assert main(common + list(args)) == 0


def _read(ck):
    weights, _, _ = safetensors_np.read(ck / "model.safetensors")
    best, _, _ = safetensors_np.read(ck / "best.safetensors")
    state, _, _ = safetensors_np.read(ck / "optimizer.safetensors")
    return weights, best, state


def _same(a, b, exact):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("framework,exact", [("torch", True), ("mlx", False)])
def test_checkpoint_holds_the_average_and_resumes_exactly(framework, exact, tmp_path, one_thread):
    pytest.importorskip({"torch": "torch", "mlx": "mlx.core"}[framework])
    _train(framework, tmp_path, "--out", str(tmp_path / "whole"))
    weights, best, state = _read(tmp_path / "whole")
    assert set(state) >= {f"{p}.{k}" for k in weights for p in ("ema", "raw")}
    for k in weights:  # what eval and predict load is the average; the raw weights stay for a resume
        np.testing.assert_array_equal(weights[k], state[f"ema.{k}"], err_msg=k)
    assert max(float(np.abs(weights[k] - state[f"raw.{k}"]).max()) for k in weights) > 1e-4
    record = json.loads((tmp_path / "whole" / "train_state.json").read_text())
    assert record["spec"]["train"]["ema"] == 0.9
    assert best.keys() == weights.keys()  # best is picked on the average's validation, and is the average

    part = tmp_path / "part"
    _train(framework, tmp_path, "--out", str(part), "--max-steps", str(STOP))
    shutil.rmtree(part / "best.safetensors", ignore_errors=True)
    _train(framework, tmp_path, "--resume", str(part))
    p_weights, _, p_state = _read(part)
    assert int(p_state["step"]) == EPOCHS * STEPS_PER_EPOCH
    _same(weights, p_weights, exact)
    _same(state, p_state, exact)
    whole = {r["step"]: r["val_loss"] for r in record["history"]}
    resumed = {r["step"]: r["val_loss"] for r in json.loads((part / "train_state.json").read_text())["history"]}
    for step, loss in whole.items():
        assert resumed[step] == loss if exact else resumed[step] == pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize("value", ["1", "1.5", "-0.1", "nan"])
def test_ema_out_of_range_is_one_line(value, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--framework", "torch", "--device", "cpu", "--preset", "tiny", "--ema", value]
    rc = main(argv + ["--out", str(tmp_path / "ck"), "--quiet"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("mla-mnist: error: "), lines
    assert "--ema" in lines[0] or "ema" in lines[0], lines
    assert not (tmp_path / "ck").exists()
