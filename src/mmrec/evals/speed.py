"""Speed and memory against length: training throughput, decoding latency, state bytes.

Used by ``benchmarks/bench_core.py`` and ``mmrec compare``. On CPU, peak
memory is measured by running the measurement in a fresh child process and
reading its peak resident set size (the allocator gives no per-call figure);
on CUDA it is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mmrec.utils.device import autocast_for


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], steps: int, device: torch.device, warmup: int = 1) -> float:
    """Median seconds of ``fn`` over ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_throughput(
    model: nn.Module,
    seq_len: int,
    tokens: int,
    steps: int,
    device: torch.device,
    dtype: torch.dtype | None = None,
    vocab: int = 256,
) -> dict[str, float]:
    """Forward + backward + AdamW on random ids: tokens/s, seconds per step, peak GPU GiB (nan on CPU)."""
    batch = max(1, tokens // seq_len)
    ids = torch.randint(0, vocab, (batch, seq_len + 1), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step() -> None:
        with autocast_for(device, dtype or torch.float32):
            loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sec = timed(step, steps, device)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"tokens_per_s": batch * seq_len / sec, "seconds_per_step": sec, "batch": batch, "peak_gib": mem}


@torch.no_grad()
def decode_latency(
    model: nn.Module,
    context: int,
    steps: int,
    device: torch.device,
    dtype: torch.dtype | None = None,
    prefill_window: int = 4096,
    vocab: int = 256,
    batch: int = 1,
) -> dict[str, float]:
    """Milliseconds per decoding step after ``context`` tokens, for ``batch`` streams decoded together
    (one token each per step), the aggregate tokens/s and the state's bytes there.

    One stream is prefilled; a batch holds copies of its state (joined with the state's ``cat``): the
    cost of a step does not depend on what the streams hold."""
    state = None
    with autocast_for(device, dtype or torch.float32):
        for start in range(0, context, prefill_window):
            n = min(prefill_window, context - start)
            state = model(torch.randint(0, vocab, (1, n), device=device), state=state).state
        assert state is not None
        if batch > 1:
            state = type(state).cat([state] * batch)
        token = torch.randint(0, vocab, (batch, 1), device=device)
        holder = {"state": state}

        def one() -> None:
            # Each timed step extends the context by one token: negligible against ``context``.
            holder["state"] = model(token, state=holder["state"]).state

        sec = timed(one, steps, device)
    return {"ms_per_token": sec * 1e3, "tokens_per_s": batch / sec, "state_bytes": float(state.nbytes())}


def fit_exponent(lengths: list[int], seconds: list[float]) -> float:
    """alpha of seconds ~ c * length^alpha, least squares in log-log space (nan with < 2 points)."""
    pts = [(math.log(n), math.log(s)) for n, s in zip(lengths, seconds, strict=True) if s > 0 and math.isfinite(s)]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    var = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / var if var > 0 else float("nan")


def fit_exponents(seconds: dict[str, dict[int, float]]) -> dict[str, dict[str, Any]]:
    """The time-against-length exponent of every model, fitted over the same lengths for all.

    ``seconds[model][length]`` holds the lengths a model was measured at (a failed measurement is
    left out). Every exponent is fitted over the lengths that all models have, so the exponents
    compare like with like; when fewer than two lengths are shared, each model's own lengths are
    used and ``shared`` says so. Returns per model ``exponent``, ``exponent_lengths`` (the lengths
    fitted) and ``shared``.
    """
    common = sorted(set.intersection(*(set(s) for s in seconds.values()))) if seconds else []
    shared = len(common) >= 2
    out: dict[str, dict[str, Any]] = {}
    for key, by_length in seconds.items():
        lengths = common if shared else sorted(by_length)
        out[key] = {
            "exponent": fit_exponent(lengths, [by_length[n] for n in lengths]),
            "exponent_lengths": lengths,
            "shared": shared,
        }
    return out


def _child(queue: Any, fn: Callable[..., dict[str, float]], build: Callable[[], nn.Module], kwargs: dict) -> None:
    from mmrec.utils.cpu import tune_glibc_malloc

    tune_glibc_malloc()
    torch.set_num_threads(kwargs.pop("threads"))
    try:
        result = fn(build(), **kwargs)
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        queue.put(result)
    except Exception as e:  # report, do not hang the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})


def measure_isolated(
    fn: Callable[..., dict[str, float]], build: Callable[[], nn.Module], timeout: float = 1800, **kwargs: Any
) -> dict[str, float]:
    """Run ``fn(build(), **kwargs)`` in a fresh process; adds its peak RSS (GiB). ``build`` must be picklable."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    kwargs.setdefault("threads", torch.get_num_threads())
    proc = ctx.Process(target=_child, args=(queue, fn, build, kwargs))
    proc.start()
    try:
        result = queue.get(timeout=timeout)
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    if "error" in result:
        raise RuntimeError(f"measurement failed in the child process: {result['error']}")
    return result  # type: ignore[no-any-return]
