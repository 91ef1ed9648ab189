"""`mla-mnist`: train, eval, predict, show, make-grid, convert, bench.

Every user-fixable problem is a UserError: one line on stderr, exit code 2, no traceback (--debug shows it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from convert.errors import UserError, one_line

from .backends import DEFAULT_CHECKPOINT, FRAMEWORKS, default_framework


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2, like ours
        raise UserError(f"{self.prog}: {message} (see --help)")

    def exit(self, status=0, message=None):
        sys.stdout.flush()  # --help into a closed pipe fails here, inside main(), not at interpreter exit
        super().exit(status, message)


MAX_INT = 2**63 - 1  # past this no count, step or seed means anything, and numpy would overflow
# Upper bounds per flag, checked as the flag is parsed: what fits a machine (and a grid image) at all.
LIMITS = {"--samples": 10_000_000, "--val-samples": 10_000_000, "--train-samples": 10_000_000, "--grid": 64,
          "--digits": 64 * 64, "--max-length": 100_000, "--batch-size": 65_536, "--train-batch-size": 65_536,
          "--epochs": 1_000_000, "--repeats": 100_000, "--threads": 4096}
MAX_LENGTH = LIMITS["--max-length"]


def _int(text):
    text = str(text).strip()
    if len(text.lstrip("+-")) > 19:  # refuse 10**100000 before int() spends time on it
        raise argparse.ArgumentTypeError(f"{text[:20]}... is not an integer up to {MAX_INT}")
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None


def positive_int(text):
    v = _int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    if v > MAX_INT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_INT}, got {v}")
    return v


def nonneg_int(text):
    text = str(text)
    v = _int(text) if text.strip().lstrip("-").isdigit() else None
    if v is None or v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    if v > MAX_INT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_INT}, got {v}")
    return v


def at_most(limit, parse=positive_int):
    """`parse`, then refuse values over `limit` with a message that names the bound."""
    def bounded(text):
        v = parse(text)
        if v > limit:
            raise argparse.ArgumentTypeError(f"{v} is over the limit of {limit:,}")
        return v
    bounded.__name__ = parse.__name__
    return bounded


def length_list(text):
    """A comma-separated list of generation lengths, each an integer up to MAX_LENGTH; kept as text (the
    command checks the lower bound)."""
    parts = [t.strip() for t in str(text).split(",") if t.strip()]
    if not parts or len(parts) > 1000:
        raise argparse.ArgumentTypeError(f"expected up to 1000 comma-separated lengths, got {text[:40]!r}")
    check = at_most(MAX_LENGTH, _int)
    for part in parts:
        check(part)
    return text


def _apply_limits(parser):
    """Bound every integer flag named in LIMITS, in every sub-command (the parser itself stays as built)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _apply_limits(sub)
        elif action.dest == "lengths" and action.type is None:
            action.type = length_list
        else:
            limit = next((LIMITS[o] for o in action.option_strings if o in LIMITS), None)
            if limit is not None and action.type in (positive_int, nonneg_int):
                action.type = at_most(limit, action.type)
    return parser


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
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    def common(sp, framework_default=None):
        sp.add_argument("--framework", choices=FRAMEWORKS, default=framework_default,
                        help="torch or mlx (default: mlx where installed, else torch)")
        sp.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (torch) or gpu (mlx)")
        sp.add_argument("--data-dir", help="folder with the four MNIST files (else $MLA_MNIST_DIR, else a cache)")

    t = sub.add_parser("train", help="train a model")
    common(t)
    t.add_argument("--preset", help="tiny | small | seed (default small)")
    t.add_argument("--config", type=Path, help="a model config JSON (instead of --preset)")
    t.add_argument("--attention", choices=("mla", "mha"), help="override the preset's attention")
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
    e.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
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
    s.add_argument("--framework", choices=FRAMEWORKS, help="torch or mlx (default: mlx where installed, else torch)")
    s.add_argument("--device", default="auto")
    s.add_argument("--layers", choices=("last", "all"), default="last",
                   help="cross-attention of the last decoder layer, or averaged over all layers")

    c = sub.add_parser("convert", help="convert checkpoints and weight files between formats")
    c.add_argument("src", type=Path)
    c.add_argument("dst", type=Path)
    c.add_argument("--dtype", choices=("float32", "float16", "bfloat16"))
    c.add_argument("--preset")
    c.add_argument("--config", type=Path)
    c.add_argument("--grid", type=positive_int, help="grid of an original-format state_dict (default 10)")
    c.add_argument("--quantize", type=int, choices=(4, 8),
                   help="bits per Linear weight, MLX affine groups (needs MLX; DST must be a directory)")
    c.add_argument("--group-size", type=int, choices=(32, 64), default=64, help="weights per scale/bias (--quantize)")

    b = sub.add_parser("bench", help="generation and training throughput, cache bytes (JSON, table, plot)")
    b.add_argument("--preset", default="seed")
    b.add_argument("--checkpoint", type=Path)
    b.add_argument("--batch-size", type=positive_int, default=4)
    b.add_argument("--lengths", default="10,20,30,50")
    b.add_argument("--frameworks", default="torch,mlx")
    b.add_argument("--device", default="cpu")
    b.add_argument("--repeats", type=positive_int, default=3)
    b.add_argument("--train-steps", type=nonneg_int, default=5, help="timed training steps (0: no training)")
    b.add_argument("--train-batch-size", type=positive_int,
                   help="grids per training step (default: --batch-size; a GPU needs more to be busy)")
    b.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="generation weights and activations (training is always float32)")
    b.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's own choice)")
    b.add_argument("--json", type=Path)
    b.add_argument("--plot", type=Path)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = _apply_limits(build_parser()).parse_args(argv)
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
        print(f"mla-mnist: error: {one_line(e)}", file=sys.stderr)
        return 2
    except RecursionError:
        if debug:
            raise
        # Only hostile input recurses this deep here (JSON nested thousands of levels, read by a JSON parser).
        print("mla-mnist: error: an input file is nested too deeply to read (JSON with thousands of levels?): "
              "give a flat config or checkpoint file", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mla-mnist: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the last resort: anything else is a bug, still reported on one line
        if debug:
            raise
        print(f"mla-mnist: internal error (a bug, please report): {type(e).__name__}: {one_line(e)[:500]}; "
              "rerun with --debug for the traceback", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
