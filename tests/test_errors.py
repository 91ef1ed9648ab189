"""Bad input: one line `mla-mnist: error: <problem> ... <fix>`, exit code 2, no traceback, nothing left behind.

Most cases run in-process through `mla_mnist.cli.main` (fast); a few run `python -m mla_mnist` to prove the
real exit status and stderr, and what a closed pipe does.
"""

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convert import checkpoint, safetensors_np
from convert.config import ModelConfig
from convert.errors import UserError
from mla_mnist.cli import main
from mnist_grid import mnist

ROOT = Path(__file__).resolve().parents[1]
TORCH = ["--framework", "torch", "--device", "cpu"]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}  # hidden temp files included


def _fails_cleanly(argv, capsys, root: Path, phrase: str):
    """Run the CLI in-process; it must exit 2 with one line naming the problem and create no file."""
    before = _tree(root)
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, (rc, out, err)
    assert len(lines) == 1 and lines[0].startswith("mla-mnist: error: "), err
    assert phrase in lines[0], err
    assert _tree(root) == before, f"left behind: {_tree(root) - before}"
    return lines[0]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a stray relative output (e.g. runs/) would show up in the snapshot


@pytest.fixture(scope="module")
def run_ck(tmp_path_factory):
    """A one-step torch training run: config, weights, best weights, optimizer and train state."""
    torch = pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("run") / "ck"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core machine more threads only wait on each other
    try:
        assert (
            main(
                [
                    "train",
                    *TORCH,
                    "--preset",
                    "tiny",
                    "--batch-size",
                    "4",
                    "--train-samples",
                    "8",
                    "--max-steps",
                    "1",
                    "--val-samples",
                    "4",
                    "--quiet",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture
def ck(run_ck, tmp_path):
    return Path(shutil.copytree(run_ck, tmp_path / "ck"))


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "grid.png"
    Image.new("L", (56, 56)).save(path)
    return path


# ---- damaged checkpoints: every command that reads one -----------------------------------------------


def _edit_weights(edit):
    def damage(ck, tmp):
        weights, _, _ = safetensors_np.read(ck / "model.safetensors")
        edit(weights)
        safetensors_np.write(ck / "model.safetensors", weights)
        return ck

    return damage


def _edit_config(edit):
    def damage(ck, tmp):
        meta = json.loads((ck / "config.json").read_text())
        edit(meta)
        (ck / "config.json").write_text(json.dumps(meta))
        return ck

    return damage


def _rewrite(name, content):
    def damage(ck, tmp):
        data = (ck / name).read_bytes()
        (ck / name).write_bytes(content(data))
        return ck

    return damage


def _bare_file(kind):
    def damage(ck, tmp):
        weights, _, _ = safetensors_np.read(ck / "model.safetensors")
        path = tmp / f"weights.{kind}"
        if kind == "npz":
            np.savez(path, **weights)
        elif kind == "pt":
            import torch

            torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, path)
        else:
            shutil.copy(ck / "model.safetensors", path)
        return path

    return damage


def _remove(name):
    def damage(ck, tmp):
        (ck / name).unlink()
        return ck

    return damage


def _empty_folder(ck, tmp):
    path = tmp / "empty"
    path.mkdir()
    return path


def _set(key, value):
    return lambda w: w.__setitem__(key, value)


def _poison(value):
    def edit(w):
        w["encoder.0.mlp.fc1.weight"][0, 0] = value

    return edit


DAMAGE = {
    "missing path": (lambda ck, tmp: tmp / "no_such_checkpoint", "does not exist"),
    "empty folder": (_empty_folder, "has no config.json"),
    "folder without config.json": (_remove("config.json"), "has no config.json"),
    "folder without weights": (_remove("model.safetensors"), "has no model.safetensors"),
    "truncated weights": (_rewrite("model.safetensors", lambda d: d[: len(d) // 2]), "truncated or corrupt"),
    "empty weights file": (_rewrite("model.safetensors", lambda d: b""), "truncated or corrupt"),
    "garbage header": (_rewrite("model.safetensors", lambda d: d[:8] + b"\xff" * 64 + d[72:]), "header is not JSON"),
    "wrong shape": (_edit_weights(_set("head.bias", np.zeros(5, np.float32))), "wrong shape 1: head.bias"),
    "missing tensor": (_edit_weights(lambda w: w.pop("head.bias")), "missing 1: head.bias"),
    "extra tensor": (_edit_weights(_set("head.extra", np.zeros(3, np.float32))), "unexpected 1: head.extra"),
    "integer weights": (_edit_weights(_set("head.bias", np.zeros(13, np.int32))), "must be floating point"),
    "NaN weights": (_edit_weights(_poison(np.nan)), "contain NaN or Inf"),
    "Inf weights": (_edit_weights(_poison(np.inf)), "contain NaN or Inf"),
    "config of another model": (_edit_config(lambda m: m["model"].update(dec_layers=3)), "do not match the config"),
    "config with unknown field": (_edit_config(lambda m: m["model"].update(depth=9)), "unknown config field(s) depth"),
    "config out of range": (_edit_config(lambda m: m["model"].update(grid=0)), "grid must be a positive integer"),
    "config not JSON": (_rewrite("config.json", lambda d: d[:-20]), "is not valid JSON"),
    "config of a future format": (_edit_config(lambda m: m.update(format_version=99)), "checkpoint format 99"),
    "bare .npz": (_bare_file("npz"), "mla-mnist convert"),
    "bare .pt": (_bare_file("pt"), "mla-mnist convert"),
    "bare .safetensors": (_bare_file("safetensors"), "mla-mnist convert"),
}
# What every command that takes a checkpoint must handle; eval also gets the whole table.
EVERY_COMMAND = [
    "missing path",
    "folder without config.json",
    "truncated weights",
    "NaN weights",
    "bare .npz",
    "bare .pt",
    "wrong shape",
]


def _command(name, path, image, tmp):
    out = ["--out", tmp / "out", "--val-samples", "4", "--quiet"]
    return {
        "eval": ["eval", path, *TORCH, "--samples", "4"],
        "predict": ["predict", image, "--checkpoint", path, *TORCH],
        "train --resume": ["train", *TORCH, "--resume", path, *out],
        "train --init": ["train", *TORCH, "--preset", "tiny", "--init", path, *out],
    }[name]


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_checkpoint_eval(damage, ck, image, tmp_path, capsys):
    make, phrase = DAMAGE[damage]
    path = make(ck, tmp_path)
    _fails_cleanly(_command("eval", path, image, tmp_path), capsys, tmp_path, phrase)


@pytest.mark.parametrize("command", ["predict", "train --resume", "train --init"])
@pytest.mark.parametrize("damage", EVERY_COMMAND)
def test_damaged_checkpoint_other_commands(command, damage, ck, image, tmp_path, capsys):
    make, phrase = DAMAGE[damage]
    path = make(ck, tmp_path)
    _fails_cleanly(_command(command, path, image, tmp_path), capsys, tmp_path, phrase)


def test_eval_best_weights_missing(ck, tmp_path, capsys):
    (ck / "best.safetensors").unlink()
    _fails_cleanly(["eval", ck, *TORCH, "--weights", "best"], capsys, tmp_path, "has no best.safetensors")


@pytest.mark.parametrize("loader", ["checkpoint.load", "mla_torch.load", "safetensors_np.read"])
def test_public_loaders_raise_user_error(loader, ck, tmp_path):
    _rewrite("model.safetensors", lambda d: d[:100])(ck, tmp_path)
    call = {
        "checkpoint.load": lambda: checkpoint.load(ck),
        "mla_torch.load": lambda: pytest.importorskip("mla_torch").load(ck),
        "safetensors_np.read": lambda: safetensors_np.read(ck / "model.safetensors"),
    }[loader]
    with pytest.raises(UserError, match="truncated or corrupt"):
        call()


# ---- train: presets, config files, numbers, output paths, resume ------------------------------------


def _train_case(tmp, *extra):
    return [
        "train",
        *TORCH,
        "--train-samples",
        "8",
        "--batch-size",
        "4",
        "--val-samples",
        "4",
        "--max-steps",
        "1",
        "--quiet",
        "--out",
        tmp / "out",
        *extra,
    ]


def _config_file(tmp, text):
    path = tmp / "model.json"
    path.write_text(text)
    return path


TRAIN_CASES = {
    "unknown preset": (lambda t: ["--preset", "huge"], "invalid choice: 'huge' (choose from 'tiny', 'small', 'seed')"),
    "unknown config field": (
        lambda t: ["--config", _config_file(t, '{"grid": 2, "colour": 1}')],
        "unknown config field(s) colour",
    ),
    "config not JSON": (lambda t: ["--config", _config_file(t, '{"grid": 2,')], "is not valid JSON"),
    "config not an object": (lambda t: ["--config", _config_file(t, "[2, 14]")], "must be a JSON object"),
    "config missing": (lambda t: ["--config", t / "nope.json"], "cannot read --config"),
    "config grid 0": (lambda t: ["--config", _config_file(t, '{"grid": 0}')], "grid must be a positive integer"),
    "config dropout 1": (
        lambda t: ["--config", _config_file(t, '{"grid": 2, "dropout": 1.0}')],
        "dropout must be in [0, 1)",
    ),
    "preset and config": (lambda t: ["--preset", "tiny", "--config", _config_file(t, "{}")], "not both"),
    "epochs 0": (lambda t: ["--preset", "tiny", "--epochs", "0"], "--epochs: must be > 0"),
    "epochs negative": (lambda t: ["--preset", "tiny", "--epochs", "-2"], "--epochs: must be > 0"),
    "epochs not a number": (lambda t: ["--preset", "tiny", "--epochs", "two"], "expected a positive integer"),
    "batch 0": (lambda t: ["--preset", "tiny", "--batch-size", "0"], "--batch-size: must be > 0"),
    "lr negative": (lambda t: ["--preset", "tiny", "--lr", "-0.001"], "--lr: must be a finite number > 0"),
    "lr NaN": (lambda t: ["--preset", "tiny", "--lr", "nan"], "--lr: must be a finite number > 0"),
    "warmup negative": (lambda t: ["--preset", "tiny", "--warmup", "-1"], "--warmup: expected an integer >= 0"),
    "label smoothing 1": (lambda t: ["--preset", "tiny", "--label-smoothing", "1"], "label smoothing must be in"),
    "fewer samples than a batch": (lambda t: ["--preset", "tiny", "--train-samples", "2"], "less than one batch"),
    "unknown device": (lambda t: ["--preset", "tiny", "--device", "tpu"], "not a torch device"),
    "unknown framework": (lambda t: ["--preset", "tiny", "--framework", "jax"], "invalid choice: 'jax'"),
    "out under a file": (
        lambda t: ["--preset", "tiny", "--out", _config_file(t, "{}") / "ck"],
        "is a file, not a directory",
    ),
    "out is a file": (lambda t: ["--preset", "tiny", "--out", _config_file(t, "{}")], "exists and is not a directory"),
    "out is someone's folder": (
        lambda t: ["--preset", "tiny", "--out", Path(_config_file(t, "{}")).parent],
        "not a checkpoint and is not empty",
    ),
}


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_bad_arguments(case, tmp_path, capsys):
    extra, phrase = TRAIN_CASES[case]
    _fails_cleanly(_train_case(tmp_path, *extra(tmp_path)), capsys, tmp_path, phrase)


def _resume_damage(name, ck, tmp):
    if name == "corrupt train state":
        (ck / "train_state.json").write_text('{"step": 1, "spec": ')
    elif name == "train state not a run":
        (ck / "train_state.json").write_text("[]")
    elif name == "truncated optimizer":
        (ck / "optimizer.safetensors").write_bytes((ck / "optimizer.safetensors").read_bytes()[:300])
    elif name == "optimizer of another model":
        arrays, _, _ = safetensors_np.read(ck / "optimizer.safetensors")
        arrays["m.head.bias"] = np.zeros(7, np.float32)
        safetensors_np.write(ck / "optimizer.safetensors", arrays)
    elif name == "no train state":
        (ck / "train_state.json").unlink()
    return ck


RESUME_CASES = {
    "other preset": ([], ["--preset", "small"], "model config differs"),
    "other config": ([], ["--config", "dropout.json"], "model config differs"),
    "other batch size": ([], ["--batch-size", "8"], "batch_size differ from the interrupted run's"),
    "other seed and samples": ([], ["--seed", "3", "--train-samples", "16"], "train_samples, seed differ"),
    "with --init": ([], ["--init", "CK"], "not both"),
    "no train state": (["no train state"], [], "it can be evaluated, not resumed"),
    "corrupt train state": (["corrupt train state"], [], "train_state.json is corrupt"),
    "train state not a run": (["train state not a run"], [], "train_state.json is corrupt"),
    "truncated optimizer": (["truncated optimizer"], [], "truncated or corrupt"),
    "optimizer of another model": (["optimizer of another model"], [], "m.head.bias"),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_refuses(case, ck, tmp_path, capsys):
    damages, extra, phrase = RESUME_CASES[case]
    for name in damages:
        _resume_damage(name, ck, tmp_path)
    (tmp_path / "dropout.json").write_text(json.dumps({**ModelConfig.preset("tiny").to_dict(), "dropout": 0.2}))
    extra = [str(ck) if a == "CK" else str(tmp_path / a) if a.endswith(".json") else a for a in extra]
    _fails_cleanly(["train", *TORCH, "--resume", ck, "--val-samples", "4", "--quiet", *extra], capsys, tmp_path, phrase)


# ---- MNIST files, make-grid, predict, eval numbers, convert, the parser ------------------------------


def _mnist_copy(tmp, damage):
    """A copy of the test split's two files, one of them damaged."""
    d = tmp / "mnist"
    d.mkdir()
    shutil.copy(mnist._find(mnist.resolve_data_dir(), mnist.TEST_IMAGES), d)
    labels = bytearray(mnist._read(mnist._find(mnist.resolve_data_dir(), mnist.TEST_LABELS)))
    if damage == "checksum":
        labels[500] = (labels[500] + 1) % 10  # still a valid label: only the md5 can tell
    elif damage == "header":
        labels[:4] = b"\x00\x00\x08\x03"
    elif damage == "truncated":
        labels = labels[:-7]
    (d / (mnist.TEST_LABELS + ".gz")).write_bytes(gzip.compress(bytes(labels)))
    return d


MNIST_CASES = {"checksum": "checksum mismatch", "header": "wrong IDX header", "truncated": "wrong IDX header"}


@pytest.mark.parametrize("damage", MNIST_CASES)
@pytest.mark.parametrize("command", ["make-grid", "eval"])
def test_damaged_mnist(command, damage, run_ck, tmp_path, capsys):
    data = _mnist_copy(tmp_path, damage)
    argv = {"make-grid": ["make-grid", tmp_path / "g.png"], "eval": ["eval", run_ck, *TORCH, "--samples", "4"]}[command]
    msg = _fails_cleanly(argv + ["--data-dir", data], capsys, tmp_path, MNIST_CASES[damage])
    assert "re-download" in msg


def test_mnist_missing_offline(tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(mnist.urllib.request, "urlopen", offline)
    (tmp_path / "empty").mkdir()
    msg = _fails_cleanly(
        ["make-grid", tmp_path / "g.png", "--data-dir", tmp_path / "empty"], capsys, tmp_path, "MNIST files missing"
    )
    assert "--data-dir" in msg and "MLA_MNIST_DIR" in msg


MAKE_GRID_CASES = {
    "grid 0": (["--grid", "0"], "--grid: must be > 0"),
    "grid negative": (["--grid", "-1"], "--grid: must be > 0"),
    "digits 0": (["--digits", "0"], "--digits: must be > 0"),
    "too many digits": (["--grid", "2", "--digits", "5"], "does not fit a 2x2 grid"),
    "unknown split": (["--split", "dev"], "invalid choice: 'dev'"),
    "seed negative": (["--seed", "-4"], "expected an integer >= 0"),
}


@pytest.mark.parametrize("case", MAKE_GRID_CASES)
def test_make_grid_bad_arguments(case, tmp_path, capsys):
    extra, phrase = MAKE_GRID_CASES[case]
    _fails_cleanly(["make-grid", tmp_path / "g.png", *extra], capsys, tmp_path, phrase)


@pytest.mark.parametrize("where", ["under a file", "in a missing folder"])
def test_make_grid_unwritable_output(where, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = tmp_path / ("file" if where == "under a file" else "missing") / "g.png"
    _fails_cleanly(["make-grid", out, "--grid", "2"], capsys, tmp_path, "choose a writable location")


def _bad_image(kind, tmp):
    path = tmp / f"{kind.replace(' ', '_')}.png"
    if kind == "text file":
        path.write_text("3 1 4 1 5\n")
    elif kind == "empty file":
        path.write_bytes(b"")
    elif kind == "truncated PNG":
        Image.new("L", (56, 56), 128).save(path)
        path.write_bytes(path.read_bytes()[:50])
    elif kind == "too small":
        Image.new("L", (5, 40)).save(path)
    elif kind == "folder":
        path.mkdir()
    return path


IMAGE_CASES = {
    "text file": "not a readable PNG/JPEG image",
    "empty file": "not a readable PNG/JPEG image",
    "truncated PNG": "not a readable PNG/JPEG image",
    "too small": "too small (5x40 px)",
    "missing": "does not exist",
    "folder": "is not a file",
}


@pytest.mark.parametrize("kind", IMAGE_CASES)
def test_predict_bad_image(kind, run_ck, image, tmp_path, capsys):
    bad = _bad_image(kind, tmp_path)
    # The good image first: one bad file among several still fails the command as a whole.
    _fails_cleanly(["predict", image, bad, "--checkpoint", run_ck, *TORCH], capsys, tmp_path, IMAGE_CASES[kind])


NUMBER_CASES = {
    "eval samples 0": (["eval", "CK", "--samples", "0"], "--samples: must be > 0"),
    "eval batch 0": (["eval", "CK", "--batch-size", "0"], "--batch-size: must be > 0"),
    "eval unknown dtype": (["eval", "CK", "--dtype", "int8"], "invalid choice: 'int8'"),
    "bench length 0": (["bench", "--lengths", "0,5", "--json", "bench.json"], "every length must be >= 2"),
    "no command": ([], "the following arguments are required: command"),
    "unknown command": (["fit"], "invalid choice: 'fit'"),
    "unknown option": (["eval", "CK", "--fast"], "unrecognized arguments: --fast"),
}


@pytest.mark.parametrize("case", NUMBER_CASES)
def test_parser_errors(case, run_ck, tmp_path, capsys):
    argv, phrase = NUMBER_CASES[case]
    _fails_cleanly([run_ck if a == "CK" else a for a in argv], capsys, tmp_path, phrase)


@pytest.mark.parametrize("framework", ["mla_torch", "mla_mlx"])
def test_generate_rejects_bad_sampling_settings(framework, run_ck):
    """The Python API checks its numbers too (the CLI decodes greedily and to full length only)."""
    fw = pytest.importorskip(framework)
    model = fw.load(run_ck)
    images = np.zeros((1, 56, 56), np.float32)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        fw.generate(model, images, temperature=-0.5)
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        fw.generate(model, images, max_length=1)


def test_convert_refuses_a_pickle_that_runs_code(tmp_path, capsys):
    """A .pt whose unpickling would run a command: refused (weights_only), the command never runs."""
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"head.weight": Payload()}, tmp_path / "evil.pt")
    _fails_cleanly(
        ["convert", tmp_path / "evil.pt", tmp_path / "out", "--preset", "tiny"], capsys, tmp_path, "refused to load"
    )
    assert not marker.exists()


def test_convert_missing_source(tmp_path, capsys):
    _fails_cleanly(["convert", tmp_path / "nope.pt", tmp_path / "out"], capsys, tmp_path, "does not exist")


# ---- real processes: exit status, stderr, --debug, closed pipes ---------------------------------------


def _run(args, tmp, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.update(kwargs.pop("env", {}))
    return subprocess.run(
        [sys.executable, "-m", "mla_mnist", *map(str, args)],
        cwd=tmp,
        env=env,
        text=True,
        capture_output=True,
        timeout=120,
        **kwargs,
    )


@pytest.mark.parametrize("case", ["truncated weights", "config not JSON", "bad MNIST"])
def test_real_process_exit_status(case, ck, tmp_path):
    if case == "truncated weights":
        _rewrite("model.safetensors", lambda d: d[:1000])(ck, tmp_path)
        args, phrase = ["eval", ck, *TORCH], "truncated or corrupt"
    elif case == "config not JSON":
        args, phrase = ["train", *TORCH, "--config", _config_file(tmp_path, "{oops")], "is not valid JSON"
    else:
        args, phrase = ["make-grid", tmp_path / "g.png", "--data-dir", _mnist_copy(tmp_path, "checksum")], "checksum"
    before = _tree(tmp_path)
    p = _run(args, tmp_path)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("mla-mnist: error: ") and p.stderr.count("\n") == 1 and phrase in p.stderr
    assert _tree(tmp_path) == before


def test_debug_shows_the_traceback(tmp_path):
    p = _run(["--debug", "make-grid", tmp_path / "g.png", "--data-dir", _mnist_copy(tmp_path, "header")], tmp_path)
    assert p.returncode == 1 and "Traceback" in p.stderr
    assert "UserError: " in p.stderr and "wrong IDX header" in p.stderr


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("args", [["--help"], ["make-grid", "g.png", "--grid", "2"]], ids=["help", "make-grid"])
def test_closed_pipe_is_quiet(args, buffered, tmp_path):
    """`mla-mnist ... | head` where head has already gone: no traceback, no 'Exception ignored'."""
    read, write = os.pipe()
    os.close(read)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env.update({"PYTHONPATH": str(ROOT)} if buffered else {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    p = subprocess.run(
        [sys.executable, "-m", "mla_mnist", *args],
        cwd=tmp_path,
        env=env,
        stdout=write,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
    )
    os.close(write)
    assert p.stderr == "" and p.returncode in (0, 141)
