"""Fused losses against their matmul floor, and dense vs fused memory, in one process (issues 2, 13).

The teacher arrives as the `hidden` payload (its final hidden states + lm_head), the default at
scale, so a fused loss cannot avoid four matmuls per chunk of token rows: student logits
h_s @ W_s^T, teacher logits h_t @ W_t^T, and the two gradient products dL/dh = G @ W_s and
dL/dW = G^T @ h_s. The *floor* is exactly those four matmuls, run bare (random G, nothing else) on
the same rows, chunk sizes, dtype and threads; `fused/floor time ratio` is what every loss costs
on top of them (forward + backward). Shapes:

* `smollm`: N=4096 tokens, d=576, V=49152 (SmolLM2);
* `qwen`:   N=2048 tokens, d=896, V=151936 (a Qwen-sized vocabulary).

bf16 runs give the loss bf16 hidden states and lm_heads (both sides); its floor runs the four
matmuls in bf16 (AVX512-BF16 where the CPU has it). The loss does its softmax/loss math in fp32
whatever the dtype (tests pin it), so its bf16 line also prints the ratio to the fp32 floor.

Peak memory is the process's resident high-water mark above the level before each call
(Linux: `/proc/self/clear_refs` resets it); before each call glibc returns its free memory to
the OS (`malloc_trim(0)`), so one variant cannot reuse pages another left behind, while inside a
call the allocator caches buffers as it does in a trainer (telling glibc to mmap every buffer,
as an earlier version did, added a page-fault storm to every [chunk, V] temporary: ~9 ms per
32 MiB buffer, more than the arithmetic on it). `peak at N/4 vs N` shows
the fused loss's memory is flat in the number of tokens; `--dense` adds the dense-vs-fused table
(full [N,V] logits with autograd) of issue 2.

    python bench/loss_memory.py                                # every shape, dtype and loss (~25 min here)
    python bench/loss_memory.py --shapes qwen --dtypes bf16 --losses csd-SS,fkl --n 1024
    python bench/loss_memory.py --shapes smollm --dtypes fp32 --losses csd-SS --dense
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from csd_ray.losses import HiddenTeacher, get_loss  # noqa: E402

SHAPES = {"smollm": (4096, 576, 49152), "qwen": (2048, 896, 151936)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: bench name -> (registry name, params). Every registered loss but `mix` (a sum of these).
LOSSES = {
    "csd-SS": ("csd", {"weights": ("student", "student")}),
    "csd-US": ("csd", {"weights": ("uniform", "student")}),
    "csd-TS": ("csd", {"weights": ("teacher", "student")}),
    "csd-TSmix": ("csd", {"weights": ("mix", "student"), "alpha": 0.15}),
    "dld": ("dld", {}),
    "fkl": ("fkl", {}),
    "rkl": ("rkl", {}),
    "gjsd": ("gjsd", {"beta": 0.5}),
    "sfkl": ("sfkl", {}),
    "srkl": ("srkl", {}),
    "tvd": ("tvd", {}),
    "ce": ("ce", {}),
}


_LIBC = ctypes.CDLL("libc.so.6")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) * 1024


def measure(fn) -> tuple[float, int]:
    """(seconds, peak resident bytes above the starting level) of one call."""
    gc.collect()
    _LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start_rss = _status("VmRSS")
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return seconds, _status("VmHWM") - start_rss


class Case:
    """Inputs of one (shape, dtype): student h [N,d] and W [V,d], teacher payload, mask, targets."""

    def __init__(self, n: int, d: int, v: int, dtype: torch.dtype, device: str = "cpu") -> None:
        g = torch.Generator(device=device).manual_seed(0)
        self.n, self.d, self.v, self.dtype, self.device = n, d, v, dtype, device

        def randn(*shape, scale):
            return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

        self.h = randn(n, d, scale=0.5).requires_grad_(True)
        self.w = randn(v, d, scale=0.05).requires_grad_(True)
        self.teacher = HiddenTeacher(randn(n, d, scale=0.5), randn(v, d, scale=0.05))
        self.mask = torch.rand(n, generator=g, device=device) > 0.1
        self.targets = torch.randint(0, v, (n,), generator=g, device=device)
        self._grads: dict = {}

    def grad_buffer(self, chunk: int, dtype: torch.dtype) -> torch.Tensor:
        """The floor's stand-in for dL/dz ``[chunk, V]``, drawn once (outside any timing)."""
        if (chunk, dtype) not in self._grads:
            self._grads[(chunk, dtype)] = torch.randn(chunk, self.v, device=self.device).to(dtype)
        return self._grads[(chunk, dtype)]

    def fused(self, loss) -> float:
        value, _ = loss.fused(self.h, self.w, self.teacher, self.mask, targets=self.targets)
        value.backward()
        self.h.grad = self.w.grad = None
        return value.item()

    def floor(self, chunk: int, dtype: torch.dtype) -> None:
        """The four matmuls of the fused loss, bare, on the same rows and chunks, in ``dtype``."""
        rows = self.mask.nonzero().squeeze(1)
        h, w = self.h.detach().to(dtype), self.w.detach().to(dtype)
        th, tw = self.teacher.hidden.to(dtype), self.teacher.lm_head.to(dtype)
        grad_h, grad_w = torch.zeros_like(h), torch.zeros_like(w)
        g = self.grad_buffer(chunk, dtype)
        for start in range(0, rows.numel(), chunk):
            r = rows[start : start + chunk]
            hc = h[r]
            z = hc @ w.t()
            t = th[r] @ tw.t()
            gc = g[: r.numel()]
            grad_h[r] = gc @ w
            grad_w.addmm_(gc.t(), hc)
            del z, t


