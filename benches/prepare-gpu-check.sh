#!/usr/bin/env bash
# Builds what benches/gpu-check.sh needs and copies Fashion-MNIST into data/ so the device
# tool can carry it (the GPU machine has no Debian data package).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
cargo build --release --quiet -p sid-launch -p sid-benches
mkdir -p data/fashion-mnist
cp -u /usr/share/datasets/fashion-mnist/*.gz data/fashion-mnist/
du -shc target/release/sid-launch target/release/sid-bench data/fashion-mnist | tail -1
