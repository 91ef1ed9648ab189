"""`mla-mnist`: train, eval, predict, show, make-grid, convert, bench, parity, info.

Every user-fixable problem is a UserError: one line on stderr, exit code 2, no traceback (--debug shows it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from convert.checkpoint import FLOAT_DTYPES
from convert.errors import UserError
from convert.presets import DEFAULT_PRESET, PRESETS, preset_help
from convert.quantize import BITS, GROUP_SIZES
from convert.schema import ATTENTION

from .backends import DEFAULT_CHECKPOINT, FRAMEWORKS, INFERENCE_FIRST, TRAINING_FIRST


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2, like ours
        raise UserError(f"{self.prog}: {message} (see --help)")

    def exit(self, status=0, message=None):
        sys.stdout.flush()  # --help into a closed pipe fails here, inside main(), not at interpreter exit
        super().exit(status, message)


def positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def nonneg_int(text):
    v = int(text) if text.lstrip("-").isdigit() else None
    if v is None or v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def nonneg_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def build_parser() -> Parser:
    p = Parser(prog="mla-mnist", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    from .info import package_version

    p.add_argument("--version", action="version", version=f"mla-mnist {package_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    def common(sp, framework_default=None):
        sp.add_argument("--framework", choices=FRAMEWORKS, default=framework_default,
                        help=f"one of {', '.join(FRAMEWORKS)} (default: the first installed of "
                             f"{', '.join(TRAINING_FIRST)} for train, else of {', '.join(INFERENCE_FIRST)})")
        sp.add_argument("--device", default="auto", help="auto, cpu or gpu (each framework's own names work too: "
                                                         "cuda, cuda:N, mps)")
        sp.add_argument("--data-dir", help="folder with the four MNIST files (else $MLA_MNIST_DIR, else a cache)")

    t = sub.add_parser("train", help="train a model")
    common(t)
    t.add_argument("--preset", choices=PRESETS, help=f"model and recipe (default {DEFAULT_PRESET}): {preset_help()}")
    t.add_argument("--config", type=Path, help="a model config JSON (instead of --preset)")
    t.add_argument("--attention", choices=ATTENTION, help="override the preset's attention")
    t.add_argument("--kv-heads", type=positive_int, help="K/V heads of --attention gqa (default heads // 4)")
    t.add_argument("--epochs", type=positive_int)
    t.add_argument("--batch-size", type=positive_int)
    t.add_argument("--lr", type=positive_float)
    t.add_argument("--warmup", type=nonneg_int)
    t.add_argument("--weight-decay", type=nonneg_float)
    t.add_argument("--label-smoothing", type=nonneg_float)
    t.add_argument("--train-samples", type=positive_int, help="grids per epoch")
    t.add_argument("--val-samples", type=positive_int, default=512)
    t.add_argument("--augment", nargs="?", const="shift", choices=("shift", "affine"),
                   help="per-digit augmentation: shift (up to 2 px; the default when no value is given) or "
                        "affine (shift + rotation, scale, shear)")
    t.add_argument("--seed", type=nonneg_int)
    t.add_argument("--out", type=Path, help="checkpoint directory (default runs/<preset>)")
    t.add_argument("--resume", type=Path, help="continue the run saved in this checkpoint directory")
    t.add_argument("--init", type=Path, help="start from this checkpoint's weights (fresh optimiser: fine-tuning)")
    t.add_argument("--save-every", type=nonneg_int, default=0, help="also checkpoint every N steps")
    t.add_argument("--max-steps", type=nonneg_int, default=0, help="stop after step N (schedule unchanged)")
    t.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    t.add_argument("--quiet", action="store_true")

    e = sub.add_parser("eval", help="greedy evaluation on fixed test grids")
    e.add_argument("checkpoint", nargs="?", type=Path, default=DEFAULT_CHECKPOINT)
    common(e)
    e.add_argument("--split", choices=("test", "val"), default="test")
    e.add_argument("--samples", type=positive_int, default=1000)
    e.add_argument("--batch-size", type=positive_int, default=250)
    e.add_argument("--weights", choices=("last", "best"), default="last")
    e.add_argument("--dtype", choices=FLOAT_DTYPES, default="float32")
    e.add_argument("--quantize-cache", action="store_true", help="store the MLA latent cache as int8 (per-token scale)")
    e.add_argument("--json", action="store_true", help="print one JSON object")

    g = sub.add_parser("make-grid", help="render a grid of real MNIST digits to a PNG and print its label")
    g.add_argument("out", type=Path)
    g.add_argument("--grid", type=positive_int, default=4)
    g.add_argument("--digits", type=positive_int, help="how many cells hold a digit (default random)")
    g.add_argument("--seed", type=nonneg_int, default=0)
    g.add_argument("--split", choices=("test", "val", "train"), default="test")
    g.add_argument("--data-dir")

    pr = sub.add_parser("predict", help="read the digits in grid images (PNG/JPEG)")
    pr.add_argument("images", nargs="+", type=Path)
    common(pr)
    pr.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    pr.add_argument("--json", action="store_true")

    s = sub.add_parser("show", help="draw an image with its prediction and cross-attention maps")
    s.add_argument("checkpoint", type=Path)
    s.add_argument("image", type=Path)
    s.add_argument("--out", type=Path, required=True, help="the PNG to write")
    s.add_argument("--framework", choices=FRAMEWORKS,
                   help=f"default: the first installed of {', '.join(INFERENCE_FIRST)}")
    s.add_argument("--device", default="auto")
    s.add_argument("--layers", choices=("last", "all"), default="last",
                   help="cross-attention of the last decoder layer, or averaged over all layers")

    c = sub.add_parser("convert", help="convert checkpoints and weight files between formats")
    c.add_argument("src", type=Path)
    c.add_argument("dst", type=Path)
    c.add_argument("--dtype", choices=FLOAT_DTYPES)
    c.add_argument("--preset", choices=PRESETS)
    c.add_argument("--config", type=Path)
    c.add_argument("--grid", type=positive_int, help="grid of an original-format state_dict (default 10)")
    c.add_argument("--quantize", type=int, choices=BITS,
                   help="bits per Linear weight, MLX affine groups (needs MLX; DST must be a directory)")
    c.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=64, help="weights per scale/bias (--quantize)")

    b = sub.add_parser("bench", help="generation and training throughput, cache bytes (JSON, table, plot)")
    b.add_argument("--preset", choices=PRESETS, default="seed")
    b.add_argument("--checkpoint", type=Path)
    b.add_argument("--batch-size", type=positive_int, default=4)
    b.add_argument("--lengths", default="10,20,30,50")
    b.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    b.add_argument("--device", default="cpu")
    b.add_argument("--repeats", type=positive_int, default=3)
    b.add_argument("--train-steps", type=nonneg_int, default=5, help="timed training steps (0: no training)")
    b.add_argument("--train-batch-size", type=positive_int,
                   help="grids per training step (default: --batch-size; a GPU needs more to be busy)")
    b.add_argument("--dtype", choices=FLOAT_DTYPES, default="float32",
                   help="generation weights and activations (training is always float32)")
    b.add_argument("--threads", type=positive_int, help="CPU threads, where the framework takes a number (default: its own choice)")
    b.add_argument("--json", type=Path)
    b.add_argument("--plot", type=Path)
    parity_parser(sub)

    i = sub.add_parser("info", help="a checkpoint's config, size, dtype, quantization and training summary")
    i.add_argument("checkpoint", type=Path)
    i.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def parity_parser(sub):
    from .parity import DEFAULT_DTYPES, DEFAULT_SAMPLES, tolerance_help

    q = sub.add_parser("parity", help="compare a model across frameworks and dtypes: per-layer drift, greedy "
                                      "read-outs, round trip",
                       description="REFERENCE runs in the first of --frameworks, CANDIDATE (default: REFERENCE) "
                                   "in the second. Exit 0: every comparison within tolerance; 1: one is not; "
                                   "2: bad input. See docs/parity.md.")
    q.add_argument("reference", type=Path, help="checkpoint directory (quantized too), .pt/.npz/.safetensors, or an "
                                                "original-format state_dict")
    q.add_argument("candidate", type=Path, nargs="?", help="the same kinds; default REFERENCE")
    q.add_argument("--frameworks", help=f"one or two of {', '.join(FRAMEWORKS)} (default: those installed, in "
                                        f"that order)")
    q.add_argument("--dtype", default=",".join(DEFAULT_DTYPES), help=f"comma-separated of {', '.join(FLOAT_DTYPES)} "
                                                                     f"(default %(default)s)")
    q.add_argument("--samples", type=positive_int, default=DEFAULT_SAMPLES, help="test grids (default %(default)s)")
    q.add_argument("--modes", help="decode modes, comma-separated (default: every one the model has of absorbed, "
                                   "expanded, uncached)")
    q.add_argument("--json", type=Path, help="write the report as JSON (schema in docs/parity.md)")
    q.add_argument("--plot", type=Path, help="write a PNG of max relative difference per layer")
    q.add_argument("--tolerance", action="append", metavar="DTYPE=X",
                   help="override a dtype's max relative difference (layers and logits); also DTYPE.layer=X, "
                        f"DTYPE.logits=X, DTYPE.agreement=X. Defaults: {tolerance_help().replace('%', '%%')}")
    q.add_argument("--device", default="auto", help="auto, cpu or gpu, for both frameworks")
    q.add_argument("--preset", choices=PRESETS, help="config of a weights file without one")
    q.add_argument("--config", type=Path, help="a model config JSON for a weights file without one")
    q.add_argument("--grid", type=positive_int, help="grid of an original-format state_dict (default 10)")
    q.add_argument("--data-dir", help="folder with the four MNIST files (else $MLA_MNIST_DIR, else a cache)")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        from . import commands

        rc = getattr(commands, "cmd_" + args.command.replace("-", "_"))(args) or 0
        sys.stdout.flush()  # a reader that went away (`| head`) shows up here, where it is handled
        return rc
    except BrokenPipeError:
        # Nothing is wrong: the reader stopped reading. Point stdout at devnull so the interpreter's
        # final flush does not print a traceback, and exit like a process killed by SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except UserError as e:
        if debug:
            raise
        print(f"mla-mnist: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mla-mnist: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
