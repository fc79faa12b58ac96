#!/usr/bin/env bash
# Every GPU claim checked by something that can fail, in one command for a machine lent by the
# device tool (benches/gpu-all.sh runs it with the other GPU checks). Prepare here with
# benches/prepare-gpu-check.sh, then run there:
#   command: bash benches/gpu-acceptance.sh
#   carry:   ["target/release/sid-launch", "target/release/sid-bench", "data/fashion-mnist"]
# Prints the device, then one `PASS name` or `FAIL name: why` per check, and exits 1 if any
# check failed (0 only when all passed), 2 if libtorch cannot be found. Output also goes to
# $OUT/acceptance.txt. Worst case, every step at its timeout: 2 × 5 + 23 + 6 × 17 + 2 × 10 = 155 s.
#
#   bash benches/gpu-acceptance.sh --self-test
# runs anywhere, without a GPU: it feeds the same check helpers made-up run folders, two that
# agree and two forced mismatches, and so must print PASS for the first and FAIL for the
# others and exit 1 (launcher/tests/cli.rs runs it).
set -uo pipefail
cd "$(dirname "$0")/.."
. benches/gpu-common.sh
checker=benches/acceptance_check.py
failures=0
pass() { echo "PASS $1"; }
fail() { echo "FAIL $1: $2"; failures=$((failures + 1)); }
# check NAME CMD...: PASS when CMD exits 0, else FAIL with the last line CMD printed.
check() {
  local name=$1 why
  shift
  if why=$("$@" 2>&1); then pass "$name"; else fail "$name" "$(tail -n 1 <<<"$why")"; fi
}
# has FILE PATTERN: FILE has a line matching PATTERN (grep -E).
has() { grep -qE "$2" "$1" || echo "no line matching '$2' in $1"; grep -qE "$2" "$1"; }
# captured LOG: sid-launch's output LOG says a CUDA graph was captured and replayed (a failed
# capture falls back to eager steps, which the loss comparisons alone cannot tell apart;
# SID_NO_CUDA_GRAPH=1 forces that and must make this FAIL).
captured() { has "$1" "^CUDA graph: [1-9][0-9]* captured, [1-9][0-9]* replays"; }
# expect_exit NAME CODE NEEDLE CMD...: CMD must exit with CODE and print NEEDLE on an error: line.
expect_exit() {
  local name=$1 code=$2 needle=$3 out rc
  shift 3
  out=$("$@" 2>&1)
  rc=$?
  if [ "$rc" != "$code" ]; then
    fail "$name" "exit code $rc, expected $code"
  elif ! grep -q "^error:.*$needle" <<<"$out"; then
    fail "$name" "no 'error: ...$needle' line in: $(tail -n 1 <<<"$out")"
  else
    pass "$name"
  fi
}
# fake DIR LOSS ACC SOURCE: a one-epoch run folder as sid-launch writes it.
fake() {
  mkdir -p "$1"
  printf '{"epoch":1,"train_loss":%s,"test_acc":%s,"peak_memory":[{"device":"cuda:0","bytes":1048576,"source":"%s"}]}\n' \
    "$2" "$3" "$4" >"$1/metrics.jsonl"
}

self_test() {
  local t
  t=$(mktemp -d /tmp/sid-acceptance-self-test.XXXXXX)
  fake "$t/eager" 0.8123456789012 0.81 cuda-allocator
  fake "$t/graph" 0.8123456789012 0.81 cuda-allocator
  fake "$t/off" 0.8123456789013 0.81 process-rss
  fake "$t/no-loss" null 0.81 cuda-allocator
  echo "device: none (self-test: made-up run folders)"
  check "self-test: equal losses" python3 "$checker" same-final-loss "$t/eager" "$t/graph"
  check "self-test: close losses" python3 "$checker" close "$t/eager" "$t/off" 1e-6 0.005
  check "self-test: allocator peaks" python3 "$checker" peak-source "$t/graph" cuda:0 cuda-allocator
  echo "CUDA graph: 1 captured, 9 replays" >"$t/graph.log"
  echo "no CUDA graph: every step ran eagerly" >"$t/eager.log"
  check "self-test: graph captured" captured "$t/graph.log"
  check "self-test: losses differ" python3 "$checker" differ "$t/eager" "$t/off" 1e-14
  # Forced mismatches: these must FAIL.
  check "self-test: forced capture mismatch" captured "$t/eager.log"
  check "self-test: forced no-effect mismatch" python3 "$checker" differ "$t/eager" "$t/graph" 1e-5
  check "self-test: forced missing losses" python3 "$checker" same-final-loss "$t/no-loss" "$t/no-loss"
  check "self-test: forced loss mismatch" python3 "$checker" same-final-loss "$t/eager" "$t/off"
  check "self-test: forced peak-source mismatch" python3 "$checker" peak-source "$t/off" cuda:0 cuda-allocator
  expect_exit "self-test: forced exit-code mismatch" 1 "GPU 7" true
  rm -rf "$t"
}

