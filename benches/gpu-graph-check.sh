#!/usr/bin/env bash
# CUDA graphs on a GPU: the same runs eagerly (--no-cuda-graph) and replayed from a graph (the
# default on one GPU), compared, one `PASS name` or `FAIL name: why` line each; then a run
# resumed through a graph against a straight one. Prepare with benches/prepare-gpu-check.sh;
# run with the device tool (carry as for benches/gpu-check.sh); benches/gpu-all.sh runs it.
#   - MLP runs (matrix products only) must give bit-identical final train losses;
#   - SimpleCNN, VGG-11 and ResNet-18 (cuDNN convolutions, whose backward kernels add with
#     atomics and so differ from run to run in the last bits) are compared after 10 steps
#     (1,280 samples) within 1e-3 relative train loss and 0.01 test accuracy: far above what
#     10 steps of reordered sums move them, far below what a replay of a stale batch, a skipped
#     update or frozen BatchNorm statistics would.
# FULL=1 adds a run interrupted with SIGINT and resumed (45 s more); SWEEPS=1 the depth sweep
# both ways (120 s more). Worst case, every step at its timeout: 147 s (FULL=1 and SWEEPS=1:
# 312 s). Exits 1 if a check failed, 2 if libtorch cannot be found.
# Output: $OUT/graph-check.txt (or gpu-graph-check-out/).
set -uo pipefail
cd "$(dirname "$0")/.."
. benches/gpu-common.sh
out=${OUT:-gpu-graph-check-out}
mkdir -p "$out"
work=$(mktemp -d /tmp/sid-graph-check.XXXXXX)
gpu_env
data=${SID_DATA:-data/fashion-mnist}
launch=target/release/sid-launch
bench=target/release/sid-bench
checker=benches/acceptance_check.py
failed=0
show() { # run folder: the numbers to compare
  [ -f "$1/metrics.jsonl" ] || { echo "  $1: no metrics.jsonl"; return; }
  python3 - "$1/metrics.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    print(f"  epoch {m['epoch']}: train_loss {m['train_loss']:.10f} test_acc {m['test_acc']:.4f} "
          f"median {m['median_step_ms']:.3f} ms/step {m['samples_per_second']:.0f} samples/s "
          f"peak {m['peak_memory'][0]['bytes'] / 2**20:.1f} MiB")
