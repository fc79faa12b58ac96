#!/usr/bin/env bash
# The whole test suite on a GPU machine, the tests that need CUDA included (elsewhere they are
# #[ignore]d, and --include-ignored makes them fail where CUDA is missing):
#   cargo test --workspace -- --include-ignored
# Apart from benches/gpu-all.sh because it does not fit that script's 540 s: the suite alone
# takes minutes, and the test build is too large to carry, so it is built on the GPU machine,
# which needs a Rust toolchain and the crates (network, or a vendored registry):
#   bash benches/gpu-tests.sh          (within 600 s: BUILD_S and TEST_S below)
# It refuses to start, with one line and exit 2, when there is no GPU (nvidia-smi missing or
# listing none), no cargo, or no libtorch with CUDA. Then it builds the tests (timed apart,
# under BUILD_S, default 300 s) and runs them (under TEST_S, default 280 s). It prints
# `PASS tests` or `FAIL tests: why` and exits 1 on a failure, a timeout, or a result line that
# still reports an ignored test (then a GPU test did not run). Output in $OUT (or runs/gpu-tests).
set -uo pipefail
cd "$(dirname "$0")/.."
. benches/gpu-common.sh
out=${OUT:-runs/gpu-tests}
nvidia_smi=${NVIDIA_SMI:-nvidia-smi}
cargo=${CARGO:-cargo}
build_s=${BUILD_S:-300}
test_s=${TEST_S:-280}

refuse() { echo "gpu-tests: refusing to start: $*"; exit 2; }

[ $# = 0 ] || { echo "usage: benches/gpu-tests.sh" >&2; exit 2; }
command -v "$nvidia_smi" >/dev/null 2>&1 || refuse "no GPU: $nvidia_smi not found (no NVIDIA driver)"
gpus=$(timeout 5 "$nvidia_smi" -L 2>/dev/null | grep -c "^GPU ")
[ "${gpus:-0}" -gt 0 ] || refuse "no GPU: $nvidia_smi -L lists none"
command -v "$cargo" >/dev/null 2>&1 || refuse "no cargo: the tests are built on this machine"
lib=$(torch_libdir 2>&1) || refuse "$lib"
export LIBTORCH=${lib%/lib}
[ -f "$lib/libtorch_cuda.so" ] || refuse "$lib has no libtorch_cuda.so: a CPU-only libtorch cannot use the GPU"

mkdir -p "$out"
echo "device: $(timeout 5 "$nvidia_smi" --query-gpu=name,driver_version --format=csv,noheader | paste -sd ';')"
start=$SECONDS
timeout -k 5 "$build_s" "$cargo" test --workspace --no-run >"$out/build.txt" 2>&1
rc=$?
echo "build: exit $rc after $((SECONDS - start)) s"
if [ "$rc" != 0 ]; then
  tail -n 20 "$out/build.txt" | sed 's/^/    /'
  echo "FAIL tests: the build failed or ran past $build_s s (see $out/build.txt)"
  exit 1
fi
start=$SECONDS
timeout -k 5 "$test_s" "$cargo" test --workspace -- --include-ignored >"$out/tests.txt" 2>&1
rc=$?
secs=$((SECONDS - start))
grep -E "^test result:" "$out/tests.txt" | sed 's/^/    /'
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  echo "FAIL tests: ran past $test_s s (see $out/tests.txt)"
  exit 1
elif [ "$rc" != 0 ]; then
  grep -E "^test .* FAILED$|^    [a-z_:]+$" "$out/tests.txt" | sed 's/^/    /'
  echo "FAIL tests: exit code $rc after $secs s (see $out/tests.txt)"
  exit 1
elif grep -E "^test result:" "$out/tests.txt" | grep -qv " 0 ignored;"; then
  echo "FAIL tests: a test was still ignored under --include-ignored (see $out/tests.txt)"
  exit 1
elif ! grep -qE "^test result: ok\. [1-9]" "$out/tests.txt"; then
  echo "FAIL tests: no test ran (see $out/tests.txt)"
  exit 1
fi
echo "PASS tests (${secs} s)"
