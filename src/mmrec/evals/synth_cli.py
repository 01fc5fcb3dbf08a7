"""Command-line wiring: ``mmrec synth ...`` and ``mmrec eval passkey``.

``add_synth_parser(subparsers)`` adds the ``synth`` command with one action
per task; ``add_passkey_parser(eval_subparsers)`` adds ``passkey`` under
``mmrec eval``. Each action's ``func(args)`` returns an exit code: 0 on
success, 1 with a message on stderr for a bad input found after parsing
(argparse itself rejects malformed flags with exit code 2).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch

from mmrec.evals import passkey as pk
from mmrec.evals import synthetic as syn
from mmrec.evals import task_train as tt
from mmrec.models import MMRecLM

GIB = 2**30


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


positive_int = _int_at_least(1)
nonneg_int = _int_at_least(0)

# Zoology's MQAR training set (Arora et al. 2023, zoology/experiments): (seq_len, kv_pairs, examples).
ZOOLOGY_MQAR_MIX = ((64, 4, 100_000), (128, 8, 20_000), (256, 16, 20_000), (256, 32, 20_000), (256, 64, 20_000))


def _mix_entry(text: str) -> tuple[int, int, float]:
    """``SEQ:KV`` or ``SEQ:KV:WEIGHT`` (weight 1 by default)."""
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        seq, kv = int(parts[0]), int(parts[1])
        weight = float(parts[2]) if len(parts) == 3 else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SEQ:KV or SEQ:KV:WEIGHT (e.g. 256:16:2), got {text!r}") from None
    if seq < 1 or kv < 1 or not 0 < weight < float("inf"):
        raise argparse.ArgumentTypeError(f"need SEQ >= 1, KV >= 1 and a finite WEIGHT > 0, got {text!r}")
    return seq, kv, weight


def _mix_arg(text: str) -> str | tuple[int, int, float]:
    return "zoology" if text == "zoology" else _mix_entry(text)


def _mqar_mix(values: list[str | tuple[int, int, float]] | None) -> list[tuple[int, int, float]]:
    """The parsed ``--train-mix``: 'zoology' expands to Zoology's training set."""
    mix: list[tuple[int, int, float]] = []
    for value in values or []:
        if value == "zoology":
            mix.extend((t, kv, float(n)) for t, kv, n in ZOOLOGY_MQAR_MIX)
        else:
            assert isinstance(value, tuple)
            mix.append(value)
    return mix


def _fail(args: argparse.Namespace, error: Exception) -> int:
    command = " ".join(part for part in ("mmrec", getattr(args, "command_path", "")) if part)
    print(f"{command}: error: {error}", file=sys.stderr)
    return 1


def _setup(args: argparse.Namespace) -> torch.device:
    """What every action does first: tune malloc, threads, seed, device."""
    from mmrec.utils.cpu import tune_glibc_malloc

    tune_glibc_malloc()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return tt.resolve_device(args.device)


