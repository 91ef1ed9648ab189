#!/usr/bin/env bash
# The GPU measurements behind docs/benchmarks.md and docs/training.md, in the order they are cheapest to lose:
# decoding paths and evaluation (issue-sized, a few minutes), training steps side by side, then the one-command
# recipe. Every command writes under OUT (default runs/gpu); each is bounded by `timeout` so one slow part
# cannot eat the others' time. Usage: MLA_MNIST_DIR=... bash scripts/bench_gpu.sh [OUT] [FRAMEWORKS]
set -uo pipefail
out=${1:-runs/gpu}
frameworks=${2:-torch,mlx}
mkdir -p "$out"
bench=(python -m mla_mnist bench --device gpu --attentions mla --render-batch 0 --quiet --force)
for fw in ${frameworks//,/ }; do
  timeout 300 "${bench[@]}" --frameworks "$fw" --train-steps 0 --preset seed --lengths 50 --repeats 5 \
    --decode-batches 1,4,64 --decode-length 50 --out "$out/decode-seed-$fw" > "$out/decode-seed-$fw.txt" 2>&1
  timeout 200 "${bench[@]}" --frameworks "$fw" --train-steps 0 --checkpoint mla_mnist/checkpoints/small \
    --lengths 18 --repeats 3 --decode-batches 1,4,64 --decode-length 18 --eval-samples 10000 \
    --out "$out/decode-small-$fw" > "$out/decode-small-$fw.txt" 2>&1
  for dtype in float32 bfloat16; do
    timeout 90 python -m mla_mnist eval --framework "$fw" --samples 10000 --dtype "$dtype" --json --quiet \
      > "$out/eval-small-$fw-$dtype.json"
  done
done
# Training steps, the frameworks taking turns in one run, bf16 (peak memory in the table).
for run in "small 256 30" "seed 64 12" "seed 256 6"; do
  set -- $run
  timeout 300 "${bench[@]}" --frameworks "$frameworks" --decode-batches "" --preset "$1" --lengths 5 --repeats 1 \
    --train-steps "$3" --train-batch-size "$2" --train-dtype bfloat16 --out "$out/train-$1-$2" \
    > "$out/train-$1-$2.txt" 2>&1
done
# Where the recipe's step time goes: compile mode x dropout x weight average, torch, side by side.
timeout 400 python scripts/train_step_ab.py --preset small --batch-size 512 --device cuda --bf16 \
  --json "$out/train-step-ab.json" > "$out/train-step-ab.txt" 2>&1
# The one-command recipe, from scratch, wall time included.
start=$(date +%s)
timeout 600 python -m mla_mnist train --preset small --framework torch --bf16 --val-samples 1000 --quiet \
  --out "$out/small-torch" --force > "$out/small-torch.log" 2>&1
echo "small-torch wall $(( $(date +%s) - start )) s" | tee -a "$out/walls.txt"
for split in val test; do
  python -m mla_mnist eval "$out/small-torch" --framework torch --split "$split" --samples 10000 --json --quiet \
    > "$out/small-torch-$split.json"
done
