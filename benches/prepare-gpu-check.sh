#!/usr/bin/env bash
# Builds what the GPU checks need (target/release/sid-launch and target/release/sid-bench) and
# copies Fashion-MNIST into data/ so that the device tool can carry it (the GPU machine has no
# Debian data package); then checks that the three stay under the 64 MiB a device call carries.
# Next, on the GPU machine: bash benches/gpu-all.sh (see its header).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --no-build >/dev/null
cargo build --release --quiet -p sid-launch -p sid-benches
mkdir -p data/fashion-mnist
cp -u /usr/share/datasets/fashion-mnist/*.gz data/fashion-mnist/
carry=(target/release/sid-launch target/release/sid-bench data/fashion-mnist)
kib=$(du -skL "${carry[@]}" | awk '{s += $1} END {print s}')
echo "to carry: ${carry[*]}: $((kib / 1024)) MiB (limit 64 MiB)"
if [ "$kib" -gt $((64 * 1024)) ]; then
  echo "error: over the 64 MiB a device call carries" >&2
  exit 1
fi
