#!/usr/bin/env bash
# GPU checks for a machine lent by the device tool. Prepare here with
#   benches/prepare-gpu-check.sh
# then run there, in one call:
#   command: bash benches/gpu-check.sh
#   carry:   ["target/release/sid-launch", "target/release/sid-bench", "data/fashion-mnist"]
# It proves CUDA is really used, compares --gpus 0 with --gpus 0,0,0,0 (one stream per worker)
# on a wide-module model, trains Fashion-MNIST briefly on the GPU, and sweeps SID vs BP
# ms/step and peak memory at L = 2 and 8. Output goes to $OUT
# (the device tool's folder) or gpu-check-out/. Every step has a timeout; together they stay under 9 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check-out}
mkdir -p "$out"
torch_lib=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null)/lib
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CUDA_DEVICE_ORDER=PCI_BUS_ID
data=${SID_DATA:-data/fashion-mnist}
launch=target/release/sid-launch
bench=target/release/sid-bench
step() { echo; echo "== $*"; }
{
  step "machine"
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  step "1. CUDA is used: what libtorch sees, a kernel on every GPU, libtorch's stream pool"
  "$bench" env
  ldd "$launch" | grep -E "torch_cuda|cudart" || echo "WARNING: sid-launch does not link libtorch_cuda"
  step "2. --gpus 0 vs --gpus 0,0,0,0 (one CUDA stream per worker), wide modules"
  timeout 120 "$bench" workers --gpus 0,0,0,0 --modules 8 --module-hidden 4096 --batch-size 512 \
    --warmup 5 --rounds 5 --steps 10
  step "2b. the same without separate streams (all workers on the default stream)"
  timeout 60 "$bench" workers --gpus 0,0,0,0 --modules 8 --module-hidden 4096 --batch-size 512 \
    --warmup 3 --rounds 3 --steps 10 --no-streams
  step "3. SID vs BP step time on the GPU"
  timeout 60 "$bench" step-time --gpus 0 --model mlp,cnn --modules 5
  step "4. Fashion-MNIST on the GPU: SimpleCNN, L=5, 2 epochs, --gpus 0 and --gpus 0,0,0,0 (L=4)"
  timeout 90 "$launch" --gpus 0 --data-dir "$data" --model cnn --modules 5 --epochs 2 \
    --run-dir "$out/fmnist-gpu0"
  timeout 60 "$launch" --gpus 0,0,0,0 --data-dir "$data" --model cnn --modules 4 --epochs 1 \
    --run-dir "$out/fmnist-gpu0x4"
  step "5. SID vs BP on the GPU at L = 2 and 8, wide modules: ms/step and peak memory"
  timeout 120 "$bench" run depth memory --gpus 0 --depths 2,8 --module-hidden 2048 --check-hidden 4096 \
    --data-dir "$data" --limit-train 12800 --epochs 1 --out "$out/bench-gpu"
  step "6. a GPU that does not exist"
  "$launch" --gpus 7 --data-dir "$data" --run-dir "$out/never"; echo "exit code $?"
} 2>&1 | tee "$out/gpu-check.txt"
