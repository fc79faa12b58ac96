#!/usr/bin/env bash
# GPU measurements for a machine lent by the device tool. Prepare here with
#   benches/prepare-gpu-check.sh
# then run there, in one call:
#   command: bash benches/gpu-check.sh
#   carry:   ["target/release/sid-launch", "target/release/sid-bench", "data/fashion-mnist"]
# It shows CUDA is used, compares --gpus 0 with --gpus 0,0,0,0 (one stream per worker) on a
# wide-module model, trains Fashion-MNIST briefly on the GPU (with telemetry and a trace), and
# sweeps SID vs BP ms/step and peak memory at L = 1, 2, 4, 8 (CUDA graph and eager) plus the
# memory and speed-up checks. Each step prints `PASS name` when it exits 0 and `FAIL name: why`
# otherwise; the script exits 1 if any step failed, 2 if libtorch cannot be found. The figures
# are measurements, printed, not asserted (benches/gpu-acceptance.sh asserts).
# QUICK=1 (what benches/gpu-all.sh runs): only the two Fashion-MNIST runs, worst case 61 s.
# With BEFORE_BENCH=path/to/an/earlier/sid-bench it also runs the step-time and workers
# benchmarks with that build, in the same call, for a before/after comparison.
# Worst case, every step at its timeout: 396 s; with BEFORE_BENCH 496 s.
# What comes back: $OUT/gpu-check.txt (everything printed, with excerpts of the run files) and
# $OUT/gpu-runs.tar.gz (run folders without checkpoints, the trace, the benchmark report, CSV
# and plots).
set -uo pipefail
cd "$(dirname "$0")/.."
. benches/gpu-common.sh
out=${OUT:-gpu-check-out}
work=$(mktemp -d /tmp/sid-gpu-check.XXXXXX)
mkdir -p "$out"
gpu_env
data=${SID_DATA:-data/fashion-mnist}
launch=target/release/sid-launch
bench=target/release/sid-bench
quick=${QUICK:-0}
failed=0
# step SECONDS NAME CMD...: runs CMD under a timeout (a shell function of this script keeps its
# own), then one PASS or FAIL line.
step() {
  local limit=$1 name=$2 rc
  shift 2
  echo
  echo "== $name"
  if declare -F "$1" >/dev/null; then "$@"; else timeout "$limit" "$@"; fi
  rc=$?
  if [ "$rc" = 0 ]; then
    echo "PASS $name"
  elif [ "$rc" = 124 ]; then
    echo "FAIL $name: timed out after $limit s"
    failed=$((failed + 1))
  else
    echo "FAIL $name: exit code $rc"
    failed=$((failed + 1))
  fi
}
excerpt() { # run folder: what telemetry and metrics recorded
  [ -f "$1/metrics.jsonl" ] || { echo "-- $1: no metrics.jsonl"; return; }
  echo "-- $1: telemetry.jsonl has $(wc -l <"$1/telemetry.jsonl") samples; first and last:"
  head -n 1 "$1/telemetry.jsonl" | cut -c1-1200
  tail -n 1 "$1/telemetry.jsonl" | cut -c1-1200
  echo "-- $1: metrics.jsonl"; cut -c1-1500 "$1/metrics.jsonl"
  echo "-- $1: summary.json"; head -c 3000 "$1/summary.json"; echo
}
# expect_gpu7: a GPU that does not exist is one error line and exit 1.
expect_gpu7() {
  local o rc
  o=$(timeout 10 "$launch" --gpus 7 --data-dir "$data" --run-dir "$work/never" 2>&1)
  rc=$?
  echo "$o" | tail -n 2
  [ "$rc" = 1 ] && grep -q "^error:.*GPU 7" <<<"$o"
}
{
  echo "== machine"
  date -u
  timeout 5 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  nproc
  if [ "$quick" != 1 ]; then
    step 25 "CUDA is used: what libtorch sees, a kernel on every GPU, libtorch's stream pool" \
      "$bench" env
    ldd "$launch" | grep -E "torch_cuda" || { echo "FAIL sid-launch links libtorch_cuda"; failed=$((failed + 1)); }
    step 50 "--gpus 0 vs --gpus 0,0,0,0 (one CUDA stream per worker), wide modules" \
      "$bench" workers --gpus 0,0,0,0 --modules 8 --module-hidden 4096 --batch-size 512 \
      --warmup 5 --rounds 5 --steps 10
    step 35 "the same without separate streams (all workers on the default stream)" \
      "$bench" workers --gpus 0,0,0,0 --modules 8 --module-hidden 4096 --batch-size 512 \
      --warmup 3 --rounds 3 --steps 10 --no-streams
    step 35 "SID vs BP step time on the GPU" "$bench" step-time --gpus 0 --model mlp,cnn --modules 5
    if [ -n "${BEFORE_BENCH:-}" ]; then
      step 35 "step time with an earlier build ($BEFORE_BENCH)" \
        "$BEFORE_BENCH" step-time --gpus 0 --model mlp,cnn --modules 5
      step 35 "workers with an earlier build ($BEFORE_BENCH)" \
        "$BEFORE_BENCH" workers --gpus 0,0,0,0 --modules 8 --module-hidden 4096 --batch-size 512 \
        --warmup 3 --rounds 3 --steps 10
      step 30 "step time with the current build once more, right after" \
        "$bench" step-time --gpus 0 --model mlp,cnn --modules 5
    fi
  fi
  step 28 "Fashion-MNIST on --gpus 0: SimpleCNN, L=5, 2 epochs" \
    "$launch" --gpus 0 --data-dir "$data" --model cnn --modules 5 --epochs 2 \
    --run-dir "$work/fmnist-gpu0"
  excerpt "$work/fmnist-gpu0"
  step 28 "Fashion-MNIST on --gpus 0,0,0,0 (four module stages on one GPU): L=4, 1 epoch, traced" \
    "$launch" --gpus 0,0,0,0 --data-dir "$data" --model cnn --modules 4 --epochs 1 \
    --run-dir "$work/fmnist-gpu0x4" --trace "$work/fmnist-gpu0x4/trace.json"
  excerpt "$work/fmnist-gpu0x4"
  if [ "$quick" != 1 ]; then
    step 100 "SID vs BP at L = 1, 2, 4, 8, wide modules: ms/step and peak memory; speed-up check" \
      "$bench" run depth memory speedup --gpus 0 --depths 1,2,4,8 --workers 1,2,4 \
      --module-hidden 2048 --check-hidden 4096 \
      --data-dir "$data" --limit-train 12800 --epochs 1 --out "$work/bench-gpu"
    step 80 "the depth sweep again with every step run eagerly (--no-cuda-graph)" \
      "$bench" run depth --gpus 0 --depths 1,2,4,8 --module-hidden 2048 --no-cuda-graph \
      --data-dir "$data" --limit-train 12800 --epochs 1 --out "$work/bench-gpu-eager"
    grep -A8 "## Depth" "$work/bench-gpu-eager/report.md" 2>/dev/null
    step 10 "a GPU that does not exist: one error line, exit 1" expect_gpu7
  fi
  echo
  echo "$failed step(s) failed"
  exit $((failed > 0))
} 2>&1 | tee "$out/gpu-check.txt"
status=${PIPESTATUS[0]}
find "$work" -name checkpoint.safetensors -delete
tar -czf "$out/gpu-runs.tar.gz" -C "$work" .
rm -rf "$work"
exit "$status"
