"""`mla-mnist parity`, `info` and `--version` on tiny checkpoints (CPU, at most 8 grids)."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("mlx.core")

from convert import checkpoint  # noqa: E402
from mla_mnist.cli import main  # noqa: E402

SAMPLES = "8"


def _train(out, framework):
    assert (
        main(
            [
                "train",
                "--preset",
                "tiny",
                "--framework",
                framework,
                "--epochs",
                "1",
                "--train-samples",
                "320",
                "--batch-size",
                "32",
                "--val-samples",
                "16",
                "--quiet",
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def tiny_torch(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("parity") / "torch", "torch")


def _parity(capsys, *args):
    capsys.readouterr()
    rc = main(["parity", *map(str, args), "--samples", SAMPLES, "--device", "cpu"])
    return rc, capsys.readouterr()


def test_passes_in_both_frameworks_with_json_and_plot(tiny_torch, tmp_path, capsys):
    rc, out = _parity(
        capsys,
        tiny_torch,
        "--frameworks",
        "torch,mlx",
        "--dtype",
        "float32,bfloat16",
        "--json",
        tmp_path / "p.json",
        "--plot",
        tmp_path / "p.png",
    )
    assert rc == 0, out.out
    assert out.out.startswith("PASS: ")
    assert "patch_embed" in out.out and "decoder.1" in out.out and "bit-exact" in out.out
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    r = json.loads((tmp_path / "p.json").read_text())
    assert r["schema"] == "mla-mnist.parity/1" and r["passed"] is True and r["first_failure"] is None
    assert isinstance(r["verdict"], str) and r["samples"] == 8 and r["dtypes"] == ["float32", "bfloat16"]
    assert r["modes"] == ["absorbed", "expanded", "uncached"]
    assert r["boundaries"] == [
        "patch_embed",
        "encoder.0",
        "encoder.1",
        "encoder_out",
        "decoder.0",
        "decoder.1",
        "logits",
    ]
    assert {r["reference"]["framework"], r["candidate"]["framework"]} == {"torch", "mlx"}
    for t in r["tolerances"].values():
        assert set(t) == {"layer", "logits", "min_sequence_agreement"}
    pairs = {(a["pair"], a["dtype"]) for a in r["activations"]}
    assert pairs == {
        ("torch vs mlx", "float32"),
        ("torch vs mlx", "bfloat16"),
        ("torch bf16 vs f32", "bfloat16"),
        ("mlx bf16 vs f32", "bfloat16"),
    }
    for a in r["activations"]:
        assert set(a) == {"pair", "dtype", "reference", "candidate", "ok", "first_over", "layers"}
        assert [x["boundary"] for x in a["layers"]] == r["boundaries"]
        for x in a["layers"]:
            assert set(x) == {"boundary", "max_abs", "max_rel", "cosine", "tolerance", "ok"}
            assert all(isinstance(x[k], float) for k in ("max_abs", "max_rel", "cosine", "tolerance"))
    fp32 = next(a for a in r["activations"] if a["dtype"] == "float32")
    assert max(x["max_rel"] for x in fp32["layers"]) < 1e-4
    assert {(g["mode"], g["cache"]) for g in r["greedy"]} == {
        ("absorbed", "float"),
        ("expanded", "float"),
        ("uncached", "float"),
        ("absorbed", "int8"),
        ("expanded", "int8"),
    }
    for g in r["greedy"]:
        assert isinstance(g["token_agreement"], float) and isinstance(g["sequence_agreement"], float)
        assert isinstance(g["ok"], bool) and isinstance(g["disagreements"], list)
        for d in g["disagreements"]:
            assert set(d) == {"grid", "position", "reference_margin", "near_tie"}
    assert [(t["weights"], t["exact"]) for t in r["round_trip"]] == [("reference", True), ("candidate", True)]


def test_a_checkpoint_trained_in_mlx_passes(tmp_path, capsys):
    ckpt = _train(tmp_path / "mlx", "mlx")
    rc, out = _parity(capsys, ckpt, "--dtype", "float32", "--modes", "absorbed")
    assert rc == 0, out.out
    assert out.out.startswith("PASS: ")


def test_a_perturbed_decoder_layer_fails_and_is_named(tiny_torch, tmp_path, capsys):
    assert main(["convert", str(tiny_torch), str(tmp_path / "x.npz")]) == 0
    with np.load(tmp_path / "x.npz") as f:
        weights = dict(f)
    weights["decoder.1.mlp.fc2.weight"] = weights["decoder.1.mlp.fc2.weight"] + np.float32(1e-3)
    np.savez(tmp_path / "x.npz", **weights)
    rc, out = _parity(
        capsys,
        tiny_torch,
        tmp_path / "x.npz",
        "--preset",
        "tiny",
        "--dtype",
        "float32",
        "--modes",
        "absorbed",
        "--json",
        tmp_path / "p.json",
    )
    assert rc == 1, out.out
    first = out.out.splitlines()[0]
    assert first.startswith("FAIL: ") and "first over tolerance: decoder.1 (float32, torch vs mlx)" in first
    r = json.loads((tmp_path / "p.json").read_text())
    assert r["passed"] is False and r["first_failure"]["boundary"] == "decoder.1"
    assert r["first_failure"]["check"] == "activations"
    layers = r["activations"][0]["layers"]
    assert all(x["ok"] for x in layers[: r["boundaries"].index("decoder.1")])  # clean up to the perturbed layer


def test_an_8_bit_checkpoint_passes_against_its_dequantized_reference(tiny_torch, tmp_path, capsys):
    assert main(["convert", str(tiny_torch), str(tmp_path / "q8"), "--quantize", "8", "--group-size", "32"]) == 0
    rc, out = _parity(capsys, tmp_path / "q8", "--dtype", "float32", "--modes", "absorbed,expanded")
    assert rc == 0, out.out
    assert "8-bit" in out.out


def test_a_tolerance_of_zero_fails_with_exit_1(tiny_torch, capsys):
    rc, out = _parity(capsys, tiny_torch, "--dtype", "float32", "--modes", "absorbed", "--tolerance", "float32=0")
    assert rc == 1 and out.out.startswith("FAIL: ")


@pytest.mark.parametrize(
    "args",
    [
        ["parity", "/nonexistent/ckpt"],
        ["parity", "{ckpt}", "--dtype", "float64"],
        ["parity", "{ckpt}", "--frameworks", "jax"],
        ["parity", "{ckpt}", "--tolerance", "float32=lots"],
        ["parity", "{ckpt}", "--modes", "sideways"],
        ["info", "/nonexistent/ckpt"],
    ],
)
def test_bad_input_exits_2(args, tiny_torch, capsys):
    assert main([a.format(ckpt=tiny_torch) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mla-mnist: error: ") and len(err.strip().splitlines()) == 1


def test_info_text_and_json(tiny_torch, capsys):
    capsys.readouterr()
    assert main(["info", str(tiny_torch)]) == 0
    text = capsys.readouterr().out
    assert "parameters" in text and "trained     torch, 10 steps" in text and "best val" in text
    assert main(["info", str(tiny_torch), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    cfg, _ = checkpoint.read_config(tiny_torch)
    assert d["config"] == cfg.to_dict() and d["kind"] == "checkpoint directory" and d["dtype"] == "float32"
    assert d["quantization"] is None and isinstance(d["parameters"], int) and d["parameters"] > 0
    assert d["size_bytes"] == sum(d["files"].values()) and "model.safetensors" in d["files"]
    assert d["training"]["framework"] == "torch" and d["training"]["steps"] == 10
    assert set(d["training"]["best"]) >= {"step", "val_exact_match", "val_digit_accuracy", "val_loss"}


def test_info_of_the_shipped_and_a_quantized_checkpoint(tiny_torch, tmp_path, capsys):
    from mla_mnist.backends import DEFAULT_CHECKPOINT

    assert main(["info", str(DEFAULT_CHECKPOINT), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["preset"] == "small" and d["dtype"] == "float16" and d["training"]["stages"] == 1
    assert d["training"]["steps"] == 3500  # the one command: 7 epochs of 500 steps
    assert 0.9 < d["training"]["best"]["val_exact_match"] <= 1
    assert main(["convert", str(tiny_torch), str(tmp_path / "q8"), "--quantize", "8", "--group-size", "32"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "q8")]) == 0
    assert "8-bit, groups of 32" in capsys.readouterr().out


def test_version(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"mla-mnist {metadata.version('mla-mnist')}"


def test_help_states_the_default_tolerances(capsys):
    from mla_mnist.parity import TOLERANCES

    with pytest.raises(SystemExit):
        main(["parity", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for dtype, t in TOLERANCES.items():
        assert f"{dtype}: layers {t.layer:g}, logits {t.logits:g}" in text


def test_tolerance_overrides_and_the_first_failure_is_the_earliest_boundary():
    from mla_mnist.parity import TOLERANCES, _first_failure, parse_tolerances

    t = parse_tolerances(["float32=1e-3", "bfloat16.logits=0.5", "float16.agreement=0.5"])
    assert (t["float32"].layer, t["float32"].logits) == (1e-3, 1e-3)
    assert (t["bfloat16"].layer, t["bfloat16"].logits) == (TOLERANCES["bfloat16"].layer, 0.5)
    assert t["float16"].min_sequence_agreement == 0.5

    def layers(over):
        return [
            {"boundary": b, "max_rel": 1.0 if b == over else 0.0, "tolerance": 0.1, "ok": b != over}
            for b in ("patch_embed", "encoder.0", "decoder.0", "logits")
        ]

    report = {
        "boundaries": ["patch_embed", "encoder.0", "decoder.0", "logits"],
        "greedy": [],
        "round_trip": [],
        "activations": [
            {"pair": "a", "dtype": "float32", "ok": False, "first_over": "decoder.0", "layers": layers("decoder.0")},
            {"pair": "b", "dtype": "bfloat16", "ok": False, "first_over": "encoder.0", "layers": layers("encoder.0")},
        ],
    }
    f = _first_failure(report)
    assert (f["check"], f["boundary"], f["pair"], f["dtype"]) == ("activations", "encoder.0", "b", "bfloat16")


def test_one_framework_compares_each_dtype_with_float32(tiny_torch, tmp_path, capsys):
    rc, out = _parity(
        capsys,
        tiny_torch,
        "--frameworks",
        "torch",
        "--dtype",
        "float32,float16",
        "--modes",
        "absorbed",
        "--json",
        tmp_path / "p.json",
    )
    assert rc == 0, out.out
    r = json.loads((tmp_path / "p.json").read_text())
    assert [(a["pair"], a["dtype"]) for a in r["activations"]] == [("torch f16 vs f32", "float16")]
    assert [(t["saved_by"], t["loaded_by"], t["exact"]) for t in r["round_trip"]] == [("torch", "torch", True)]
