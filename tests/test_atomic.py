"""Checkpoint saves survive a crash at any moment: there is always one whole, loadable checkpoint.

Two angles: a save made to die (os._exit, no cleanup) at every file-system call it makes, one by one;
and real training processes killed with SIGKILL at random moments while they checkpoint every step,
each next one resuming from whatever survived.
"""

import builtins
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from convert import checkpoint, safetensors_np
from convert.config import ModelConfig
from convert.errors import UserError
from convert.schema import schema

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ModelConfig.preset("tiny")
CRASHED = 77  # exit status of a save made to die


def _weights(version: int) -> dict[str, np.ndarray]:
    """Tiny-model weights whose every tensor says which version it belongs to."""
    return {k: np.full(shape, version, dtype=np.float32) for k, shape in schema(CONFIG).items()}


def _save(path, version):
    files = {"note.json": json.dumps({"version": version}).encode()}
    if version % 2:  # odd versions rewrite best.safetensors, even ones carry it over (hard link)
        files[checkpoint.BEST] = lambda p: safetensors_np.write(p, _weights(version))
    checkpoint.save(
        path,
        CONFIG,
        _weights(version),
        preset="tiny",
        metrics={"version": version},
        files=files,
        keep=(checkpoint.BEST,),
    )


def _crash_at(path, version, k):
    """In a forked child: save `version` over `path`, dying at the k-th file-system call of the save."""
    calls = [0]

    def dying(fn):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == k:
                os._exit(CRASHED)  # like SIGKILL: no except/finally clean-up runs
            return fn(*args, **kwargs)

        return wrapper

    try:
        for name in ("rename", "fsync", "link", "unlink", "rmdir", "mkdir", "open"):
            setattr(os, name, dying(getattr(os, name)))
        builtins.open = io.open = dying(io.open)
        safetensors_np.write = dying(safetensors_np.write)
        _save(path, version)
    finally:
        os._exit(0)


def _version_of(path) -> int:
    """The one version the checkpoint at `path` holds, after checking that all its parts agree."""
    config, weights, meta = checkpoint.load(path)
    versions = {float(v.flat[0]) for v in weights.values()} | {float(v.flat[-1]) for v in weights.values()}
    assert len(versions) == 1, f"weights mix versions {versions}"
    version = int(versions.pop())
    root = checkpoint.resolve(path)
    assert json.loads((root / "note.json").read_text())["version"] == version
    assert checkpoint.read_metrics(root)["version"] == version
    best_version = version if version % 2 else version - 1
    _, best, _ = checkpoint.load(path, checkpoint.BEST)
    assert {float(v.flat[0]) for v in best.values()} == {best_version}
    assert config == CONFIG and meta["preset"] == "tiny"
    return version


def _wait(pid, timeout):
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the save in child {pid} hung")
        time.sleep(0.001)


def _crash_points(tmp_path, first: bool):
    """Run the crashing save (version 3 first, else 4 over 3) for k = 1, 2, ... until one completes;
    yield the directory after each."""
    template = tmp_path / "template"
    template.mkdir()
    if not first:
        for version in (1, 2, 3):
            _save(template / "ck", version)
    for k in range(1, 500):
        d = tmp_path / f"k{k}"
        shutil.copytree(template, d)
        pid = os.fork()  # a child that only does numpy and file calls, then _exit: safe to fork
        if pid == 0:
            _crash_at(d / "ck", 3 if first else 4, k)
        status = _wait(pid, timeout=60)
        assert status in (0, CRASHED), status
        yield k, d, status == CRASHED
        if status == 0:
            return
    raise AssertionError("the save never completed")


@pytest.mark.parametrize("first", [False, True], ids=["overwrite", "first-save"])
def test_crash_at_every_step_of_a_save(tmp_path, first):
    """Killed at any call, the checkpoint is whole: the old one (or none yet) before the swap, the new one after."""
    seen = set()
    for k, d, crashed in _crash_points(tmp_path, first):
        ck = d / "ck"
        if first and not ck.exists():
            with pytest.raises(UserError, match="does not exist"):
                checkpoint.load(ck)
            seen.add(None)
        else:
            version, new = _version_of(ck), 3 if first else 4
            assert version in (3, new) and (crashed or version == new)
            seen.add(version)
        # The next save works and leaves nothing behind but the checkpoint itself.
        _save(ck, 5)
        assert _version_of(ck) == 5
        assert sorted(p.name for p in d.iterdir()) == ["ck"], f"crash at call {k} left junk"
    assert k > 10, "too few crash points: the save makes more file-system calls than this"
    # Both outcomes occur: a crash before the swap keeps the previous state, after it the new one.
    assert seen == ({None, 3} if first else {3, 4})


