"""scripts/average_checkpoints.py: the element-wise mean of checkpoints that share one model config."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from convert import checkpoint
from convert.config import ModelConfig
from convert.schema import schema

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "average_checkpoints.py"
TINY = ModelConfig.preset("tiny")


def _script():
    spec = importlib.util.spec_from_file_location("average_checkpoints", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _random_checkpoint(path, cfg, seed, dtype="float32"):
    rng = np.random.default_rng(seed)
    weights = {k: rng.standard_normal(shape).astype(dtype) for k, shape in schema(cfg).items()}
    checkpoint.save(path, cfg, weights, dtype=dtype)
    return checkpoint.load(path)[1]  # as stored (float16 rounding included)


def test_average_is_the_element_wise_mean(tmp_path, capsys):
    a = _random_checkpoint(tmp_path / "a", TINY.replace(dropout=0.1), seed=0)
    b = _random_checkpoint(tmp_path / "b", TINY.replace(dropout=0.2), seed=1, dtype="float16")
    c = _random_checkpoint(tmp_path / "c", TINY.replace(dropout=0.1), seed=2)
    assert _script().main([str(tmp_path / "out"), str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")]) == 0
    assert "mean of 3 checkpoints" in capsys.readouterr().out
    config, weights, meta = checkpoint.load(tmp_path / "out")
    assert config == TINY.replace(dropout=0.1) and meta["preset"] is None  # the first source's config
    assert meta["weight_dtypes"] == ["float32"] and set(weights) == set(a)
    for k in a:
        expected = (a[k].astype(np.float64) + b[k] + c[k]) / 3
        np.testing.assert_allclose(weights[k], expected, rtol=1e-6, atol=1e-7)


def test_preset_records_the_preset_config(tmp_path):
    for name, dropout in (("a", 0.1), ("b", 0.2)):
        _random_checkpoint(tmp_path / name, TINY.replace(dropout=dropout), seed=len(name) + int(10 * dropout))
    out = tmp_path / "out"
    assert _script().main(["--preset", "tiny", str(out), str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    config, _, meta = checkpoint.load(out)
    assert config == TINY and meta["preset"] == "tiny"


@pytest.mark.parametrize(
    "other, phrase",
    [
        (TINY.replace(d_model=64, head_dim=16), "d_model 32 vs 64"),
        (TINY.replace(attention="mha"), "attention 'mla' vs 'mha'"),
    ],
)
def test_refuses_configs_that_differ_beyond_dropout(tmp_path, other, phrase):
    _random_checkpoint(tmp_path / "a", TINY, seed=0)
    _random_checkpoint(tmp_path / "b", other, seed=1)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "out"), str(tmp_path / "a"), str(tmp_path / "b")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert len(lines) == 1 and lines[0].startswith("average_checkpoints: error: "), proc.stderr
    assert phrase in lines[0] and "dropout" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary left behind


def test_refuses_one_source_a_wrong_preset_and_a_source_as_output(tmp_path, capsys):
    _random_checkpoint(tmp_path / "a", TINY, seed=0)
    _random_checkpoint(tmp_path / "b", TINY, seed=1)
    main = _script().main
    cases = [
        ([str(tmp_path / "out"), str(tmp_path / "a")], "at least two"),
        (["--preset", "small", str(tmp_path / "out"), str(tmp_path / "a"), str(tmp_path / "b")], "drop --preset"),
        ([str(tmp_path / "a"), str(tmp_path / "a"), str(tmp_path / "b")], "also a source"),
        ([str(tmp_path / "out"), str(tmp_path / "a"), str(tmp_path / "missing")], "does not exist"),
    ]
    for argv, phrase in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and phrase in err[0], err
    assert not (tmp_path / "out").exists()
