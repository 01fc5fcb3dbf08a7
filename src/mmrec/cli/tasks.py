"""What the ``mmrec synth`` commands share: the training options, the model options, and their output.

Every task's options inherit :class:`TaskOptions` (seed, device, threads,
steps, batch size, learning rate, logging, time budget, output folder, the
architecture); the model options are those of ``mmrec train``, generated from
``MMRecConfig`` and ``TransformerConfig``. A task's own model size (width 128
for MQAR, ...) is a preset passed to ``resolve_model_config`` as if given, so
a flag overrides it and no model default is declared twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from mmrec.cli.command import Command
from mmrec.cli.commands import DEVICE_HELP, add_model_options, model_values
from mmrec.config import ConfigError, ModelConfig, _doc, _positive, _require
from mmrec.evals.context import BEYOND_MODES, MakeBatch, TaskEval, evaluate_task
from mmrec.evals.synthetic import stream_seed
from mmrec.models.factory import label, resolve_model_config
from mmrec.train.config import TrainConfig
from mmrec.train.tasks import TASK_BETAS, TaskOutput, train_task
from mmrec.utils.device import resolve_device
from mmrec.utils.options import build, field_names, given

GIB = 2**30
# Added to --seed for every held-out evaluation: its batches come from another generator stream than training's,
# so no evaluation batch is a training batch (tests/test_synthetic.py checks it batch by batch).
HELD_OUT_BATCHES = 8  # held-out batches at the training length after training (train_task's own default)
OUT_HELP = "Output folder (created): results.json, results.md, figures, metrics.csv and the trained model (step-N/)."


def same_as(cls: type, name: str) -> Any:
    """The field ``name`` of dataclass ``cls`` (its default and doc), for an option that means the same here."""
    (f,) = (f for f in dataclasses.fields(cls) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return field(default_factory=f.default_factory, metadata=f.metadata)
    return field(default=f.default, metadata=f.metadata)


def check_out_folder(out: str, name: str = "out") -> None:
    _require(bool(out), name, "give the output folder")
    _require(not Path(out).is_file(), name, f"{out} is a file; give a folder")


def finite(value: Any, name: str, minimum: float, strict: bool) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum)
    _require(ok, name, f"must be a finite number {'>' if strict else '>='} {minimum:g}, got {value!r}")


def at_least(values: Iterable[int], name: str, minimum: int) -> None:
    for v in values:
        _require(v >= minimum, name, f"must be >= {minimum}, got {v}")


@dataclass
class LongContextOptions:
    """How a model reads sequences far beyond its training length (`synth induction`, passkey grids)."""

    stream_window: int = _doc(
        "Tokens per forward call; MM-Rec carries its state between calls (memory, not results).",
        default=4096,
        group="long-context evaluation",
    )
    max_memory_gb: float = _doc(
        "A length whose Transformer KV cache would exceed this is skipped.",
        default=8.0,
        group="long-context evaluation",
    )
    transformer_context: str = _doc(
        "A Transformer past its trained length: a sliding window of that length, full attention, or skip.",
        default="sliding",
        choices=BEYOND_MODES,
        group="long-context evaluation",
    )

    def check_long_context(self) -> None:
        _positive(self, "stream_window")
        finite(self.max_memory_gb, "max_memory_gb", 0.0, strict=True)
        _require(
            self.transformer_context in BEYOND_MODES,
            "transformer_context",
            f"must be one of {', '.join(BEYOND_MODES)}, got {self.transformer_context!r}",
        )

    @property
    def max_memory_bytes(self) -> int:
        return int(self.max_memory_gb * GIB)


@dataclass
class TaskOptions:
    """What every synthetic task takes: training, execution and the model."""

    # A task's own model size, used unless the flag is given (e.g. {"d_model": 128}).
    PRESET: ClassVar[dict[str, Any]] = {}

    out: str = _doc(OUT_HELP, default="")
    arch: str = same_as(TrainConfig, "arch")
    match_params: bool = same_as(TrainConfig, "match_params")
    write_l1: float = same_as(TrainConfig, "write_l1")
    write_l1_warmup: int = same_as(TrainConfig, "write_l1_warmup")
    steps: int = _doc("Training steps.", default=1000, group="training")
    batch_size: int = _doc("Sequences per step.", default=32, group="training")
    lr: float = _doc(
        "Peak learning rate (AdamW, betas 0.9/0.98; warm-up, then cosine decay to a tenth).",
        default=3e-3,
        group="training",
    )
    log_every: int = _doc("Print a line and write a row of metrics.csv every N steps.", default=50, group="training")
    max_minutes: float | None = _doc(
        "Time budget: lower --steps so training (schedule included) fits it, from the step time after 30 steps "
        "and again at every --log-every. With --lrs it is the budget of each learning rate's run.",
        default=None,
        group="training",
    )
    seed: int = _doc("Seed of the model, the data and the keys.", default=0, group="execution")
    device: str = _doc(DEVICE_HELP, default="auto", group="execution")
    threads: int | None = _doc("CPU threads for PyTorch (default: all cores).", default=None, group="execution")
    # The model options given on the command line (no flag of their own), and the config they resolve to.
    model_values: dict[str, Any] = field(default_factory=dict)
    model: ModelConfig | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_out_folder(self.out)
        _positive(self, "steps", "batch_size", "log_every")
        if self.threads is not None:
            _positive(self, "threads")
        finite(self.lr, "lr", 0.0, strict=True)
        if self.max_minutes is not None:
            finite(self.max_minutes, "max_minutes", 0.0, strict=True)
        finite(self.write_l1, "write_l1", 0.0, strict=False)
        _require(self.write_l1_warmup >= 0, "write_l1_warmup", f"must be >= 0, got {self.write_l1_warmup}")
        try:  # the seed must keep its training, validation and evaluation streams apart
            stream_seed(self.seed, "evaluation")
        except ValueError as e:
            raise ConfigError(f"seed: {e}") from None

    def resolve_model(self, vocab_size: int, train_len: int) -> ModelConfig:
        """The model config: the task's preset < the model flags given; checked here, before anything is made.

        ``train_len`` is the longest training sequence: the gpt preset's position
        table, and four times the mistral preset's default window.
        """
        values = {**self.PRESET, **self.model_values}
        if values.get("sparse_write") and "selective_write" not in self.model_values:
            values["selective_write"] = True  # --sparse-write implies --selective-write
        try:
            config = resolve_model_config(
                self.arch,
                values,
                vocab_size=vocab_size,
                match_params=self.match_params,
                train_len=train_len,
                window_default=max(1, train_len // 4),
            )
        except ConfigError:
            raise
        except ValueError as e:  # a baseline that cannot be sized to MM-Rec's parameter count
            raise ConfigError(f"match_params: {e}; or add --no-match-params") from None
        if self.write_l1 > 0 and not getattr(config, "sparse_write", False):
            raise ConfigError(
                f"write_l1: {self.write_l1:g} penalises MM-Rec's sparse-write gates, so it needs --arch mmrec "
                "and --sparse-write"
            )
        return config

    @property
    def max_seconds(self) -> float | None:
        return None if self.max_minutes is None else self.max_minutes * 60

    def settings(self, task: str) -> dict[str, Any]:
        """The options as saved in meta.json (the model config is saved beside them)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        return {"task": task, **values}

    def train(
        self,
        model: torch.nn.Module,
        make_batch: MakeBatch,
        device: torch.device,
        evaluate: Callable[[torch.nn.Module], float],
        output: TaskOutput,
    ) -> dict[str, Any]:
        """Train ``model`` on ``make_batch`` with these options, through the one task loop (train/tasks.py)."""
        return train_task(
            model,
            make_batch,
            self.steps,
            self.batch_size,
            self.lr,
            device,
            self.log_every,
            self.seed,
            evaluate,
            betas=TASK_BETAS,
            max_seconds=self.max_seconds,
            write_l1=self.write_l1,
            write_l1_warmup=self.write_l1_warmup,
            output=output,
        )