def test_interrupted_swap_is_recovered(tmp_path):
    """Between the two renames only `.ck.old-PID` exists: loading puts it back; a stale one is ignored."""
    ck = tmp_path / "ck"
    _save(ck, 1)
    shutil.copytree(ck, tmp_path / ".ck.old-99999999")  # stale: left half-deleted by some earlier save
    (tmp_path / ".ck.old-99999999" / checkpoint.WEIGHTS).write_bytes(b"junk")
    _save(ck, 2)
    assert not (tmp_path / ".ck.old-99999999").exists()  # cleared before the swap
    os.rename(ck, tmp_path / ".ck.old-1234")  # as if killed between the renames
    assert _version_of(ck) == 2 and ck.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


# ---- real training processes, SIGKILLed while they checkpoint every step ----------------------------


def _identity(path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _kill_driver(out: str, snapshots: str, kills: int, seed: int):
    """Fork training processes and SIGKILL each at a random moment after its first save, copying the
    output folder after every kill for the test to check. A one-step run here first pays the imports and
    torch's lazy set-up once, so that each child trains at once (a fresh interpreter spends seconds)."""
    import torch

    torch.set_num_threads(1)  # no thread pool: forking after torch work is then safe
    from mla_mnist.cli import main

    common = ["train", "--framework", "torch", "--device", "cpu", "--val-samples", "4", "--save-every", "1", "--quiet"]
    fresh = ["--preset", "tiny", "--batch-size", "4", "--train-samples", "40000"]
    assert main(common + fresh + ["--max-steps", "1", "--out", str(Path(snapshots).parent / "warm-up")]) == 0
    rng = random.Random(seed)
    for i in range(kills):
        argv = common + (fresh + ["--out", out] if i == 0 else ["--resume", out])
        before = _identity(out)
        pid = os.fork()
        if pid == 0:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1), os.dup2(null, 2)
            os._exit(main(argv))
        try:
            deadline = time.monotonic() + 60
            while _identity(out) in (before, None):  # until this child's first save has landed
                done, status = os.waitpid(pid, os.WNOHANG)
                if done or time.monotonic() > deadline:
                    raise SystemExit(f"child {i} ended (status {status}) or hung before saving")
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.3))
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        shutil.copytree(Path(out).parent, Path(snapshots) / str(i), symlinks=True)


def _check_snapshot(root: Path, previous_step: int) -> int:
    from mla_mnist.train_loop import read_state

    ck = root / "ck"
    config, weights, _ = checkpoint.load(ck)  # recovers an interrupted swap, validates every tensor
    state, arrays = read_state(ck)
    step = int(arrays["step"])
    assert state["step"] == step >= max(previous_step, 1)
    assert config == ModelConfig.preset("tiny") and state["spec"]["batch_size"] == 4
    return step


def test_sigkill_during_saves_always_leaves_a_checkpoint(tmp_path):
    pytest.importorskip("torch")
    kills, run, snapshots = 12, tmp_path / "run", tmp_path / "snapshots"
    run.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, __file__, str(run / "ck"), str(snapshots), str(kills), str(random.randrange(2**32))],
        env=env,
        cwd=ROOT,
        check=True,
        timeout=120,
    )
    step, interrupted = 0, 0
    for i in range(kills):
        root = snapshots / str(i)
        interrupted += any(p.name.startswith(".ck.") for p in root.iterdir())  # killed mid-save
        step = _check_snapshot(root, step)
    # The surviving checkpoint resumes: a normal process continues the same run for two more steps.
    ck = run / "ck"
    step = _check_snapshot(run, 0)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mla_mnist",
            "train",
            "--framework",
            "torch",
            "--device",
            "cpu",
            "--resume",
            str(ck),
            "--max-steps",
            str(step + 2),
            "--val-samples",
            "4",
            "--quiet",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert _check_snapshot(run, step + 2) == step + 2
    assert sorted(p.name for p in run.iterdir()) == ["ck"]  # leftovers of the killed saves are cleared
    print(f"{interrupted} of {kills} kills left a save in progress")


if __name__ == "__main__":
    _kill_driver(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
