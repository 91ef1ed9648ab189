"""`mla-mnist parity`: do two frameworks (or two files) compute the same model?

REFERENCE runs in the first of --frameworks, CANDIDATE (default: REFERENCE again) in the second (or in the
same one, if one framework is given). Either may be anything the project reads (convert.formats.read): a
checkpoint directory, a quantized checkpoint, a .pt/.npz/.safetensors weights file, an original-format
state_dict. Both models are built from numpy weights (a quantized REFERENCE is dequantized; a quantized CANDIDATE
directory runs as its framework loads it, MLX's quantized matmuls included). On the fixed test grids of `eval`:

1. activations at every boundary (Backend.trace: patch_embed, encoder.<i>, encoder_out, decoder.<i>, logits),
   teacher-forced on the grids' labels, compared reference vs candidate in each dtype, and each dtype vs
   float32 within a framework: max |d|, max relative d (max |d| / max |reference|), cosine similarity;
2. greedy read-outs in every decode mode and cache kind (float; int8 where the model has MLA's latent cache):
   token and whole-sequence agreement; for each grid that differs, the first position where the read-outs part
   and the reference's top-1 minus top-2 logit there (a near tie when it is <= 2 x the max |d logits|
   measured for the same pair: then the difference in rounding alone may flip the argmax);
3. the round trip: weights saved by one framework and loaded by the other come back bit for bit.

A comparison passes when its max relative d is within its dtype's tolerance at every layer and at the
logits, and when its greedy sequence agreement is at least the dtype's minimum (or every disagreement is a
near tie). Exit 0: all pass; 1: one does not; 2: bad input.

JSON (--json FILE), schema "mla-mnist.parity/1" (docs/parity.md has an example):
    schema: str; passed: bool; verdict: str (the table's first line)
    reference, candidate: {path: str, what: str, framework: str, quantization: dict | null}
    samples: int; grid: int; device: str; dtypes: [str]; modes: [str]; boundaries: [str] (in order)
    tolerances: {dtype: {layer: float, logits: float, min_sequence_agreement: float}}
    activations: [{pair: str, dtype: str, reference: str, candidate: str, ok: bool, first_over: str | null,
                   layers: [{boundary: str, max_abs: float, max_rel: float, cosine: float, tolerance: float,
                             ok: bool}]}]
    greedy: [{pair: str, dtype: str, mode: str, cache: "float" | "int8", reference: str, candidate: str,
              token_agreement: float, sequence_agreement: float, near_tie_margin: float,
              min_sequence_agreement: float, ok: bool,
              disagreements: [{grid: int, position: int, reference_margin: float, near_tie: bool}]}]
    round_trip: [{weights: "reference" | "candidate", saved_by: str, loaded_by: str, tensors: int, exact: bool,
                  mismatched: [str]}]
    first_failure: null | {check: "activations" | "greedy" | "round_trip", pair: str, dtype: str | null,
                           boundary: str | null, value: float | null, tolerance: float | null}
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convert import checkpoint
from convert.checkpoint import FLOAT_DTYPES
from convert.config import ModelConfig
from convert.errors import UserError
from convert.formats import read
from convert.quantize import dequantize
from mnist_grid.tokens import PAD

from .backends import FRAMEWORKS, get_backend, installed
from .evaluation import eval_set, predict_tokens

SCHEMA = "mla-mnist.parity/1"
DEFAULT_DTYPES = ("float32", "bfloat16")
DEFAULT_SAMPLES = 16  # MLX's Linux CPU backend is slow: 16 grids of the small model take a few minutes there
SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


@dataclass(frozen=True)
class Tolerance:
    layer: float  # max relative d at any boundary before the logits
    logits: float  # ... at the logits
    min_sequence_agreement: float  # whole greedy read-outs equal, fraction of the grids


# Derived from measurements (docs/parity.md has them): the shipped small checkpoint and tiny checkpoints trained
# for 10 steps in each framework, 16 test grids, CPU. Layers and logits: 10x the largest float32 drift, 4x the
# largest bfloat16/float16 drift, rounded up. Greedy: every read-out agreed in every measurement; the minimum
# allows 4x the ~3% of grids that bf16 changes on a briefly trained model (tests/test_parity.py), 1% for fp16.
TOLERANCES = {
    "float32": Tolerance(layer=7e-5, logits=3e-5, min_sequence_agreement=1.0),  # measured 6.3e-6, 2.3e-6
    "bfloat16": Tolerance(layer=0.3, logits=0.2, min_sequence_agreement=0.88),  # measured 6.9e-2, 4.3e-2
    "float16": Tolerance(layer=0.04, logits=0.05, min_sequence_agreement=0.96),  # measured 7.9e-3, 1.1e-2
}


def tolerance_help() -> str:
    return "; ".join(
        f"{d}: layers {t.layer:g}, logits {t.logits:g}, greedy sequences >= {t.min_sequence_agreement:.0%}"
        for d, t in TOLERANCES.items()
    )


# ---- arguments ------------------------------------------------------------------------------------------------
def parse_list(text: str | None, allowed, flag: str, default) -> tuple[str, ...]:
    if text is None:
        return tuple(default)
    items = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise UserError(f"{flag} {text!r}: choose from {', '.join(allowed)} (comma-separated)")
    return items


def parse_tolerances(items) -> dict[str, Tolerance]:
    """--tolerance DTYPE=X (layers and logits), DTYPE.layer=X, DTYPE.logits=X, DTYPE.agreement=X."""
    out = dict(TOLERANCES)
    fields = {"layer": "layer", "logits": "logits", "agreement": "min_sequence_agreement"}
    for item in items or ():
        key, _, value = item.partition("=")
        dtype, _, field = key.strip().partition(".")
        try:
            x = float(value)
        except ValueError:
            x = float("nan")
        if dtype not in FLOAT_DTYPES or (field and field not in fields) or not x >= 0 or x == float("inf"):
            raise UserError(
                f"--tolerance {item!r}: expected DTYPE=X or DTYPE.layer|logits|agreement=X, DTYPE one "
                f"of {', '.join(FLOAT_DTYPES)}, X a finite number >= 0"
            )
        t = out[dtype]
        changes = {"layer": x, "logits": x} if not field else {fields[field]: x}
        out[dtype] = Tolerance(**{**t.__dict__, **changes})
    return out


# ---- the two sides --------------------------------------------------------------------------------------------
@dataclass
class Side:
    path: Path
    what: str
    config: ModelConfig  # float (quantization None)
    weights: dict[str, np.ndarray]  # float32 (dequantized where the file is quantized)
    quantization: dict | None


def load_side(path, config: ModelConfig | None = None, grid: int | None = None) -> Side:
    path = Path(path)
    src = read(path, None if path.is_dir() else config, grid)
    cfg = src.config
    if grid is not None and cfg.grid != grid:  # no weight depends on the grid
        cfg = cfg.replace(grid=grid)
    checkpoint.validate_weights(src.weights, cfg, path)
    weights, q = src.weights, cfg.quantization
    if q:
        weights = dequantize(weights, q["bits"], q["group_size"])
        cfg = cfg.replace(quantization=None)
    weights = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
    return Side(path, src.what, cfg, weights, q)


def _same_model(a: ModelConfig, b: ModelConfig):
    da, db = a.to_dict(), b.to_dict()
    diff = [k for k in da if da[k] != db.get(k) and k != "grid"]
    if diff:
        what = ", ".join(f"{k} {da[k]} vs {db.get(k)}" for k in diff[:3])
        raise UserError(
            f"REFERENCE and CANDIDATE are different models ({what}): parity compares one model's weights in two places"
        )


class Run:
    """One side in one framework and dtype: its model, traced activations and greedy read-outs."""

    def __init__(self, label, role, backend, side: Side, dtype: str, quantized_dir: bool):
        self.label, self.role, self.backend, self.dtype = label, role, backend, dtype
        if quantized_dir:  # the framework's own loader: MLX runs the quantized matmuls, torch dequantizes
            self.model = backend.load(side.path, dtype=dtype)
        else:
            self.model = backend.load_weights(backend.build(side.config), side.weights)
            if dtype != "float32":
                self.model = backend.cast(self.model, dtype)
        self.greedy: dict[tuple[str, str], np.ndarray] = {}

    @property
    def name(self):
        return f"{self.label} {self.dtype}"


def _compare(a: np.ndarray, b: np.ndarray) -> dict:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    max_abs = float(np.abs(a64 - b64).max())
    scale = float(np.abs(a64).max())
    denom = float(np.linalg.norm(a64) * np.linalg.norm(b64))
    cosine = float(a64 @ b64 / denom) if denom > 0 else (1.0 if max_abs == 0 else 0.0)
    return {
        "max_abs": max_abs,
        "max_rel": max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf")),
        "cosine": cosine,
    }


def _margins(run: Run, images, tokens, grids, positions) -> list[float]:
    """The run's top-1 minus top-2 logit predicting tokens[g, p], teacher-forced on its own tokens."""
    logits = run.backend.trace(run.model, images[grids], tokens[grids, :-1])["logits"]
    out = []
    for i, p in enumerate(positions):
        top2 = np.sort(logits[i, p - 1])[-2:]
        out.append(float(top2[1] - top2[0]))
    return out


