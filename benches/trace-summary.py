#!/usr/bin/env python3
"""Per-span time from a sid Chrome trace (--trace FILE, .json or .json.gz): for each span name,
how many, median and total milliseconds, and share of the traced wall time.
Usage: benches/trace-summary.py TRACE [TRACE ...]"""
import gzip
import json
import statistics
import sys
from collections import defaultdict


def load(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def summary(path):
    events = load(path)
    stacks = defaultdict(list)
    spans = defaultdict(list)
    lo, hi = float("inf"), 0.0
    for e in events:
        if e.get("ph") == "B":
            stacks[e["tid"]].append((e["name"], e["ts"]))
        elif e.get("ph") == "E" and stacks[e["tid"]]:
            name, start = stacks[e["tid"]].pop()
            spans[name].append((e["ts"] - start) / 1000.0)
            lo, hi = min(lo, start), max(hi, e["ts"])
        elif e.get("ph") == "X":
            spans[e["name"]].append(e["dur"] / 1000.0)
    wall = (hi - lo) / 1000.0
    print(f"{path}: {wall:.0f} ms traced")
    print(f"{'span':<22}{'count':>8}{'median ms':>11}{'total ms':>11}{'share':>8}")
    for name, d in sorted(spans.items(), key=lambda kv: -sum(kv[1])):
        print(f"{name:<22}{len(d):>8}{statistics.median(d):>11.3f}{sum(d):>11.1f}{sum(d) / wall:>8.1%}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for p in sys.argv[1:]:
        summary(p)