def _make_out(args: argparse.Namespace) -> Path:
    """The output folder, created once the inputs are known to be good (so a typo leaves nothing behind)."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of the model, the data and the keys (default: 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for PyTorch (default: all cores)")


def _add_model_args(p: argparse.ArgumentParser, d_model: int) -> None:
    p.add_argument("--arch", choices=tt.ARCHS, default="mmrec", help="model family (default: mmrec)")
    p.add_argument("--d-model", type=positive_int, default=d_model, help=f"model width (default: {d_model})")
    p.add_argument("--n-layers", type=positive_int, default=2, help="blocks (default: 2)")
    p.add_argument("--n-heads", type=positive_int, default=2, help="heads, recurrence or attention (default: 2)")
    p.add_argument("--chunk-size", type=positive_int, default=64, help="MM-Rec chunk size (default: 64)")
    p.add_argument("--mem-slots", type=positive_int, default=32, help="MM-Rec long-term memory slots (default: 32)")
    p.add_argument("--summary-window", type=positive_int, default=8, help="MM-Rec chunk summaries kept (default: 8)")
    p.add_argument(
        "--decay-max",
        type=_unit_float,
        default=0.999,
        help="MM-Rec: initial decay of the longest-memory short-term head (default: 0.999)",
    )
    p.add_argument(
        "--selective-write",
        action="store_true",
        help="MM-Rec: Mamba-2-style selection in the short-term memory: decay from the convolved features, "
        "writes scaled by (1 - decay) (MMRecConfig.selective_write)",
    )
    p.add_argument(
        "--sparse-write",
        action="store_true",
        help="MM-Rec: selective writes whose gate relu(W x + b) can leave the state exactly unchanged "
        "(implies --selective-write; MMRecConfig.sparse_write)",
    )
    p.add_argument(
        "--write-l1",
        type=_nonnegative_float,
        default=0.0,
        help="MM-Rec with --sparse-write: weight of a penalty on the mean write gate, which switches off the "
        "writes the task does not need (default: 0)",
    )
    p.add_argument(
        "--write-l1-warmup",
        type=nonneg_int,
        default=0,
        help="steps over which the --write-l1 penalty rises from 0 to its weight (default: 0, full from the start)",
    )
    p.add_argument(
        "--attn-window",
        type=positive_int,
        default=None,
        help="sliding window of the mistral preset (default: a quarter of the training length)",
    )
    p.add_argument(
        "--no-match-params",
        dest="match_params",
        action="store_false",
        help="do not size a Transformer's MLP to MM-Rec's parameter count",
    )


def _add_train_args(p: argparse.ArgumentParser, steps: int, batch: int, lr: float) -> None:
    p.add_argument("--steps", type=positive_int, default=steps, help=f"training steps (default: {steps})")
    p.add_argument("--batch-size", type=positive_int, default=batch, help=f"sequences per step (default: {batch})")
    p.add_argument("--lr", type=_positive_float, default=lr, help=f"peak learning rate, AdamW (default: {lr:g})")
    p.add_argument("--log-every", type=positive_int, default=50, help="print a line every N steps (default: 50)")
    p.add_argument(
        "--max-minutes",
        type=_positive_float,
        default=None,
        help="time budget: lower --steps so training (schedule included) fits it, from the step time after 30 "
        "steps and again at every --log-every",
    )
    p.add_argument("--out", required=True, help="output folder (created)")


def _build(args: argparse.Namespace, vocab_size: int, train_len: int, device: torch.device) -> torch.nn.Module:
    if args.write_l1 > 0 and not (args.arch == "mmrec" and args.sparse_write):
        # Checked here, before the output folder exists; train_task would refuse it only after.
        raise ValueError(f"--write-l1 {args.write_l1:g} needs an MM-Rec with sparse_write: add --sparse-write")
    attn_window = args.attn_window
    if args.arch == "mistral" and attn_window is None:
        attn_window = max(1, train_len // 4)
    model = tt.build_task_model(
        args.arch,
        vocab_size,
        args.d_model,
        args.n_layers,
        args.n_heads,
        args.chunk_size,
        args.mem_slots,
        args.summary_window,
        max_seq_len=train_len,
        attn_window=attn_window,
        match_params=args.match_params,
        decay_max=args.decay_max,
        selective_write=args.selective_write or args.sparse_write,
        sparse_write=args.sparse_write,
    )
    return model.to(device)


def _model_fields(args: argparse.Namespace, model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
    cfg = cast(Any, model).config
    return {
        "arch": args.arch,
        "d_model": args.d_model,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "params": sum(p.numel() for p in model.parameters()),
        "model_config": cfg.to_dict(),
        "device": str(device),
        "seed": args.seed,
        "write_l1": args.write_l1,
        "write_l1_warmup": args.write_l1_warmup,
    }


def plot_lines(
    path: Path, series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str, title: str, logx: bool
) -> Path | None:
    """A line plot (one line per series); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, "o-" if len(xs) < 30 else "-", lw=1.2, ms=4, label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_loss(out: Path, history: list[float], title: str) -> Path | None:
    return plot_lines(
        out / "loss.png", {"train": (list(range(1, len(history) + 1)), history)}, "step", "loss (nats)", title, False
    )


# mmrec synth mqar -----------------------------------------------------------