def _greedy_compare(ref: Run, cand: Run, images, key, near_tie: float) -> dict:
    a, b = ref.greedy[key], cand.greedy[key]
    live = (a != PAD) | (b != PAD)
    live[:, 0] = False  # <start> is given, not read
    token_agreement = float((a == b)[live].mean()) if live.any() else 1.0
    rows = np.flatnonzero((a != b).any(axis=1))
    positions = [int(np.flatnonzero(a[g] != b[g])[0]) for g in rows]
    margins = _margins(ref, images, a, rows, positions) if len(rows) else []
    return {
        "token_agreement": token_agreement,
        "sequence_agreement": 1 - len(rows) / len(a),
        "near_tie_margin": near_tie,
        "disagreements": [
            {"grid": int(g), "position": p, "reference_margin": m, "near_tie": m <= near_tie}
            for g, p, m in zip(rows, positions, margins)
        ],
    }


def _round_trip(saver, loader, model, expected: dict[str, np.ndarray], tmp: Path, name: str) -> dict:
    """`saver` writes the model's checkpoint, `loader` reads it back: its weights must be `expected` exactly."""
    saver.save(model, tmp / name)
    back = loader.weights(loader.load(tmp / name))
    mismatched = sorted(
        k
        for k in expected.keys() | back.keys()
        if k not in back
        or k not in expected
        or back[k].shape != expected[k].shape
        or not np.array_equal(back[k], expected[k])
    )
    return {
        "weights": name,
        "saved_by": saver.name,
        "loaded_by": loader.name,
        "tensors": len(expected),
        "exact": not mismatched,
        "mismatched": mismatched[:20],
    }


