"""The layout the project promises: one backend per framework with one surface, attention variants declared in
one place, presets declared in one place, and an application layer that never names a framework."""

import importlib.util
import inspect
import json
import re
from pathlib import Path

import pytest

from convert.config import ModelConfig
from convert.schema import ATTENTION

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = [fw for fw in ("torch", "mlx") if importlib.util.find_spec(fw)]


def _public(cls):
    return {
        name: inspect.signature(member) if callable(member) else type(member).__name__
        for name, member in vars(cls).items()
        if not name.startswith("_") and name != "name"
    }


def test_the_two_backends_expose_the_same_names_and_signatures():
    pytest.importorskip("torch")
    pytest.importorskip("mlx")
    from mla_mlx.backend import Backend as MLXBackend
    from mla_torch.backend import Backend as TorchBackend

    torch_api, mlx_api = _public(TorchBackend), _public(MLXBackend)
    assert set(torch_api) == set(mlx_api), set(torch_api) ^ set(mlx_api)
    for name in torch_api:
        assert str(torch_api[name]) == str(mlx_api[name]), name
    assert inspect.signature(TorchBackend.__init__) == inspect.signature(MLXBackend.__init__)
    assert (TorchBackend.name, MLXBackend.name) == ("torch", "mlx")


def test_the_application_layer_reaches_a_framework_only_through_the_backend_lookup():
    """No `import torch`/`import mlx`, no framework-name test, no module looked up by a framework's name."""
    offenders = []
    for path in sorted((ROOT / "mla_mnist").rglob("*.py")):
        if path.name == "backends.py":  # the one lookup
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if (
                re.search(r"^\s*(import|from)\s+(torch|mlx|mla_torch|mla_mlx)\b", code)
                or re.search(r"==\s*[\"'](torch|mlx)[\"']|[\"'](torch|mlx)[\"']\s*==", code)
                or re.search(r"import_module\(", code)
                or "Device(cpu" in code
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_every_attention_variant_builds_with_the_schema_names(framework):
    from mla_mnist.backends import get_backend

    backend = get_backend(framework, "cpu")
    from convert.schema import schema

    for attention in ATTENTION:
        cfg = ModelConfig.preset("tiny", attention=attention)
        weights = backend.weights(backend.build(cfg))
        assert {k: tuple(v.shape) for k, v in weights.items()} == schema(cfg)


def test_gqa_config_rules():
    cfg = ModelConfig.preset("tiny", attention="gqa")
    assert cfg.kv_heads == 1 and ModelConfig.preset("tiny", attention="gqa", kv_heads=2).kv_heads == 2
    from convert.errors import UserError

    with pytest.raises(UserError, match="dividing heads"):
        ModelConfig.preset("tiny", attention="gqa", kv_heads=3)
    with pytest.raises(UserError, match="gqa setting"):
        ModelConfig.preset("tiny", kv_heads=2)  # never accepted and ignored


def test_a_preset_added_in_one_place_trains_and_evaluates_through_the_cli(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    from convert import presets
    from mla_mnist.cli import main

    monkeypatch.setitem(
        presets.PRESETS,
        "wee",
        presets.Preset(
            "a test preset: tiny's model with grouped-query attention",
            dict(presets.PRESETS["tiny"].model, attention="gqa", kv_heads=2),
            epochs=1,
            batch_size=16,
            lr=3e-3,
            train_samples=160,
            warmup=2,
        ),
    )
    out = tmp_path / "wee"
    assert (
        main(
            [
                "train",
                "--preset",
                "wee",
                "--framework",
                "torch",
                "--device",
                "cpu",
                "--val-samples",
                "16",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    from convert import checkpoint

    cfg, meta = checkpoint.read_config(out)
    assert meta["preset"] == "wee" and cfg.attention == "gqa" and cfg.kv_heads == 2
    capsys.readouterr()
    assert main(["eval", str(out), "--framework", "torch", "--device", "cpu", "--samples", "8", "--json"]) == 0
    read = json.loads(capsys.readouterr().out)
    assert "exact_match" in read and read["dtype"] == "float32"  # --dtype auto: float32 on a CPU
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "wee" in capsys.readouterr().out  # the choices and the help text come from the record