def _time(fn, repeats: int) -> tuple[float, int]:
    runs = [measure(fn) for _ in range(repeats)]
    return statistics.median(t for t, _ in runs), max(m for _, m in runs)


def run_case(shape: str, n: int, d: int, v: int, dtype_name: str, names: list[str], repeats: int) -> list[tuple]:
    dtype = DTYPES[dtype_name]
    case = Case(n, d, v, dtype)
    chunk = get_loss("csd").chunk_rows(v)
    print(f"\n== {shape}: N={n} d={d} V={v} {dtype_name}, {chunk}-row chunks, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    case.floor(chunk, dtype)  # warm-up
    floor32 = None
    if dtype != torch.float32:
        case.grad_buffer(chunk, torch.float32)
        floor32 = _time(lambda: case.floor(chunk, torch.float32), 1)[0]
    # The floor runs before every loss and once more at the end; each loss is compared with the
    # faster of the floors on either side of it (the machine is shared: a neighbour's burst
    # must not decide a ratio).
    floors = [_time(lambda: case.floor(chunk, dtype), 1)[0]]
    rows = []
    for i, name in enumerate(names):
        reg, params = LOSSES[name]
        loss = get_loss(reg, **params)
        if i == 0:
            case.fused(loss)  # warm-up of the loss path (allocator, thread pool)
        secs, peak = _time(lambda: case.fused(loss), repeats)
        floors.append(_time(lambda: case.floor(chunk, dtype), 1)[0])
        rows.append([name, secs, peak, min(floors[-2:])])
    print(f"floor (4 bare {dtype_name} matmuls per chunk): {min(floors):.2f} s  (runs {', '.join(f'{f:.2f}' for f in floors)})"
          + (f";  fp32 floor {floor32:.2f} s" if floor32 else ""))
    out = []
    for name, secs, peak, floor in rows:
        extra = f"   fused/fp32-floor {secs / floor32:5.2f}" if floor32 else ""
        print(f"{name:10s} fused {secs:6.2f} s   peak {peak / 2**20:7.1f} MiB   fused/floor time ratio {secs / floor:5.2f}{extra}")
        out.append((shape, dtype_name, name, secs, floor, secs / floor, peak))
    # Memory flat in N: the same loss on a quarter of the tokens.
    small = Case(max(n // 4, 1), d, v, dtype)
    reg, params = LOSSES[names[0]]
    loss = get_loss(reg, **params)
    _, peak_small = measure(lambda: small.fused(loss))
    print(f"{names[0]} peak at N/4 vs N: {peak_small / 2**20:.1f} MiB vs {rows[0][2] / 2**20:.1f} MiB")
    return out


def dense_vs_fused(n: int, d: int, v: int, repeats: int) -> None:
    """Issue 2's table: CSD (S,S) with the batch's full logits and autograd vs fused, fp32."""
    case = Case(n, d, v, torch.float32)
    h, w, teacher, mask = case.h, case.w, case.teacher, case.mask
    dense_loss, fused_loss = get_loss("csd", chunk_size=n), get_loss("csd")
    results: dict[str, tuple] = {}

    def dense():
        value, _ = dense_loss(h @ w.t(), teacher.hidden @ teacher.lm_head.t(), mask)
        value.backward()
        results["dense"] = (value.item(), h.grad, w.grad)
        h.grad = w.grad = None

    def fused():
        value, _ = fused_loss.fused(h, w, teacher, mask)
        value.backward()
        results["fused"] = (value.item(), h.grad, w.grad)
        h.grad = w.grad = None

    print(f"\n== csd dense vs fused: N={n} d={d} V={v}, fp32")
    timings: dict[str, list] = {"dense": [], "fused": []}
    for fn in (dense, fused):
        fn()  # warm-up
    for _ in range(repeats):
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


def _names(text: str, known, what: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in known]
    if bad or not names:
        print(f"loss_memory: --{what}: unknown '{bad[0] if bad else text}'; expected a comma list of {', '.join(known)}",
              file=sys.stderr)
        sys.exit(2)
    return names


def _tokens(text, shapes) -> dict:
    """--n: '1024' (every shape) or 'qwen=512,smollm=4096'."""
    if text is None:
        return {}
    try:
        if "=" not in text:
            out = {shape: int(text) for shape in shapes}
        else:
            out = {k.strip(): int(v) for k, v in (item.split("=", 1) for item in text.split(",") if item.strip())}
    except ValueError:
        out = {"": 0}
    bad = [k for k, v in out.items() if k not in SHAPES or v <= 0]
    if bad:
        print(f"loss_memory: --n: expected a positive token count or SHAPE=N pairs with SHAPE in "
              f"{', '.join(SHAPES)}; got {text!r}", file=sys.stderr)
        sys.exit(2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="smollm,qwen", help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    parser.add_argument("--losses", default=",".join(LOSSES), help=f"comma list of {', '.join(LOSSES)}")
    parser.add_argument("--n", default=None,
                        help="tokens N instead of each shape's default: a number for every shape, or SHAPE=N,...")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per loss (median)")
    parser.add_argument("--dense", action="store_true", help="also the dense-vs-fused table (fp32, first shape)")
    args = parser.parse_args()
    shapes = _names(args.shapes, SHAPES, "shapes")
    dtypes = _names(args.dtypes, DTYPES, "dtypes")
    names = _names(args.losses, LOSSES, "losses")
    tokens = _tokens(args.n, shapes)
    summary = []
    for shape in shapes:
        n, d, v = SHAPES[shape]
        n = tokens.get(shape, n)
        if args.dense:
            dense_vs_fused(n, d, v, max(args.repeats, 1))
        for dtype_name in dtypes:
            summary += run_case(shape, n, d, v, dtype_name, names, max(args.repeats, 1))
    worst = max(summary, key=lambda r: r[5])
    print(f"\nworst fused/floor time ratio: {worst[5]:.2f} ({worst[2]}, {worst[0]}, {worst[1]})")


if __name__ == "__main__":
    main()
