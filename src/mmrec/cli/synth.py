"""``mmrec synth mqar | induction | selective-copy`` (and, from :mod:`mmrec.cli.passkey`, the passkey commands).

Each task trains a small model on fresh generated batches with
:func:`mmrec.train.tasks.train_task` (the optimiser, schedule and clipping of
``mmrec train``), evaluates it on held-out batches (:mod:`mmrec.evals.context`)
and writes results.json, results.md, figures, metrics.csv and the trained
model as a step directory (``mmrec.load(OUT)``).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from mmrec.cli.passkey import EVAL_PASSKEY, PASSKEY_DATA, SYNTH_PASSKEY
from mmrec.cli.tasks import (
    HELD_OUT_BATCHES,
    LongContextOptions,
    TaskOptions,
    accuracy_text,
    at_least,
    command,
    finite,
    held_out_evaluator,
    make_out,
    model_fields,
    plot_lines,
    plot_loss,
    setup,
)
from mmrec.config import ConfigError, _doc, _positive, _require
from mmrec.evals import synthetic as syn
from mmrec.evals.common import write_results
from mmrec.evals.context import MakeBatch, TaskEval, evaluate_task, state_floats
from mmrec.models.factory import build_model
from mmrec.train.tasks import LrSweep, TaskOutput, save_task_model, sweep_lr

__all__ = ["COMMANDS", "EVAL_PASSKEY"]

# Zoology's MQAR training set (Arora et al. 2023, zoology/experiments): (seq_len, kv_pairs, examples).
ZOOLOGY_MQAR_MIX = ((64, 4, 100_000), (128, 8, 20_000), (256, 16, 20_000), (256, 32, 20_000), (256, 64, 20_000))


def parse_mix(values: list[str]) -> list[tuple[int, int, float]]:
    """``--train-mix`` entries ``SEQ:KV`` or ``SEQ:KV:WEIGHT`` (weight 1); 'zoology' is Zoology's training set."""
    mix: list[tuple[int, int, float]] = []
    for text in values:
        if text == "zoology":
            mix.extend((t, kv, float(n)) for t, kv, n in ZOOLOGY_MQAR_MIX)
            continue
        parts = text.split(":")
        try:
            if len(parts) not in (2, 3):
                raise ValueError
            seq, kv = int(parts[0]), int(parts[1])
            weight = float(parts[2]) if len(parts) == 3 else 1.0
        except ValueError:
            raise ConfigError(f"train_mix: expected SEQ:KV or SEQ:KV:WEIGHT (e.g. 256:16:2), got {text!r}") from None
        if seq < 1 or kv < 1 or not 0 < weight < float("inf"):
            raise ConfigError(f"train_mix: need SEQ >= 1, KV >= 1 and a finite WEIGHT > 0, got {text!r}")
        mix.append((seq, kv, weight))
    return mix


def _dry_run(make_batch: MakeBatch, where: str = "") -> None:
    """Draw one sequence, so that bad task settings fail as options, before any model or folder exists."""
    try:
        make_batch(1, torch.Generator().manual_seed(0))
    except ValueError as e:
        raise ConfigError(f"{where}{e}") from None


def _start(opts: TaskOptions, task: str, train_len: int, summary: str) -> tuple[Any, torch.device]:
    """Seed, device, the model on it, the output folder and the first line: what every task does before training."""
    device = setup(opts)
    assert opts.model is not None
    model = build_model(opts.model).to(device)
    make_out(opts.out)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{task}: {model_fields(opts, model, device)['arch']}, {params:,} parameters; {summary} on {device}", flush=True
    )
    return model, device


def _output(opts: TaskOptions, task: str, trained_seq_len: int) -> TaskOutput:
    return TaskOutput(Path(opts.out), trained_seq_len, config=opts.settings(task))


# mmrec synth mqar ----------------------------------------------------------------------------------------------