PY
}
# train SECONDS DIR FLAGS...: one run, its lines that matter, its numbers.
train() {
  local limit=$1 dir=$2
  shift 2
  echo "== ${dir##*/}: $*"
  local rc
  timeout "$limit" "$launch" --gpus 0 --data-dir "$data" "$@" --run-dir "$dir" 2>&1 |
    tee "$dir.log" | grep -E "note:|error|final-epoch|CUDA graph"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || echo "  exit code $rc$([ "$rc" = 124 ] && echo ", timed out after $limit s")"
  show "$dir"
}
# captured DIR: the run's output says a CUDA graph was captured and replayed (a failed capture
# falls back to eager steps, which the comparisons cannot tell apart; SID_NO_CUDA_GRAPH=1
# forces that and must make this FAIL).
captured() {
  grep -qE "^CUDA graph: [1-9][0-9]* captured, [1-9][0-9]* replays" "$1.log" ||
    { echo "no 'CUDA graph: N captured' line in $1.log"; return 1; }
}
# check NAME CMD...: PASS when CMD exits 0, else FAIL with the last line it printed.
check() {
  local name=$1 why
  shift
  if why=$("$@" 2>&1); then
    echo "PASS $name"
  else
    echo "FAIL $name: $(tail -n 1 <<<"$why")"
    failed=$((failed + 1))
  fi
}
{
  timeout 5 nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  mlp=(--model mlp --modules 8 --module-hidden 2048 --limit-train 12800)
  train 12 "$work/sid-mlp-eager" "${mlp[@]}" --epochs 2 --no-cuda-graph
  train 12 "$work/sid-mlp-graph" "${mlp[@]}" --epochs 2 --cuda-graph
  check "SID, MLP: a CUDA graph was captured and replayed" captured "$work/sid-mlp-graph"
  check "SID, MLP: graph replay equals eager (bit-identical train loss)" \
    python3 "$checker" same-final-loss "$work/sid-mlp-eager" "$work/sid-mlp-graph"
  train 10 "$work/sid-mlp-fused-graph" "${mlp[@]}" --epochs 2 --fused-teacher --cuda-graph
  check "SID, MLP: the fused schedule's graph equals the reference schedule (bit-identical)" \
    python3 "$checker" same-final-loss "$work/sid-mlp-eager" "$work/sid-mlp-fused-graph"
  train 10 "$work/bp-mlp-eager" "${mlp[@]}" --epochs 1 --method bp --no-cuda-graph
  train 10 "$work/bp-mlp-graph" "${mlp[@]}" --epochs 1 --method bp --cuda-graph
  check "BP, MLP: a CUDA graph was captured and replayed" captured "$work/bp-mlp-graph"
  check "BP, MLP: graph replay equals eager (bit-identical train loss)" \
    python3 "$checker" same-final-loss "$work/bp-mlp-eager" "$work/bp-mlp-graph"
  for spec in "cnn sid 10" "vgg11 sid 12" "resnet18 bp 12"; do
    read -r model method limit <<<"$spec"
    conv=(--model "$model" --method "$method" --modules 5 --limit-train 1280 --epochs 1)
    train "$limit" "$work/$method-$model-eager" "${conv[@]}" --no-cuda-graph
    train "$limit" "$work/$method-$model-graph" "${conv[@]}" --cuda-graph
    check "$method, $model: a CUDA graph was captured and replayed" \
      captured "$work/$method-$model-graph"
    check "$method, $model, 10 steps: graph replay trains like eager (1e-3 / 0.01)" \
      python3 "$checker" close "$work/$method-$model-eager" "$work/$method-$model-graph" 1e-3 0.01
  done
  echo "== resume through a CUDA graph: 1 epoch, then --resume to 2, against 2 straight epochs"
  train 10 "$work/halves" "${mlp[@]}" --epochs 1 --cuda-graph
  timeout 10 "$launch" --resume "$work/halves" --epochs 2 --data-dir "$data" 2>&1 |
    grep -E "error|note|final-epoch"
  show "$work/halves"
  check "1 epoch + 1 resumed through a graph equals 2 straight epochs (bit-identical)" \
    python3 "$checker" same-final-loss "$work/sid-mlp-graph" "$work/halves"
  if [ "${FULL:-0}" = 1 ]; then
    echo "== Ctrl-C mid-run through a CUDA graph, then --resume: 40 epochs straight vs interrupted"
    resume=(--model mlp --modules 4 --module-hidden 1024 --limit-train 12800 --epochs 40)
    train 20 "$work/straight40" "${resume[@]}"
    timeout --preserve-status -s INT 5 "$launch" --gpus 0 --data-dir "$data" "${resume[@]}" \
      --run-dir "$work/stopped" >"$work/stopped.log" 2>&1
    code=$?
    grep -E "error|interrupt|stopp|checkpoint" "$work/stopped.log" | head -3
    check "SIGINT mid-run exits 130" test "$code" = 130
    timeout 20 "$launch" --resume "$work/stopped" --epochs 40 --data-dir "$data" 2>&1 |
      grep -E "error|resuming|final-epoch"
    check "interrupted + resumed through a graph equals the straight run (bit-identical)" \
      python3 "$checker" same-final-loss "$work/straight40" "$work/stopped"
  fi
  if [ "${SWEEPS:-0}" = 1 ]; then
    for graph in --no-cuda-graph --cuda-graph; do
      echo "== depth sweep $graph"
      timeout 60 "$bench" run depth --gpus 0 --depths 1,2,4,8 --module-hidden 2048 $graph \
        --data-dir "$data" --limit-train 12800 --epochs 1 --out "$work/bench$graph" >/dev/null 2>&1
      check "depth sweep $graph ran" test -f "$work/bench$graph/report.md"
      grep -A8 "## Depth" "$work/bench$graph/report.md" 2>/dev/null
    done
  fi
  echo "$failed check(s) failed"
  exit $((failed > 0))
} 2>&1 | tee "$out/graph-check.txt"
status=${PIPESTATUS[0]}
rm -rf "$work"
exit "$status"
