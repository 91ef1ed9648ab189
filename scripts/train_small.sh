#!/usr/bin/env bash
# The recipe of the shipped checkpoint mla_mnist/checkpoints/small: the one command (docs/training.md; ~290 s on
# one H200), then its float16 copy, which ships, and that copy's 10,000-grid test evaluation.
# Usage: MLA_MNIST_DIR=... bash scripts/train_small.sh [OUT_DIR]
set -euo pipefail
out=${1:-runs/small}
python -m mla_mnist train --preset small --bf16 --out "$out/run"
python -m mla_mnist convert "$out/run" "$out/small-fp16" --dtype float16
python -m mla_mnist eval "$out/small-fp16" --samples 10000 --dtype float32 --json > "$out/eval.json"
