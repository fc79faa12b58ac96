#!/usr/bin/env bash
# The stage pipeline on a lent GPU: staged SID with K stages as K streams on one GPU against the
# graphed single-GPU trainer and the BP pipelines, and the model's prediction for K real GPUs.
# Exits non-zero if a run fails or the stage pipeline is not faster than the same stages on one
# stream (PASS/FAIL lines). Prepare with benches/prepare-gpu-check.sh; run with the device tool
# (carry target/release/sid-launch, target/release/sid-bench, data/fashion-mnist).
# Output: $OUT/pipeline-check.txt (or gpu-pipeline-check-out/).
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
  timeout 240 "$bench" pipeline --gpus 0 --stages 2,4 --rounds 5 --steps 8 --link nvlink || fail=1
  echo "== one epoch each (60,000 samples): graphed single GPU, staged K=2 on one stream, K=2 on two streams"
  for spec in "graph:--gpus 0" "one:--gpus 0 --stages 2 --placement auto" "two:--gpus 0,0 --stages 2 --placement auto" \
      "bp1f1b:--gpus 0,0 --stages 2 --method bp"; do
    name=${spec%%:*}; flags=${spec#*:}
    timeout 120 "$launch" $flags --data-dir "$data" --epochs 1 --run-dir "$work/$name" 2>&1 \
      | grep -E "staged|backprop pipeline|auto placement|final-epoch|error" || fail=1
    echo "  $name: median $(median "$work/$name") ms/step"
  done
  python3 - "$work" <<'PY' || fail=1
import json, sys
w = sys.argv[1]
m = {n: json.loads(open(f"{w}/{n}/metrics.jsonl").readlines()[-1])["median_step_ms"] for n in ("graph", "one", "two")}
ok = m["two"] < m["one"]
print(("PASS" if ok else "FAIL") + f" staged K=2 on two streams faster than on one: {m['one'] / m['two']:.2f}x")
print(f"INFO staged K=2 on two streams vs the graphed single-GPU trainer: {m['graph'] / m['two']:.2f}x")
sys.exit(0 if ok else 1)
PY
  exit $fail
} 2>&1 | tee "$out/pipeline-check.txt"
status=${PIPESTATUS[0]}
rm -rf "$work"
exit "$status"
