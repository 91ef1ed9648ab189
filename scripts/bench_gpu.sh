#!/usr/bin/env bash
# The GPU measurements behind docs/benchmarks.md, docs/training.md and docs/seed.md, in named parts, so that a
# time-limited machine runs the parts it has time for. Every part writes under OUT and is bounded by `timeout`,
# so one slow part cannot eat the others' time.
# Usage: MLA_MNIST_DIR=... bash scripts/bench_gpu.sh OUT PART... [FRAMEWORKS=torch,mlx in the environment]
#   decode       decoding paths of random seed weights and of the shipped small model, eval grids/s per dtype
#   train-rows   training steps of both frameworks side by side, bf16, peak memory (small b256, seed b64/b256)
#   step-ab      where torch's step time goes: compile mode x dropout x weight average, side by side
#   small        the one-command small recipe from scratch, wall time, then its val and test read-outs (fp32)
#   seed         the seed recipe, MINUTES (default 8) of it: starts, or continues OUT/seed with --resume
#   seed-read    the seed checkpoint in OUT/seed: fp16 copy, 2,000 test grids, bench with real reading rows
set -uo pipefail
out=$1
shift
frameworks=${FRAMEWORKS:-torch,mlx}
mkdir -p "$out"
bench=(python -m mla_mnist bench --device gpu --attentions mla --render-batch 0 --quiet --force)
wall() { echo "$1 wall $(($(date +%s) - $2)) s" | tee -a "$out/walls.txt"; }

decode() {
  for fw in ${frameworks//,/ }; do
    timeout 240 "${bench[@]}" --frameworks "$fw" --train-steps 0 --preset seed --lengths 50 --repeats 5 \
      --decode-batches 1,4,64 --decode-length 50 --out "$out/decode-seed-$fw" > "$out/decode-seed-$fw.txt" 2>&1
    timeout 200 "${bench[@]}" --frameworks "$fw" --train-steps 0 --checkpoint small \
      --lengths 18 --repeats 3 --decode-batches 1,4,64 --decode-length 18 --eval-samples 10000 \
      --out "$out/decode-small-$fw" > "$out/decode-small-$fw.txt" 2>&1
    for dtype in auto float32 bfloat16; do
      timeout 90 python -m mla_mnist eval --framework "$fw" --samples 10000 --dtype "$dtype" --json --quiet \
        > "$out/eval-small-$fw-$dtype.json"
    done
  done
}

train_rows() {
  for run in "small 256 30" "seed 64 12" "seed 256 6"; do
    set -- $run
    timeout 300 "${bench[@]}" --frameworks "$frameworks" --decode-batches "" --preset "$1" --lengths 5 \
      --repeats 1 --train-steps "$3" --train-batch-size "$2" --train-dtype bfloat16 --out "$out/train-$1-$2" \
      > "$out/train-$1-$2.txt" 2>&1
  done
}

step_ab() {
  timeout 400 python scripts/train_step_ab.py --preset small --batch-size 512 --device cuda --bf16 \
    --json "$out/train-step-ab.json" > "$out/train-step-ab.txt" 2>&1
}

small() {
  local fw=${frameworks%%,*} start
  start=$(date +%s)
  timeout 600 python -m mla_mnist train --preset small --framework "$fw" --bf16 --val-samples 1000 --quiet \
    --out "$out/small-$fw" --force > "$out/small-$fw.log" 2>&1
  wall "small-$fw" "$start"
  for split in val test; do
    python -m mla_mnist eval "$out/small-$fw" --framework "$fw" --split "$split" --samples 10000 \
      --dtype float32 --json --quiet > "$out/small-$fw-$split.json"
  done
}

seed() {
  local minutes=${SEED_MINUTES:-8} start resume=()
  [ -f "$out/seed/optimizer.safetensors" ] && resume=(--resume "$out/seed") || resume=(--preset seed)
  start=$(date +%s)
  timeout $((minutes * 60 + 90)) python -m mla_mnist train "${resume[@]}" --framework torch --bf16 \
    --val-samples 256 --quiet --out "$out/seed" --max-minutes "$minutes" --save-every 500 \
    2>&1 | tee -a "$out/seed.log"
  wall "seed" "$start"
}

seed_read() {
  # the validation-best weights, as shipped (the run's last ones where validation never ran)
  local src=("$out/seed")
  [ -f "$out/seed/best.safetensors" ] && src=("$out/seed/best.safetensors" --config "$out/seed/config.json")
  python -m mla_mnist convert "${src[@]}" "$out/seed-fp16" --dtype float16 --force --quiet
  for fw in ${frameworks//,/ }; do
    timeout 120 python -m mla_mnist eval "$out/seed-fp16" --framework "$fw" --samples 2000 --dtype float32 \
      --json --quiet > "$out/seed-eval-$fw.json"
    timeout 200 "${bench[@]}" --frameworks "$fw" --train-steps 0 --checkpoint "$out/seed-fp16" --lengths 50 \
      --repeats 3 --decode-batches 1,4,64 --decode-length 50 --out "$out/bench-seed-$fw" \
      > "$out/bench-seed-$fw.txt" 2>&1
  done
}

for part in "$@"; do
  case $part in
    decode) decode ;;
    train-rows) train_rows ;;
    step-ab) step_ab ;;
    small) small ;;
    seed) seed ;;
    seed-read) seed_read ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done
