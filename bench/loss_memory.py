"""Dense vs fused CSD: peak memory and time, side by side in one process (issue 2).

Shapes are SmolLM2's: N tokens, hidden d=576, vocabulary V=49152. The teacher arrives as the
`hidden` payload (its final hidden states + lm_head), the default at scale.

* dense: the batch's full student and teacher logits [N, V] are formed, the loss runs over all
  rows at once and autograd carries the gradient back through the matmul.
* fused: `loss.fused(...)` forms [chunk, V] logits for both sides, one chunk at a time.

Peak memory is the process's resident high-water mark above the level before each call
(Linux: `/proc/self/clear_refs` resets it); glibc is told to return every buffer ≥ 64 KiB to
the OS on free, so one variant cannot reuse pages the other left behind.

    python bench/loss_memory.py [--tokens 4096] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.environ["MALLOC_TRIM_THRESHOLD_"] = "0"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import torch  # noqa: E402

from csd_ray.losses import HiddenTeacher, get_loss  # noqa: E402


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) * 1024


def measure(fn) -> tuple[float, int]:
    """(seconds, peak resident bytes above the starting level) of one call."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start_rss = _status("VmRSS")
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return seconds, _status("VmHWM") - start_rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    n, d, v = args.tokens, args.hidden, args.vocab
    h = (torch.randn(n, d) * 0.5).requires_grad_(True)
    w = (torch.randn(v, d) * 0.05).requires_grad_(True)
    teacher = HiddenTeacher(torch.randn(n, d) * 0.5, torch.randn(v, d) * 0.05)
    mask = torch.rand(n) > 0.1
    dense_loss = get_loss("csd", chunk_size=n)
    fused_loss = get_loss("csd")
    results: dict[str, dict] = {}

    def dense():
        z = h @ w.t()
        t = teacher.hidden @ teacher.lm_head.t()
        value, _ = dense_loss(z, t, mask)
        value.backward()
        results["dense"] = (value.item(), h.grad, w.grad)
        h.grad = w.grad = None

    def fused():
        value, _ = fused_loss.fused(h, w, teacher, mask)
        value.backward()
        results["fused"] = (value.item(), h.grad, w.grad)
        h.grad = w.grad = None

    print(f"csd dense vs fused: N={n} d={d} V={v}, fp32, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"fused chunk: {fused_loss.chunk_rows(v)} rows")
    timings: dict[str, list] = {"dense": [], "fused": []}
    for name, fn in [("dense", dense), ("fused", fused)]:
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in [("dense", dense), ("fused", fused)]:
            timings[name].append(measure(fn))
    for name in ("dense", "fused"):
        secs = statistics.median(t for t, _ in timings[name])
        peak = max(m for _, m in timings[name])
        print(f"{name:5s}: peak {peak / 2**20:8.1f} MiB   time {secs:6.2f} s   loss {results[name][0]:.6f}")
    (vd, hd, wd), (vf, hf, wf) = results["dense"], results["fused"]
    print(f"agreement: |loss| {abs(vd - vf):.2e}, max |grad h| {(hd - hf).abs().max():.2e}, max |grad W| {(wd - wf).abs().max():.2e}")
    mem_ratio = max(m for _, m in timings["fused"]) / max(m for _, m in timings["dense"])
    time_ratio = statistics.median(t for t, _ in timings["fused"]) / statistics.median(t for t, _ in timings["dense"])
    print(f"fused/dense peak memory ratio: {mem_ratio:.3f}, time ratio: {time_ratio:.3f}")


if __name__ == "__main__":
    main()