def accuracy_text(value: float | None, digits: int = 3) -> str:
    """An accuracy for a table; a result that does not exist is "not evaluated", never 0."""
    return "not evaluated" if value is None else f"{value:.{digits}f}"


def held_out_evaluator(
    make_batch: Any, n_batches: int, batch_size: int, device: torch.device, seed: int, **kwargs: Any
) -> tuple[Callable[[torch.nn.Module], float], list[TaskEval]]:
    """``eval_fn`` for ``train_task`` on batches of the evaluation stream of ``seed``
    (:func:`mmrec.evals.synthetic.stream_seed`: never a training or validation batch), and the list it fills.

    The list keeps every evaluation whole, so a result that could not be measured stays None (null in
    results.json); ``train_task`` itself only receives a number (nan for none).
    """
    done: list[TaskEval] = []
    evaluation_seed = stream_seed(seed, "evaluation")

    def evaluate(model: torch.nn.Module) -> float:
        ev = evaluate_task(model, make_batch, n_batches, batch_size, device, seed=evaluation_seed, **kwargs)
        done.append(ev)
        return math.nan if ev.accuracy is None else ev.accuracy

    return evaluate, done


# Command-line construction ------------------------------------------------------------------------------------

# Model lengths a task sets from its training lengths, as its --help says.
TASK_MODEL_DEFAULTS = {
    "max_seq_len": "the longest training sequence (gpt's position table)",
    "window": "a quarter of the longest training sequence (mistral)",
}


