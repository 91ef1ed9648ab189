"""The app end to end with the shipped checkpoint: make-grid -> predict round trip, and show."""

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from mla_mnist.backends import DEFAULT_CHECKPOINT
from mla_mnist.cli import main

N_GRIDS = 200
# The shipped checkpoint reads 96.0% of 10,000 random 4x4 test grids exactly (its eval.json) and 188 of these
# 200 fixed grids, in torch and MLX alike: the floor is that 94.0% (deterministic: no sampling noise), so
# falling below it means the image -> prediction path broke.
EXACT_MATCH_FLOOR = 0.94


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def predict_json(paths, framework):
    rc, out, err = run_cli(["predict", *paths, "--framework", framework, "--device", "cpu", "--json"])
    assert rc == 0, err
    return json.loads(out)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Test workers share the CPU; torch's intra-op threads would spin against each other."""
    try:
        import torch
    except ImportError:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def grids(tmp_path_factory):
    """200 rendered test grids, their labels, and dark-on-light RGB copies (alternately JPEG q95 and PNG)."""
    d = tmp_path_factory.mktemp("grids")
    paths, inverted, labels = [], [], []
    for seed in range(N_GRIDS):
        path = d / f"grid{seed:03d}.png"
        rc, out, err = run_cli(["make-grid", path, "--seed", seed])
        assert rc == 0, err
        labels.append(out.strip())
        with Image.open(path) as img:
            pixels = np.asarray(img)
        rgb = Image.fromarray(np.stack([255 - pixels] * 3, axis=-1), "RGB")
        inv = d / f"inverted{seed:03d}.{'jpg' if seed % 2 == 0 else 'png'}"
        rgb.save(inv, quality=95)  # PNG ignores quality
        paths.append(path)
        inverted.append(inv)
    return paths, inverted, labels


@pytest.fixture(scope="module")
def torch_predictions(grids):
    pytest.importorskip("torch")
    paths, inverted, _ = grids
    result = predict_json(paths + inverted, "torch")  # one invocation: one model load, batched
    return [r["digits"] for r in result[:N_GRIDS]], [r["digits"] for r in result[N_GRIDS:]]


def test_make_grid_labels_are_digit_strings(grids):
    _, _, labels = grids
    assert all(label.isdigit() and 1 <= len(label) <= 16 for label in labels)
    assert len(set(labels)) > N_GRIDS * 0.9  # seeds give different grids


def test_predict_round_trip_mlx(grids):
    pytest.importorskip("mlx")
    paths, _, labels = grids
    result = predict_json(paths, "mlx")
    assert [r["file"] for r in result] == [str(p) for p in paths]
    assert all(set(r) == {"file", "digits"} and (r["digits"] == "" or r["digits"].isdigit()) for r in result)
    digits = [r["digits"] for r in result]
    exact = np.mean([p == t for p, t in zip(digits, labels)])
    print(f"\nmlx exact match on {N_GRIDS} make-grid images: {exact:.1%}")
    assert exact >= EXACT_MATCH_FLOOR


def test_inverted_rgb_copies_read_the_same(grids, torch_predictions):
    _, _, labels = grids
    original, inverted = torch_predictions
    assert np.mean([p == t for p, t in zip(original, labels)]) >= EXACT_MATCH_FLOOR
    agree = np.mean([a == b for a, b in zip(original, inverted)])
    print(f"\ninverted RGB (JPEG q95 / PNG) copies read the same: {agree:.1%}")
    assert agree >= 0.99


