#!/usr/bin/env bash
# Reproduces the Fashion-MNIST accuracy tables of docs/accuracy.md: SID and BP on the reference
# SimpleCNN (L=5, batch 128, 5 epochs, seed 0, no augmentation) and on the MLP extractor
# (L=5, 2 epochs), on the CPU. Usage: benches/fashion-mnist-accuracy.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/accuracy}
bin=target/release/sid-launch
[ -x "$bin" ] || cargo build --release -p sid-launch
mkdir -p "$out"
common=(--dataset fashion-mnist --modules 5 --batch-size 128 --seed 0 --no-augment --gpus cpu)
for method in sid bp; do
  "$bin" "${common[@]}" --method "$method" --model cnn --epochs 5 --run-dir "$out/$method-cnn" 2>&1 | tee "$out/$method-cnn.log"
done
for method in sid bp; do
  "$bin" "${common[@]}" --method "$method" --model mlp --epochs 2 --run-dir "$out/$method-mlp" 2>&1 | tee "$out/$method-mlp.log"
done
for r in sid-cnn bp-cnn sid-mlp bp-mlp; do
  echo "== $r"; cat "$out/$r/metrics.jsonl"
done
