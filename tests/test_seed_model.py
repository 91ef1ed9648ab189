"""The shipped `seed` checkpoint (10x10 grids, up to 100 digits) reads real test grids, the same in both
frameworks. Its eval.json holds the 2,000-grid figures; these few grids keep the test quick on a CPU."""

import pytest

from convert import checkpoint
from mla_mnist.backends import FRAMEWORKS, get_backend, installed
from mla_mnist.evaluation import eval_set, predict_tokens
from mnist_grid import decode, evaluate

N_GRIDS = 6
# The checkpoint reads 99.17% of the digits of 2,000 fixed test grids (eval.json); on these six (~300 digits)
# a floor of 98% is ~1.2 points under that: falling below it means loading or decoding broke, not noise.
DIGIT_FLOOR = 0.98


@pytest.fixture(scope="module")
def grids():
    return eval_set("test", 10, N_GRIDS, raw=True)


@pytest.fixture(scope="module")
def seed_dir():
    path = checkpoint.shipped().get("seed")
    assert path is not None and (path / "model.safetensors").exists(), "the seed checkpoint is not installed"
    return path


def read(framework, seed_dir, images):
    backend = get_backend(framework, "cpu")
    model = backend.load(seed_dir)
    return predict_tokens(backend, model, images, batch_size=N_GRIDS)


def test_seed_is_a_shipped_name_with_its_record(seed_dir):
    config, _ = checkpoint.read_config(seed_dir)
    assert (config.grid, config.enc_layers, config.dec_layers) == (10, 16, 16)
    for name in ("eval.json", "metrics.json", "curves.png"):
        assert (seed_dir / name).exists(), name


@pytest.mark.slow
def test_seed_reads_100_digit_grids_the_same_in_both_frameworks(seed_dir, grids):
    images, tokens = grids
    target = decode(tokens)
    assert sum(len(t) for t in target) > 200  # the task's long grids, not a handful of digits
    frameworks = [f for f in FRAMEWORKS if installed(f)]
    reads = {f: read(f, seed_dir, images) for f in frameworks}
    for framework, pred in reads.items():
        scores = evaluate(decode(pred), target)
        assert scores["digit_accuracy"] >= DIGIT_FLOOR, (framework, scores)
        assert scores["length_accuracy"] == 1.0, (framework, scores)
    if len(reads) == 2:
        assert decode(reads["torch"]) == decode(reads["mlx"])
