#!/usr/bin/env bash
# Sets up what sid needs on a fresh machine and builds sid-launch and sid-bench. Safe to rerun:
# each step is skipped when its result is already there.
#   1. libtorch 2.11.0: pip's torch==2.11.0 in a project-local venv (.venv, about 4.6 GB),
#      unless LIBTORCH is already set to a libtorch of your own;
#      with torchvision 0.26, timm, safetensors and tensorboard beside it, which only the
#      interop tests use (torchvision and timm models as references, TensorBoard's reader);
#   2. Debian's dataset-fashion-mnist (the data), libgloo-dev (Gloo's headers, for the c10d
#      backend) and protobuf-compiler (protoc, which the TensorBoard writer's build needs),
#      through apt-get: root or sudo;
#   3. cargo build --release -p sid-launch -p sid-benches (skipped with --no-build).
set -euo pipefail
cd "$(dirname "$0")/.."
build=1
for arg in "$@"; do
  case "$arg" in
    --no-build) build=0 ;;
    *) echo "usage: scripts/setup.sh [--no-build]" >&2; exit 2 ;;
  esac
done

# What this script cannot install itself: say so at once, in one line each.
need() { # COMMAND WHAT
  command -v "$1" >/dev/null 2>&1 || { echo "setup: $1 not found: $2" >&2; exit 1; }
}
need cargo "install a Rust toolchain (https://rustup.rs), then rerun"
need c++ "install a C++ compiler (Debian: apt-get install g++), then rerun"

if [ -n "${LIBTORCH:-}" ]; then
  echo "setup: using LIBTORCH=$LIBTORCH"
else
  need python3 "install Python 3 with venv (Debian: apt-get install python3-venv), then rerun"
  if ! .venv/bin/python -W ignore -c 'import sys, torch; sys.exit(torch.__version__.split("+")[0] != "2.11.0")' 2>/dev/null; then
    echo "setup: installing torch 2.11.0 into .venv (about 4.6 GB; several minutes)"
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check torch==2.11.0
  fi
  # The interop tests' references and readers (launcher/tests/interop.rs), at the versions
  # that match torch 2.11 (torchvision 0.26 is built against it); pinned torch so that pip
  # never replaces it.
  if ! .venv/bin/python -W ignore -c 'import torchvision, timm, safetensors, tensorboard, sys; sys.exit(not torchvision.__version__.startswith("0.26."))' 2>/dev/null; then
    echo "setup: installing torchvision 0.26, timm, safetensors and tensorboard into .venv (for the interop tests)"
    .venv/bin/pip install --quiet --disable-pip-version-check torch==2.11.0 "torchvision==0.26.*" timm safetensors tensorboard
  fi
  # CUDA headers (runtime + crt) for the small C++ shim that reads the CUDA allocator's peaks,
  # and CCCL's (nv/target), which ProcessGroupNCCL.hpp needs, for the c10d shim.
  if ! ls .venv/lib/python3*/site-packages/nvidia/cu13/include/nv/target >/dev/null 2>&1; then
    echo "setup: installing CUDA's headers into .venv (cuda-toolkit 13.0.2: crt, cccl)"
    .venv/bin/pip install --quiet --disable-pip-version-check "cuda-toolkit[crt,cccl]==13.0.2"
  fi
  # A fixed path for .cargo/config.toml, whatever the venv's Python version.
  torch_dir=$(.venv/bin/python -W ignore -c "import os, torch; print(os.path.dirname(torch.__file__))") || {
    echo "setup: .venv/bin/python cannot import torch; remove .venv and rerun" >&2
    exit 1
  }
  # The real path: a .venv that is itself a link (a second checkout sharing one) must not
  # leave a link through this checkout behind.
  ln -sfn "$(realpath "$torch_dir")" .venv/libtorch
fi

packages=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || packages+=(dataset-fashion-mnist)
[ -f /usr/include/gloo/config.h ] || packages+=(libgloo-dev)
command -v protoc >/dev/null 2>&1 || packages+=(protobuf-compiler)
if [ ${#packages[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${packages[*]}"
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    need sudo "installing ${packages[*]} needs root: run as root, or install them yourself"
    sudo=sudo
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${packages[@]}" >/dev/null
fi

if [ "$build" = 1 ]; then
  echo "setup: building target/release/sid-launch and target/release/sid-bench (several minutes the first time)"
  cargo build --release --quiet -p sid-launch -p sid-benches
  echo "setup: built target/release/sid-launch and target/release/sid-bench"
fi
echo "setup: done"
