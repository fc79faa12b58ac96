#!/usr/bin/env bash
# GPU checks for a machine lent by the device tool. Prepare here with
#   benches/prepare-gpu-check.sh
# then run there, in one call:
#   command: bash benches/gpu-check.sh
#   carry:   ["target/release/sid-launch", "target/release/sid-bench", "data/fashion-mnist"]
# It proves CUDA is really used, compares --gpus 0 with --gpus 0,0,0,0 (one stream per worker)
# on a wide-module model, trains Fashion-MNIST briefly on the GPU (with telemetry and a trace),
# and sweeps SID vs BP ms/step and peak memory at L = 1, 2, 4, 8 (steps replayed from CUDA
# graphs, the default on one GPU, and eagerly) plus the memory and speed-up checks.
# With BEFORE_BENCH=path/to/an/earlier/sid-bench it also runs the step-time and workers benchmarks
# with that build, on the same machine in the same call, for a before/after comparison.
# Every step has a timeout; together they stay under 7 minutes.
# What comes back (the device tool returns at most 8 files): $OUT/gpu-check.txt (everything
# printed, with excerpts of the run files) and $OUT/gpu-runs.tar.gz (run folders without
# checkpoints, the trace, the benchmark report, CSV and plots).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check-out}
work=$(mktemp -d /tmp/sid-gpu-check.XXXXXX)
mkdir -p "$out"
torch_lib=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null)/lib
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CUDA_DEVICE_ORDER=PCI_BUS_ID
data=${SID_DATA:-data/fashion-mnist}
launch=target/release/sid-launch
bench=target/release/sid-bench
step() { echo; echo "== $*"; }
excerpt() { # run folder: what telemetry and metrics recorded
  echo "-- $1: telemetry.jsonl has $(wc -l <"$1/telemetry.jsonl") samples; first and last:"
  head -n 1 "$1/telemetry.jsonl" | cut -c1-1200
  tail -n 1 "$1/telemetry.jsonl" | cut -c1-1200
  echo "-- $1: metrics.jsonl"; cut -c1-1500 "$1/metrics.jsonl"
  echo "-- $1: summary.json"; head -c 3000 "$1/summary.json"; echo
}
{
  step "machine"
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  nproc
  step "1. CUDA is used: what libtorch sees, a kernel on every GPU, libtorch's stream pool"
  timeout 60 "$bench" env
  ldd "$launch" | grep -E "torch_cuda|cudart" || echo "WARNING: sid-launch does not link libtorch_cuda"
  step "2. --gpus 0 vs --gpus 0,0,0,0 (one CUDA stream per worker), wide modules"
  timeout 90 "$bench" workers --gpus 0,0,0,0 --modules 8 --module-hidden 4096 --batch-size 512 \
    --warmup 5 --rounds 5 --steps 10
  step "2b. the same without separate streams (all workers on the default stream)"
  timeout 45 "$bench" workers --gpus 0,0,0,0 --modules 8 --module-hidden 4096 --batch-size 512 \
    --warmup 3 --rounds 3 --steps 10 --no-streams
  step "3. SID vs BP step time on the GPU"
  timeout 45 "$bench" step-time --gpus 0 --model mlp,cnn --modules 5
  if [ -n "${BEFORE_BENCH:-}" ]; then
    step "3b. the same benchmarks with an earlier build ($BEFORE_BENCH), for a before/after on this GPU"
    timeout 45 "$BEFORE_BENCH" step-time --gpus 0 --model mlp,cnn --modules 5
    timeout 90 "$BEFORE_BENCH" workers --gpus 0,0,0,0 --modules 8 --module-hidden 4096 --batch-size 512 \
      --warmup 5 --rounds 5 --steps 10
    echo "-- and the current build once more, right after"
    timeout 45 "$bench" step-time --gpus 0 --model mlp,cnn --modules 5
  fi
  step "4. Fashion-MNIST on the GPU: SimpleCNN, L=5, 2 epochs on --gpus 0; L=4, 1 epoch on --gpus 0,0,0,0 with a trace"
  timeout 75 "$launch" --gpus 0 --data-dir "$data" --model cnn --modules 5 --epochs 2 \
    --run-dir "$work/fmnist-gpu0"
  echo "exit code $?"
  excerpt "$work/fmnist-gpu0"
  timeout 45 "$launch" --gpus 0,0,0,0 --data-dir "$data" --model cnn --modules 4 --epochs 1 \
    --run-dir "$work/fmnist-gpu0x4" --trace "$work/fmnist-gpu0x4/trace.json"
  echo "exit code $?"
  excerpt "$work/fmnist-gpu0x4"
  step "5. SID vs BP on the GPU at L = 1, 2, 4, 8, wide modules: ms/step and peak memory; speed-up check"
  timeout 100 "$bench" run depth memory speedup --gpus 0 --depths 1,2,4,8 --workers 1,2,4 \
    --module-hidden 2048 --check-hidden 4096 \
    --data-dir "$data" --limit-train 12800 --epochs 1 --out "$work/bench-gpu"
  step "5b. the depth sweep again with every step run eagerly (--no-cuda-graph)"
  timeout 90 "$bench" run depth --gpus 0 --depths 1,2,4,8 --module-hidden 2048 --no-cuda-graph \
    --data-dir "$data" --limit-train 12800 --epochs 1 --out "$work/bench-gpu-eager" 2>&1 |
    grep -A8 "## Depth"
  step "6. a GPU that does not exist"
  "$launch" --gpus 7 --data-dir "$data" --run-dir "$work/never"; echo "exit code $?"
} 2>&1 | tee "$out/gpu-check.txt"
find "$work" -name checkpoint.safetensors -delete
tar -czf "$out/gpu-runs.tar.gz" -C "$work" .
ls -l "$out"
