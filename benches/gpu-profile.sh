#!/usr/bin/env bash
# Where a training step's time goes on a GPU: Chrome traces of a short SID run and a short BP
# run (MLP extractor, L=8, module hidden 2048), for benches/trace-summary.py. Prepare with
# benches/prepare-gpu-check.sh; run with the device tool (carry as for benches/gpu-check.sh).
# GPUS=cpu runs it here. Output: $OUT (or gpu-profile-out/): log.txt, sid-trace.json.gz,
# bp-trace.json.gz. Worst case, both runs at their timeouts: 240 s.
set -uo pipefail
cd "$(dirname "$0")/.."
. benches/gpu-common.sh
out=${OUT:-gpu-profile-out}
gpus=${GPUS:-0}
mkdir -p "$out"
work=$(mktemp -d /tmp/sid-gpu-profile.XXXXXX)
gpu_env
launch=target/release/sid-launch
common=(--gpus "$gpus" --data-dir "${SID_DATA:-data/fashion-mnist}" --model mlp --modules 8
  --module-hidden 2048 --epochs 1 --limit-train "${LIMIT:-12800}")
{
  for method in sid bp; do
    echo "== $method"
    timeout 120 "$launch" "${common[@]}" --method "$method" --run-dir "$work/$method" \
      --trace "$work/$method/trace.json"
    gzip -c "$work/$method/trace.json" >"$out/$method-trace.json.gz"
  done
} 2>&1 | tee "$out/log.txt"