gpu_checks() {
  local work launch bench data gpu0
  work=$(mktemp -d /tmp/sid-acceptance.XXXXXX)
  gpu_env
  data=${SID_DATA:-data/fashion-mnist}
  launch=target/release/sid-launch
  bench=target/release/sid-bench
  echo "device: $(timeout 5 nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null |
    paste -sd ';' || true)"
  # GPU 0's name as the driver's own tool reports it: NVML through sid must give the same.
  gpu0=$(timeout 5 nvidia-smi --query-gpu=name --format=csv,noheader -i 0 2>/dev/null | head -n 1)
  timeout 23 "$bench" env >"$work/env.txt" 2>&1
  sed 's/^/  env: /' "$work/env.txt"
  check "CUDA seen" has "$work/env.txt" "^cuda available: true"
  check "a matrix product ran on cuda:0 with a finite result" \
    has "$work/env.txt" "^cuda:0: .*ran on the GPU.*checksum finite: true"
  check "NVML seen (driver)" has "$work/env.txt" "^NVML: driver [0-9]"
  check "NVML names GPU 0 as nvidia-smi does (${gpu0:-nvidia-smi gave no name})" \
    nvml_names_gpu0 "$work/env.txt" "$gpu0"
  check "streams: libtorch's pool stream set and synchronised" \
    has "$work/env.txt" "pool stream set and synchronised"
  check "c10d: NCCL built in; all-reduce at world size 1 through sid's shim keeps its values" \
    has "$work/env.txt" "values kept: true"
  # Short MLP runs: 6400 samples, 1 epoch, the same seed.
  local common=(--data-dir "$data" --model mlp --modules 4 --module-hidden 512 --limit-train 6400
    --epochs 1 --telemetry-hz 0)
  run() { # NAME ARGS...: a run folder in $work, its last lines on failure
    local name=$1 out
    shift
    out=$(timeout 17 "$launch" "${common[@]}" "$@" --run-dir "$work/$name" 2>&1) ||
      echo "  $name failed: $(tail -n 2 <<<"$out" | paste -sd ' ')"
    printf '%s\n' "$out" >"$work/$name.log"
    grep -E "^note:" <<<"$out" | sed "s/^/  $name: /"
  }
  run eager --gpus 0 --no-cuda-graph
  run graph --gpus 0 --cuda-graph
  run two --gpus 0,0
  # Two processes on cuda:0 (replicas summing over Gloo: NCCL refuses two ranks on one GPU).
  run replicas --gpus 0,0 --data-parallel 2 --nproc-per-node 2 --master-port 29731
  run bf16 --gpus 0 --precision bf16
  run bf16-eager --gpus 0 --precision bf16 --no-cuda-graph
  check "a CUDA graph was captured and replayed (one GPU)" captured "$work/graph.log"
  check "graph replay equals eager (bit-identical final train loss)" \
    python3 "$checker" same-final-loss "$work/eager" "$work/graph"
  check "two workers on cuda:0 equal one device (within 1e-4 / 0.005)" \
    python3 "$checker" close "$work/eager" "$work/two" 1e-4 0.005
  check "2 data-parallel ranks on cuda:0 equal one device (within 1e-4 / 0.005)" \
    python3 "$checker" close "$work/eager" "$work/replicas" 1e-4 0.005
  check "allocator peaks recorded (one device, graph)" \
    python3 "$checker" peak-source "$work/graph" cuda:0 cuda-allocator
  check "allocator peaks recorded (two workers)" \
    python3 "$checker" peak-source "$work/two" cuda:0 cuda-allocator
  # bf16 autocast: a finite loss near fp32's (a NaN fails `close`), the graph as eager.
  check "a CUDA graph was captured and replayed (bf16)" captured "$work/bf16.log"
  check "bf16 was in effect (final loss differs from fp32's by more than 1e-5 relative)" \
    python3 "$checker" differ "$work/eager" "$work/bf16" 1e-5
  check "bf16 (CUDA graph) trains like fp32 (loss within 5%, accuracy within 0.03)" \
    python3 "$checker" close "$work/eager" "$work/bf16" 0.05 0.03
  check "bf16 graph replay equals bf16 eager (within 1e-4 / 0.005)" \
    python3 "$checker" close "$work/bf16-eager" "$work/bf16" 1e-4 0.005
  expect_exit "bf16 on the CPU refused with exit 1" 1 "needs a CUDA device" \
    timeout 10 "$launch" --gpus cpu --precision bf16 --run-dir "$work/bad-bf16"
  expect_exit "bad --gpus 7 refused with exit 1" 1 "GPU 7" \
    timeout 10 "$launch" --gpus 7 --run-dir "$work/bad"
  tar -C "$work" --exclude='*.safetensors' -czf "$out_dir/acceptance-runs.tar.gz" . 2>/dev/null
}

main() {
  if [ "${1:-}" = --self-test ]; then self_test; else gpu_checks; fi
  echo "$failures check(s) failed"
  [ "$failures" = 0 ]
}

out_dir=${OUT:-gpu-acceptance-out}
mkdir -p "$out_dir"
main "$@" 2>&1 | tee "$out_dir/acceptance.txt"
exit "${PIPESTATUS[0]}"
