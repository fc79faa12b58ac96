#!/usr/bin/env bash
# Staged SID's accuracy next to the paper's SID: Fashion-MNIST, SimpleCNN, L=5, batch 128,
# 5 epochs, no augmentation, on the CPU, for each seed given (default 0). Paper SID and BP come
# from benches/fashion-mnist-accuracy.sh with the same settings.
# Usage: benches/staged-accuracy.sh [OUT_DIR] [SEEDS...]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/staged-accuracy}
shift || true
seeds=("${@:-0}")
bin=target/release/sid-launch
[ -x "$bin" ] || cargo build --release -p sid-launch
mkdir -p "$out"
for seed in "${seeds[@]}"; do
  common=(--dataset fashion-mnist --model cnn --modules 5 --batch-size 128 --epochs 5 --seed "$seed" --no-augment --telemetry-hz 0)
  for k in 2 4; do
    "$bin" "${common[@]}" --stages "$k" --gpus "cpu:$k" --placement even --run-dir "$out/staged$k-seed$seed" 2>&1 | tee "$out/staged$k-seed$seed.log"
  done
done
for f in "$out"/*/metrics.jsonl; do
  echo "== $f"; python3 -c "import json,sys; [print(m['epoch'], round(m['test_acc']*100,2), round(m['train_loss'],4), [round(a*100,1) for a in m['module_test_acc']]) for m in map(json.loads, open(sys.argv[1]))]" "$f"
done
