#!/usr/bin/env bash
# CUDA graphs on a GPU: the same runs eagerly (--no-cuda-graph) and through a graph (the default
# on one GPU), side by side (train loss, test accuracy, median ms/step), then the depth sweep
# both ways. Prepare with
# benches/prepare-gpu-check.sh; run with the device tool (carry as for benches/gpu-check.sh).
# SWEEPS=0 skips the depth sweeps. Output: $OUT/graph-check.txt (or gpu-graph-check-out/).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-graph-check-out}
mkdir -p "$out"
work=$(mktemp -d /tmp/sid-graph-check.XXXXXX)
torch_lib=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null)/lib
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
data=${SID_DATA:-data/fashion-mnist}
launch=target/release/sid-launch
bench=target/release/sid-bench
show() { # run folder: the numbers to compare
  python3 - "$1/metrics.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    print(f"  epoch {m['epoch']}: train_loss {m['train_loss']:.10f} test_acc {m['test_acc']:.4f} "
          f"median {m['median_step_ms']:.3f} ms/step {m['samples_per_second']:.0f} samples/s "
          f"peak {m['peak_memory'][0]['bytes'] / 2**20:.1f} MiB")
PY
}
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  for spec in "mlp 8 2048 12800 sid" "mlp 8 2048 12800 sid --fused-teacher" "mlp 8 2048 12800 bp" \
    "cnn 5 256 60000 sid" "cnn 5 256 60000 bp" "vgg11 5 256 6400 sid" "resnet18 5 256 6400 bp"; do
    read -r model modules hidden limit method extra <<<"$spec"
    for graph in --no-cuda-graph --cuda-graph; do
      dir="$work/$model-$method${extra:-}$graph"
      echo "== $method $model L=$modules hidden $hidden, $limit samples, 1 epoch ${extra:-} $graph"
      timeout 90 "$launch" --gpus 0 --data-dir "$data" --model "$model" --modules "$modules" \
        --module-hidden "$hidden" --limit-train "$limit" --epochs 1 --method "$method" $graph \
        ${extra:-} --run-dir "$dir" 2>&1 | grep -E "note:|error|final-epoch"
      show "$dir"
    done
  done
  echo "== resume through a CUDA graph: 2 epochs straight vs 1 epoch, then --resume to 2"
  resume=(--gpus 0 --data-dir "$data" --model mlp --modules 4 --module-hidden 1024 --limit-train 12800)
  timeout 60 "$launch" "${resume[@]}" --epochs 2 --run-dir "$work/straight" 2>&1 | grep -E "error|final-epoch"
  timeout 60 "$launch" "${resume[@]}" --epochs 1 --run-dir "$work/halves" 2>&1 | grep -E "error|final-epoch"
  timeout 60 "$launch" --resume "$work/halves" --epochs 2 --data-dir "$data" 2>&1 | grep -E "error|note|final-epoch"
  echo "straight:"; show "$work/straight"
  echo "1 + resumed 1:"; show "$work/halves"
  echo "== Ctrl-C mid-run through a CUDA graph, then --resume: 40 epochs straight vs interrupted"
  timeout 90 "$launch" "${resume[@]}" --epochs 40 --run-dir "$work/straight40" 2>&1 | grep -E "error|final-epoch"
  timeout --preserve-status -s INT 5 "$launch" "${resume[@]}" --epochs 40 --run-dir "$work/stopped" 2>&1 |
    grep -E "error|interrupt|stopp|checkpoint" | head -3
  echo "exit code ${PIPESTATUS[0]}"
  timeout 90 "$launch" --resume "$work/stopped" --epochs 40 --data-dir "$data" 2>&1 | grep -E "error|resuming|final-epoch"
  echo "straight:"; show "$work/straight40" | tail -1
  echo "interrupted + resumed:"; show "$work/stopped" | tail -1
  [ "${SWEEPS:-1}" = 1 ] && for graph in --no-cuda-graph ""; do
    echo "== depth sweep ${graph:-with CUDA graphs}"
    timeout 120 "$bench" run depth --gpus 0 --depths 1,2,4,8 --module-hidden 2048 $graph \
      --data-dir "$data" --limit-train 12800 --epochs 1 --out "$work/bench${graph:-graph}" 2>&1 |
      grep -A8 "## Depth"
  done
} 2>&1 | tee "$out/graph-check.txt"
