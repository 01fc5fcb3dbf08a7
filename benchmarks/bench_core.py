"""Training and decoding speed of MM-Rec against a parameter-matched Transformer.

    python benchmarks/bench_core.py                       # CPU, the issue's grid
    python benchmarks/bench_core.py --device cuda --dtype bf16 --lengths 2048 8192 32768 65536
    python benchmarks/bench_core.py --lengths --threads 1 --decode-steps 200   # the decoding table only
    python benchmarks/bench_core.py --lengths --threads 1 --decode-steps 200 --compile-decoding  # + compiled

Training: forward + backward + AdamW step on random byte ids, ``--tokens``
tokens per step (batch = tokens // T, at least 1), median over ``--steps``
timed steps after one warm-up (``--lengths`` with no value skips it). Decoding:
median latency of one step after a context of each ``--contexts`` length, for
each ``--decode-batches`` count of streams decoded together (one token each per
step; tokens/s is the aggregate). Prints markdown tables with the ratio
MM-Rec / Transformer; nothing here is asserted (machines are shared and noisy).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from mmrec import MMRecConfig, MMRecLM, TransformerLM, matched_transformer_config
from mmrec.evals.speed import decode_latency, train_throughput
from mmrec.utils.cpu import tune_glibc_malloc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--lengths", type=int, nargs="*", default=[1024, 4096, 16384, 32768], help="none: no training table")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per training step")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 32768])
    p.add_argument("--decode-steps", type=int, default=20)
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16], help="streams decoded together")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--skip-transformer-above",
        type=int,
        default=None,
        help="skip the Transformer's training at lengths above this (it is O(T^2))",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile both models (training table)")
    p.add_argument(
        "--compile-decoding",
        action="store_true",
        help="add a column: MM-Rec decoding through MMRecLM.compile_decoding (compiled before the table)",
    )
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

    if args.lengths:
        train_table(args, models, device, dtype)

    print(
        f"\nDecoding one token per stream after a context (ms per step, median of {args.decode_steps}; "
        "aggregate tokens/s; state bytes of all streams)\n"
    )
    compiled = None
    if args.compile_decoding:
        compiled = copy.deepcopy(mm)
        t0 = time.perf_counter()
        compiled.compile_decoding(warm_up=tuple(args.decode_batches))
        print(f"(MM-Rec's decoding step compiled in {time.perf_counter() - t0:.0f} s)\n")
    extra = " MM-Rec compiled ms | compiled tok/s |" if compiled is not None else ""
    print(
        "| context | streams | MM-Rec ms | MM-Rec tok/s |" + extra + " Transformer ms | Transformer tok/s "
        "| MM-Rec state | KV cache |"
    )
    print("|---|---|---|---|" + ("---|---|" if compiled is not None else "") + "---|---|---|---|")
    for ctx in args.contexts:
        for batch in args.decode_batches:
            # Eager decoding (and the compiled MM-Rec step, if asked): the Transformer's whole-model graph
            # would recompile for every cache length.
            mm_dec = decode_latency(mm, ctx, args.decode_steps, device, dtype, batch=batch)
            cols = ""
            if compiled is not None:
                c_dec = decode_latency(compiled, ctx, args.decode_steps, device, dtype, batch=batch)
                cols = f" {c_dec['ms_per_token']:.2f} | {c_dec['tokens_per_s']:,.0f} |"
            tf_dec = decode_latency(tf, ctx, args.decode_steps, device, dtype, batch=batch)
            print(
                f"| {ctx:,} | {batch} | {mm_dec['ms_per_token']:.2f} | {mm_dec['tokens_per_s']:,.0f} |{cols} "
                f"{tf_dec['ms_per_token']:.2f} | {tf_dec['tokens_per_s']:,.0f} | "
                f"{mm_dec['state_bytes'] / 2**20:.2f} MiB | {tf_dec['state_bytes'] / 2**20:.1f} MiB |",
                flush=True,
            )


def train_table(
    args: argparse.Namespace, models: dict[str, torch.nn.Module], device: torch.device, dtype: torch.dtype | None
) -> None:
    print(f"Training, forward + backward + AdamW, {args.tokens:,} tokens per step (tokens/s, median of {args.steps})\n")
    print("| T | batch | MM-Rec tok/s | Transformer tok/s | ratio | MM-Rec GiB | Transformer GiB |")
    print("|---|---|---|---|---|---|---|")
    for T in args.lengths:
        mm_run = train_throughput(models["mmrec"], T, args.tokens, args.steps, device, dtype)
        mm_tps, mm_mem = mm_run["tokens_per_s"], mm_run["peak_gib"]
        tf_tps, tf_mem = float("nan"), float("nan")
        if not (args.skip_transformer_above and args.skip_transformer_above < T):
            tf_run = train_throughput(models["llama"], T, args.tokens, args.steps, device, dtype)
            tf_tps, tf_mem = tf_run["tokens_per_s"], tf_run["peak_gib"]
        print(
            f"| {T:,} | {max(1, args.tokens // T)} | {mm_tps:,.0f} | {tf_tps:,.0f} | {mm_tps / tf_tps:.2f}x | "
            f"{mm_mem:.2f} | {tf_mem:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
