"""MQAR on the CPU grid of issue 13: MM-Rec against a LLaMA-style Transformer, learning rate swept in every cell.

    python benchmarks/mqar_grid.py --out runs/mqar_grid.json          # the whole grid (hours on 2 cores)
    python benchmarks/mqar_grid.py --out runs/mqar_grid.json --resume # go on after an interruption
    python benchmarks/mqar_grid.py --lengths 64 --pairs 4 --steps 200 --out runs/mqar_cell.json  # one small cell

Zoology's multiquery_ar layout (``mmrec.evals.synthetic.mqar_zoology_batch``:
keys from the lower half of the vocabulary, values from the upper half,
random tokens everywhere else, power-law gaps) at lengths 64 / 128 / 256
with 4 / 8 / 16 key-value pairs (every pair count at every length), two
layers, vocabulary 1024, one width. In every cell each model is trained once
per learning rate (1e-3, 3e-3, 1e-2 by default) with the same steps, batch,
seed and initial weights; the learning rate is chosen on validation batches
and the chosen model is scored on evaluation batches, both drawn from seed
streams that no training batch came from (``stream_seed``: the three streams
never share a generator seed). The Transformer is sized to MM-Rec's
parameter count. Prints a markdown table and writes every cell (every
learning rate's validation accuracy and final loss, the chosen one's loss
curve) to a JSON file after each cell.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from mmrec.evals.context import state_floats
from mmrec.evals.synthetic import MQAR_LAYOUTS, stream_seed
from mmrec.models.factory import build_model, resolve_model_config
from mmrec.train.tasks import sweep_lr, train_task
from mmrec.utils.cpu import tune_glibc_malloc

# MM-Rec and its variants under test (issue 13's levers), by the name the table shows.
MMREC_VARIANTS: dict[str, dict[str, Any]] = {"mmrec": {}, "mmrec-delta": {"short_term": "delta"}}
ARCHS = [*MMREC_VARIANTS, "llama", "gpt", "mistral"]


def cell_key(cell: dict[str, Any]) -> tuple[str, int, int, int]:
    return cell["arch"], cell["d_model"], cell["seq_len"], cell["kv_pairs"]


def run_cell(
    arch: str, width: int, seq_len: int, kv_pairs: int, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    values = dict(
        d_model=width,
        n_layers=2,
        n_heads=args.n_heads,
        chunk_size=args.chunk_size,
        mem_slots=args.mem_slots,
        summary_window=args.summary_window,
    )
    if arch.startswith("mmrec"):  # mmrec, or mmrec-<variant>: the MM-Rec options of MMREC_VARIANTS
        config = resolve_model_config("mmrec", {**values, **MMREC_VARIANTS[arch]}, vocab_size=args.vocab_size)
    else:  # a Transformer of preset `arch`, sized to the parameter count of the MM-Rec of the same values
        config = resolve_model_config(
            "transformer", {**values, "preset": arch}, vocab_size=args.vocab_size, train_len=seq_len
        )
    make = MQAR_LAYOUTS[args.layout]

    def make_batch(b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return make(b, seq_len, kv_pairs, args.vocab_size, g, power_a=args.power_a)

    def train(model: torch.nn.Module, lr: float, eval_fn: Any) -> dict[str, Any]:
        return train_task(
            model, make_batch, args.steps, args.batch_size, lr, device, seed=args.seed, eval_fn=eval_fn, log=None
        )

    t0 = time.perf_counter()
    sweep = sweep_lr(
        args.lrs,
        partial(build_model, config),
        train,
        make_batch,
        args.eval_batches,
        args.batch_size,
        device,
        args.seed,
        log=None,
    )
    chosen, model = sweep.chosen, sweep.model
    return {
        "arch": arch,
        "d_model": width,
        "seq_len": seq_len,
        "kv_pairs": kv_pairs,
        "accuracy": None if sweep.evaluation is None else sweep.evaluation.accuracy,
        "eval_queries": None if sweep.evaluation is None else sweep.evaluation.total,
        "lr": None if chosen is None else chosen.lr,
        "sweep": [
            {
                "lr": run.lr,
                "validation_accuracy": None if run.validation is None else run.validation.accuracy,
                "final_loss": run.final_loss,
                "train_seconds": None if run.trained is None else round(run.trained["train_seconds"], 2),
                "note": run.note,
            }
            for run in sweep.runs
        ],
        "state_floats": None if model is None else state_floats(model, seq_len),
        "params": None if model is None else sum(p.numel() for p in model.parameters()),
        "cell_seconds": round(time.perf_counter() - t0, 2),
        "loss_history": None if chosen is None or chosen.trained is None else chosen.trained["history"],
    }


def _entry(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "-"
    if cell["accuracy"] is None:
        return "diverged" if cell["lr"] is None else "not evaluated"
    return f"{cell['accuracy']:.3f} (lr {cell['lr']:g})"


def table(cells: list[dict[str, Any]], settings: list[tuple[int, int]]) -> str:
    """Rows: arch x width; columns: (length, pairs); each entry 'evaluation accuracy (chosen lr)'."""
    by_key = {cell_key(c): c for c in cells}
    rows = sorted({(c["arch"], c["d_model"]) for c in cells})
    lines = [
        "| model | d_model | " + " | ".join(f"T={n} N={kv}" for n, kv in settings) + " |",
        "|---|---:|" + "---:|" * len(settings),
    ]
    for arch, width in rows:
        parts = [_entry(by_key.get((arch, width, n, kv))) for n, kv in settings]
        lines.append(f"| {arch} | {width} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000, help="training steps per learning rate and cell (default: 2000)")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2], help="learning rates swept per cell")
    p.add_argument("--archs", nargs="+", default=["mmrec", "llama"], choices=ARCHS)
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--pairs", type=int, nargs="+", default=[4, 8, 16], help="key-value pairs, tried at every length")
    p.add_argument("--widths", type=int, nargs="+", default=[64])
    p.add_argument("--layout", default="zoology", choices=sorted(MQAR_LAYOUTS))
    p.add_argument("--power-a", type=float, default=0.01)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--n-heads", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--mem-slots", type=int, default=32)
    p.add_argument("--summary-window", type=int, default=8)
    p.add_argument("--eval-batches", type=int, default=16, help="validation and evaluation batches (default: 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--out", default="runs/mqar_grid.json", help="JSON of every cell (default: runs/mqar_grid.json)")
    p.add_argument("--resume", action="store_true", help="keep the cells of --out run with the same settings")
    args = p.parse_args()
    if args.steps < 1 or args.batch_size < 1 or args.eval_batches < 1:
        p.error("--steps, --batch-size and --eval-batches must be >= 1")
    if len(set(args.lrs)) != len(args.lrs) or min(args.lrs) <= 0:
        p.error(f"--lrs must be distinct and > 0, got {args.lrs}")
    try:
        stream_seed(args.seed, "evaluation")
    except ValueError as e:
        p.error(f"--seed: {e}")
    settings = [(n, kv) for n in args.lengths for kv in args.pairs if n >= 4 * kv]
    for n, kv in ((n, kv) for n in args.lengths for kv in args.pairs if n < 4 * kv):
        print(f"skipping T={n} with {kv} pairs: the pairs and their queries need {4 * kv} tokens")
    tune_glibc_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out)
    recorded = {k: v for k, v in vars(args).items() if k not in ("out", "resume", "threads", "device")}
    cells: list[dict[str, Any]] = []
    if args.resume and out.exists():
        previous = json.loads(out.read_text())
        if {k: previous["settings"].get(k) for k in recorded} != recorded:
            p.error(f"--resume: {out} was run with other settings; give another --out")
        cells = previous["cells"]
    done = {cell_key(c) for c in cells}
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine()}
    out.parent.mkdir(parents=True, exist_ok=True)
    for n, kv in settings:
        for width in args.widths:
            for arch in args.archs:
                if (arch, width, n, kv) in done:
                    continue
                cell = run_cell(arch, width, n, kv, args, device)
                cells.append(cell)
                swept = ", ".join(
                    f"{r['lr']:g}: "
                    + ("diverged" if r["validation_accuracy"] is None else f"{r['validation_accuracy']:.3f}")
                    for r in cell["sweep"]
                )
                print(
                    f"{arch:>7} d={width:<4} T={n:<4} pairs={kv:<3} accuracy {_entry(cell)}  "
                    f"[validation {swept}]  state floats {cell['state_floats'] or 0:>9,}  {cell['cell_seconds']:.0f}s",
                    flush=True,
                )
                # Written after every cell, so an interrupted grid keeps what it ran (--resume goes on).
                text = json.dumps({"settings": recorded, "meta": meta, "cells": cells}, indent=1) + "\n"
                tmp = out.with_suffix(".tmp")
                tmp.write_text(text)
                tmp.replace(out)
    print()
    print(table(cells, settings))
    print(
        "\nAccuracy on evaluation batches of the learning rate chosen on validation batches "
        f"({', '.join(f'{lr:g}' for lr in args.lrs)}; {args.steps} steps each)."
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
