"""Where a training step's GPU time goes, kernel by kernel, in either framework.

torch.profiler's CUDA trace (CUPTI) records every kernel the process launches, MLX's included, so one tool reads
both frameworks' steps. After warm-up (compilation, MLX's run-time kernel builds), --steps steps are traced; the
table gives kernels and GPU time per step and the costliest kernels. Needs torch with CUDA, and for
--framework mlx MLX's CUDA backend in the same process.

    python scripts/kernel_table.py --framework mlx --preset small --batch-size 1024 --bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convert.config import ModelConfig  # noqa: E402
from convert.errors import UserError  # noqa: E402
from convert.presets import PRESETS  # noqa: E402
from convert.training import TrainConfig  # noqa: E402
from mla_mnist.backends import get_backend  # noqa: E402
from mla_mnist.bench.suites import synthetic_batch  # noqa: E402
from mla_mnist.cli import positive_int  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--framework", choices=("torch", "mlx"), default="mlx")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--batch-size", type=positive_int, default=256)
    ap.add_argument("--steps", type=positive_int, default=3, help="traced steps (after 3 untraced)")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--unpadded", action="store_true", help="MLX: without the attention layout of its training step")
    ap.add_argument("--top", type=positive_int, default=25)
    ap.add_argument("--json", type=Path, help="also write the table here")
    ap.add_argument("--force", action="store_true", help="replace an existing --json file")
    args = ap.parse_args(argv)
    if args.json and args.json.exists() and not args.force:
        print(f"kernel_table: {args.json} exists (--force replaces it)", file=sys.stderr)
        return 2
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        print("kernel_table: needs torch (its profiler reads the kernels)", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("kernel_table: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    torch.zeros(1, device="cuda")  # the profiler attaches to the CUDA context both frameworks share
    try:
        backend = get_backend(args.framework, "gpu")
    except UserError as e:
        print(f"kernel_table: {e}", file=sys.stderr)
        return 2
    cfg = ModelConfig(**PRESETS[args.preset].model)
    trainer = backend.trainer(backend.build(cfg, seed=0), TrainConfig(lr=1e-4, warmup_steps=0), bf16=args.bf16)
    if args.unpadded and args.framework == "mlx":
        trainer.pad_attention = False
    images, tokens = (backend.array(a) for a in synthetic_batch(cfg, args.batch_size))

    def step():
        return float(trainer.step(images, tokens)[0])  # float(): waits for the step

    for _ in range(3):
        step()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
    events = prof.key_averages()
    per_step = {
        "framework": args.framework,
        "preset": args.preset,
        "batch_size": args.batch_size,
        "bf16": args.bf16,
        "device": torch.cuda.get_device_name(),
        "step_ms": statistics.median(times) * 1e3,
        "kernels": sum(e.count for e in events) / args.steps,
        "gpu_ms": sum(e.device_time_total for e in events) / args.steps / 1e3,
        "top": [
            {"ms": e.device_time_total / args.steps / 1e3, "calls": e.count / args.steps, "kernel": e.key}
            for e in sorted(events, key=lambda e: -e.device_time_total)[: args.top]
        ],
    }
    print(
        f"{args.framework} {args.preset} batch {args.batch_size} {'bf16' if args.bf16 else 'fp32'} on "
        f"{per_step['device']}: step {per_step['step_ms']:.2f} ms (median of 5), {per_step['kernels']:.0f} kernels "
        f"and {per_step['gpu_ms']:.2f} ms of GPU time a step\n\n| GPU ms a step | calls | kernel |\n|---:|---:|---|"
    )
    for row in per_step["top"]:
        print(f"| {row['ms']:.3f} | {row['calls']:.0f} | `{row['kernel'][:100]}` |")
    if args.json:
        args.json.write_text(json.dumps(per_step, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
