#!/usr/bin/env bash
# Staged SID's accuracy next to the paper's SID and BP: Fashion-MNIST, SimpleCNN, L=5, batch 128,
# 5 epochs, no augmentation, on the CPU, for each seed given (default 0): paper SID and BP on
# one device (all cores), staged SID K=2 and K=4 (`--placement even`, one CPU device per stage).
# A run whose summary.json exists is kept, so the script resumes where it stopped; the table
# at the end gives each method's final accuracy per seed, the mean and the spread.
# Usage: [METHODS="sid staged2"] benches/staged-accuracy.sh [OUT_DIR] [SEEDS...]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/staged-accuracy}
shift || true
seeds=("${@:-0}")
bin=target/release/sid-launch
[ -x "$bin" ] || cargo build --release -p sid-launch
mkdir -p "$out"
run() { # NAME ARGS...
  local name=$1; shift
  [ -f "$out/$name/summary.json" ] && { echo "== $name: done before"; return; }
  rm -rf "${out:?}/$name"
  "$bin" "${common[@]}" "$@" --run-dir "$out/$name" 2>&1 | tee "$out/$name.log"
}
# METHODS picks which runs and in which order (all four by default).
read -r -a methods <<< "${METHODS:-sid bp staged2 staged4}"
for seed in "${seeds[@]}"; do
  common=(--dataset fashion-mnist --model cnn --modules 5 --batch-size 128 --epochs 5 --seed "$seed" --no-augment --telemetry-hz 0)
  for m in "${methods[@]}"; do
    case $m in
      sid | bp) run "$m-seed$seed" --method "$m" --gpus cpu ;;
      staged2 | staged4) k=${m#staged}; run "$m-seed$seed" --stages "$k" --gpus "cpu:$k" --placement even ;;
      *) echo "unknown method $m (sid, bp, staged2, staged4)"; exit 2 ;;
    esac
  done
done
python3 - "$out" <<'PY'
import json, pathlib, statistics, sys
out = pathlib.Path(sys.argv[1])
rows = {}
for s in sorted(out.glob("*-seed*/summary.json")):
    name, seed = s.parent.name.rsplit("-seed", 1)
    rows.setdefault(name, {})[int(seed)] = json.load(open(s))["final_test_acc"] * 100
print("method | " + " | ".join(f"seed {k}" for k in range(3)) + " | mean | spread (max-min)")
for name, accs in rows.items():
    vals = list(accs.values())
    cells = [f"{accs[k]:.2f}" if k in accs else "-" for k in range(3)]
    print(f"{name} | " + " | ".join(cells) + f" | {statistics.mean(vals):.2f} | {max(vals) - min(vals):.2f}")
PY