# ---- the suite ------------------------------------------------------------------------------------------------
def run_parity(
    reference,
    candidate=None,
    *,
    frameworks=None,
    dtypes=DEFAULT_DTYPES,
    samples=DEFAULT_SAMPLES,
    modes=None,
    tolerances=None,
    device="auto",
    config=None,
    grid=None,
    data_dir=None,
) -> dict:
    tolerances = tolerances or TOLERANCES
    frameworks = tuple(frameworks or [f for f in FRAMEWORKS if installed(f)])
    if not frameworks:
        raise UserError("neither torch nor mlx is installed: pip install 'mla-mnist[mlx]' or 'mla-mnist[torch]'")
    if len(frameworks) > 2:
        raise UserError("--frameworks takes one or two frameworks: REFERENCE runs in the first, CANDIDATE in the last")
    ref_side = load_side(reference, config, grid)
    cand_side = load_side(candidate, config, grid) if candidate is not None else ref_side
    _same_model(ref_side.config, cand_side.config)
    f_ref, f_cand = frameworks[0], frameworks[-1]
    backends = {f: get_backend(f, device) for f in frameworks}
    two = candidate is not None or f_ref != f_cand or ref_side.quantization is not None
    labels = (f_ref, f_cand) if f_ref != f_cand else ("reference", "candidate")
    cfg = ref_side.config
    images, targets = eval_set("test", cfg.grid, samples, data_dir)
    teacher = targets[:, :-1]

    runs: dict[tuple[str, str], Run] = {}
    for dtype in dtypes:
        runs["reference", dtype] = Run(
            labels[0] if two else f_ref, "reference", backends[f_ref], ref_side, dtype, False
        )
        if two:
            quantized_dir = cand_side.quantization is not None and cand_side.path.is_dir()
            runs["candidate", dtype] = Run(labels[1], "candidate", backends[f_cand], cand_side, dtype, quantized_dir)
    first = runs["reference", dtypes[0]].model
    available = first.decode_modes
    if modes is None:
        modes = available
    missing = [m for m in modes if m not in available]
    if missing:
        raise UserError(f"--modes {','.join(missing)}: this {cfg.attention} model decodes in {', '.join(available)}")
    keys = [(m, "float") for m in modes] + [(m, "int8") for m in modes if m != "uncached" and "absorbed" in available]

    traces = {}
    for k, run in runs.items():
        traces[k] = run.backend.trace(run.model, images, teacher)
        for mode, cache in keys:
            run.greedy[mode, cache] = predict_tokens(
                run.backend, run.model, images, mode=mode, quantize_cache=cache == "int8"
            )
    boundaries = list(traces["reference", dtypes[0]])

    pairs = []  # (pair label, dtype, reference run key, candidate run key)
    if two:
        for dtype in dtypes:
            pairs.append((f"{labels[0]} vs {labels[1]}", dtype, ("reference", dtype), ("candidate", dtype)))
    if "float32" in dtypes:
        for role in ("reference", "candidate") if two else ("reference",):
            for dtype in dtypes:
                if dtype != "float32":
                    lab = runs[role, dtype].label
                    pairs.append((f"{lab} {SHORT[dtype]} vs f32", dtype, (role, "float32"), (role, dtype)))

    activations, greedy = [], []
    for pair, dtype, rk, ck in pairs:
        tol = tolerances[dtype]
        layers = []
        for b in boundaries:
            m = _compare(traces[rk][b], traces[ck][b])
            limit = tol.logits if b == "logits" else tol.layer
            layers.append({"boundary": b, **m, "tolerance": limit, "ok": m["max_rel"] <= limit})
        over = next((x["boundary"] for x in layers if not x["ok"]), None)
        activations.append(
            {
                "pair": pair,
                "dtype": dtype,
                "reference": runs[rk].name,
                "candidate": runs[ck].name,
                "ok": over is None,
                "first_over": over,
                "layers": layers,
            }
        )
        near_tie = 2 * layers[-1]["max_abs"]
        for key in keys:
            g = _greedy_compare(runs[rk], runs[ck], images, key, near_tie)
            ok = g["sequence_agreement"] >= tol.min_sequence_agreement or all(d["near_tie"] for d in g["disagreements"])
            greedy.append(
                {
                    "pair": pair,
                    "dtype": dtype,
                    "mode": key[0],
                    "cache": key[1],
                    "reference": runs[rk].name,
                    "candidate": runs[ck].name,
                    **g,
                    "min_sequence_agreement": tol.min_sequence_agreement,
                    "ok": ok,
                }
            )

    round_trip = []
    with tempfile.TemporaryDirectory(prefix="mla-mnist-parity-") as tmp:
        tmp = Path(tmp)
        a, b = backends[f_ref], backends[f_cand]
        ref_model = runs.get(("reference", "float32")) or Run("", "", a, ref_side, "float32", False)
        expected = a.weights(ref_model.model)
        other = b.load_weights(b.build(cfg), expected)  # the reference's weights in the other framework
        round_trip.append(_round_trip(b, a, other, expected, tmp, "reference"))
        if two:
            cand = runs.get(("candidate", "float32"))
            if cand is None:
                cand = Run(
                    "", "", b, cand_side, "float32", cand_side.quantization is not None and cand_side.path.is_dir()
                )
            round_trip.append(_round_trip(b, a, cand.model, cand_side.weights, tmp, "candidate"))

    report = {
        "schema": SCHEMA,
        "reference": {
            "path": str(ref_side.path),
            "what": ref_side.what,
            "framework": f_ref,
            "quantization": ref_side.quantization,
        },
        "candidate": {
            "path": str(cand_side.path),
            "what": cand_side.what,
            "framework": f_cand if two else f_ref,
            "quantization": cand_side.quantization,
        },
        "samples": int(len(images)),
        "grid": cfg.grid,
        "device": str(device),
        "dtypes": list(dtypes),
        "modes": list(modes),
        "boundaries": boundaries,
        "tolerances": {d: dict(tolerances[d].__dict__) for d in dtypes},
        "activations": activations,
        "greedy": greedy,
        "round_trip": round_trip,
    }
    report["first_failure"] = _first_failure(report)
    report["passed"] = report["first_failure"] is None
    report["verdict"] = _verdict(report)
    return report


