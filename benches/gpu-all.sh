#!/usr/bin/env bash
# Every GPU check, in order, in one command that fits a 10-minute device call: at most 540 s
# even if every step runs to its timeout. Prepare here with benches/prepare-gpu-check.sh, then
# on the GPU machine:
#   command: bash benches/gpu-all.sh
#   carry:   ["target/release/sid-launch", "target/release/sid-bench", "data/fashion-mnist"]
# It refuses to start, with one line and exit 2, when there is no GPU (nvidia-smi missing or
# listing none), libtorch cannot be found, or what it needs is missing or over the 64 MiB a
# device call carries. Then it runs each check under its own budget (seconds):
#   acceptance 160  benches/gpu-acceptance.sh: CUDA, NVML, NCCL, graphs, streams, replicas, bf16
#   pipeline   125  benches/gpu-pipeline-check.sh: staged SID on two streams, per-stage graphs
#   graphs     155  benches/gpu-graph-check.sh: graph replay against eager, resume
#   bench       70  QUICK=1 benches/gpu-check.sh: Fashion-MNIST on --gpus 0 and --gpus 0,0,0,0
# plus 30 s for the checks before them (nvidia-smi twice, 5 s each; libtorch through python3,
# 20 s): 540 s. A check's own timeouts fit in its budget less 5 s, the grace `timeout -k`
# leaves before it kills. The test suite with its GPU tests (cargo test --workspace --
# --include-ignored) does not fit these 540 s and needs a toolchain on the GPU machine: it is
# benches/gpu-tests.sh, a command of its own. Prints one `PASS name` / `FAIL name: why` line
# per check (each FAIL line of a check's own output follows, indented), then a summary, and
# exits 1 if any check failed. Each check's whole output is in $OUT/<name>/ (or runs/gpu-all/).
#
#   bash benches/gpu-all.sh --self-test
# runs anywhere, without a GPU: the same runner on stand-in checks, one that passes, one forced
# to fail and one that overruns its budget, and the NVML name check on an error string. It must
# print PASS for the first, FAIL for the others and exit 1 (benches/tests/gpu_all.rs runs it).
set -uo pipefail
cd "$(dirname "$0")/.."
. benches/gpu-common.sh
out=${OUT:-runs/gpu-all}
nvidia_smi=${NVIDIA_SMI:-nvidia-smi}
carry=(target/release/sid-launch target/release/sid-bench "${SID_DATA:-data/fashion-mnist}")
carry_limit_mib=64
failed=0
passed=0
names=()

refuse() { echo "gpu-all: refusing to start: $*"; exit 2; }

# run_check NAME BUDGET CMD...: CMD under `timeout` (killed 5 s after its budget's end), its
# output in $out/NAME/log.txt; one PASS or FAIL line, and the FAIL lines CMD printed.
run_check() {
  local name=$1 budget=$2 rc start secs
  shift 2
  mkdir -p "$out/$name"
  # A shell function of these scripts runs in a bash of its own, so that `timeout` can stop it.
  if declare -F "$1" >/dev/null; then
    export -f "$1"
    set -- bash -c '"$@"' bash "$@"
  fi
  start=$SECONDS
  OUT="$out/$name" timeout -k 5 $((budget - 5)) "$@" >"$out/$name/log.txt" 2>&1
  rc=$?
  secs=$((SECONDS - start))
  if [ "$rc" = 0 ]; then
    echo "PASS $name (${secs} s)"
    passed=$((passed + 1))
  else
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
      echo "FAIL $name: ran past its budget of $budget s (see $out/$name/log.txt)"
    else
      echo "FAIL $name: exit code $rc after ${secs} s (see $out/$name/log.txt)"
    fi
    grep -E "^FAIL " "$out/$name/log.txt" | sed 's/^/    /'
    failed=$((failed + 1))
    names+=("$name")
  fi
}

# carry_size: the files a device call must carry exist and stay under the limit.
carry_size() {
  local f kib
  for f in "${carry[@]}"; do
    [ -e "$f" ] || { echo "$f is missing: run benches/prepare-gpu-check.sh first"; return 1; }
  done
  kib=$(du -skL "${carry[@]}" | awk '{s += $1} END {print s}')
  echo "carried: ${carry[*]}: $((kib / 1024)) MiB (limit $carry_limit_mib MiB)"
  [ "$kib" -le $((carry_limit_mib * 1024)) ]
}

summary() {
  echo "gpu-all: $passed passed, $failed failed${names[*]:+ (${names[*]})}"
  [ "$failed" = 0 ]
}

self_test() {
  local t=$out
  mkdir -p "$t"
  echo "device: none (self-test: stand-in checks)"
  run_check "self-test-passing" 10 true
  run_check "self-test-forced-failure" 10 bash -c 'echo "FAIL a sub-check: forced"; exit 1'
  run_check "self-test-over-budget" 6 sleep 30
  printf 'NVML gpu 0: NVML error: not supported\n' >"$t/env.txt"
  run_check "self-test-nvml-error-is-not-a-name" 10 nvml_names_gpu0 "$t/env.txt" "NVIDIA H100 80GB HBM3"
  summary
}

gpu_checks() {
  # Before anything slow: a GPU, libtorch, the carried files.
  command -v "$nvidia_smi" >/dev/null 2>&1 || refuse "no GPU: $nvidia_smi not found (no NVIDIA driver)"
  local gpus
  gpus=$(timeout 5 "$nvidia_smi" -L 2>/dev/null | grep -c "^GPU ")
  [ "${gpus:-0}" -gt 0 ] || refuse "no GPU: $nvidia_smi -L lists none"
  local lib
  lib=$(torch_libdir 2>&1) || refuse "$lib"
  export LIBTORCH=${lib%/lib}
  [ -f "$lib/libtorch_cuda.so" ] || refuse "$lib has no libtorch_cuda.so: a CPU-only libtorch cannot use the GPU"
  local why
  why=$(carry_size) || refuse "$why"
  echo "device: $(timeout 5 "$nvidia_smi" --query-gpu=name,driver_version --format=csv,noheader | paste -sd ';')"
  echo "$why"
  echo "libtorch: $lib"
  run_check acceptance 160 bash benches/gpu-acceptance.sh
  run_check pipeline 125 bash benches/gpu-pipeline-check.sh
  run_check graphs 155 env SWEEPS=0 FULL=0 bash benches/gpu-graph-check.sh
  run_check bench 70 env QUICK=1 bash benches/gpu-check.sh
  summary
}

if [ "${1:-}" = --self-test ]; then
  out=${OUT:-runs/gpu-all-self-test}
  self_test
else
  [ $# = 0 ] || { echo "usage: benches/gpu-all.sh [--self-test]" >&2; exit 2; }
  mkdir -p "$out"
  gpu_checks 2>&1 | tee "$out/gpu-all.txt"
  exit "${PIPESTATUS[0]}"
fi
