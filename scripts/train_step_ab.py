"""Training-step variants side by side on one device: which part of a recipe costs what.

Each variant (compile mode x dropout x weight average) gets its own torch Trainer on the same synthetic batch;
after warm-up (compilation included, timed apart) the variants take turns for --rounds rounds of --steps steps,
and each keeps its median round. Prints a Markdown table and, with --json, writes the numbers.

    python scripts/train_step_ab.py --preset small --batch-size 512 --device cuda --bf16
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from convert.config import ModelConfig  # noqa: E402
from convert.training import TrainConfig  # noqa: E402
from mla_mnist.bench.suites import synthetic_batch  # noqa: E402
from mla_torch import checkpoint  # noqa: E402
from mla_torch.train import Trainer  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--compile", default="off,layers,model", help="comma-separated: off, layers, model")
    p.add_argument("--dropout", default="0,0.1", help="comma-separated model dropouts")
    p.add_argument("--ema", default="0,0.999", help="comma-separated weight-average decays")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    variants = list(
        itertools.product(
            args.compile.split(","),
            [float(d) for d in args.dropout.split(",")],
            [float(e) for e in args.ema.split(",")],
        )
    )
    players = []
    for mode, dropout, ema in variants:
        cfg = ModelConfig.preset(args.preset).replace(dropout=dropout)
        model = checkpoint.build(cfg, 0).to(args.device)
        tc = TrainConfig(lr=1e-4, warmup_steps=0, total_steps=10**6, ema=ema)
        trainer = Trainer(model, tc, args.device, bf16=args.bf16, compile={"off": False}.get(mode, mode))
        x, y = synthetic_batch(cfg, args.batch_size)
        start = time.perf_counter()
        for _ in range(3):  # warm-up: compilation, allocator, cuBLAS
            float(trainer.step(x, y)[0])
        players.append(((mode, dropout, ema), trainer, x, y, time.perf_counter() - start))
    rates = {key: [] for key, *_ in players}
    for _ in range(args.rounds):
        for key, trainer, x, y, _ in players:
            start = time.perf_counter()
            for _ in range(args.steps):
                loss, _ = trainer.step(x, y)
            float(loss)  # waits for the last step
            rates[key].append(args.steps * args.batch_size / (time.perf_counter() - start))
    rows = [
        {"compile": k[0], "dropout": k[1], "ema": k[2], "samples_per_s": statistics.median(rates[k]), "warmup_s": w}
        for k, _, _, _, w in players
    ]
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device
    print(
        f"{args.preset}, batch {args.batch_size}, {'bf16' if args.bf16 else 'fp32'}, {device}, "
        f"torch {torch.__version__}"
    )
    print("| compile | dropout | ema | samples/s | warm-up s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['compile']} | {r['dropout']} | {r['ema']} | {r['samples_per_s']:,.0f} | {r['warmup_s']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
