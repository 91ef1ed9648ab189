"""`mla-mnist`: train, eval, predict, show, make-grid, convert, bench, parity, info.

Every user-fixable problem is a UserError: one line on stderr, exit code 2, no traceback (--debug shows it).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from convert.checkpoint import FLOAT_DTYPES, by_name, shipped
from convert.errors import UserError, one_line
from convert.formats import ACCEPTED as ACCEPTED_SOURCES
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


MAX_INT = 2**63 - 1  # past this no count, step or seed means anything, and numpy would overflow
# Upper bounds per flag, checked as the flag is parsed: what fits a machine (and a grid image) at all.
LIMITS = {
    "--samples": 10_000_000,
    "--val-samples": 10_000_000,
    "--train-samples": 10_000_000,
    "--grid": 64,
    "--digits": 64 * 64,
    "--max-length": 100_000,
    "--batch-size": 65_536,
    "--train-batch-size": 65_536,
    "--epochs": 1_000_000,
    "--repeats": 100_000,
    "--threads": 4096,
}
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


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks and shows each option's default where it has one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            action.default not in (None, False, argparse.SUPPRESS)
            and "%(default)" not in text
            and action.option_strings
            and "(default" not in text
        ):
            text += " (default: %(default)s)"
        return text


EXAMPLES = {
    "train": [
        "mla-mnist train --preset tiny --framework mlx --epochs 1 --train-samples 2000 --out runs/tiny",
        "mla-mnist train --preset small --bf16 --out runs/small          # the shipped model's recipe",
        "mla-mnist train --resume runs/small                             # continue an interrupted run",
    ],
    "eval": [
        "mla-mnist eval --samples 1000                                   # the shipped model, MLX",
        "mla-mnist eval runs/tiny --framework torch --samples 500 --json",
    ],
    "make-grid": ["mla-mnist make-grid grid.png --digits 9 --seed 3"],
    "predict": ["mla-mnist predict grid.png photo.jpg --json"],
    "show": ["mla-mnist show grid.png --out seen.png                          # the shipped model"],
    "convert": ["mla-mnist convert runs/tiny tiny.pt", "mla-mnist convert runs/tiny runs/tiny-q8 --quantize 8"],
    "bench": [
        "mla-mnist bench --preset tiny                                   # writes runs/bench-tiny/",
        "mla-mnist bench --preset seed --frameworks torch --repeats 5 --out runs/bench-seed",
    ],
}


STATIC_PATHS = ("auto", "off", "eager", "graph", "compiled", "fused")  # generate(static=...); auto is None


def build_parser() -> Parser:
    checkpoint_help = f"a checkpoint directory or a shipped one's name ({', '.join(shipped())}; default: small)"
    p = Parser(prog="mla-mnist", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    from .info import package_version

    p.add_argument("--version", action="version", version=f"mla-mnist {package_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    def command(name, help):
        epilog = "example:\n  " + "\n  ".join(EXAMPLES[name])
        return sub.add_parser(name, help=help, description=help, epilog=epilog, formatter_class=HelpFormatter)

    def common(sp, prefer=INFERENCE_FIRST):
        sp.add_argument(
            "--framework",
            choices=FRAMEWORKS,
            help=f"default: the first installed of {', '.join(prefer)}",
        )
        sp.add_argument(
            "--device", default="auto", help="auto, cpu or gpu (each framework's own names work too: cuda, cuda:N, mps)"
        )
        sp.add_argument(
            "--data-dir",
            help="folder with the four MNIST files (default: $MLA_MNIST_DIR, else a user cache, downloaded once)",
        )

    def checkpoint_argument(sp):
        sp.add_argument(
            "checkpoint",
            nargs="?",
            type=by_name,
            default=DEFAULT_CHECKPOINT,
            help=checkpoint_help,
        )

    t = command("train", "train a model")
    common(t, TRAINING_FIRST)
    t.add_argument("--preset", choices=PRESETS, help=f"model and recipe (default {DEFAULT_PRESET}): {preset_help()}")
    t.add_argument("--config", type=Path, help="a model config JSON (instead of --preset)")
    t.add_argument("--attention", choices=ATTENTION, help="override the preset's attention")
    t.add_argument("--kv-heads", type=positive_int, help="K/V heads of --attention gqa (default heads // 4)")
    t.add_argument("--epochs", type=positive_int, help="passes over --train-samples grids (default: the preset's)")
    t.add_argument("--batch-size", type=positive_int, help="grids per step (default: the preset's)")
    t.add_argument("--lr", type=positive_float, help="peak learning rate (default: the preset's)")
    t.add_argument("--warmup", type=nonneg_int, help="linear warm-up steps (default: the preset's)")
    t.add_argument("--weight-decay", type=nonneg_float, help="AdamW decoupled weight decay (default: the preset's)")
    t.add_argument("--label-smoothing", type=nonneg_float, help="cross-entropy label smoothing (default: the preset's)")
    t.add_argument(
        "--ema",
        type=nonneg_float,
        metavar="DECAY",
        help="validate and save an exponential moving average of the weights with this decay per step, "
        "e.g. 0.999; 0 turns it off (default: the preset's)",
    )
    t.add_argument("--train-samples", type=positive_int, help="grids per epoch (default: the preset's)")
    t.add_argument("--val-samples", type=positive_int, default=512, help="validation grids scored after each epoch")
    t.add_argument(
        "--augment",
        nargs="?",
        const="shift",
        choices=("shift", "affine"),
        help="per-digit augmentation: shift (up to 2 px; the default when no value is given) or "
        "affine (shift + rotation, scale, shear)",
    )
    t.add_argument(
        "--full-grids",
        type=nonneg_int,
        metavar="STEPS",
        help="the first STEPS steps train on grids with every cell occupied, where the k-th digit is in the k-th "
        "cell (default: the preset's; 0 with --init)",
    )
    t.add_argument("--seed", type=nonneg_int, help="data order and initial weights (default 0)")
    t.add_argument("--out", type=Path, help="checkpoint directory (default runs/<preset>)")
    t.add_argument("--force", action="store_true", help="start a new run over an existing --out checkpoint")
    t.add_argument("--resume", type=Path, help="continue the run saved in this checkpoint directory")
    t.add_argument(
        "--init",
        type=by_name,
        help="start from this checkpoint's weights, or a shipped one's (fresh optimiser: fine-tuning)",
    )
    t.add_argument("--save-every", type=nonneg_int, default=0, help="also checkpoint every N steps (0: per epoch)")
    t.add_argument("--max-steps", type=nonneg_int, default=0, help="stop after step N, schedule unchanged (0: never)")
    t.add_argument(
        "--max-minutes",
        type=nonneg_float,
        default=0.0,
        help="stop with a checkpoint once this much wall time has passed, schedule unchanged; continue with "
        "--resume (0: never)",
    )
    t.add_argument("--bf16", action="store_true", help="bfloat16 compute, float32 weights and optimiser state")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    e = command("eval", "greedy evaluation on fixed test grids")
    checkpoint_argument(e)
    common(e)
    e.add_argument("--split", choices=("test", "val"), default="test", help="MNIST digits the grids are made of")
    e.add_argument("--samples", type=positive_int, default=1000, help="grids to read (the same fixed ones every run)")
    e.add_argument(
        "--batch-size",
        type=positive_int,
        help="grids per generate call (default: 64 on a CPU; on a GPU as many as the model's activations allow, "
        "in equal calls)",
    )
    e.add_argument(
        "--weights", choices=("last", "best"), default="last", help="the last weights, or the best on validation"
    )
    e.add_argument(
        "--dtype",
        choices=("auto", *FLOAT_DTYPES),
        default="auto",
        help="compute dtype (auto: the framework's choice for the device: float32 on a CPU, bfloat16 for torch "
        "on a GPU)",
    )
    e.add_argument("--quantize-cache", action="store_true", help="store the MLA latent cache as int8 (per-token scale)")
    e.add_argument(
        "--static",
        choices=STATIC_PATHS,
        default="auto",
        help="the fixed-shape decoding step: off (the step-by-step loop), eager, graph (CUDA graph, torch), compiled, "
        "fused (CUDA: in MLX the whole step as one kernel, in torch its products fused by torch.compile); auto: "
        "graph on a CUDA GPU in torch, fused on MLX's CUDA backend up to 512 grids a call, else compiled on an "
        "MLX GPU, off on a CPU",
    )
    e.add_argument(
        "--readouts",
        type=Path,
        help="also write the read-outs to this text file, one line of digits per grid in order (the JSON's "
        "readout_sha256 is its sha256sum): diff two runs to see where they read differently",
    )
    e.add_argument("--force", action="store_true", help="replace an existing --readouts file")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--quiet", action="store_true", help="no progress bar")

    g = command("make-grid", "render a grid of real MNIST digits to a PNG and print its label")
    g.add_argument("out", type=Path, help="the PNG to write")
    g.add_argument("--grid", type=positive_int, default=4, help="cells per side")
    g.add_argument("--digits", type=positive_int, help="how many cells hold a digit (default random)")
    g.add_argument("--seed", type=nonneg_int, default=0, help="which grid")
    g.add_argument("--split", choices=("test", "val", "train"), default="test", help="MNIST digits to use")
    g.add_argument("--data-dir", help="folder with the four MNIST files (default: $MLA_MNIST_DIR, else a cache)")

    pr = command("predict", "read the digits in grid images (PNG/JPEG)")
    pr.add_argument("images", nargs="+", type=Path, help="image files")
    common(pr)
    pr.add_argument(
        "--checkpoint",
        type=by_name,
        default=DEFAULT_CHECKPOINT,
        help=checkpoint_help,
    )
    pr.add_argument("--json", action="store_true", help="print one JSON list")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.add_argument(
        "--grid", type=positive_int, help="the images hold an NxN grid (at most the model's; default: the model's own)"
    )

    s = command("show", "draw an image with its prediction and cross-attention maps")
    s.add_argument(
        "args",
        nargs="+",
        metavar="[CHECKPOINT] IMAGE",
        help="the image, after a checkpoint directory (default: the shipped small model)",
    )
    s.add_argument("--out", type=Path, required=True, help="the PNG to write")
    s.add_argument(
        "--framework", choices=FRAMEWORKS, help=f"default: the first installed of {', '.join(INFERENCE_FIRST)}"
    )
    s.add_argument("--device", default="auto", help="auto, cpu or gpu")
    s.add_argument(
        "--layers",
        choices=("last", "all"),
        default="last",
        help="cross-attention of the last decoder layer, or averaged over all layers",
    )

    c = command("convert", "convert checkpoints and weight files between formats")
    c.add_argument("src", type=Path, help=ACCEPTED_SOURCES)
    c.add_argument("dst", type=Path, help="a checkpoint directory, or a .pt/.pth, .npz or .safetensors file")
    c.add_argument("--force", action="store_true", help="replace an existing DST")
    c.add_argument("--dtype", choices=FLOAT_DTYPES, help="weights dtype to write (default: the source's)")
    c.add_argument("--preset", choices=PRESETS, help="the model of a bare weights file")
    c.add_argument("--config", type=Path, help="the model config JSON of a bare weights file")
    c.add_argument("--grid", type=positive_int, help="grid of an original-format state_dict (default 10)")
    c.add_argument(
        "--quantize",
        type=int,
        choices=BITS,
        help="bits per Linear weight, MLX affine groups (needs MLX; DST must be a directory)",
    )
    c.add_argument(
        "--group-size", type=int, choices=GROUP_SIZES, default=64, help="weights per scale/bias (--quantize)"
    )
    c.add_argument("--quiet", action="store_true", help="no progress bar")

    b = command("bench", "generation and training throughput, cache bytes (JSON, table, plot)")
    b.add_argument("--preset", choices=PRESETS, default="seed", help="random weights of this preset's model")
    b.add_argument(
        "--checkpoint",
        type=by_name,
        help="a trained checkpoint (or a shipped one's name) instead of --preset",
    )
    b.add_argument("--batch-size", type=positive_int, default=4, help="grids per generate call")
    b.add_argument("--lengths", default="10,20,30,50", help="forced generation lengths, comma-separated")
    b.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="comma-separated")
    b.add_argument(
        "--attentions", default=",".join(ATTENTION), help="attention variants of the generation rows, comma-separated"
    )
    b.add_argument(
        "--decode-batches",
        default="1,4,64",
        help="batch sizes of the decoding-path rows (the loop against the fixed-shape step, eager / graph / "
        "compiled / fused), comma-separated; empty: none",
    )
    b.add_argument(
        "--decode-paths",
        help="the decoding paths to time, comma-separated: off, eager, graph, compiled, fused (default: all the "
        "device has; the loop, off, always runs: the others' tokens are compared with it)",
    )
    b.add_argument(
        "--decode-length",
        type=positive_int,
        default=50,
        help="forced tokens of the decoding-path rows (at most the model's)",
    )
    b.add_argument(
        "--eval-samples",
        type=nonneg_int,
        default=0,
        help="also read this many fixed test grids through every decoding path (grids/s; 0: skip)",
    )
    b.add_argument("--device", default="cpu", help="cpu or gpu (each framework's own names work too)")
    b.add_argument("--repeats", type=positive_int, default=3, help="timed runs per row (the median is kept)")
    b.add_argument("--train-steps", type=nonneg_int, default=5, help="timed training steps (0: no training)")
    b.add_argument(
        "--train-batch-size",
        type=positive_int,
        help="grids per training step (default: --batch-size; a GPU needs more to be busy)",
    )
    b.add_argument("--dtype", choices=FLOAT_DTYPES, default="float32", help="generation weights and activations")
    b.add_argument(
        "--train-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="training compute (bfloat16: float32 weights and optimiser state, as train --bf16)",
    )
    b.add_argument(
        "--threads", type=positive_int, help="CPU threads, where the framework takes a number (default: its own choice)"
    )
    b.add_argument(
        "--render-batch",
        type=nonneg_int,
        default=256,
        help="grids per batch when timing the training-grid renderers (0: skip them)",
    )
    b.add_argument("--out", type=Path, help="folder for bench.json and bench.png (default runs/bench-<preset>)")
    b.add_argument("--json", type=Path, help="the JSON file (default OUT/bench.json)")
    b.add_argument("--plot", type=Path, help="the PNG file (default OUT/bench.png)")
    b.add_argument("--force", action="store_true", help="replace existing result files")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    parity_parser(sub)

    i = sub.add_parser(
        "info",
        help="a checkpoint's config, size, dtype, quantization and training summary",
        epilog="example:\n  mla-mnist info mla_mnist/checkpoints/small",
        formatter_class=HelpFormatter,
    )
    checkpoint_argument(i)
    i.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def parity_parser(sub):
    from .parity import DEFAULT_DTYPES, DEFAULT_SAMPLES, tolerance_help

    q = sub.add_parser(
        "parity",
        help="compare a model across frameworks and dtypes: per-layer drift, greedy read-outs, round trip",
        description="REFERENCE runs in the first of --frameworks, CANDIDATE (default: REFERENCE) "
        "in the second. Exit 0: every comparison within tolerance; 1: one is not; "
        "2: bad input. See docs/parity.md.",
        epilog="example:\n  mla-mnist parity mla_mnist/checkpoints/small\n"
        "  mla-mnist parity runs/tiny tiny.npz --frameworks torch,mlx --json parity.json",
        formatter_class=HelpFormatter,
    )
    q.add_argument(
        "reference",
        type=by_name,
        help="checkpoint directory (quantized too), .pt/.npz/.safetensors, or an original-format state_dict",
    )
    q.add_argument("candidate", type=by_name, nargs="?", help="the same kinds; default REFERENCE")
    q.add_argument(
        "--frameworks", help=f"one or two of {', '.join(FRAMEWORKS)} (default: those installed, in that order)"
    )
    q.add_argument(
        "--dtype",
        default=",".join(DEFAULT_DTYPES),
        help=f"comma-separated of {', '.join(FLOAT_DTYPES)} (default %(default)s)",
    )
    q.add_argument("--samples", type=positive_int, default=DEFAULT_SAMPLES, help="test grids (default %(default)s)")
    q.add_argument(
        "--modes",
        help="decode modes, comma-separated (default: every one the model has of absorbed, expanded, uncached)",
    )
    q.add_argument("--json", type=Path, help="write the report as JSON (schema in docs/parity.md)")
    q.add_argument("--plot", type=Path, help="write a PNG of max relative difference per layer")
    q.add_argument(
        "--tolerance",
        action="append",
        metavar="DTYPE=X",
        help="override a dtype's max relative difference (layers and logits); also DTYPE.layer=X, "
        f"DTYPE.logits=X, DTYPE.agreement=X. Defaults: {tolerance_help().replace('%', '%%')}",
    )
    q.add_argument("--device", default="auto", help="auto, cpu or gpu, for both frameworks")
    q.add_argument("--preset", choices=PRESETS, help="config of a weights file without one")
    q.add_argument("--config", type=Path, help="a model config JSON for a weights file without one")
    q.add_argument("--grid", type=positive_int, help="grid of an original-format state_dict (default 10)")
    q.add_argument("--data-dir", help="folder with the four MNIST files (else $MLA_MNIST_DIR, else a cache)")


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
        print(
            "mla-mnist: error: an input file is nested too deeply to read (JSON with thousands of levels?): "
            "give a flat config or checkpoint file",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("mla-mnist: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the last resort: anything else is a bug, still reported on one line
        if debug:
            raise
        print(
            f"mla-mnist: internal error (a bug, please report): {type(e).__name__}: {one_line(e)[:500]}; "
            "rerun with --debug for the traceback",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
