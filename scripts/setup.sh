#!/usr/bin/env bash
# Sets up what sid needs on a fresh machine and builds sid-launch. Safe to rerun: each step is
# skipped when its result is already there.
#   1. libtorch 2.11.0: pip's torch==2.11.0 in a project-local venv (.venv), unless LIBTORCH is
#      already set to a libtorch of your own;
#   2. Fashion-MNIST: Debian's dataset-fashion-mnist package, and Gloo's headers for the c10d
#      backend: Debian's libgloo-dev (both need root or sudo);
#   3. cargo build --release (skipped with --no-build).
set -euo pipefail
cd "$(dirname "$0")/.."
build=1
for arg in "$@"; do
  case "$arg" in
    --no-build) build=0 ;;
    *) echo "usage: scripts/setup.sh [--no-build]" >&2; exit 2 ;;
  esac
done

if [ -n "${LIBTORCH:-}" ]; then
  echo "setup: using LIBTORCH=$LIBTORCH"
else
  if ! .venv/bin/python -c 'import sys, torch; sys.exit(torch.__version__.split("+")[0] != "2.11.0")' 2>/dev/null; then
    echo "setup: installing torch==2.11.0 into .venv (about 4.6 GB, a few minutes)"
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check torch==2.11.0
  fi
  # CUDA headers (runtime + crt) for the small C++ shim that reads the CUDA allocator's peaks,
  # and CCCL's (nv/target), which ProcessGroupNCCL.hpp needs, for the c10d shim.
  if ! ls .venv/lib/python3*/site-packages/nvidia/cu13/include/nv/target >/dev/null 2>&1; then
    .venv/bin/pip install --quiet --disable-pip-version-check "cuda-toolkit[crt,cccl]==13.0.2"
  fi
  # A fixed path for .cargo/config.toml, whatever the venv's Python version.
  ln -sfn "$(.venv/bin/python -c "import os, torch; print(os.path.dirname(torch.__file__))" 2>/dev/null)" .venv/libtorch
fi

fmnist=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
packages=""
[ -f "$fmnist" ] || packages="dataset-fashion-mnist"
[ -f /usr/include/gloo/config.h ] || packages="$packages libgloo-dev"
if [ -n "$packages" ]; then
  echo "setup: installing Debian's$packages"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $packages >/dev/null
fi

if [ "$build" = 1 ]; then
  cargo build --release --quiet -p sid-launch
  echo "setup: built target/release/sid-launch"
fi
