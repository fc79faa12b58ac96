#!/usr/bin/env bash
# The stage pipeline on a lent GPU: staged SID with K stages as K streams on one GPU (eager, and
# each stage replaying its own CUDA graph) against the graphed single-GPU trainer and the BP
# pipelines, and the model's prediction for K real GPUs. Exits non-zero if a run fails, the
# stage pipeline is not faster than the same stages on one stream, or the per-stage graphs do
# not train like the eager stages (PASS/FAIL lines). Prepare with benches/prepare-gpu-check.sh; run with the device tool
# (carry target/release/sid-launch, target/release/sid-bench, data/fashion-mnist).
# Output: $OUT/pipeline-check.txt and $OUT/pipeline/ (the benchmark's CSV and plots, per-stage
# memory from the CUDA allocator), or the same under gpu-pipeline-check-out/.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-pipeline-check-out}
mkdir -p "$out"
work=$(mktemp -d /tmp/sid-pipeline-check.XXXXXX)
torch_lib=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null)/lib
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
data=${SID_DATA:-data/fashion-mnist}
launch=target/release/sid-launch
bench=target/release/sid-bench
fail=0
median() { python3 -c "import json,sys; print(json.loads(open(sys.argv[1]).readlines()[-1])['median_step_ms'])" "$1/metrics.jsonl"; }
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  echo "== sid-bench pipeline, SimpleCNN L=10, batch 128"
  timeout 240 "$bench" pipeline --gpus 0 --stages 2,4 --rounds 5 --steps 8 --link nvlink --out "$out/pipeline" || fail=1
  echo "== one epoch each (60,000 samples): graphed single GPU, staged K=2 on one stream, K=2 on two streams (eager; graphed)"
  for spec in "graph:--gpus 0" "one:--gpus 0 --stages 2 --placement auto" "two:--gpus 0,0 --stages 2 --placement auto" \
      "twograph:--gpus 0,0 --stages 2 --placement auto --cuda-graph" \
      "bp1f1b:--gpus 0,0 --stages 2 --method bp"; do
    name=${spec%%:*}; flags=${spec#*:}
    timeout 120 "$launch" $flags --data-dir "$data" --epochs 1 --run-dir "$work/$name" 2>&1 \
      | grep -E "staged|backprop pipeline|auto placement|final-epoch|error" || fail=1
    echo "  $name: median $(median "$work/$name") ms/step"
  done
  python3 - "$work" <<'PY' || fail=1
import json, sys
w = sys.argv[1]
last = lambda n: json.loads(open(f"{w}/{n}/metrics.jsonl").readlines()[-1])
m = {n: last(n)["median_step_ms"] for n in ("graph", "one", "two", "twograph")}
ok = m["two"] < m["one"]
print(("PASS" if ok else "FAIL") + f" staged K=2 on two streams faster than on one: {m['one'] / m['two']:.2f}x")
# Same seed, same batches: the graphed stages must train like the eager ones.
a, b = last("two")["train_loss"], last("twograph")["train_loss"]
same = abs(a - b) <= 1e-3 * max(1.0, abs(a))
print(("PASS" if same else "FAIL") + f" per-stage CUDA graphs train like eager stages: train loss {b:.5f} vs {a:.5f}")
print(f"INFO per-stage CUDA graphs vs eager stages, two streams: {m['two'] / m['twograph']:.2f}x")
print(f"INFO staged K=2 on two streams vs the graphed single-GPU trainer: eager {m['graph'] / m['two']:.2f}x, graphed {m['graph'] / m['twograph']:.2f}x")
sys.exit(0 if ok and same else 1)
PY
  exit $fail
} 2>&1 | tee "$out/pipeline-check.txt"
status=${PIPESTATUS[0]}
rm -rf "$work"
exit "$status"