def _first_failure(report) -> dict | None:
    order = {b: i for i, b in enumerate(report["boundaries"])}
    bad = [(order[c["first_over"]], c) for c in report["activations"] if not c["ok"]]
    if bad:
        _, c = min(bad, key=lambda x: x[0])
        layer = next(x for x in c["layers"] if x["boundary"] == c["first_over"])
        return {
            "check": "activations",
            "pair": c["pair"],
            "dtype": c["dtype"],
            "boundary": c["first_over"],
            "value": layer["max_rel"],
            "tolerance": layer["tolerance"],
        }
    for g in report["greedy"]:
        if not g["ok"]:
            return {
                "check": "greedy",
                "pair": g["pair"],
                "dtype": g["dtype"],
                "boundary": None,
                "value": g["sequence_agreement"],
                "tolerance": g["min_sequence_agreement"],
                "mode": g["mode"],
                "cache": g["cache"],
            }
    for r in report["round_trip"]:
        if not r["exact"]:
            return {
                "check": "round_trip",
                "pair": f"saved by {r['saved_by']}, loaded by {r['loaded_by']}",
                "dtype": None,
                "boundary": None,
                "value": None,
                "tolerance": None,
            }
    return None


def _verdict(report) -> str:
    n_act, n_greedy = len(report["activations"]), len(report["greedy"])
    where = f"{report['samples']} test grids, {', '.join(report['dtypes'])}"
    f = report["first_failure"]
    if f is None:
        return (
            f"PASS: {n_act} activation and {n_greedy} greedy comparisons within tolerance ({where}); "
            f"round trip bit-exact"
        )
    failed = (
        sum(not c["ok"] for c in report["activations"])
        + sum(not g["ok"] for g in report["greedy"])
        + sum(not r["exact"] for r in report["round_trip"])
    )
    if f["check"] == "activations":
        what = f"{f['boundary']} ({f['dtype']}, {f['pair']}) max rel {f['value']:.2e} > {f['tolerance']:.0e}"
    elif f["check"] == "greedy":
        what = (
            f"greedy {f['mode']}/{f['cache']} ({f['dtype']}, {f['pair']}) sequences {f['value']:.1%} < "
            f"{f['tolerance']:.0%}"
        )
    else:
        what = f"round trip {f['pair']}: weights differ"
    return f"FAIL: {failed} check(s) over tolerance ({where}); first over tolerance: {what}"