def _mqar(args: argparse.Namespace) -> int:
    try:
        device = _setup(args)

        def make_batch(b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            return syn.mqar_batch(b, args.seq_len, args.kv_pairs, args.vocab_size, g, power_a=args.power_a)

        mix = _mqar_mix(args.train_mix)
        weights = torch.tensor([w for _, _, w in mix], dtype=torch.float64)

        def train_batch(b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            # Each training batch is one setting of the mix, drawn by weight; evaluation stays on the test setting.
            if not mix:
                return make_batch(b, g)
            seq, kv, _ = mix[int(torch.multinomial(weights, 1, generator=g))]
            return syn.mqar_batch(b, seq, kv, args.vocab_size, g, power_a=args.power_a)

        make_batch(1, torch.Generator().manual_seed(0))  # bad task settings fail here, before the model is built
        for seq, kv, _ in mix:
            try:
                syn.mqar_batch(1, seq, kv, args.vocab_size, torch.Generator().manual_seed(0))
            except ValueError as e:
                raise ValueError(f"--train-mix {seq}:{kv}: {e}") from None
        longest = max([args.seq_len, *(seq for seq, _, _ in mix)])
        model = _build(args, args.vocab_size, longest, device)
        out = _make_out(args)
        fields = _model_fields(args, model, device)
        print(
            f"MQAR: {args.arch}, {fields['params']:,} parameters, {args.seq_len} tokens, {args.kv_pairs} pairs, "
            f"vocabulary {args.vocab_size}; {args.steps} steps of {args.batch_size} on {device}",
            flush=True,
        )
        held_out: list[tt.TaskEval] = []

        def evaluate(m: torch.nn.Module) -> float:
            # Fresh batches from another seed: the accuracy train_task reports, kept whole for the table.
            held_out.append(
                tt.evaluate_task(m, make_batch, args.eval_batches, args.batch_size, device, seed=args.seed + 1_000_003)
            )
            return float(held_out[-1].accuracy or 0.0)

        trained = tt.train_task(
            model,
            train_batch,
            args.steps,
            args.batch_size,
            args.lr,
            device,
            args.log_every,
            args.seed,
            evaluate,
            max_seconds=args.max_minutes * 60 if args.max_minutes else None,
            write_l1=args.write_l1,
            write_l1_warmup=args.write_l1_warmup,
        )
        evaluation = held_out[-1]
    except (ValueError, FloatingPointError, OSError) as e:
        return _fail(args, e)
    accuracy = float(evaluation.accuracy or 0.0)
    results = {
        "task": "mqar",
        **fields,
        "accuracy": accuracy,
        "state_floats": tt.state_floats(model, args.seq_len),
        "seq_len": args.seq_len,
        "kv_pairs": args.kv_pairs,
        "vocab_size": args.vocab_size,
        "power_a": args.power_a,
        "train_mix": [{"seq_len": t, "kv_pairs": kv, "weight": w} for t, kv, w in mix] or None,
        "steps": trained["steps"],
        "batch_size": args.batch_size,
        "lr": args.lr,
        "train_seconds": round(trained["train_seconds"], 3),
        "seconds_per_step": round(trained["seconds_per_step"], 5),
        "eval_queries": evaluation.total,
        "chance": 2 / args.vocab_size,
        "final_loss": sum(trained["history"][-10:]) / len(trained["history"][-10:]),
        "loss_history": trained["history"],
    }
    table = (
        f"# MQAR ({args.arch})\n\n"
        "| arch | d_model | seq_len | kv_pairs | vocab | steps | accuracy | state floats | params | train s |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        f"| {args.arch} | {args.d_model} | {args.seq_len} | {args.kv_pairs} | {args.vocab_size} | {trained['steps']} | "
        f"{accuracy:.3f} | {results['state_floats']:,} | {fields['params']:,} | {trained['train_seconds']:.0f} |\n\n"
        f"Accuracy over {evaluation.total:,} held-out queries (chance {2 / args.vocab_size:.4f}).\n"
        + ("Trained on the mix " + ", ".join(f"{t}:{kv} (weight {w:g})" for t, kv, w in mix) + ".\n" if mix else "")
    )
    _write(out, results, table)
    _save_model(out, model)
    _plot_loss(out, trained["history"], f"MQAR training loss ({args.arch}, d={args.d_model}, T={args.seq_len})")
    print(table)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'loss.png'}")
    return 0


def _save_model(out: Path, model: torch.nn.Module) -> None:
    """The trained weights, ``model.safetensors``: rebuild with the ``model_config`` of results.json."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))


def _write(out: Path, results: dict[str, Any], table: str) -> None:
    from mmrec.evals.common import write_results

    write_results(out, results, table)


# mmrec synth induction / selective-copy -----------------------------------


def _length_task(task: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            device = _setup(args)

            def batch_fn(length: int) -> tt.MakeBatch:
                if task == "induction":
                    return lambda b, g: syn.induction_batch(b, length, args.vocab_size, g)
                return lambda b, g: syn.selective_copy_batch(b, length, args.n_tokens, args.vocab_size, g)

            for length in [args.train_len, *args.test_lens]:
                batch_fn(length)(1, torch.Generator().manual_seed(0))  # bad settings fail before any training
            model = _build(args, args.vocab_size, args.train_len, device)
            out = _make_out(args)
            fields = _model_fields(args, model, device)
            print(
                f"{task}: {args.arch}, {fields['params']:,} parameters; training {args.steps} steps of "
                f"{args.batch_size} x {args.train_len} tokens on {device}",
                flush=True,
            )
            make_train = batch_fn(args.train_len)
            trained = tt.train_task(
                model,
                make_train,
                args.steps,
                args.batch_size,
                args.lr,
                device,
                args.log_every,
                args.seed,
                max_seconds=args.max_minutes * 60 if args.max_minutes else None,
                write_l1=args.write_l1,
                write_l1_warmup=args.write_l1_warmup,
            )
            evals = []
            for length in args.test_lens:
                ev = tt.evaluate_task(
                    model,
                    batch_fn(length),
                    args.test_batches,
                    args.test_batch_size or args.batch_size,
                    device,
                    args.window,
                    seed=args.seed + 1_000_003,
                    max_memory_bytes=int(args.max_memory_gb * GIB),
                    trained_len=args.train_len,
                    beyond=args.transformer_context,
                )
                acc = "skipped" if ev.accuracy is None else f"{ev.accuracy:.3f}"
                print(f"  {length:>8,} tokens: accuracy {acc}  ({ev.note}; {ev.seconds:.1f}s)", flush=True)
                evals.append(ev)
        except (ValueError, FloatingPointError, OSError) as e:
            return _fail(args, e)
        test_batch = args.test_batch_size or args.batch_size
        elem = next(model.parameters()).element_size()

        def held(ev: tt.TaskEval) -> int:
            # Floats of state one stream held while reading (a sliding window holds less than the full
            # context would need); for a skipped length, what it would have needed.
            return tt.state_floats(model, ev.seq_len) if ev.skipped else ev.memory_bytes // (test_batch * elem)

        per_length = {
            str(ev.seq_len): {
                **ev.to_dict(),
                "state_floats": held(ev),
                "full_context_state_floats": tt.state_floats(model, ev.seq_len),
            }
            for ev in evals
        }
        results = {
            "task": task,
            **fields,
            "vocab_size": args.vocab_size,
            "train_len": args.train_len,
            "test_lens": args.test_lens,
            "steps": trained["steps"],
            "batch_size": args.batch_size,
            "lr": args.lr,
            "window": args.window,
            "transformer_context": args.transformer_context,
            "train_seconds": round(trained["train_seconds"], 3),
            "train_accuracy": trained["accuracy"],
            "accuracy": {k: v["accuracy"] for k, v in per_length.items()},
            "per_length": per_length,
            "loss_history": trained["history"],
        }
        if task == "selective-copy":
            results["n_tokens"] = args.n_tokens
        chance = 1 / (args.vocab_size - 2)
        lines = [
            f"# {task} ({args.arch}): trained at {args.train_len} tokens, tested long",
            "",
            "| length | accuracy | state floats per stream | how it was read |",
            "|---:|---:|---:|---|",
        ]
        for ev in evals:
            acc = "skipped" if ev.accuracy is None else f"{ev.accuracy:.3f}"
            lines.append(f"| {ev.seq_len:,} | {acc} | {held(ev):,} | {ev.note} |")
        lines += [
            "",
            f"Held-out accuracy at the training length after training: {trained['accuracy']:.3f}; "
            f"chance {chance:.3f}. A skipped length shows the state it would have needed.",
        ]
        table = "\n".join(lines) + "\n"
        _write(out, results, table)
        _save_model(out, model)
        ran = [ev for ev in evals if ev.accuracy is not None]
        plot_lines(
            out / "accuracy.png",
            {args.arch: ([ev.seq_len for ev in ran], [float(ev.accuracy or 0.0) for ev in ran])},
            "test length (tokens)",
            "accuracy",
            f"{task}: trained at {args.train_len}, tested long ({args.arch})",
            True,
        )
        _plot_loss(out, trained["history"], f"{task} training loss ({args.arch})")
        print(table)
        print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'accuracy.png'} and {out / 'loss.png'}")
        return 0

    return run


# mmrec synth passkey-data -------------------------------------------------


def _passkey_data(args: argparse.Namespace) -> int:
    from mmrec.tokenizer import load_tokenizer

    try:
        if args.min_len > args.max_len:
            raise ValueError(f"--min-len {args.min_len} must not exceed --max-len {args.max_len}")
        out = Path(args.out)
        if out.is_dir():
            raise ValueError(f"--out {out} is a folder; give the .jsonl file to write")
        tokenizer = load_tokenizer(args.tokenizer)
        t0 = time.perf_counter()
        count = pk.write_passkey_documents(
            out, pk.passkey_documents(tokenizer, args.n, args.min_len, args.max_len, args.seed)
        )
    except (ValueError, OSError) as e:
        return _fail(args, e)
    print(
        f"wrote {count:,} passkey documents of {args.min_len}-{args.max_len} tokens to {out} "
        f"in {time.perf_counter() - t0:.1f}s; mix them into training with "
        f"`mmrec train --data passkey={out}:0.3 ...`"
    )
    return 0


# mmrec synth passkey ------------------------------------------------------


def _train_range(values: list[int]) -> tuple[int, int]:
    if len(values) > 2:
        raise ValueError(f"--train-len takes one length or MIN MAX, got {len(values)} values")
    lo, hi = values[0], values[-1]
    if lo > hi:
        raise ValueError(f"--train-len {lo} {hi}: MIN must not exceed MAX")
    return lo, hi


def _synth_passkey(args: argparse.Namespace) -> int:
    from mmrec.tokenizer import load_tokenizer

    try:
        device = _setup(args)
        tokenizer = load_tokenizer(args.tokenizer)
        lo, hi = _train_range(args.train_len)
        filler = pk.read_filler(tokenizer, args.filler) if args.filler else None
        span = f"{lo}" if lo == hi else f"{lo}-{hi}"

        def make_batch(b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            # One length per batch, uniform in [lo, hi]: every row of a batch is a prompt of the same length.
            length = lo if lo == hi else int(torch.randint(lo, hi + 1, (1,), generator=g))
            return pk.passkey_batch(tokenizer, b, length, g, score_repeat=args.score_repeat, filler_tokens=filler)

        pk.passkey_batch(tokenizer, 1, lo, torch.Generator().manual_seed(0))  # bad lengths fail before training
        pk.check_prompt_lengths(tokenizer, args.lengths)
        model = _build(args, tokenizer.vocab_size, hi, device)
        out = _make_out(args)
        fields = _model_fields(args, model, device)
        print(
            f"passkey: {args.arch}, {fields['params']:,} parameters; training {args.steps} steps of "
            f"{args.batch_size} prompts of {span} tokens on {device}, scored at the key only",
            flush=True,
        )
        trained = tt.train_task(
            model,
            make_batch,
            args.steps,
            args.batch_size,
            args.lr,
            device,
            args.log_every,
            args.seed,
            max_seconds=args.max_minutes * 60 if args.max_minutes else None,
            write_l1=args.write_l1,
            write_l1_warmup=args.write_l1_warmup,
        )
        print(f"held-out accuracy at the key's tokens ({span}-token prompts): {trained['accuracy']:.3f}", flush=True)
        # The model and tokenizer are saved before the grid, so a long grid that is cut short loses no training;
        # `mmrec eval passkey --checkpoint OUT` grades them again at any length.
        _save_model(out, model)
        tokenizer.save(out / "tokenizer.json")
        base = {
            "task": "passkey",
            **fields,
            "tokenizer": args.tokenizer,
            "train_len": [lo, hi],
            "score_repeat": args.score_repeat,
            "filler": args.filler,
            "steps": trained["steps"],
            "batch_size": args.batch_size,
            "lr": args.lr,
            "train_seconds": round(trained["train_seconds"], 3),
            "train_accuracy": trained["accuracy"],
            "loss_history": trained["history"],
        }
        _write(out, base, "Training finished; the passkey grid is still running or was interrupted.\n")
        grid = pk.evaluate_passkey(
            model,
            tokenizer,
            args.lengths,
            args.depths,
            args.trials,
            device,
            int(args.max_memory_gb * GIB),
            args.window,
            trained_len=hi,
            beyond=args.transformer_context,
            seed=args.seed,  # the keys of `mmrec eval passkey --seed` with the same seed: it reproduces this grid
            filler_seed=args.seed if args.vary_filler or filler else None,
            filler_tokens=filler,
        )
    except (ValueError, FloatingPointError, OSError) as e:
        return _fail(args, e)
    results = {**base, **{k: v for k, v in grid.items() if k != "arch"}}
    filler_name = args.filler or "the five sentences, shuffled"
    table = pk.passkey_table(results) + (
        f"\nTrained {trained['steps']} steps on prompts of {span} tokens (filler: {filler_name}), scored at the "
        f"key{' and its repeat in the needle' if args.score_repeat else ''}; held-out accuracy at the scored tokens "
        f"{trained['accuracy']:.3f}.\n"
    )
    _write(out, results, table)
    png = pk.plot_passkey_heatmap(results, out / "heatmap.png")
    _plot_loss(out, trained["history"], f"passkey training loss ({args.arch})")
    print(table)
    wrote = [out / "results.json", out / "results.md", out / "model.safetensors", *([png] if png else [])]
    print("wrote " + ", ".join(map(str, wrote)))
    return 0


# mmrec eval passkey -------------------------------------------------------


def _load_synth_passkey(folder: Path, device: torch.device) -> tuple[torch.nn.Module, Any, int, int]:
    """(model, tokenizer, longest training length, steps) of a `mmrec synth passkey` output folder."""
    import json

    from safetensors.torch import load_file

    from mmrec.config import MMRecConfig, TransformerConfig
    from mmrec.evals.common import CheckpointError
    from mmrec.models import MMRecLM, TransformerLM
    from mmrec.tokenizer import load_tokenizer

    try:
        meta = json.loads((folder / "results.json").read_text())
        if meta.get("task") != "passkey":
            raise CheckpointError(
                f"--checkpoint: {folder} holds the results of `mmrec synth {meta.get('task')}`, not of `mmrec synth "
                "passkey` or `mmrec train`"
            )
        cfg = meta["model_config"]
        model: torch.nn.Module
        if meta["arch"] == "mmrec":
            model = MMRecLM(MMRecConfig.from_dict(cfg))
        else:
            model = TransformerLM(TransformerConfig.from_dict(cfg))
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        tokenizer = load_tokenizer(folder / "tokenizer.json")
        return model.to(device).eval(), tokenizer, int(meta["train_len"][-1]), int(meta["steps"])
    except CheckpointError:
        raise
    except Exception as e:  # json, safetensors, configs and load_state_dict raise several types
        raise CheckpointError(f"--checkpoint: {folder} is not a complete `mmrec synth passkey` output: {e}") from e


def _passkey_eval(args: argparse.Namespace) -> int:
    from mmrec.evals.common import CheckpointError, load_checkpoint, write_results

    try:
        device = _setup(args)
        folder = Path(args.checkpoint)
        if (folder / "results.json").is_file() and not (folder / "meta.json").exists():
            model, tokenizer, trained_len, step = _load_synth_passkey(folder, device)
            arch = "mmrec" if isinstance(model, MMRecLM) else f"transformer-{cast(Any, model).config.preset}"
        else:
            loaded = load_checkpoint(args.checkpoint, device)
            model, tokenizer, trained_len, step, folder = (
                loaded.model,
                loaded.tokenizer,
                loaded.trained_seq_len,
                loaded.step,
                loaded.path,
            )
            arch = loaded.arch
        print(f"passkey: {arch} from {folder} (step {step}, trained on {trained_len})")
        filler = pk.read_filler(tokenizer, args.filler) if args.filler else None
        results = pk.evaluate_passkey(
            model,
            tokenizer,
            args.lengths,
            args.depths,
            args.trials,
            device,
            int(args.max_memory_gb * GIB),
            args.window,
            trained_len=trained_len,
            beyond=args.transformer_context,
            seed=args.seed,
            filler_seed=args.seed if args.vary_filler or filler else None,
            filler_tokens=filler,
        )
        _make_out(args)
    except (CheckpointError, ValueError, OSError) as e:
        return _fail(args, e)
    results.update({"checkpoint": str(folder), "step": step, "device": str(device), "filler": args.filler})
    table = pk.passkey_table(results)
    out = write_results(args.out, results, table)
    png = pk.plot_passkey_heatmap(results, out / "heatmap.png")
    print(table)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}" + (f" and {png}" if png else ""))
    return 0


# Parsers ---------------------------------------------------------------------


def add_synth_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``synth`` (MQAR, induction, selective copying, passkey, passkey training data) to ``subparsers``."""
    synth = subparsers.add_parser(
        "synth",
        help="synthetic recall tasks: MQAR, induction heads, selective copying, passkey; passkey training data",
        description="Train small models on generated tasks and measure recall (DESIGN.md section 7).",
    )
    actions = synth.add_subparsers(dest="synth_command", metavar="TASK")
    actions.required = True

    mqar = actions.add_parser(
        "mqar",
        help="multi-query associative recall (Zoology): train and report accuracy against state size",
        description="Train a small model on fresh MQAR batches and report held-out accuracy at the value "
        "positions, with the floats of state it needed.",
    )
    _add_model_args(mqar, d_model=128)
    mqar.add_argument("--seq-len", type=positive_int, default=512, help="tokens per sequence (default: 512)")
    mqar.add_argument("--kv-pairs", type=positive_int, default=64, help="key-value pairs (default: 64)")
    mqar.add_argument("--vocab-size", type=_int_at_least(4), default=8192, help="vocabulary (default: 8192)")
    mqar.add_argument(
        "--power-a", type=_positive_float, default=0.01, help="query placement power law, Zoology (default: 0.01)"
    )
    mqar.add_argument("--eval-batches", type=positive_int, default=8, help="held-out batches (default: 8)")
    mqar.add_argument(
        "--train-mix",
        nargs="+",
        type=_mix_arg,
        metavar="SEQ:KV[:WEIGHT]",
        default=None,
        help="train on batches drawn from these settings by weight (one setting per batch) instead of the test "
        "setting; 'zoology' is Zoology's training set (64:4, 128:8, 256:16, 256:32, 256:64 weighted by their "
        "example counts). Evaluation stays at --seq-len/--kv-pairs",
    )
    _add_train_args(mqar, steps=2000, batch=32, lr=3e-3)
    _add_common(mqar)
    mqar.set_defaults(func=_mqar, command_path="synth mqar")

    for task, helptext in (
        ("induction", "induction heads (Mamba paper): recall the token after a trigger; trained short, tested long"),
        ("selective-copy", "selective copying (Mamba paper): output scattered data tokens in order; trained short"),
    ):
        p = actions.add_parser(task, help=helptext, description=helptext[0].upper() + helptext[1:] + ".")
        _add_model_args(p, d_model=64)
        p.add_argument("--vocab-size", type=_int_at_least(4), default=16, help="vocabulary (default: 16)")
        if task == "selective-copy":
            p.add_argument("--n-tokens", type=positive_int, default=16, help="data tokens to copy (default: 16)")
        p.add_argument("--train-len", type=_int_at_least(3), default=256, help="training length (default: 256)")
        p.add_argument(
            "--test-lens",
            type=_int_at_least(3),
            nargs="+",
            default=[256, 1024, 4096, 16384, 65536],
            help="test lengths (default: 256 1024 4096 16384 65536)",
        )
        p.add_argument("--test-batches", type=positive_int, default=4, help="batches per test length (default: 4)")
        p.add_argument(
            "--test-batch-size",
            type=positive_int,
            default=None,
            help="sequences per test batch (default: --batch-size)",
        )
        p.add_argument(
            "--window",
            type=positive_int,
            default=4096,
            help="tokens per forward call at test time; MM-Rec carries its state between calls (default: 4096)",
        )
        p.add_argument(
            "--max-memory-gb",
            type=_positive_float,
            default=8.0,
            help="a Transformer length whose KV cache would exceed this is skipped (default: 8)",
        )
        p.add_argument(
            "--transformer-context",
            choices=tt.BEYOND_MODES,
            default="sliding",
            help="a Transformer past its training length: sliding window of that length, full attention, or skip "
            "(default: sliding)",
        )
        _add_train_args(p, steps=1000, batch=32, lr=3e-3)
        _add_common(p)
        p.set_defaults(func=_length_task(task), command_path=f"synth {task}")

    pkp = actions.add_parser(
        "passkey",
        help="passkey retrieval: train on short prompts scored at the key, then grade lengths x depths",
        description="Train a small model on passkey prompts of --train-len tokens (random key, depth and filler "
        "order; the loss is taken at the key only), then grade exact match and digit likelihood on the "
        "lengths x depths grid of `mmrec eval passkey`. The weights are saved before the grid: "
        "`mmrec eval passkey --checkpoint OUT` grades them again at other lengths.",
    )
    _add_model_args(pkp, d_model=128)
    pkp.add_argument(
        "--train-len",
        type=_int_at_least(64),
        nargs="+",
        default=[128, 384],
        metavar="LEN",
        help="training prompt length, or MIN MAX: each batch draws one length uniformly (default: 128 384)",
    )
    pkp.add_argument(
        "--no-score-repeat",
        dest="score_repeat",
        action="store_false",
        help="score the answer only, not also the key's repeat inside the pass key line",
    )
    pkp.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer.json (default: byte)")
    _add_passkey_grid_args(pkp, [256, 1024, 4096, 16384, 65536], trials=8)
    _add_train_args(pkp, steps=1000, batch=32, lr=3e-3)
    _add_common(pkp)
    pkp.set_defaults(func=_synth_passkey, command_path="synth passkey")

    data = actions.add_parser(
        "passkey-data",
        help="write passkey-style training documents (JSONL) to mix into `mmrec train`",
        description="Documents in the passkey layout, answer included, of random length, depth and key. Mix them "
        "into training at short length: mmrec train --data passkey=FILE.jsonl:0.3",
    )
    data.add_argument("--out", required=True, help="JSONL file to write (its folder is created)")
    data.add_argument("--n", type=positive_int, default=2000, help="documents (default: 2000)")
    data.add_argument("--min-len", type=positive_int, default=512, help="shortest document, tokens (default: 512)")
    data.add_argument("--max-len", type=positive_int, default=4096, help="longest document, tokens (default: 4096)")
    data.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer.json; lengths count its tokens")
    data.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    data.set_defaults(func=_passkey_data, command_path="synth passkey-data")
    return synth


def _add_passkey_grid_args(p: argparse.ArgumentParser, lengths: list[int], trials: int) -> None:
    """The lengths x depths grid of passkey prompts and how each is read (`eval passkey`, `synth passkey`)."""
    p.add_argument(
        "--lengths",
        type=_int_at_least(64),
        nargs="+",
        default=lengths,
        help=f"prompt lengths in tokens (default: {' '.join(map(str, lengths))})",
    )
    p.add_argument(
        "--depths",
        type=_unit_float,
        nargs="+",
        default=[0.0, 0.25, 0.5, 0.75, 1.0],
        help="depths of the key, 0 = start, 1 = just before the question (default: 0 0.25 0.5 0.75 1)",
    )
    p.add_argument("--trials", type=positive_int, default=trials, help=f"random keys per cell (default: {trials})")
    p.add_argument("--window", type=positive_int, default=4096, help="tokens per forward call (default: 4096)")
    p.add_argument(
        "--max-memory-gb",
        type=_positive_float,
        default=8.0,
        help="lengths whose Transformer KV cache would exceed this are skipped (default: 8)",
    )
    p.add_argument(
        "--transformer-context",
        choices=tt.BEYOND_MODES,
        default="sliding",
        help="a Transformer past its trained length: sliding window of that length, full attention, or skip "
        "(default: sliding)",
    )
    p.add_argument("--vary-filler", action="store_true", help="shuffle the test filler's sentences (seeded by --seed)")
    p.add_argument(
        "--filler",
        default=None,
        metavar="FILE",
        help="a UTF-8 text file to use as filler instead of the five sentences, cycled from a place chosen by the "
        "seed (synth passkey: in training too)",
    )


def add_passkey_parser(eval_subparsers: Any) -> argparse.ArgumentParser:
    """Add ``passkey`` to the subparsers of ``mmrec eval``."""
    p = eval_subparsers.add_parser(
        "passkey",
        help="passkey retrieval: exact match and digit likelihood over lengths x depths",
        description="Hide a random 5-digit key at each depth of filler prompts of each length and ask for it. "
        "MM-Rec streams the prompt in windows with constant memory; a Transformer uses its KV cache "
        "within --max-memory-gb and a sliding window of its trained length beyond it.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint of `mmrec train` (step or run directory), or the --out folder of `mmrec synth passkey`",
    )
    _add_passkey_grid_args(p, [1024, 4096, 16384, 65536], trials=5)
    p.add_argument("--out", required=True, help="output folder (created)")
    _add_common(p)
    p.set_defaults(func=_passkey_eval, command_path="eval passkey")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run these commands without the main CLI: ``python -m mmrec.evals.synth_cli synth mqar ...``."""
    parser = argparse.ArgumentParser(prog="mmrec")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_synth_parser(sub)
    ev = sub.add_parser("eval", help="evaluations")
    ev_sub = ev.add_subparsers(dest="eval_command", metavar="EVAL")
    ev_sub.required = True
    add_passkey_parser(ev_sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
