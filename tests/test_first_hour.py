"""What a newcomer meets first: defaults that work from any folder, nothing overwritten unasked, one-line
errors for devices that are not there, bench's outputs where it says."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from convert.config import ModelConfig
from mla_mnist.cli import main

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_MLX = importlib.util.find_spec("mlx") is not None


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert err.startswith("mla-mnist: error:") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def tiny(tmp_path):
    torch_mod = pytest.importorskip("mla_torch")
    path = tmp_path / "tiny"
    torch_mod.save(torch_mod.build(ModelConfig.preset("tiny")), path)
    return path


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_the_shipped_checkpoint_is_the_default_from_any_folder(tmp_path):
    """`eval` with no checkpoint and `mla_torch.load()` with no argument, run from a folder with no checkpoints."""
    code = "import mla_torch, sys; m = mla_torch.load(); sys.exit(0 if m.config.grid == 4 else 1)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    assert subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env).returncode == 0
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mla_mnist",
            "eval",
            "--framework",
            "torch",
            "--device",
            "cpu",
            "--samples",
            "4",
            "--json",
            "--quiet",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["checkpoint"].endswith("checkpoints/small")


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_train_refuses_to_replace_a_run_unless_forced(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "train",
        "--preset",
        "tiny",
        "--framework",
        "torch",
        "--device",
        "cpu",
        "--train-samples",
        "64",
        "--batch-size",
        "32",
        "--val-samples",
        "8",
        "--quiet",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(argv) == 2
    _one_error_line(capsys, "already exists", "--force", "--resume")
    assert (out / "model.safetensors").read_bytes() == before  # untouched
    assert main(argv + ["--force", "--seed", "1"]) == 0
    assert (out / "model.safetensors").read_bytes() != before


def test_convert_refuses_to_replace_and_odd_extensions(tiny, tmp_path, capsys):
    dst = tmp_path / "w.npz"
    assert main(["convert", str(tiny), str(dst), "--quiet"]) == 0
    stamp = dst.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["convert", str(tiny), str(dst), "--quiet"]) == 2
    _one_error_line(capsys, "already exists", "--force")
    assert dst.stat().st_mtime_ns == stamp
    assert main(["convert", str(tiny), str(dst), "--force", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["convert", str(tiny), str(tmp_path / "out.txt"), "--quiet"]) == 2
    _one_error_line(capsys, "'.txt'", "weights format")
    assert not (tmp_path / "out.txt").exists()


@pytest.mark.skipif(not HAS_MLX, reason="needs mlx")
def test_mlx_gpu_that_is_not_there_is_one_line(capsys):
    import mlx.core as mx

    if mx.is_available(mx.gpu):
        pytest.skip("this MLX has a GPU")
    assert main(["eval", "--framework", "mlx", "--device", "gpu", "--samples", "1"]) == 2
    _one_error_line(capsys, "no GPU backend", "device cpu")
    assert main(["eval", "--framework", "mlx", "--device", "tpu", "--samples", "1"]) == 2
    _one_error_line(capsys, "not an MLX device")


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_bench_writes_json_and_plot_into_a_named_folder_by_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [
        "bench",
        "--preset",
        "tiny",
        "--lengths",
        "3",
        "--repeats",
        "1",
        "--train-steps",
        "0",
        "--frameworks",
        "torch",
        "--quiet",
    ]
    assert main(argv) == 0
    folder = tmp_path / "runs" / "bench-tiny"
    result = json.loads((folder / "bench.json").read_text())
    assert result["rows"] and (folder / "bench.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(argv) == 2  # the second run asks before replacing the first one's results
    _one_error_line(capsys, "already exists", "--force")
    assert main(argv + ["--force"]) == 0


def test_every_option_has_help_and_every_command_an_example(capsys):
    from mla_mnist.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        assert command.epilog and command.epilog.startswith("example:"), name
        for action in command._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.option_strings or action.dest} has no help text"


@pytest.mark.skipif(not (HAS_TORCH and HAS_MLX), reason="needs torch and MLX")
def test_eval_readouts_show_both_frameworks_read_alike(tmp_path, capsys):
    """--readouts writes one line of digits per grid; the JSON's readout_sha256 is that file's sha256, so two
    frameworks' read-outs are compared by digest; an existing file is kept unless --force."""
    import hashlib

    digests = {}
    for fw in ("torch", "mlx"):
        out = tmp_path / f"{fw}.txt"
        assert main(["eval", "--framework", fw, "--device", "cpu", "--samples", "6", "--json", "--quiet",
                     "--readouts", str(out)]) == 0  # fmt: skip
        m = json.loads(capsys.readouterr().out)
        lines = out.read_text().splitlines()
        assert len(lines) == 6 and all(line.isdigit() for line in lines)
        assert m["readout_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
        digests[fw] = m["readout_sha256"]
    assert digests["torch"] == digests["mlx"]
    before = (tmp_path / "mlx.txt").read_bytes()
    argv = ["eval", "--framework", "torch", "--samples", "2", "--quiet", "--readouts", str(tmp_path / "mlx.txt")]
    assert main(argv) == 2
    _one_error_line(capsys, "already exists", "--force")
    assert (tmp_path / "mlx.txt").read_bytes() == before
    assert main([*argv, "--force"]) == 0
    assert len((tmp_path / "mlx.txt").read_text().splitlines()) == 2
