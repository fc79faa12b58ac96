# Sourced by the benches/gpu-*.sh scripts (not a check of its own): finds libtorch's libraries
# for the prebuilt binaries, or stops with one line saying what is missing. Finding them through
# python3 can take up to 20 s more than a script's stated worst case; benches/gpu-all.sh does
# it once and passes LIBTORCH on.

# torch_libdir: prints the folder holding libtorch_cpu.so: $LIBTORCH/lib, the project venv's
# (.venv/libtorch/lib, made by scripts/setup.sh), or that of the torch python3 imports.
torch_libdir() {
  local d=""
  if [ -n "${LIBTORCH:-}" ]; then
    d=$LIBTORCH/lib
  elif [ -f .venv/libtorch/lib/libtorch_cpu.so ]; then
    d=$(cd .venv/libtorch/lib && pwd -P)
  elif command -v python3 >/dev/null 2>&1; then
    d=$(timeout 20 python3 -W ignore -c \
      'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null) || d=""
  fi
  if [ -n "${LIBTORCH:-}" ] && [ ! -f "$d/libtorch_cpu.so" ]; then
    echo "libtorch not found: LIBTORCH=$LIBTORCH has no lib/libtorch_cpu.so" >&2
    return 1
  elif [ -z "$d" ] || [ ! -f "$d/libtorch_cpu.so" ]; then
    echo "libtorch not found (LIBTORCH unset, no .venv/libtorch, python3 cannot import torch):" \
      "set LIBTORCH to a libtorch 2.11.0, or pip install torch==2.11.0" >&2
    return 1
  fi
  echo "$d"
}

# gpu_env: exports LD_LIBRARY_PATH (libtorch first) and CUDA_DEVICE_ORDER, or exits 2.
gpu_env() {
  local lib
  lib=$(torch_libdir) || exit 2
  export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export CUDA_DEVICE_ORDER=PCI_BUS_ID
}

# nvml_names_gpu0 ENV_FILE NAME: `sid-bench env` printed exactly `NVML gpu 0: NAME`, NAME being
# what nvidia-smi calls GPU 0 (an NVML error in the name's place, or another name, fails).
nvml_names_gpu0() {
  if [ -z "$2" ]; then echo "nvidia-smi gave no name for GPU 0"; return 1; fi
  grep -qxF "NVML gpu 0: $2" "$1" && return 0
  echo "expected 'NVML gpu 0: $2', got '$(grep '^NVML gpu 0:' "$1" | head -n 1)'"
  return 1
}
