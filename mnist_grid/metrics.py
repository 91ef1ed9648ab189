"""Sequence metrics for read-out digit strings."""

import numpy as np

from .tokens import decode


def edit_distance(a, b):
    """Levenshtein distance between two sequences (insert, delete, substitute all cost 1)."""
    if a == b:  # most read-outs of a trained model: no O(len^2) table for them
        return 0
    a, b = list(a), list(b)
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def counts(pairs) -> tuple[int, int, int, int]:
    """(exact matches, digit edits, target digits, grids) of (prediction, target) string pairs: sums that add up
    over batches and data-parallel ranks."""
    pairs = list(pairs)
    return (
        sum(p == t for p, t in pairs),
        sum(edit_distance(p, t) for p, t in pairs),
        sum(len(t) for _, t in pairs),
        len(pairs),
    )


def digit_accuracy(errors, total) -> float:
    """1 - character error rate; clipped at 0 since insertions can exceed the target length."""
    return max(0.0, 1 - errors / total) if total else float(errors == 0)


def _summary(pairs):
    exact, errors, total, n = counts(pairs)
    return {"samples": n, "exact_match": exact / n if n else 0.0, "digit_accuracy": digit_accuracy(errors, total)}


def evaluate(pred, target):
    """Exact-match, digit and length accuracy overall and per target length."""
    if isinstance(pred, np.ndarray):
        pred = decode(pred)
    if isinstance(target, np.ndarray):
        target = decode(target)
    if len(pred) != len(target):
        raise ValueError(f"{len(pred)} predictions for {len(target)} targets")
    pairs = [(str(p), str(t)) for p, t in zip(pred, target)]
    result = _summary(pairs)
    n = len(pairs)
    result["length_accuracy"] = sum(len(p) == len(t) for p, t in pairs) / n if n else 0.0
    by_length: dict[int, list] = {}
    for pair in pairs:
        by_length.setdefault(len(pair[1]), []).append(pair)
    result["per_length"] = {k: _summary(by_length[k]) for k in sorted(by_length)}
    return result


def format_table(metrics):
    """Markdown table: one row per number of digits, then the totals."""
    lines = ["| digits | samples | exact match | digit accuracy |", "|---:|---:|---:|---:|"]
    rows = [(str(k), m) for k, m in sorted(metrics["per_length"].items())] + [("all", metrics)]
    for name, m in rows:
        lines.append(f"| {name} | {m['samples']} | {m['exact_match']:.2%} | {m['digit_accuracy']:.2%} |")
    lines.append(f"\nlength accuracy: {metrics['length_accuracy']:.2%}")
    return "\n".join(lines)
