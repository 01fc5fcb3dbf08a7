"""Training and decoding speed of MM-Rec against a parameter-matched Transformer.

    python benchmarks/bench_core.py                       # CPU, the issue's grid
    python benchmarks/bench_core.py --device cuda --dtype bf16 --lengths 2048 8192 32768 65536

Training: forward + backward + AdamW step on random byte ids, ``--tokens``
tokens per step (batch = tokens // T, at least 1), median over ``--steps``
timed steps after one warm-up. Decoding: median latency of one token after a
context of each ``--contexts`` length. Prints markdown tables with the ratio
MM-Rec / Transformer; nothing here is asserted (machines are shared and noisy).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from mmrec import MMRecConfig, MMRecLM, TransformerLM, matched_transformer_config
from mmrec.utils.cpu import tune_glibc_malloc


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], steps: int, device: torch.device) -> float:
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_speed(
    model: torch.nn.Module, T: int, tokens: int, steps: int, device: torch.device, dtype: torch.dtype | None
) -> tuple[float, float]:
    """(tokens/s, peak GPU memory in GiB or nan)."""
    B = max(1, tokens // T)
    ids = torch.randint(0, 256, (B, T + 1), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sec = timed(step, steps, device)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return B * T / sec, mem


@torch.inference_mode()
def decode_latency(
    model: torch.nn.Module,
    context: int,
    steps: int,
    device: torch.device,
    dtype: torch.dtype | None,
    prefill_window: int,
) -> tuple[float, int]:
    """(ms per token after ``context`` tokens, state bytes at that point)."""
    state = None
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for start in range(0, context, prefill_window):
            n = min(prefill_window, context - start)
            state = model(torch.randint(0, 256, (1, n), device=device), state=state).state
        token = torch.randint(0, 256, (1, 1), device=device)
        holder = {"state": state}

        def one() -> None:
            holder["state"] = model(token, state=holder["state"]).state

        # Each timed step extends the context by one token: negligible against `context`.
        sec = timed(one, steps, device)
    return sec * 1e3, state.nbytes()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    p.add_argument("--tokens", type=int, default=16384, help="tokens per training step")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 32768])
    p.add_argument("--decode-steps", type=int, default=20)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--skip-transformer-above",
        type=int,
        default=None,
        help="skip the Transformer's training at lengths above this (it is O(T^2))",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    args = p.parse_args()
    malloc_tuned = tune_glibc_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, None: torch.bfloat16 if device.type == "cuda" else None}[args.dtype]

    torch.manual_seed(0)
    mm = MMRecLM(MMRecConfig(d_model=args.d_model, n_layers=args.n_layers)).to(device)
    tcfg = matched_transformer_config(
        mm.num_parameters(),
        preset="llama",
        d_model=args.d_model,
        n_layers=args.n_layers,
        max_seq_len=max(args.lengths + args.contexts) + 64,
    )
    tf = TransformerLM(tcfg).to(device)
    models: dict[str, torch.nn.Module] = {"mmrec": mm, "llama": tf}
    if args.compile:
        models = {k: torch.compile(v) for k, v in models.items()}  # type: ignore[misc]
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(
        f"device {device} ({where}), "
        f"dtype {dtype or torch.float32}, torch {torch.__version__}, glibc malloc tuned: {malloc_tuned}"
    )
    print(
        f"MM-Rec {mm.num_parameters():,} parameters; LLaMA-style Transformer {tf.num_parameters():,} "
        f"(d_ff {tcfg.d_ff})\n"
    )

    print(f"Training, forward + backward + AdamW, {args.tokens:,} tokens per step (tokens/s, median of {args.steps})\n")
    print("| T | batch | MM-Rec tok/s | Transformer tok/s | ratio | MM-Rec GiB | Transformer GiB |")
    print("|---|---|---|---|---|---|---|")
    for T in args.lengths:
        mm_tps, mm_mem = train_speed(models["mmrec"], T, args.tokens, args.steps, device, dtype)
        if args.skip_transformer_above and args.skip_transformer_above < T:
            tf_tps, tf_mem = float("nan"), float("nan")
        else:
            tf_tps, tf_mem = train_speed(models["llama"], T, args.tokens, args.steps, device, dtype)
        print(
            f"| {T:,} | {max(1, args.tokens // T)} | {mm_tps:,.0f} | {tf_tps:,.0f} | {mm_tps / tf_tps:.2f}x | "
            f"{mm_mem:.2f} | {tf_mem:.2f} |",
            flush=True,
        )

    print(f"\nDecoding one token after a context (ms per token, median of {args.decode_steps}; state bytes)\n")
    print("| context | MM-Rec ms | Transformer ms | MM-Rec state | Transformer KV cache |")
    print("|---|---|---|---|---|")
    for ctx in args.contexts:
        mm_ms, mm_bytes = decode_latency(mm, ctx, args.decode_steps, device, dtype, 4096)
        tf_ms, tf_bytes = decode_latency(tf, ctx, args.decode_steps, device, dtype, 4096)
        print(
            f"| {ctx:,} | {mm_ms:.2f} | {tf_ms:.2f} | {mm_bytes / 2**20:.2f} MiB | {tf_bytes / 2**20:.1f} MiB |",
            flush=True,
        )


if __name__ == "__main__":
    main()
