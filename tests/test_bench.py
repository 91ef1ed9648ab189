"""`mla-mnist bench` end to end on the tiny preset (a smoke test: no timing is asserted), and its FLOP count."""

import importlib.util
import json

import pytest

from convert import ModelConfig
from convert.checkpoint import SHIPPED
from convert.flops import encoder_flops
from mla_mnist.bench import COLUMNS
from mla_mnist.cli import main

FRAMEWORKS = [fw for fw in ("torch", "mlx") if importlib.util.find_spec(fw)]


def test_small_bench_writes_every_row_column_and_plot(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = main(
        [
            "bench",
            "--preset",
            "tiny",
            "--lengths",
            "3,5",
            "--repeats",
            "1",
            "--train-steps",
            "2",
            "--frameworks",
            "torch,mlx",
            "--device",
            "cpu",
            "--json",
            str(out),
            "--plot",
            str(png),
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    rows = {(r["framework"], r["mode"], r["attention"], r["length"]): r for r in result["rows"]}
    modes = {
        "mla": ("absorbed", "expanded", "uncached"),
        "mha": ("expanded", "uncached"),
        "gqa": ("expanded", "uncached"),
    }
    expected = {(fw, mode, a, n) for fw in FRAMEWORKS for a in modes for mode in modes[a] for n in (3, 5)}
    assert set(rows) == expected and len(result["rows"]) == len(expected)
    for key, row in rows.items():
        for column in COLUMNS:
            if column == "cache_bytes" and key[1] == "uncached":
                assert row[column] is None  # the original algorithm keeps no cache
            else:
                assert row[column] > 0, (key, column)
        assert row["peak_memory_method"]
    for fw in FRAMEWORKS:
        for n in (3, 5):
            mla, mha, gqa = (
                rows[(fw, mode, a, n)]["cache_bytes"]
                for mode, a in (("absorbed", "mla"), ("expanded", "mha"), ("expanded", "gqa"))
            )
            assert mla < gqa < mha
            # the expanded form holds the same latent self-attention cache but expanded cross-attention K/V
            expanded, absorbed = rows[(fw, "expanded", "mla", n)], rows[(fw, "absorbed", "mla", n)]
            assert expanded["self_cache_bytes"] == absorbed["self_cache_bytes"]
            assert expanded["cross_cache_bytes"] > absorbed["cross_cache_bytes"]
        info = result["frameworks"][fw]
        assert info["matmul_gflops"] > 0 and info["train_samples_per_s"] > 0
        assert all(info["encoder"][a]["fraction_of_matmul"] > 0 for a in modes)
        assert info["cross_attention_us"]["latent"] > 0 and info["cross_attention_us"]["expanded"] > 0
    assert len(result["speedups"]) == 3 * 2 * len(FRAMEWORKS)
    # Weight variants: every smaller format writes a smaller file; cache variants are exact byte counts.
    sizes = [w["file_bytes"] for w in result["weight_variants"]]
    assert [w["variant"].split(",")[0] for w in result["weight_variants"]] == ["float32", "float16", "8-bit", "4-bit"]
    assert all(a > b for a, b in zip(sizes, sizes[1:])) and all(
        w["weight_bytes"] > 0 for w in result["weight_variants"]
    )
    cfg = ModelConfig.preset("tiny")
    per = {c["cache"]: c["bytes"] / (4 * 5 * cfg.dec_layers) for c in result["cache_variants"]}
    r, pe = cfg.dec_kv_rank, cfg.rope_dim
    assert per == {
        "MHA K/V, float32": 2 * cfg.d_model * 4,
        "MLA latent, float32": (r + pe) * 4,
        "GQA K/V, float32": 2 * (cfg.heads // 4) * cfg.head_dim * 4,
        "MLA latent, float16": (r + pe) * 2,
        "MLA int8 latent, float32 model": r + 4 + pe * 4,
        "MLA int8 latent, float16 model": r + 2 + pe * 2,
    }
    # Decoding paths: every path the device has, at each default batch, tokens equal to the loop's.
    paths = {(r["framework"], r["batch"], r["path"]): r for r in result["decode_paths"]}
    assert set(paths) == {
        (fw, b, p)
        for fw, ps in (("torch", ("off", "eager")), ("mlx", ("off", "eager", "compiled")))
        for b in (1, 4, 64)
        for p in ps
    }
    assert all(r["tokens_match_off"] and r["ms_per_token"] > 0 and 0 < r["bound_ms"] for r in paths.values())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| torch | absorbed | mla | 3 |" in printed and "| torch | expanded | gqa | 3 |" in printed
    assert "matmul" in printed


def test_generation_rows_interleave_modes_and_frameworks_repeat_by_repeat():
    """A slow spell of a shared machine must fall on every mode and framework alike: A B C, A B C, ..."""
    from mla_mnist.bench import suites

    calls = []

    class Cache:
        nbytes = self_nbytes = cross_nbytes = 1

    class Backend:
        def __init__(self, name):
            self.name = name

        def synchronize(self, *arrays):
            pass

        def encode(self, model, images):
            return images

        def generate(self, model, images, encoded, mode, **kw):
            assert images is None and encoded is not None  # the encoder output is timed apart, then reused
            calls.append((self.name, mode))
            return encoded, Cache()

        def peak_memory(self, fn):
            return fn(), {"peak_memory_bytes": 1}

    players = [
        (backend, object(), [0], mode)
        for backend in (Backend("a"), Backend("b"))
        for mode in ("absorbed", "expanded", "uncached")
    ]
    rows = suites.generation_rows(players, 5, repeats=3, warm_up=True)
    order = [(backend.name, mode) for backend, _, _, mode in players]
    assert calls == order * 4  # one warm-up round, then three timed rounds
    assert len(rows) == len(players) and all(len(row) == 5 for row in rows)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--lengths", "1,5"], "--lengths"),
        (["--lengths", "ten"], "--lengths"),
        (["--frameworks", "jax"], "--frameworks"),
        (["--preset", "huge"], "invalid choice"),
        (["--decode-batches", "0"], "--decode-batches"),
        (["--decode-paths", "warp"], "--decode-paths"),
        (["--attentions", "mqa"], "--attentions"),
    ],
)
def test_bad_options_are_one_line_errors(argv, message, capsys):
    assert main(["bench", "--preset", "tiny", "--train-steps", "0", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mla-mnist: error:") and message in err and "\n" not in err


@pytest.mark.parametrize("attention", ["mla", "mha", "gqa"])
@pytest.mark.parametrize("preset", ["tiny", "seed"])
def test_encoder_flops_match_torch_flop_counter(preset, attention):
    """Projections, MLP and patch embed as counted by torch; the fused attention (which torch's counter skips
    on the CPU) as 2 matmuls of H x T x T x head_dim per layer."""
    torch = pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode

    import mla_torch

    cfg = ModelConfig.preset(preset, attention=attention)
    model = mla_torch.build(cfg).eval()
    images = torch.rand(1, cfg.image_size, cfg.image_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode(images)
    counted = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert set(counted) <= {"aten.mm", "aten.addmm"}  # attention itself went through the fused kernel
    t, h = cfg.enc_tokens, cfg.heads
    attention_flops = cfg.enc_layers * 2 * (2 * h * t * t * cfg.head_dim)
    assert sum(counted.values()) + attention_flops == encoder_flops(cfg)


def test_a_trained_checkpoint_gets_real_reading_and_eval_rows(tmp_path):
    """With a checkpoint, bench also reads real grids of its task (early stop) and scores an evaluation through
    every path; the read-outs of the paths agree."""
    out = tmp_path / "bench.json"
    argv = ["bench", "--checkpoint", str(SHIPPED), "--frameworks", "torch", "--lengths", "3", "--repeats", "1"]
    argv += ["--train-steps", "0", "--render-batch", "0", "--attentions", "mla", "--decode-batches", "2"]
    assert main([*argv, "--decode-length", "4", "--eval-samples", "8", "--out", str(tmp_path), "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert [r["path"] for r in result["real"]] == ["off", "eager"]
    assert len({(r["exact_match"], r["digit_accuracy"]) for r in result["real"]}) == 1
    assert all(r["grids_per_s"] > 0 and r["mean_digits"] > 0 for r in result["real"])
    assert [r["path"] for r in result["eval"]] == ["off", "eager"] and result["eval"][0]["digit_accuracy"] > 0.9
    assert all(r["tokens_match_off"] for r in result["decode_paths"])


def test_decode_step_cost_grows_with_the_batch_by_its_per_row_bytes():
    """What a decoding step must read: the weights once, then per row the embedding, the latent cache rows up to
    the position (length / 2 on average) and the cross-attention latent."""
    from convert.flops import decode_step_cost

    cfg = ModelConfig.preset("seed")
    one, two = decode_step_cost(cfg, 1, 50), decode_step_cost(cfg, 2, 50)
    per_row = cfg.d_model + cfg.dec_layers * (
        25 * (cfg.dec_kv_rank + cfg.rope_dim) + cfg.enc_tokens * cfg.cross_kv_rank
    )
    assert two["bytes"] - one["bytes"] == 4 * per_row
    assert two["flops"] > one["flops"] > 2 * (one["weight_bytes"] // 4 - cfg.d_model)


def test_a_decoding_path_the_device_lacks_is_named_not_skipped_quietly(tmp_path, capsys):
    """--decode-paths asks for fused on a CPU, which has no such path: the report says so, the rest still run."""
    argv = ["bench", "--preset", "tiny", "--frameworks", "torch", "--device", "cpu", "--lengths", "3"]
    argv += ["--repeats", "1", "--train-steps", "0", "--render-batch", "0", "--attentions", "mla"]
    argv += ["--decode-batches", "1", "--decode-length", "3", "--decode-paths", "eager,fused"]
    assert main([*argv, "--out", str(tmp_path), "--quiet"]) == 0
    assert "(no fused rows: torch on cpu decodes with off, eager)" in capsys.readouterr().out
    result = json.loads((tmp_path / "bench.json").read_text())
    assert [r["path"] for r in result["decode_paths"]] == ["off", "eager"]
