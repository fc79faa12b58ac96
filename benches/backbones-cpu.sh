#!/usr/bin/env bash
# The backbone tables of docs/accuracy.md and docs/memory.md: each backbone, SID and BP on the identical network, a
# short Fashion-MNIST run on the CPU (2048 training samples, 1 epoch, batch 64, L = 10, seed 0,
# the full 10,000-sample test set), then ms/step (median), final-epoch test accuracy and peak
# memory from each run's metrics.jsonl and summary.json.
# Usage: benches/backbones-cpu.sh [OUT_DIR] [MODELS...]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/backbones}
shift || true
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(cnn vgg11 resnet18 vit-tiny)
bin=target/release/sid-launch
[ -x "$bin" ] || cargo build --release -p sid-launch
mkdir -p "$out"
common=(--dataset fashion-mnist --limit-train 2048 --epochs 1 --batch-size 64 --seed 0
  --gpus cpu --telemetry-hz 0)
for model in "${models[@]}"; do
  for method in sid bp; do
    run="$out/$method-$model"
    rm -rf "$run"
    "$bin" "${common[@]}" --model "$model" --method "$method" --run-dir "$run" >"$run.log" 2>&1 ||
      { echo "$run failed:"; tail -n 3 "$run.log"; exit 1; }
  done
done
python3 - "$out" "${models[@]}" <<'PY'
import json, sys, re
out, models = sys.argv[1], sys.argv[2:]
print("| backbone | extractor parameters | SID ms/step | BP ms/step | SID acc | BP acc | SID peak RSS | BP peak RSS |")
print("|---|---|---|---|---|---|---|---|")
for m in models:
    row = {}
    for method in ("sid", "bp"):
        d = f"{out}/{method}-{m}"
        metrics = [json.loads(l) for l in open(f"{d}/metrics.jsonl") if l.strip()]
        summary = json.load(open(f"{d}/summary.json"))
        peak = max(p["bytes"] for p in summary["peak_memory"]) / 2**20
        row[method] = (metrics[-1]["median_step_ms"], metrics[-1]["test_acc"] * 100, peak)
    log = open(f"{out}/sid-{m}.log").read()
    params = re.search(r"parameters: ([\d,]+) in the", log)
    print(f"| {m} | {params.group(1) if params else '?'} | {row['sid'][0]:.0f} | {row['bp'][0]:.0f} "
          f"| {row['sid'][1]:.2f}% | {row['bp'][1]:.2f}% | {row['sid'][2]:.0f} MiB | {row['bp'][2]:.0f} MiB |")
PY
