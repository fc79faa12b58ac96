#!/usr/bin/env bash
# The paper's claims, measured (docs/claims.md): SID against BP on the identical network, with
# and without symmetric label noise; depth L in {1, 2, 4, 8, 16}; the weight alpha of the label
# term; SID against BP with 40% noise trained four times longer (20 epochs). Fashion-MNIST, the
# full test set, batch 128, one thread per run, one run at a time, every run at the lowest CPU
# priority. A 2-core CPU shared with other work cannot train SimpleCNN on the full set for every
# cell (docs/claims.md): these claims use the MLP extractor and the first 20,000 training
# samples, 5 epochs (57 runs of 15-60 s; noise-long: 12 runs of 20 epochs, 1-3 minutes each).
# CLAIMS=cnn adds SID against BP on the reference SimpleCNN (L = 10, 5 epochs, the first 10,000
# training samples; 6 runs of 5 minutes or more on such a CPU), which is not in the default.
#
# Each run has its own directory, OUT/<claim>/<cell>-seed<N>; a run whose summary.json exists is
# kept, an interrupted one (checkpoint, no summary) is resumed from its last epoch, anything else
# there is started afresh: run the script again and it goes on where it stopped. Stopping and
# continuing a run (SIGSTOP / SIGCONT) does no harm. At the end `sid-bench claims OUT` prints the
# tables and writes them with the plots into docs/plots (claims-*) for the default OUT_DIR,
# into OUT_DIR/plots for another.
#
# Usage: [CLAIMS="noise depth alpha noise-long"] [SEEDS="0 1 2"] benches/claims.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/claims}
read -r -a claims <<< "${CLAIMS:-noise depth alpha noise-long}"
read -r -a seeds <<< "${SEEDS:-0 1 2}"
bin=target/release/sid-launch
[ -x "$bin" ] || cargo build --release -p sid-launch
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
mkdir -p "$out"

# The settings every run shares (docs/claims.md, "Settings").
common=(--dataset fashion-mnist --batch-size 128 --no-augment --gpus cpu --threads 1
  --telemetry-hz 10)
mlp=(--model mlp --limit-train 20000 --epochs 5)
mlp20=(--model mlp --limit-train 20000 --epochs 20)
cnn=(--model cnn --limit-train 10000 --epochs 5)

run() { # CLAIM CELL SEED ARGS...
  local claim=$1 cell=$2 seed=$3; shift 3
  local dir="$out/$claim/$cell-seed$seed"
  if [ -f "$dir/summary.json" ]; then echo "== $claim/$cell-seed$seed: done before"; return; fi
  mkdir -p "$out/$claim"
  local cmd=("$bin" "${common[@]}" "$@" --seed "$seed" --run-dir "$dir")
  if [ -f "$dir/checkpoint.safetensors" ] && [ -f "$dir/config.toml" ]; then
    echo "== $claim/$cell-seed$seed: resuming"
    cmd=("$bin" --resume "$dir" --threads 1)
  else
    echo "== $claim/$cell-seed$seed"
    rm -rf "${dir:?}"
  fi
  local start
  start=$(date -u +%FT%TZ)
  if nice -n 19 "${cmd[@]}" > "$dir.log" 2>&1; then
    {
      echo "command: ${bin} ${common[*]} $* --seed $seed --run-dir $dir"
      echo "commit: $commit"
      echo "started: $start"
      echo "finished: $(date -u +%FT%TZ)"
      echo "host: $(nproc) cores, $(uname -m)"
    } > "$dir/claims-run.txt"
    mv "$dir.log" "$dir/launch.log"
    tail -n 4 "$dir/launch.log" | head -n 1
  else
    echo "   failed (exit $?); its output: $dir.log" >&2
    tail -n 5 "$dir.log" >&2
  fi
}

for claim in "${claims[@]}"; do
  case $claim in
    noise) # SID vs BP, L = 10, symmetric label noise 0 / 20% / 40%
      for seed in "${seeds[@]}"; do
        for noise in 0 0.2 0.4; do
          pct=$(awk "BEGIN { printf \"%d\", $noise * 100 }")
          for m in sid bp; do
            run noise "$m-noise$pct" "$seed" "${mlp[@]}" --method "$m" --modules 10 --label-noise "$noise"
          done
        done
      done ;;
    depth) # SID and BP, no noise, L = 1 .. 16
      for seed in "${seeds[@]}"; do
        for l in 1 2 4 8 16; do
          for m in sid bp; do
            run depth "$m-L$l" "$seed" "${mlp[@]}" --method "$m" --modules "$l"
          done
        done
      done ;;
    alpha) # SID, L = 10, no noise; alpha = 0.5 is the noise claim's sid-noise0 run
      for seed in "${seeds[@]}"; do
        for a in 0.25 0.75 1.0; do
          run alpha "sid-alpha$a" "$seed" "${mlp[@]}" --method sid --modules 10 --alpha "$a"
        done
      done ;;
    noise-long) # SID vs BP, L = 10, no noise and 40%, 20 epochs (the noise claim's runs have 5)
      for seed in "${seeds[@]}"; do
        for noise in 0 0.4; do
          pct=$(awk "BEGIN { printf \"%d\", $noise * 100 }")
          for m in sid bp; do
            run noise-long "$m-noise$pct" "$seed" "${mlp20[@]}" --method "$m" --modules 10 \
              --label-noise "$noise"
          done
        done
      done ;;
    cnn) # SID vs BP on SimpleCNN, L = 10, no noise
      for seed in "${seeds[@]}"; do
        for m in sid bp; do
          run cnn "$m-cnn" "$seed" "${cnn[@]}" --method "$m" --modules 10
        done
      done ;;
    *) echo "unknown claim $claim (noise, depth, alpha, noise-long, cnn)" >&2; exit 2 ;;
  esac
done

# The page's tables and plots: docs/plots for the default folder, OUT/plots for any other
# (PLOTS=DIR picks another).
plots=${PLOTS:-$([ "$out" = runs/claims ] && echo docs/plots || echo "$out/plots")}
[ -x target/release/sid-bench ] || cargo build --release -p sid-benches
target/release/sid-bench claims "$out" --out "$plots"
