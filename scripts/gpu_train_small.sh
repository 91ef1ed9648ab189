#!/usr/bin/env bash
# Trains the shipped `small` checkpoint on one CUDA GPU and evaluates it on 10,000 test grids.
# Usage: MLA_MNIST_DIR=... bash scripts/gpu_train_small.sh OUT_DIR [EPOCHS] [TRAIN_SAMPLES]
set -euo pipefail
out=${1:?output directory}; epochs=${2:-12}; samples=${3:-200000}
cmd=(python -m mla_mnist train --framework torch --preset small --device cuda --bf16 --augment
     --epochs "$epochs" --train-samples "$samples" --batch-size 256 --lr 1e-3 --warmup 500
     --val-samples 1000 --out "$out/run")
echo "${cmd[*]}" | tee "$out/command.txt"
"${cmd[@]}" 2>&1 | tr '\r' '\n' | grep -v 'step/s' | tee "$out/train.log"
python -m mla_mnist eval "$out/run" --framework torch --device cuda --samples 10000 --json > "$out/eval.json"
cat "$out/eval.json" | head -c 300; echo