@dataclass
class MqarOptions(TaskOptions):
    PRESET: ClassVar[dict[str, Any]] = {"d_model": 128, "n_layers": 2, "n_heads": 2}

    seq_len: int = _doc("Tokens per sequence.", default=512, group="task")
    kv_pairs: int = _doc("Key-value pairs.", default=64, group="task")
    vocab_size: int = _doc("Vocabulary of the task (and the model).", default=8192, group="task")
    power_a: float = _doc("Query placement power law, Zoology's.", default=0.01, group="task")
    layout: str = _doc(
        "zoology: Zoology's multiquery_ar (random tokens everywhere not a pair or a queried key, the value never "
        "shown after its query); legacy: this project's first layout (the value follows each queried key, blanks "
        "elsewhere), to reproduce results measured with it.",
        default="zoology",
        choices=tuple(syn.MQAR_LAYOUTS),
        group="task",
    )
    lrs: list[float] = _doc(
        "Sweep these learning rates instead of --lr: one model each, the same seed and steps; the one with the "
        "best accuracy on validation batches is chosen and scored on evaluation batches of another seed stream.",
        default_factory=list,
        group="training",
    )
    train_mix: list[str] = _doc(
        "SEQ:KV[:WEIGHT]: train on batches drawn from these settings by weight (one setting per batch) instead of "
        "the test setting; 'zoology' is Zoology's training set (64:4, 128:8, 256:16, 256:32, 256:64 weighted by "
        "their example counts). Evaluation stays at --seq-len/--kv-pairs.",
        default_factory=list,
        group="task",
    )
    eval_batches: int = _doc("Held-out batches.", default=8, group="task")
    steps: int = _doc("Training steps.", default=2000, group="training")
    mix: list[tuple[int, int, float]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, "seq_len", "kv_pairs", "eval_batches")
        _require(self.vocab_size >= 4, "vocab_size", f"must be >= 4, got {self.vocab_size}")
        finite(self.power_a, "power_a", 0.0, strict=True)
        _require(self.layout in syn.MQAR_LAYOUTS, "layout", f"must be one of {tuple(syn.MQAR_LAYOUTS)}")
        _require(len(set(self.lrs)) == len(self.lrs), "lrs", f"give distinct learning rates, got {self.lrs}")
        for lr in self.lrs:
            finite(lr, "lrs", 0.0, strict=True)
        _dry_run(self.test_batch)
        self.mix = parse_mix(self.train_mix)
        for seq, kv, _ in self.mix:
            _dry_run(functools.partial(self.mix_batch, seq, kv), f"train_mix {seq}:{kv}: ")
        self.model = self.resolve_model(self.vocab_size, self.longest)

    @property
    def longest(self) -> int:
        return max([self.seq_len, *(seq for seq, _, _ in self.mix)])

    def test_batch(self, b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mix_batch(self.seq_len, self.kv_pairs, b, g)

    def mix_batch(self, seq_len: int, kv_pairs: int, b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return syn.MQAR_LAYOUTS[self.layout](b, seq_len, kv_pairs, self.vocab_size, g, power_a=self.power_a)

    def train_batch(self, b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        # Each training batch is one setting of the mix, drawn by weight; evaluation stays on the test setting.
        if not self.mix:
            return self.test_batch(b, g)
        weights = torch.tensor([w for _, _, w in self.mix], dtype=torch.float64)
        seq, kv, _ = self.mix[int(torch.multinomial(weights, 1, generator=g))]
        return self.mix_batch(seq, kv, b, g)


def _sweep_mqar(opts: MqarOptions, device: torch.device) -> LrSweep:
    """One model per --lrs value, each in OUT/lr-<lr>/ (metrics.csv and its step directory)."""

    def build() -> torch.nn.Module:
        assert opts.model is not None
        return build_model(opts.model).to(device)

    def train(model: torch.nn.Module, lr: float, evaluate: Any) -> dict[str, Any]:
        run = dataclasses.replace(opts, lr=lr, lrs=[])
        output = TaskOutput(Path(opts.out) / f"lr-{lr:g}", opts.longest, config=run.settings("mqar"))
        print(f"learning rate {lr:g}:", flush=True)
        return run.train(model, opts.train_batch, device, evaluate, output)

    sweep = sweep_lr(opts.lrs, build, train, opts.test_batch, opts.eval_batches, opts.batch_size, device, opts.seed)
    if sweep.chosen is None:
        raise ValueError(
            f"every learning rate of --lrs {' '.join(f'{lr:g}' for lr in opts.lrs)} diverged; try smaller ones"
        )
    return sweep


def run_mqar(opts: MqarOptions) -> int:
    summary = (
        f"{opts.layout} layout, {opts.seq_len} tokens, {opts.kv_pairs} pairs, vocabulary {opts.vocab_size}; "
        f"{opts.steps} steps of {opts.batch_size}"
        + (f"; learning rate chosen from {', '.join(f'{lr:g}' for lr in opts.lrs)}" if opts.lrs else "")
    )
    model, device = _start(opts, "MQAR", opts.longest, summary)
    fields = model_fields(opts, model, device)
    sweep: LrSweep | None = None
    if opts.lrs:
        sweep = _sweep_mqar(opts, device)
        assert sweep.chosen is not None and sweep.chosen.trained is not None and sweep.evaluation is not None
        assert sweep.model is not None
        trained, evaluation, lr = sweep.chosen.trained, sweep.evaluation, sweep.chosen.lr
        # The chosen model in OUT too, so that mmrec.load(OUT) (and `mmrec eval --checkpoint OUT`) loads it.
        chosen = dataclasses.replace(opts, lr=lr, lrs=[])
        save_task_model(
            TaskOutput(Path(opts.out), opts.longest, config=chosen.settings("mqar")), sweep.model, trained["steps"]
        )
    else:
        # Fresh batches of the test setting from the evaluation stream: the accuracy train_task reports, kept whole.
        evaluate, held_out = held_out_evaluator(opts.test_batch, opts.eval_batches, opts.batch_size, device, opts.seed)
        trained = opts.train(model, opts.train_batch, device, evaluate, _output(opts, "mqar", opts.longest))
        evaluation, lr = held_out[-1], opts.lr
    accuracy = evaluation.accuracy  # None (null, "not evaluated") when nothing could be scored
    mix = opts.mix
    results = {
        "task": "mqar",
        **fields,
        "accuracy": accuracy,
        "state_floats": state_floats(model, opts.seq_len),
        "seq_len": opts.seq_len,
        "kv_pairs": opts.kv_pairs,
        "vocab_size": opts.vocab_size,
        "power_a": opts.power_a,
        "layout": opts.layout,
        "train_mix": [{"seq_len": t, "kv_pairs": kv, "weight": w} for t, kv, w in mix] or None,
        "steps": trained["steps"],
        "batch_size": opts.batch_size,
        "lr": lr,
        "seed_streams": {role: syn.stream_seed(opts.seed, role) for role in syn.STREAMS},
        "lr_sweep": None
        if sweep is None
        else [
            {
                "lr": run.lr,
                "validation_accuracy": None if run.validation is None else run.validation.accuracy,
                "validation_queries": None if run.validation is None else run.validation.total,
                "final_loss": run.final_loss,
                "note": run.note,
                "checkpoint": None if run.trained is None else str(run.trained["checkpoint"]),
            }
            for run in sweep.runs
        ],
        "train_seconds": round(trained["train_seconds"], 3),
        "seconds_per_step": round(trained["seconds_per_step"], 5),
        "eval_queries": evaluation.total,
        "chance": 2 / opts.vocab_size,
        "final_loss": sum(trained["history"][-10:]) / len(trained["history"][-10:]),
        "checkpoint": str(trained["checkpoint"]),
        "loss_history": trained["history"],
    }
    arch = fields["arch"]
    table = (
        f"# MQAR ({arch}, {opts.layout} layout)\n\n"
        "| arch | d_model | seq_len | kv_pairs | vocab | steps | lr | accuracy | state floats | params | train s |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        f"| {arch} | {fields['d_model']} | {opts.seq_len} | {opts.kv_pairs} | {opts.vocab_size} | {trained['steps']} | "
        f"{lr:g} | {accuracy_text(accuracy)} | {results['state_floats']:,} | {fields['params']:,} | "
        f"{trained['train_seconds']:.0f} |\n\n"
        f"Accuracy over {evaluation.total:,} held-out queries (chance {2 / opts.vocab_size:.4f}), drawn from the "
        "evaluation seed stream, which no training or validation batch came from.\n"
        + ("Trained on the mix " + ", ".join(f"{t}:{kv} (weight {w:g})" for t, kv, w in mix) + ".\n" if mix else "")
    )
    if sweep is not None:
        table += "\n| lr | validation accuracy | final training loss |\n|---:|---:|---:|\n" + "".join(
            f"| {run.lr:g} | {accuracy_text(None if run.validation is None else run.validation.accuracy)} | "
            + ("diverged" if run.final_loss is None else f"{run.final_loss:.4f}")
            + " |\n"
            for run in sweep.runs
        )
        table += f"\nChosen on validation batches: lr {lr:g}; its accuracy above is on the evaluation batches.\n"
    out = write_results(opts.out, results, table)
    plot_loss(out, trained["history"], f"MQAR training loss ({arch}, d={fields['d_model']}, T={opts.seq_len})")
    print(table)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'loss.png'} and {trained['checkpoint']}")
    return 0


# mmrec synth induction / selective-copy ------------------------------------------------------------------------


@dataclass
class LengthTaskOptions(TaskOptions, LongContextOptions):
    """A task trained at one length and tested at others, far longer."""

    TASK: ClassVar[str] = ""
    PRESET: ClassVar[dict[str, Any]] = {"d_model": 64, "n_layers": 2, "n_heads": 2}

    vocab_size: int = _doc("Vocabulary of the task (and the model).", default=16, group="task")
    train_len: int = _doc("Training length.", default=256, group="task")
    test_lens: list[int] = _doc(
        "Test lengths.", default_factory=lambda: [256, 1024, 4096, 16384, 65536], group="evaluation"
    )
    test_batches: int = _doc("Batches per test length.", default=4, group="evaluation")
    test_batch_size: int | None = _doc(
        "Sequences per test batch (default: --batch-size).", default=None, group="evaluation"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.vocab_size >= 4, "vocab_size", f"must be >= 4, got {self.vocab_size}")
        at_least([self.train_len], "train_len", 3)
        _require(bool(self.test_lens), "test_lens", "give at least one length")
        at_least(self.test_lens, "test_lens", 3)
        _positive(self, "test_batches")
        if self.test_batch_size is not None:
            _positive(self, "test_batch_size")
        self.check_long_context()
        for length in [self.train_len, *self.test_lens]:
            _dry_run(self.batches(length))
        self.model = self.resolve_model(self.vocab_size, self.train_len)

    def batches(self, length: int) -> MakeBatch:
        return lambda b, g: syn.induction_batch(b, length, self.vocab_size, g)

    def extra_results(self) -> dict[str, Any]:
        return {}


@dataclass
class InductionOptions(LengthTaskOptions):
    TASK: ClassVar[str] = "induction"


@dataclass
class SelectiveCopyOptions(LengthTaskOptions):
    TASK: ClassVar[str] = "selective-copy"

    n_tokens: int = _doc("Data tokens to copy.", default=16, group="task")

    def __post_init__(self) -> None:
        _positive(self, "n_tokens")
        super().__post_init__()

    def batches(self, length: int) -> MakeBatch:
        return lambda b, g: syn.selective_copy_batch(b, length, self.n_tokens, self.vocab_size, g)

    def extra_results(self) -> dict[str, Any]:
        return {"n_tokens": self.n_tokens}


def run_length_task(opts: LengthTaskOptions) -> int:
    task = opts.TASK
    summary = f"training {opts.steps} steps of {opts.batch_size} x {opts.train_len} tokens"
    model, device = _start(opts, task, opts.train_len, summary)
    fields = model_fields(opts, model, device)
    evaluate, held_out = held_out_evaluator(
        opts.batches(opts.train_len), HELD_OUT_BATCHES, opts.batch_size, device, opts.seed
    )
    trained = opts.train(model, opts.batches(opts.train_len), device, evaluate, _output(opts, task, opts.train_len))
    test_batch = opts.test_batch_size or opts.batch_size
    evals = []
    for length in opts.test_lens:
        ev = evaluate_task(
            model,
            opts.batches(length),
            opts.test_batches,
            test_batch,
            device,
            opts.stream_window,
            seed=syn.stream_seed(opts.seed, "evaluation"),
            max_memory_bytes=opts.max_memory_bytes,
            trained_len=opts.train_len,
            beyond=opts.transformer_context,
        )
        print(
            f"  {length:>8,} tokens: accuracy {accuracy_text(ev.accuracy)}  ({ev.note}; {ev.seconds:.1f}s)", flush=True
        )
        evals.append(ev)
    elem = next(model.parameters()).element_size()

    def held(ev: TaskEval) -> int:
        # Floats of state one stream held while reading (a sliding window holds less than the full
        # context would need); for a skipped length, what it would have needed.
        return state_floats(model, ev.seq_len) if ev.skipped else ev.memory_bytes // (test_batch * elem)

    per_length = {
        str(ev.seq_len): {
            **ev.to_dict(),
            "state_floats": held(ev),
            "full_context_state_floats": state_floats(model, ev.seq_len),
        }
        for ev in evals
    }
    results = {
        "task": task,
        **fields,
        "vocab_size": opts.vocab_size,
        "train_len": opts.train_len,
        "test_lens": opts.test_lens,
        "steps": trained["steps"],
        "batch_size": opts.batch_size,
        "lr": opts.lr,
        "stream_window": opts.stream_window,
        "transformer_context": opts.transformer_context,
        "train_seconds": round(trained["train_seconds"], 3),
        "train_accuracy": held_out[-1].accuracy,
        "accuracy": {k: v["accuracy"] for k, v in per_length.items()},
        "per_length": per_length,
        "checkpoint": str(trained["checkpoint"]),
        "loss_history": trained["history"],
        **opts.extra_results(),
    }
    arch = fields["arch"]
    chance = 1 / (opts.vocab_size - 2)
    lines = [
        f"# {task} ({arch}): trained at {opts.train_len} tokens, tested long",
        "",
        "| length | accuracy | state floats per stream | how it was read |",
        "|---:|---:|---:|---|",
    ]
    for ev in evals:
        lines.append(f"| {ev.seq_len:,} | {accuracy_text(ev.accuracy)} | {held(ev):,} | {ev.note} |")
    lines += [
        "",
        f"Held-out accuracy at the training length after training: {accuracy_text(held_out[-1].accuracy)}; "
        f"chance {chance:.3f}. A length not evaluated shows the state it would have needed.",
    ]
    table = "\n".join(lines) + "\n"
    out = write_results(opts.out, results, table)
    ran = [(float(ev.seq_len), ev.accuracy) for ev in evals if ev.accuracy is not None]  # none drawn as 0
    plot_lines(
        out / "accuracy.png",
        {arch: ([n for n, _ in ran], [a for _, a in ran])},
        "test length (tokens)",
        "accuracy",
        f"{task}: trained at {opts.train_len}, tested long ({arch})",
        True,
    )
    plot_loss(out, trained["history"], f"{task} training loss ({arch})")
    print(table)
    print(
        f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'accuracy.png'}, {out / 'loss.png'} and "
        f"{trained['checkpoint']}"
    )
    return 0


MQAR = command(
    "mqar",
    MqarOptions,
    run_mqar,
    help="multi-query associative recall (Zoology): train and report accuracy against state size",
    description="Train a small model on fresh MQAR batches and report held-out accuracy at the value positions, "
    "with the floats of state it needed. Model: width 128, 2 layers, 2 heads unless the flags say otherwise.",
)
INDUCTION = command(
    "induction",
    InductionOptions,
    run_length_task,
    help="induction heads (Mamba paper): recall the token after a trigger; trained short, tested long",
    description="Induction heads (Mamba paper): recall the token after a trigger; trained short, tested long. "
    "Model: width 64, 2 layers, 2 heads unless the flags say otherwise.",
)
SELECTIVE_COPY = command(
    "selective-copy",
    SelectiveCopyOptions,
    run_length_task,
    help="selective copying (Mamba paper): output scattered data tokens in order; trained short",
    description="Selective copying (Mamba paper): output scattered data tokens in order; trained short, tested "
    "long. Model: width 64, 2 layers, 2 heads unless the flags say otherwise.",
)

COMMANDS = [MQAR, INDUCTION, SELECTIVE_COPY, SYNTH_PASSKEY, PASSKEY_DATA]
