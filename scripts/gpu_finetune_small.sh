#!/usr/bin/env bash
# Second stage of the shipped `small` checkpoint: continue from stage one's weights at a lower learning rate.
# Usage: MLA_MNIST_DIR=... bash scripts/gpu_finetune_small.sh INIT_DIR OUT_DIR [EPOCHS] [TRAIN_SAMPLES]
set -euo pipefail
init=${1:?stage-one checkpoint}; out=${2:?output directory}; epochs=${3:-8}; samples=${4:-200000}
cmd=(python -m mla_mnist train --framework torch --preset small --device cuda --bf16 --augment affine --seed 1
     --init "$init" --epochs "$epochs" --train-samples "$samples" --batch-size 512 --lr 4e-4 --warmup 100
     --val-samples 1000 --out "$out/run")
echo "${cmd[*]}" | tee "$out/command.txt"
"${cmd[@]}" 2>&1 | tr '\r' '\n' | grep -v 'step/s' | tee "$out/train.log"
python -m mla_mnist eval "$out/run" --framework torch --device cuda --samples 10000 --json > "$out/eval.json"
head -c 300 "$out/eval.json"; echo