# ---- output ---------------------------------------------------------------------------------------------------
def format_report(report) -> str:
    lines = [report["verdict"], ""]
    r, c = report["reference"], report["candidate"]
    lines.append(
        f"reference {r['path']} ({r['what']}) in {r['framework']}; candidate {c['path']} ({c['what']}"
        + (f", {c['quantization']['bits']}-bit" if c["quantization"] else "")
        + f") in {c['framework']}"
    )
    acts = report["activations"]
    if acts:
        lines += ["", "max relative difference per layer (max |d| / max |reference|; * over tolerance)"]
        w = max(14, *(len(a["pair"]) + 2 for a in acts))
        bw = max(len(b) for b in report["boundaries"] + ["min cosine"]) + 2
        lines.append("".ljust(bw) + "".join(a["pair"].rjust(w) for a in acts))
        lines.append("".ljust(bw) + "".join(a["dtype"].rjust(w) for a in acts))
        for i, b in enumerate(report["boundaries"]):
            cells = []
            for a in acts:
                x = a["layers"][i]
                cells.append((f"{x['max_rel']:.2e}" + ("*" if not x["ok"] else " ")).rjust(w))
            lines.append(b.ljust(bw) + "".join(cells))
        lines.append(
            "tolerance".ljust(bw)
            + "".join((f"{a['layers'][0]['tolerance']:.0e}/{a['layers'][-1]['tolerance']:.0e} ").rjust(w) for a in acts)
        )
        lines.append(
            "min cosine".ljust(bw) + "".join((f"{min(x['cosine'] for x in a['layers']):.6f} ").rjust(w) for a in acts)
        )
        lines.append("max |d| logits".ljust(bw) + "".join(f"{a['layers'][-1]['max_abs']:.2e} ".rjust(w) for a in acts))
    if report["greedy"]:
        lines += ["", "greedy read-outs (grid@position:reference margin; ~ near tie)"]
        w = max(len(g["pair"]) for g in report["greedy"]) + 2
        lines.append("pair".ljust(w) + "dtype     mode      cache   tokens  sequences  differing")
        for g in report["greedy"]:
            diff = " ".join(
                f"{d['grid']}@{d['position']}:{d['reference_margin']:.2f}" + ("~" if d["near_tie"] else "")
                for d in g["disagreements"][:6]
            )
            more = len(g["disagreements"]) - 6
            diff += f" (+{more})" if more > 0 else ""
            lines.append(
                f"{g['pair'].ljust(w)}{g['dtype']:<10}{g['mode']:<10}{g['cache']:<6}"
                f"{g['token_agreement']:>8.2%}{g['sequence_agreement']:>10.2%}{'' if g['ok'] else '*'}  "
                f"{diff or '-'}"
            )
    lines.append("")
    for t in report["round_trip"]:
        lines.append(
            f"round trip of the {t['weights']}: saved by {t['saved_by']}, loaded by {t['loaded_by']}: "
            f"{t['tensors']} tensors " + ("bit-exact" if t["exact"] else f"DIFFER ({', '.join(t['mismatched'][:4])})")
        )
    return "\n".join(lines)