def test_other_sizes_and_modes_read_the_same(grids, torch_predictions, tmp_path):
    """Upscaled photos-to-be (RGB JPEG, 2.5x), ink on a transparent page (RGBA) and 16-bit grayscale."""
    paths, _, _ = grids
    variants = []
    for i, path in enumerate(paths[:8]):
        with Image.open(path) as img:
            pixels = np.asarray(img)
        Image.fromarray(pixels).convert("RGB").resize((280, 280), Image.BICUBIC).save(tmp_path / f"{i}.jpg", quality=90)
        rgba = np.zeros(pixels.shape + (4,), np.uint8)
        rgba[..., 3] = pixels  # black ink, opacity = ink
        Image.fromarray(rgba, "RGBA").save(tmp_path / f"{i}_rgba.png")
        Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / f"{i}_16bit.png")
        variants += [tmp_path / f"{i}.jpg", tmp_path / f"{i}_rgba.png", tmp_path / f"{i}_16bit.png"]
    read = [r["digits"] for r in predict_json(variants, "torch")]
    expected = [d for d in torch_predictions[0][:8] for _ in range(3)]
    assert np.mean([a == b for a, b in zip(read, expected)]) >= 0.95


def test_predict_plain_output_one_line_per_file(grids):
    pytest.importorskip("torch")
    paths, _, _ = grids
    rc, out, err = run_cli(["predict", *paths[:3], "--framework", "torch", "--device", "cpu"])
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert [line.rsplit(": ", 1)[0] for line in lines] == [str(p) for p in paths[:3]]


