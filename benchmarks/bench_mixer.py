"""Token mixers alone: MM-Rec's chunked gated linear recurrence against causal SDPA.

    python benchmarks/bench_mixer.py --device cuda       # the setting of DESIGN.md section 11
    python benchmarks/bench_mixer.py --device cpu --tokens 16384 --lengths 1024 4096 16384

Forward + backward, ``--heads`` x ``--head-dim``, ``--tokens`` tokens per step
(batch = tokens // T), median ms over ``--steps`` after warm-up. Compare with
the reference figures in DESIGN.md (H100, bf16: SDPA 3.35 / 9.62 / 36.1 /
70.1 ms at T = 2K / 8K / 32K / 64K).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from mmrec.ops import gla_chunked
from mmrec.utils.cpu import tune_glibc_malloc


def bench(fn: Callable[[], None], steps: int, device: torch.device) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def sdpa_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()


def gla_step(fn: Callable, chunk: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> None:
    o, s = fn(q, k, v, g, None, chunk)
    (o.float().sum() + s.sum()).backward()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768, 65536])
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--chunk", type=int, nargs="+", default=[64])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="also time torch.compile(gla_chunked)")
    args = p.parse_args()
    tune_glibc_malloc()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    H, D = args.heads, args.head_dim
    compiled = torch.compile(gla_chunked, dynamic=False) if args.compile else None
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}, {dtype}, fwd+bwd, {H} heads x {D}, {args.tokens:,} tokens per step, median ms\n")
    cols = ["T", "SDPA causal"] + [f"gla_chunked C={c}" for c in args.chunk]
    cols += [f"compiled C={c}" for c in args.chunk] if compiled else []
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for T in args.lengths:
        B = max(1, args.tokens // T)
        mk = lambda *s: torch.randn(*s, device=device, dtype=dtype, requires_grad=True)  # noqa: E731
        q, k, v = mk(B, H, T, D), mk(B, H, T, D), mk(B, H, T, D)
        g = (-torch.rand(B, H, T, device=device) * 0.1).requires_grad_()

        row = [f"{T:,}", f"{bench(partial(sdpa_step, q, k, v), args.steps, device):.2f}"]
        for fn in [gla_chunked] + ([compiled] if compiled else []):
            for c in args.chunk:
                row.append(f"{bench(partial(gla_step, fn, c, q, k, v, g), args.steps, device):.2f}")
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
