"""`mla-mnist info CKPT` and `mla-mnist --version`: what a checkpoint holds, on one screen (or as JSON).

JSON keys: path, kind ("checkpoint directory" or the weights file's kind), config (the model config), preset,
parameters, dtype, quantization, files ({name: bytes}), size_bytes, training (null for a bare weights file, or
{framework, steps, stages, best: {step, val_exact_match, val_digit_accuracy, val_loss} | null, last: {...} | null}).
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

from convert import checkpoint
from convert.errors import UserError
from convert.schema import parameter_count

STATE = "train_state.json"  # written by train_loop._save beside the weights
ROOT = Path(__file__).resolve().parents[1]


def package_version() -> str:
    try:
        return metadata.version("mla-mnist")
    except metadata.PackageNotFoundError:  # a source tree that was never installed: pyproject says
        import re

        try:
            text = (ROOT / "pyproject.toml").read_text()
        except OSError:
            return "unknown"
        m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
        return m.group(1) if m else "unknown"


def _read_json(f: Path) -> dict:
    try:
        data = json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, ValueError) as e:
        raise UserError(f"{f} is not readable JSON ({e}): the checkpoint is corrupt") from None
    return data if isinstance(data, dict) else {}


def _val(record: dict | None) -> dict | None:
    if not record:
        return None
    keys = ("epoch", "step", "val_exact_match", "val_digit_accuracy", "val_loss")
    return {k: record[k] for k in keys if k in record}


def training_summary(metrics: dict, state: dict) -> dict | None:
    """Framework, steps and the best validation record: from one run's metrics.json and train_state.json, or
    from a multi-stage recipe's metrics.json (stages, each a run or several side by side)."""
    if not metrics and not state:
        return None
    stages = metrics.get("stages")
    if stages:
        histories = [r.get("history") or [] for s in stages for r in (s.get("runs") or [s])]
        records = [h for hist in histories for h in hist]
        steps = sum(
            max((h.get("step", 0) for h in (r.get("history") or [])), default=0)
            for s in stages
            for r in (s.get("runs") or [s])[:1]
        )  # side-by-side runs share their steps
        last = records[-1] if records else None
    else:
        records = metrics.get("history") or state.get("history") or []
        steps = state.get("step") or (records[-1].get("step") if records else 0)
        last = records[-1] if records else None
    best = metrics.get("best") or state.get("best")
    if not best and records:
        best = max(records, key=lambda r: r.get("val_exact_match", -1))
    return {
        "framework": metrics.get("framework") or state.get("framework"),
        "steps": int(steps or 0),
        "stages": len(stages) if stages else 1,
        "best": _val(best),
        "last": _val(last),
    }


def info(path) -> dict:
    path = Path(path)
    if path.is_dir() or not path.exists():
        path = checkpoint.resolve(path)
        cfg, meta = checkpoint.read_config(path)
        files = {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file()}
        return {
            "path": str(path),
            "kind": "checkpoint directory",
            "config": cfg.to_dict(),
            "preset": meta.get("preset"),
            "parameters": parameter_count(cfg.replace(quantization=None)),
            "dtype": meta.get("dtype"),
            "quantization": cfg.quantization,
            "files": files,
            "size_bytes": sum(files.values()),
            "training": training_summary(_read_json(path / checkpoint.METRICS), _read_json(path / STATE)),
        }
    from convert.formats import read

    src = read(path)
    cfg = src.config
    return {
        "path": str(path),
        "kind": src.what,
        "config": cfg.to_dict(),
        "preset": src.preset,
        "parameters": parameter_count(cfg.replace(quantization=None)),
        "dtype": src.dtype or "mixed",
        "quantization": cfg.quantization,
        "files": {path.name: path.stat().st_size},
        "size_bytes": path.stat().st_size,
        "training": None,
    }


def _pct(x):
    return f"{x:.2%}" if isinstance(x, (int, float)) else "-"


def format_info(d: dict) -> str:
    c = d["config"]
    q = d["quantization"]
    lines = [
        f"{d['path']} ({d['kind']})",
        f"  model       {c['attention']}, d_model {c['d_model']}, {c['heads']} heads x {c['head_dim']}, "
        f"{c['enc_layers']}+{c['dec_layers']} encoder+decoder layers, grid {c['grid']}, patch {c['patch']}",
        f"  preset      {d['preset'] or '-'}",
        f"  parameters  {d['parameters']:,}",
        f"  dtype       {d['dtype']}",
        "  quantized   " + (f"{q['bits']}-bit, groups of {q['group_size']}" if q else "no"),
        f"  size        {d['size_bytes'] / 1e6:.2f} MB ("
        + ", ".join(
            f"{name} {size / 1e6:.2f} MB" if size >= 10_000 else f"{name} {size} B" for name, size in d["files"].items()
        )
        + ")",
    ]
    t = d["training"]
    if t:
        lines.append(
            f"  trained     {t['framework'] or '?'}, {t['steps']:,} steps"
            + (f" in {t['stages']} stages" if t["stages"] > 1 else "")
        )
        for label, r in (("best val", t["best"]), ("last val", t["last"])):
            if r:
                lines.append(
                    f"  {label:<11} exact match {_pct(r.get('val_exact_match'))}, digits "
                    f"{_pct(r.get('val_digit_accuracy'))}, loss {r.get('val_loss', float('nan')):.4f} "
                    f"(step {r.get('step', '?')})"
                )
    else:
        lines.append("  trained     no training record")
    return "\n".join(lines)