def test_predict_rejects_a_non_image(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    rc, out, err = run_cli(["predict", bad, "--framework", "torch"])
    assert rc == 2 and out == ""
    assert err.startswith("mla-mnist: error:") and len(err.strip().splitlines()) == 1


def test_attention_maps_look_at_the_digit_being_read(grids):
    """For most digits the most-attended patch lies in that digit's own cell (cells in reading order)."""
    from mla_mnist.backends import get_backend
    from mla_mnist.show import attention_maps
    from mnist_grid import load_image

    paths, _, labels = grids
    images = np.stack([load_image(p, 4) for p in paths[:16]])
    backend = get_backend("torch", "cpu")
    digits, maps = attention_maps(backend, backend.load(DEFAULT_CHECKPOINT), images)
    occupied = images.reshape(-1, 4, 28, 4, 28).max(axis=(2, 4)).reshape(-1, 16) > 0
    hits = total = 0
    for cells, read, heat in zip(occupied, digits, maps):
        side = heat.shape[-1] // 4  # patches per cell side
        for j, cell in enumerate(np.flatnonzero(cells)[: len(read)]):
            r, c = np.unravel_index(heat[j].argmax(), heat[j].shape)
            hits += (r // side) * 4 + c // side == cell
            total += 1
    assert total > 50 and hits / total >= 0.9


def test_cross_attention_weights_agree_across_frameworks(grids):
    pytest.importorskip("torch")
    pytest.importorskip("mlx")
    import mlx.core as mx
    import torch

    import mla_mlx
    import mla_torch
    from mla_mlx.generate import cross_attention_weights as mlx_weights
    from mla_torch.generate import cross_attention_weights as torch_weights
    from mnist_grid import load_image

    paths, _, _ = grids
    images = np.stack([load_image(p, 4) for p in paths[:2]])
    tm = mla_torch.load(DEFAULT_CHECKPOINT)
    tokens = mla_torch.generate(tm, torch.from_numpy(images))
    wt = torch_weights(tm, torch.from_numpy(images), tokens).numpy()
    wm = np.array(mlx_weights(mla_mlx.load(DEFAULT_CHECKPOINT), mx.array(images), mx.array(tokens.numpy())))
    cfg = tm.config
    assert wt.shape == (2, cfg.dec_layers, cfg.heads, cfg.max_tokens, cfg.enc_tokens)
    np.testing.assert_allclose(wt.sum(-1), 1, atol=1e-5)
    np.testing.assert_allclose(wm, wt, atol=1e-4)


def test_show_writes_a_png(grids, tmp_path):
    pytest.importorskip("torch")
    paths, _, labels = grids
    out = tmp_path / "show.png"
    rc, stdout, err = run_cli(
        ["show", DEFAULT_CHECKPOINT, paths[0], "--out", out, "--framework", "torch", "--device", "cpu"]
    )
    assert rc == 0, err
    assert str(paths[0]) in stdout and str(out) in stdout
    with Image.open(out) as img:
        assert img.format == "PNG"
        assert 400 <= img.width <= 2000 and 400 <= img.height <= 2000
    assert [p.name for p in tmp_path.iterdir()] == ["show.png"]  # no temporary file left behind


def test_show_wants_a_png_path(grids, tmp_path):
    paths, _, _ = grids
    rc, _, err = run_cli(["show", DEFAULT_CHECKPOINT, paths[0], "--out", tmp_path / "show.jpg", "--framework", "torch"])
    assert rc == 2 and ".png" in err
    rc, _, err = run_cli(
        ["show", DEFAULT_CHECKPOINT, paths[0], "--out", tmp_path / "missing" / "show.png", "--framework", "torch"]
    )
    assert rc == 2 and "does not exist" in err
    assert not list(tmp_path.iterdir())


def test_a_gpu_reads_the_last_short_batch_padded_to_the_batch_shape():
    """On an accelerator the decoding step is captured per batch shape: the last batch is padded, and the
    padding never reaches the result."""
    from mla_mnist.evaluation import predict_tokens

    calls = []

    class Accelerator:
        on_cpu = False

        def generate(self, model, images, **kwargs):
            calls.append(len(images))
            return images[:, 0, :2].astype(np.int64)

    images = np.arange(10 * 3 * 2).reshape(10, 3, 2)
    out = predict_tokens(Accelerator(), None, images, batch_size=4)
    assert calls == [4, 4, 4]
    np.testing.assert_array_equal(out, images[:, 0, :2])
    calls.clear()
    Accelerator.on_cpu = True
    predict_tokens(Accelerator(), None, images, batch_size=4)
    assert calls == [4, 4, 2]


def test_a_gpu_batch_fits_the_model_and_splits_the_grids_evenly():
    """A GPU reads in equal calls as large as the model's encoder activations allow (no call padded); a CPU at
    64; without a model, 1,024."""
    from types import SimpleNamespace

    from convert.config import ModelConfig
    from mla_mnist.evaluation import default_batch

    gpu, cpu = SimpleNamespace(on_cpu=False), SimpleNamespace(on_cpu=True)
    small = ModelConfig.preset("small")  # 257 tokens: 257 * (512 + 8 * 257) elements a grid
    seed = ModelConfig.preset("seed")  # 401 tokens, 16 heads: 4.2x the small model's per grid
    assert default_batch(gpu, small) == (1 << 32) // (257 * (512 + 8 * 257))
    assert default_batch(gpu, seed) < default_batch(gpu, small) // 4
    assert default_batch(gpu, small, 10_000) == 5_000  # two equal calls, not 6,507 + a padded 3,493
    for samples in (1, 999, 2_000, 10_000, 12_345):
        batch = default_batch(gpu, seed, samples)
        calls = -(-samples // batch)
        assert batch <= default_batch(gpu, seed) and calls * batch - samples < calls
    assert default_batch(cpu, small, 10_000) == 64 and default_batch(gpu) == 1024


def test_a_shipped_checkpoint_by_name_unless_a_path_of_that_name_exists(tmp_path, monkeypatch, capsys):
    """`small` names the shipped checkpoint wherever a checkpoint is read; a directory of that name in the working
    directory wins (an existing path is never reinterpreted)."""
    from convert import checkpoint
    from mla_mnist.cli import main

    monkeypatch.chdir(tmp_path)
    assert checkpoint.by_name("small") == checkpoint.SHIPPED and "small" in checkpoint.shipped()
    assert main(["info", "small"]) == 0
    assert str(checkpoint.SHIPPED) in capsys.readouterr().out
    (tmp_path / "small").mkdir()
    assert checkpoint.by_name("small") == tmp_path.joinpath("small").relative_to(tmp_path)
    assert main(["info", "small"]) == 2  # the local, empty directory: not a checkpoint
    assert "small" in capsys.readouterr().err
