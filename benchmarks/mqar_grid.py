"""MQAR on a reduced CPU grid: MM-Rec against a LLaMA-style Transformer, accuracy against state size.

    python benchmarks/mqar_grid.py --out runs/mqar_grid.json                  # the whole grid, ~30 min on 2 cores
    python benchmarks/mqar_grid.py --steps 5 --lengths 64 --widths 64           # a smoke run

The Zoology setting (Arora et al. 2023, figure 2) shrunk to fit a CPU: two
layers, vocabulary 1024, lengths 64 / 128 / 256 with 4 / 8 / 16 key-value
pairs (Zoology's ratios), widths 64 / 128, the same steps, batch and learning
rate for every cell. Each cell trains a fresh model on fresh batches and
reports held-out accuracy at the value positions and the floats of state the
model needs at that length (MM-Rec: constant; Transformer: its KV cache).
The Transformer is sized to MM-Rec's parameter count. Prints a markdown
table and writes every cell, with its loss curve, to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from mmrec.evals.context import evaluate_task, state_floats
from mmrec.evals.synthetic import mqar_batch
from mmrec.models.factory import build_model, resolve_model_config
from mmrec.train.tasks import train_task
from mmrec.utils.cpu import tune_glibc_malloc

# Zoology's pairs per length.
DEFAULT_KV_PAIRS = {64: 4, 128: 8, 256: 16, 512: 64}


def run_cell(
    arch: str, width: int, seq_len: int, kv_pairs: int, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    values = dict(
        d_model=width,
        n_layers=2,
        n_heads=args.n_heads,
        chunk_size=args.chunk_size,
        mem_slots=args.mem_slots,
        summary_window=args.summary_window,
    )
    if arch == "mmrec":
        config = resolve_model_config("mmrec", values, vocab_size=args.vocab_size)
    else:  # a Transformer of preset `arch`, sized to the parameter count of the MM-Rec of the same values
        config = resolve_model_config(
            "transformer", {**values, "preset": arch}, vocab_size=args.vocab_size, train_len=seq_len
        )
    model = build_model(config)

    def make_batch(b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return mqar_batch(b, seq_len, kv_pairs, args.vocab_size, g)

    t0 = time.perf_counter()
    trained = train_task(model, make_batch, args.steps, args.batch_size, args.lr, device, seed=args.seed, log=None)
    held_out = evaluate_task(model, make_batch, args.eval_batches, args.batch_size, device, seed=args.seed + 1_000_003)
    return {
        "arch": arch,
        "d_model": width,
        "seq_len": seq_len,
        "kv_pairs": kv_pairs,
        "accuracy": held_out.accuracy,
        "state_floats": state_floats(model, seq_len),
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(trained["train_seconds"], 2),
        "cell_seconds": round(time.perf_counter() - t0, 2),
        "loss_history": trained["history"],
    }


def table(cells: list[dict[str, Any]], lengths: list[int]) -> str:
    """Rows: arch x width; columns: lengths; each cell 'accuracy (state floats)'."""
    by_key = {(c["arch"], c["d_model"], c["seq_len"]): c for c in cells}
    rows = sorted({(c["arch"], c["d_model"]) for c in cells})
    lines = [
        "| model | d_model | " + " | ".join(f"T={n} acc (state floats)" for n in lengths) + " |",
        "|---|---:|" + "---:|" * len(lengths),
    ]
    for arch, width in rows:
        parts = []
        for n in lengths:
            c = by_key.get((arch, width, n))
            parts.append("-" if c is None else f"{c['accuracy']:.3f} ({c['state_floats']:,})")
        lines.append(f"| {arch} | {width} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="training steps per cell (default: 400)")
    p.add_argument("--archs", nargs="+", default=["mmrec", "llama"], choices=["mmrec", "llama", "gpt", "mistral"])
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128])
    p.add_argument("--kv-pairs", type=int, default=None, help="pairs at every length (default: Zoology's 4/8/16)")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--n-heads", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--mem-slots", type=int, default=32)
    p.add_argument("--summary-window", type=int, default=8)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--out", default="runs/mqar_grid.json", help="JSON of every cell (default: runs/mqar_grid.json)")
    args = p.parse_args()
    if args.steps < 1 or args.batch_size < 1 or args.eval_batches < 1:
        p.error("--steps, --batch-size and --eval-batches must be >= 1")
    tune_glibc_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cells = []
    for n in args.lengths:
        kv = args.kv_pairs or DEFAULT_KV_PAIRS.get(n, max(1, n // 16))
        for width in args.widths:
            for arch in args.archs:
                cell = run_cell(arch, width, n, kv, args, device)
                cells.append(cell)
                print(
                    f"{arch:>7} d={width:<4} T={n:<4} pairs={kv:<3} accuracy {cell['accuracy']:.3f}  "
                    f"state floats {cell['state_floats']:>9,}  {cell['cell_seconds']:.0f}s",
                    flush=True,
                )
    print()
    print(table(cells, args.lengths))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    out.write_text(json.dumps({"settings": settings, "cells": cells}, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
