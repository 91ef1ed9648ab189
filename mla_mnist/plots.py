"""Training curves from a checkpoint's metrics.json (one run, or the stages of a multi-stage recipe, where a
stage may hold several runs side by side under "runs")."""

from __future__ import annotations

import json
from pathlib import Path


def training_curves(metrics: dict, out: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = metrics.get("stages") or [{"history": metrics.get("history", [])}]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    offset, finals = 0.0, [100.0]
    for i, stage in enumerate(stages):
        runs = stage.get("runs") or [stage]  # a stage may hold runs side by side, all from the same start
        end = offset
        for j, run in enumerate(runs):
            h = run.get("history") or []
            if not h:
                continue
            ep = [offset + r["epoch"] for r in h]
            tag = f"stage {i + 1}" if len(stages) > 1 else ""
            if len(runs) > 1:
                tag = f"{tag} {run.get('name', j + 1)}".strip()
            ax_loss.plot(ep, [r["train_loss"] for r in h], "-o", ms=3, label=f"train {tag}")
            ax_loss.plot(ep, [r["val_loss"] for r in h], "--o", ms=3, label=f"val {tag}")
            ax_acc.plot(ep, [100 * r["val_exact_match"] for r in h], "-o", ms=3, label=f"val exact match {tag}")
            ax_acc.plot(ep, [100 * r["val_digit_accuracy"] for r in h], "--o", ms=3, label=f"val digit accuracy {tag}")
            finals += [100 * h[-1]["val_exact_match"], 100 * h[-1]["val_digit_accuracy"]]
            end = max(end, ep[-1])
        offset = end
    # The first epochs read almost nothing: the axis starts 20 points under the weakest final value, so the end
    # of the run, where models differ, is what the plot resolves.
    bottom = max(0.0, 10 * ((min(finals) - 20) // 10))
    ax_loss.set(yscale="log", xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="%", title="validation (greedy decoding)", ylim=(bottom, 100.5))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    from mnist_grid.images import atomic_write

    out = Path(out)
    try:
        atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)
    return out


if __name__ == "__main__":
    import sys

    src = Path(sys.argv[1])
    training_curves(
        json.loads((src / "metrics.json").read_text()), Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else ""
    )
