"""Induction heads trained short and tested long, on a CPU: which MM-Rec variants carry recall further.

    python benchmarks/induction_proxy.py --out runs/induction_proxy.json        # 9 variants x 1 seed, ~14 min
    python benchmarks/induction_proxy.py --steps 20 --test-lens 64 256          # a smoke run

A small stand-in for issue 5's induction goal (trained at 256 tokens, perfect
at 64K), cheap enough for a 2-core machine: Mamba's task (vocabulary 16), the
MM-Rec of ``mmrec synth induction`` (width 64, 2 layers, 2 heads), trained at
``--train-len`` (64) and tested at 16x and 64x that length with the state
streamed. Each variant trains a fresh model from the same seed on the same
batches. For every trained model it also reports what the short-term decays
learned: ``1 - g`` of the slowest head of layer 0 at ordinary tokens and at the
token after the trigger (the one whose write matters) - their ratio is how
selective the writes became -, the share of (token, head) pairs per layer that
leave the state exactly unchanged (sparse writes), and the accuracy with the
long-term memory's read output zeroed (does the memory take part?). Variants
named ``l1 W`` train with the penalty ``write_l1 = W`` on the sparse-write gates.

Prints a markdown table and writes every variant's numbers to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmrec.evals.context import evaluate_task
from mmrec.evals.synthetic import induction_batch
from mmrec.models import MMRecLM
from mmrec.models.factory import build_model, resolve_model_config
from mmrec.train.tasks import train_task
from mmrec.utils.cpu import tune_glibc_malloc

VOCAB = 16
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "decay_max 1-1e-7": {"decay_max": 0.9999999},
    "selective_write": {"selective_write": True},
    "selective_write, decay_max 1-1e-5": {"selective_write": True, "decay_max": 0.99999},
    "selective_write, decay_max 1-1e-7": {"selective_write": True, "decay_max": 0.9999999},
    "sparse_write": {"selective_write": True, "sparse_write": True},
    "sparse_write, decay_max 1-1e-5": {"selective_write": True, "sparse_write": True, "decay_max": 0.99999},
    "sparse_write, l1 0.01": {"selective_write": True, "sparse_write": True, "write_l1": 0.01},
    "sparse_write, l1 0.1": {"selective_write": True, "sparse_write": True, "write_l1": 0.1},
    "sparse_write, l1 0.1, warmup 400": {
        "selective_write": True,
        "sparse_write": True,
        "write_l1": 0.1,
        "write_l1_warmup": 400,
    },
}


@torch.no_grad()
def write_rates(model: MMRecLM, seq_len: int) -> tuple[float, float]:
    """Median 1 - g of layer 0's slowest head at ordinary tokens and at the token after the trigger."""
    x, _ = induction_batch(16, seq_len, VOCAB, torch.Generator().manual_seed(7))
    block = model.layers[0]
    mixer = block.short_term
    h = block.norm1(model.embed(x))
    gate_in = h
    if mixer.selective_write and mixer.conv is not None:
        gate_in = F.silu(mixer.conv(h, h.new_zeros(h.size(0), mixer.conv.kernel_size - 1, h.size(-1)))[0])
    one_minus_g = -torch.expm1(mixer.log_decay(gate_in))  # [B, T, H]
    slowest = int(one_minus_g.mean(dim=(0, 1)).argmin())
    after = torch.zeros_like(x, dtype=torch.bool)
    after[:, 1:] = x[:, :-1] == VOCAB - 1
    ordinary = ~after & (x != VOCAB - 1)
    rates = one_minus_g[..., slowest]
    return float(rates[ordinary].median()), float(rates[after].median())


@torch.no_grad()
def frozen_shares(model: MMRecLM, seq_len: int) -> list[float]:
    """Per layer: the share of (token, head) pairs whose short-term state is left exactly unchanged (g == 1)."""
    x, _ = induction_batch(16, seq_len, VOCAB, torch.Generator().manual_seed(7))
    seen: list[torch.Tensor] = []
    originals = []
    for block in model.layers:
        mixer = block.short_term
        original = mixer.log_decay
        originals.append((mixer, original))

        def record(gate_in: torch.Tensor, original: Any = original) -> torch.Tensor:
            out = original(gate_in)
            seen.append(out)
            return out

        mixer.log_decay = record  # type: ignore[method-assign]
    try:
        model(x)
    finally:
        for mixer, _ in originals:
            del mixer.log_decay  # back to the class's method
    return [float((log_g == 0).float().mean()) for log_g in seen]


