"""--bf16 trains in bfloat16 in both frameworks, on the CPU too: float32 master weights and Adam moments,
a float32 loss close to the float32 run's, and a loss that goes down. Plus torch's compile option."""

import numpy as np
import pytest

from convert.config import ModelConfig
from convert.training import TrainConfig
from mnist_grid.grid import GridStream

CFG = ModelConfig.preset("tiny")
TC = TrainConfig(lr=3e-3, warmup_steps=1, total_steps=100)
STEPS = 10


@pytest.fixture(scope="module")
def batches():
    stream = GridStream("train", CFG.grid, seed=0)
    return [stream.batch(0, i, 16) for i in range(STEPS)]


def _torch(bf16, **kw):
    torch = pytest.importorskip("torch")
    from mla_torch import checkpoint
    from mla_torch.train import Trainer

    trainer = Trainer(checkpoint.build(CFG), TC, "cpu", bf16=bf16, **kw)
    return (
        trainer,
        lambda: [p for _, p in trainer.model.named_parameters()],
        lambda: [t for s in trainer.opt.state.values() for t in (s["exp_avg"], s["exp_avg_sq"])],
        torch.float32,
    )


def _mlx(bf16):
    mx = pytest.importorskip("mlx.core")
    from mlx.utils import tree_flatten

    from mla_mlx import checkpoint
    from mla_mlx.train import Trainer

    trainer = Trainer(checkpoint.build(CFG), TC, bf16=bf16)
    return (
        trainer,
        lambda: [p for _, p in tree_flatten(trainer.model.parameters())],
        lambda: [v for k, v in tree_flatten(trainer.opt.state) if k.endswith((".m", ".v"))],
        mx.float32,
    )


@pytest.mark.parametrize("make", [_torch, _mlx], ids=["torch", "mlx"])
def test_bf16_trains_with_float32_master_weights(make, batches):
    fp32, *_ = make(False)
    fp32_loss = float(fp32.step(*batches[0])[0])
    trainer, params, moments, f32 = make(True)
    losses = [trainer.step(x, y)[0] for x, y in batches]
    assert all(loss.dtype == f32 for loss in losses)
    losses = [float(loss) for loss in losses]
    assert losses[0] == pytest.approx(fp32_loss, rel=0.03)  # the same weights, computed in bf16
    assert np.mean(losses[-3:]) < 0.9 * losses[0], losses
    assert {p.dtype for p in params()} == {f32}
    assert moments() and {m.dtype for m in moments()} == {f32}
    assert trainer.eval_loss(*batches[0]) == pytest.approx(losses[-1], rel=0.3)


def test_torch_bf16_really_runs_in_bf16(batches):
    """On the CPU the forward's matmuls are bf16 (no silent float32 fallback); the loss is float32."""
    torch = pytest.importorskip("torch")
    trainer, *_ = _torch(True)
    seen = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(o.dtype) if isinstance(m, torch.nn.Linear) else None
    )
    try:
        trainer.step(*batches[0])
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16}


def test_torch_compile_keeps_state_names(batches, monkeypatch):
    """compile=True compiles each encoder and decoder layer in place: checkpoint and optimizer names stay those
    of the module, and evaluation (no_grad, other shapes) runs eager rather than compiling more graphs.
    Traced by dynamo and AOT autograd but not code-generated here: see the inductor test below."""
    torch = pytest.importorskip("torch")
    compile_ = torch.compile
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn: compiled.append(fn) or compile_(fn, backend="aot_eager"))
    plain, *_ = _torch(False)
    trainer, *_ = _torch(False, compile=True)
    assert trainer.net is trainer.model and len(compiled) == CFG.enc_layers + CFG.dec_layers
    assert list(trainer.model.state_dict()) == list(plain.model.state_dict())
    for x, y in batches[:2]:
        a, b = plain.step(x, y), trainer.step(x, y)
        assert float(b[0]) == pytest.approx(float(a[0]), rel=1e-4)
    assert trainer.state().keys() == plain.state().keys()
    torch._dynamo.utils.counters.clear()
    with trainer.averaged():
        assert trainer.eval_loss(*batches[2]) == pytest.approx(plain.eval_loss(*batches[2]), rel=1e-4)
    assert not torch._dynamo.utils.counters["frames"]["total"]  # nothing traced for evaluation


def test_torch_compile_of_the_whole_model_keeps_state_names(batches, monkeypatch):
    """compile="model" (one graph for the whole training forward, to compare with the per-layer default) wraps
    the forward only: names and losses stay; an unknown mode is refused."""
    torch = pytest.importorskip("torch")
    compile_ = torch.compile
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn: compiled.append(fn) or compile_(fn, backend="aot_eager"))
    plain, *_ = _torch(False)
    trainer, *_ = _torch(False, compile="model")
    assert len(compiled) == 1 and trainer.net is not trainer.model
    assert list(trainer.model.state_dict()) == list(plain.model.state_dict())
    x, y = batches[0]
    assert float(trainer.step(x, y)[0]) == pytest.approx(float(plain.step(x, y)[0]), rel=1e-4)
    with pytest.raises(ValueError, match="compile must be"):
        _torch(False, compile="everything")


@pytest.mark.slow
def test_torch_compile_with_inductor(batches):
    """The default backend, code-generated on the CPU (needs a C compiler): the tiny model still trains."""
    pytest.importorskip("torch")
    import shutil

    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("inductor needs a C compiler")
    plain, *_ = _torch(False)
    trainer, *_ = _torch(False, compile=True)
    assert list(trainer.model.state_dict()) == list(plain.model.state_dict())
    losses = [float(trainer.step(x, y)[0]) for x, y in batches[:4]]
    want = [float(plain.step(x, y)[0]) for x, y in batches[:4]]
    np.testing.assert_allclose(losses, want, rtol=1e-3)


def test_train_step_variants_script_times_every_combination(tmp_path, capsys):
    """scripts/train_step_ab.py: one row per compile mode x dropout x weight average, each with a rate."""
    pytest.importorskip("torch")
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_step_ab.py"
    spec = importlib.util.spec_from_file_location("train_step_ab", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "ab.json"
    argv = ["--preset", "tiny", "--batch-size", "4", "--device", "cpu", "--compile", "off", "--dropout", "0,0.1"]
    script.main([*argv, "--ema", "0,0.999", "--steps", "1", "--rounds", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {(r["dropout"], r["ema"]) for r in rows} == {(0.0, 0.0), (0.0, 0.999), (0.1, 0.0), (0.1, 0.999)}
    assert all(r["samples_per_s"] > 0 for r in rows) and "| off | 0.1 | 0.999 |" in capsys.readouterr().out