def command(
    name: str,
    options: type,
    run: Callable[[Any], int],
    help: str,
    description: str = "",
    *,
    with_model: bool = True,
    required: tuple[str, ...] = ("out",),
) -> Command:
    """A synth command: options from ``options``, model options from the model configs."""

    def extend(parser: argparse.ArgumentParser) -> None:
        if with_model:
            preset = getattr(options, "PRESET", {})
            add_model_options(parser, {**TASK_MODEL_DEFAULTS, **{k: f"{v} for this task" for k, v in preset.items()}})

    def parse(args: argparse.Namespace) -> Any:
        names = [n for n in field_names(options) if n not in ("model", "model_values")]
        values = given(args, names)
        if with_model:
            # A task's own option of a model field's name (--vocab-size of MQAR) is the task's, not a model flag.
            values["model_values"] = {k: v for k, v in model_values(args).items() if k not in names}
        return build(options, values)

    def guarded(opts: Any) -> int:
        try:
            return run(opts)
        except FloatingPointError as e:  # a loss that became NaN: a message for people, exit code 1
            raise ValueError(str(e)) from e

    return Command(name, options, guarded, help, description, required=required, extend=extend, parse=parse)


# Running --------------------------------------------------------------------------------------------------------


def setup(opts: Any) -> torch.device:
    """What every task does first: threads, seed, device."""
    if getattr(opts, "threads", None):
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    return resolve_device(opts.device)


def make_out(out: str) -> Path:
    """The output folder, created once the inputs are known to be good (so a typo leaves nothing behind)."""
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_fields(opts: TaskOptions, model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
    """What results.json says about the model of a task run."""
    config: Any = opts.model
    return {
        "arch": label(config),
        "d_model": config.d_model,
        "n_layers": config.n_layers,
        "n_heads": config.n_heads,
        "params": sum(p.numel() for p in model.parameters()),
        "model_config": config.to_dict(),
        "match_params": opts.match_params,
        "device": str(device),
        "seed": opts.seed,
        "write_l1": opts.write_l1,
        "write_l1_warmup": opts.write_l1_warmup,
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
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, "o-" if len(xs) < 30 else "-", lw=1.2, ms=4, label=name)
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


def plot_loss(out: Path, history: list[float], title: str) -> Path | None:
    steps = [float(s) for s in range(1, len(history) + 1)]
    return plot_lines(out / "loss.png", {"train": (steps, history)}, "step", "loss (nats)", title, False)