def accuracy(model: torch.nn.Module, length: int, batches: int, batch_size: int) -> float:
    result = evaluate_task(
        model, lambda b, g: induction_batch(b, length, VOCAB, g), batches, batch_size, "cpu", window=4096
    )
    return math.nan if result.accuracy is None else float(result.accuracy)  # nan: nothing was scored


def run_variant(name: str, options: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model_options = {k: v for k, v in options.items() if not k.startswith("write_l1")}
    # The MM-Rec of `mmrec synth induction`: width 64, 2 layers, 2 heads.
    model = build_model(
        resolve_model_config("mmrec", dict(d_model=64, n_layers=2, n_heads=2, **model_options), vocab_size=VOCAB)
    )
    assert isinstance(model, MMRecLM)
    t0 = time.perf_counter()
    train_task(
        model,
        lambda b, g: induction_batch(b, args.train_len, VOCAB, g),
        args.steps,
        args.batch_size,
        args.lr,
        "cpu",
        seed=args.seed,
        eval_fn=lambda m: 0.0,
        log=None,
        write_l1=options.get("write_l1", 0.0),
        write_l1_warmup=options.get("write_l1_warmup", 0),
    )
    seconds = time.perf_counter() - t0
    model.eval()
    acc = {n: accuracy(model, n, args.test_batches, args.batch_size) for n in args.test_lens}
    outs = [blk.memory.out for blk in model.layers]
    saved = [o.weight.detach().clone() for o in outs]
    with torch.no_grad():
        for o in outs:
            o.weight.zero_()
    no_memory = {n: accuracy(model, n, args.test_batches, args.batch_size) for n in args.test_lens}
    with torch.no_grad():
        for o, w in zip(outs, saved, strict=True):
            o.weight.copy_(w)
    ordinary, after = write_rates(model, args.train_len)
    frozen = frozen_shares(model, args.train_len)
    return {
        "variant": name,
        "options": options,
        "accuracy": acc,
        "accuracy_without_memory_read": no_memory,
        "write_rate_ordinary": ordinary,
        "write_rate_after_trigger": after,
        "frozen_share_by_layer": frozen,
        "train_seconds": seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--train-len", type=int, default=64)
    p.add_argument("--test-lens", type=int, nargs="+", default=None, help="default: 1x, 16x, 64x --train-len")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--test-batches", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = p.parse_args()
    args.test_lens = args.test_lens or [args.train_len, 16 * args.train_len, 64 * args.train_len]
    tune_glibc_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.variants:
        rows.append(run_variant(name, VARIANTS[name], args))
        print(f"{name}: {rows[-1]['accuracy']} ({rows[-1]['train_seconds']:.0f} s)", flush=True)
    lens = args.test_lens
    print(
        f"\nInduction, MM-Rec d 64, trained at {args.train_len} tokens for {args.steps} steps of {args.batch_size} "
        f"(lr {args.lr:g}, seed {args.seed}); accuracy over {args.test_batches * args.batch_size} sequences per "
        f"length (chance {1 / (VOCAB - 2):.3f}); memory read zeroed in brackets; 1 - g of layer 0's slowest head; "
        "frozen: share of (token, head) pairs that leave the state exactly unchanged, per layer.\n"
    )
    print(
        "| variant | " + " | ".join(f"{n:,}" for n in lens) + " | 1 - g ordinary | 1 - g after trigger | ratio | "
        "frozen (layers) |"
    )
    print("|---|" + "---:|" * (len(lens) + 4))
    for r in rows:
        cells = " | ".join(f"{r['accuracy'][n]:.3f} ({r['accuracy_without_memory_read'][n]:.3f})" for n in lens)
        ratio = r["write_rate_after_trigger"] / max(r["write_rate_ordinary"], 1e-30)
        print(
            f"| {r['variant']} | {cells} | {r['write_rate_ordinary']:.1e} | {r['write_rate_after_trigger']:.1e} | "
            f"{ratio:.1f}x | {' / '.join(f'{f:.4f}' for f in r['frozen_share_by_layer'])} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows}))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