def plot_drift(report, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    boundaries = report["boundaries"]
    fig, ax = plt.subplots(figsize=(max(7, 0.55 * len(boundaries)), 4.5))
    x = np.arange(len(boundaries))
    floor = 1e-12  # log scale: an exact match (0) is drawn at the floor
    for a in report["activations"]:
        y = [max(layer["max_rel"], floor) for layer in a["layers"]]
        ax.plot(x, y, "-o", ms=3, label=f"{a['pair']} ({a['dtype']})")
    for d, t in report["tolerances"].items():
        ax.axhline(t["layer"], ls=":", lw=0.8, color="grey")
        ax.text(len(boundaries) - 1, t["layer"], f" {d} tolerance", fontsize=7, va="bottom", ha="right", color="grey")
    ax.set_yscale("log")
    ax.set_xticks(x, boundaries, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("max |d| / max |reference|")
    ax.set_title(f"layer drift: {Path(report['reference']['path']).name}, {report['samples']} test grids")
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        _write(Path(out), lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        plt.close(fig)
    return Path(out)


def write_json(report, out: Path):
    _write(Path(out), lambda f: f.write((json.dumps(report, indent=1) + "\n").encode()))


def _write(path: Path, write_fn):
    from convert.files import atomic_write  # the one atomic writer; it makes a missing folder

    atomic_write(path, write_fn, binary_file=True)
