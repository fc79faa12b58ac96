"""SimpleCNN's four blocks timed in PyTorch itself (forward + backward, one thread, batch 128,
28 px), to check what a stage cut at block boundaries can reach: a pipeline is never faster
than its slowest stage. Run with the project's venv: .venv/bin/python benches/simplecnn-blocks.py
"""
import time

import torch

torch.set_num_threads(1)
torch.manual_seed(0)
B = 128
blocks = [
    torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU()),
    torch.nn.Sequential(torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2)),
    torch.nn.Sequential(torch.nn.Conv2d(64, 128, 3, padding=1), torch.nn.ReLU()),
    torch.nn.Sequential(torch.nn.Conv2d(128, 128, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2)),
]
x = torch.randn(B, 1, 28, 28)


def timed(f, n=5):
    f()
    ts = []
    for _ in range(n):
        s = time.perf_counter()
        f()
        ts.append(time.perf_counter() - s)
    return sorted(ts)[n // 2] * 1e3


def stage(a, b):
    """Blocks a..b-1 as one stage: its input detached (sg at the cut), fwd + bwd."""
    h = x
    with torch.no_grad():
        for blk in blocks[:a]:
            h = blk(h)

    def f():
        y = h
        for blk in blocks[a:b]:
            y = blk(y)
        y.sum().backward()

    return timed(f)


whole = stage(0, 4)
print(f"all four blocks: {whole:.1f} ms")
for cut in (1, 2, 3):
    s1, s2 = stage(0, cut), stage(cut, 4)
    print(f"cut after block {cut}: {s1:.1f} | {s2:.1f} ms -> at most {(s1 + s2) / max(s1, s2):.2f}x on two devices")
