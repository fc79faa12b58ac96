#!/usr/bin/env python3
"""Comparisons behind benches/gpu-acceptance.sh, on run folders' metrics.jsonl.

Each subcommand exits 0 when its check holds and 1 otherwise, printing one line that says
why. Standard library only: the GPU machine has python3 but nothing installed for this.

  same-final-loss A B          final epoch's train_loss bit-identical in A and B
  close A B RTOL ACC_TOL       final train_loss within RTOL (relative), test_acc within ACC_TOL
  differ A B MIN_RTOL          final train_loss differs by more than MIN_RTOL (relative): a
                               feature that was on (bf16) changed the numbers beyond fp32 noise
  peak-source A DEVICE SOURCE  every epoch recorded DEVICE's peak memory from SOURCE
"""
import json
import math
import os
import sys


def records(run):
    """Every epoch's record of a run folder."""
    path = os.path.join(run, "metrics.jsonl")
    records = [json.loads(line) for line in open(path) if line.strip()]
    if not records:
        raise ValueError(f"{path} has no epoch")
    return records


def final_loss(run):
    """The final epoch's train_loss, a finite number (two missing or NaN losses are not equal)."""
    loss = records(run)[-1].get("train_loss")
    if not isinstance(loss, (int, float)) or not math.isfinite(loss):
        raise ValueError(f"{run}: final train_loss is {loss!r}, not a finite number")
    return loss


def same_final_loss(a, b):
    la, lb = final_loss(a), final_loss(b)
    if la != lb:
        return f"final train_loss differs: {la!r} vs {lb!r}"
    print(f"final train_loss {la!r} in both")
    return None


def close(a, b, rtol, acc_tol):
    ma, mb = records(a)[-1], records(b)[-1]
    la, lb = final_loss(a), final_loss(b)
    if not math.isclose(la, lb, rel_tol=float(rtol), abs_tol=0.0):
        return f"final train_loss {la!r} vs {lb!r} beyond relative {rtol}"
    da = abs(ma["test_acc"] - mb["test_acc"])
    if da > float(acc_tol):
        return f"final test_acc {ma['test_acc']} vs {mb['test_acc']} beyond {acc_tol}"
    print(f"train_loss {la!r} vs {lb!r}, test_acc {ma['test_acc']} vs {mb['test_acc']}")
    return None


def differ(a, b, min_rtol):
    la, lb = final_loss(a), final_loss(b)
    if abs(la - lb) <= float(min_rtol) * max(abs(la), abs(lb)):
        return f"final train_loss {la!r} vs {lb!r} within relative {min_rtol}: no effect"
    print(f"train_loss {la!r} vs {lb!r}: differ beyond relative {min_rtol}")
    return None


def peak_source(a, device, source):
    for m in records(a):
        peaks = {p["device"]: p for p in m.get("peak_memory", [])}
        p = peaks.get(device)
        if p is None:
            return f"epoch {m['epoch']} has no peak for {device} (has {sorted(peaks)})"
        if p["source"] != source or p["bytes"] <= 0:
            return f"epoch {m['epoch']}: {device} peak {p['bytes']} bytes from {p['source']}, not {source}"
    print(f"every epoch's {device} peak comes from {source}")
    return None


CHECKS = {
    "same-final-loss": same_final_loss,
    "close": close,
    "differ": differ,
    "peak-source": peak_source,
}


def main(argv):
    if len(argv) < 2 or argv[1] not in CHECKS:
        print(__doc__.strip())
        return 2
    try:
        why = CHECKS[argv[1]](*argv[2:])
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = f"{type(e).__name__}: {e}"
    if why:
        print(why)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
