"""``mmrec synth passkey``, ``mmrec synth passkey-data`` and ``mmrec eval passkey``.

``synth passkey`` trains a small model on short passkey prompts scored at the
key (:func:`mmrec.train.tasks.train_task`), saves it as a step directory in
its output folder, then grades the lengths x depths grid of ``eval passkey``;
``mmrec eval passkey --checkpoint OUT`` and ``mmrec.load(OUT)`` read it back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from mmrec.cli.commands import CHECKPOINT_HELP, DEVICE_HELP
from mmrec.cli.tasks import (
    HELD_OUT_BATCHES,
    LongContextOptions,
    TaskOptions,
    accuracy_text,
    at_least,
    check_out_folder,
    command,
    held_out_evaluator,
    make_out,
    model_fields,
    plot_loss,
    setup,
)
from mmrec.config import ConfigError, _doc, _positive, _require
from mmrec.evals import passkey as pk
from mmrec.evals import passkey_report as pkr
from mmrec.evals.common import write_results
from mmrec.models.checkpoint import load
from mmrec.models.factory import build_model
from mmrec.tokenizer import load_tokenizer
from mmrec.train.tasks import TaskOutput

GRID_LISTS = ("lengths", "depths")
TOKENIZER_HELP = "'byte' or a tokenizer.json."


def _tokenizer(spec: str) -> Any:
    try:
        return load_tokenizer(spec)
    except ValueError as e:
        raise ConfigError(f"tokenizer: {e}") from None


def _check_filler(filler: str | None) -> None:
    _require(filler is None or Path(filler).is_file(), "filler", f"no such file {filler}")


@dataclass
class PasskeyGridOptions(LongContextOptions):
    """The lengths x depths grid of passkey prompts and how each is read (`eval passkey`, `synth passkey`)."""

    lengths: list[int] = _doc(
        "Prompt lengths in tokens.", default_factory=lambda: [1024, 4096, 16384, 65536], group="passkey grid"
    )
    depths: list[float] = _doc(
        "Depths of the key: 0 = start, 1 = just before the question.",
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
        group="passkey grid",
    )
    trials: int = _doc("Random keys per cell.", default=5, group="passkey grid")
    vary_filler: bool = _doc(
        "Shuffle the test filler's sentences (seeded by --seed).", default=False, group="passkey grid"
    )
    filler: str | None = _doc(
        "A UTF-8 text file to use as filler instead of the five sentences, cycled from a place chosen by the seed "
        "(synth passkey: in training too).",
        default=None,
        group="passkey grid",
    )

    def check_grid(self) -> None:
        _require(bool(self.lengths), "lengths", "give at least one length")
        at_least(self.lengths, "lengths", 64)
        _require(bool(self.depths), "depths", "give at least one depth")
        for d in self.depths:
            _require(0.0 <= d <= 1.0, "depths", f"must be between 0 and 1, got {d}")
        _positive(self, "trials")
        self.check_long_context()
        _check_filler(self.filler)

    def grade(
        self, model: torch.nn.Module, tokenizer: Any, device: torch.device, trained_len: int, seed: int, filler: Any
    ) -> dict[str, Any]:
        return pk.evaluate_passkey(
            model,
            tokenizer,
            self.lengths,
            self.depths,
            self.trials,
            device,
            self.max_memory_bytes,
            self.stream_window,
            trained_len=trained_len,
            beyond=self.transformer_context,
            seed=seed,  # the keys of `mmrec eval passkey --seed` with the same seed: it reproduces a synth grid
            filler_seed=seed if self.vary_filler or filler else None,
            filler_tokens=filler,
        )


# mmrec synth passkey -------------------------------------------------------------------------------------------


@dataclass
class SynthPasskeyOptions(TaskOptions, PasskeyGridOptions):
    PRESET: ClassVar[dict[str, Any]] = {"d_model": 128, "n_layers": 2, "n_heads": 2}

    train_len: list[int] = _doc(
        "Training prompt length, or MIN MAX: each batch draws one length uniformly.",
        default_factory=lambda: [128, 384],
        group="task",
    )
    score_repeat: bool = _doc(
        "Score the key's repeat inside the pass key line as well as the answer.", default=True, group="task"
    )
    tokenizer: str = _doc(TOKENIZER_HELP, default="byte", group="task")
    lengths: list[int] = _doc(
        "Prompt lengths in tokens.",
        default_factory=lambda: [256, 1024, 4096, 16384, 65536],
        group="passkey grid",
    )
    trials: int = _doc("Random keys per cell.", default=8, group="passkey grid")
    tok: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        TaskOptions.__post_init__(self)
        self.check_grid()
        _require(
            len(self.train_len) in (1, 2), "train_len", f"takes one length or MIN MAX, got {len(self.train_len)} values"
        )
        _require(self.lo <= self.hi, "train_len", f"{self.lo} {self.hi}: MIN must not exceed MAX")
        self.tok = _tokenizer(self.tokenizer)
        try:
            pk.passkey_batch(self.tok, 1, self.lo, torch.Generator().manual_seed(0))
            pk.check_prompt_lengths(self.tok, self.lengths)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.model = self.resolve_model(self.tok.vocab_size, self.hi)

    @property
    def lo(self) -> int:
        return self.train_len[0]

    @property
    def hi(self) -> int:
        return self.train_len[-1]


def run_synth_passkey(opts: SynthPasskeyOptions) -> int:
    device = setup(opts)
    tokenizer, lo, hi = opts.tok, opts.lo, opts.hi
    filler = pk.read_filler(tokenizer, opts.filler) if opts.filler else None
    span = f"{lo}" if lo == hi else f"{lo}-{hi}"

    def make_batch(b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        # One length per batch, uniform in [lo, hi]: every row of a batch is a prompt of the same length.
        length = lo if lo == hi else int(torch.randint(lo, hi + 1, (1,), generator=g))
        return pk.passkey_batch(tokenizer, b, length, g, score_repeat=opts.score_repeat, filler_tokens=filler)

    assert opts.model is not None
    model = build_model(opts.model).to(device)
    out = make_out(opts.out)
    fields = model_fields(opts, model, device)
    print(
        f"passkey: {fields['arch']}, {fields['params']:,} parameters; training {opts.steps} steps of "
        f"{opts.batch_size} prompts of {span} tokens on {device}, scored at the key only",
        flush=True,
    )
    # The model and tokenizer are saved as a step directory before the held-out evaluation and the grid, so a
    # long grid that is cut short loses no training; `mmrec eval passkey --checkpoint OUT` grades them again.
    # Held out: training prompts of other keys, depths and fillers (the evaluation stream of the seed).
    evaluate, held_out = held_out_evaluator(make_batch, HELD_OUT_BATCHES, opts.batch_size, device, opts.seed)
    trained = opts.train(model, make_batch, device, evaluate, TaskOutput(out, hi, tokenizer, opts.settings("passkey")))
    accuracy = held_out[-1].accuracy
    print(f"held-out accuracy at the key's tokens ({span}-token prompts): {accuracy_text(accuracy)}", flush=True)
    base = {
        "task": "passkey",
        **fields,
        "tokenizer": opts.tokenizer,
        "train_len": [lo, hi],
        "score_repeat": opts.score_repeat,
        "filler": opts.filler,
        "steps": trained["steps"],
        "batch_size": opts.batch_size,
        "lr": opts.lr,
        "train_seconds": round(trained["train_seconds"], 3),
        "train_accuracy": accuracy,
        "checkpoint": str(trained["checkpoint"]),
        "loss_history": trained["history"],
    }
    write_results(out, base, "Training finished; the passkey grid is still running or was interrupted.\n")
    grid = opts.grade(model, tokenizer, device, hi, opts.seed, filler)
    results = {**base, **{k: v for k, v in grid.items() if k != "arch"}}
    filler_name = opts.filler or "the five sentences, shuffled"
    table = pkr.passkey_table(results) + (
        f"\nTrained {trained['steps']} steps on prompts of {span} tokens (filler: {filler_name}), scored at the "
        f"key{' and its repeat in the needle' if opts.score_repeat else ''}; held-out accuracy at the scored tokens "
        f"{accuracy_text(accuracy)}.\n"
    )
    write_results(out, results, table)
    png = pkr.plot_passkey_heatmap(results, out / "heatmap.png")
    plot_loss(out, trained["history"], f"passkey training loss ({fields['arch']})")
    print(table)
    wrote = [out / "results.json", out / "results.md", *([png] if png else []), trained["checkpoint"]]
    print("wrote " + ", ".join(map(str, wrote)))
    return 0


# mmrec synth passkey-data --------------------------------------------------------------------------------------


@dataclass
class PasskeyDataOptions:
    out: str = _doc("JSONL file to write (its folder is created).", default="")
    n: int = _doc("Documents.", default=2000)
    min_len: int = _doc("Shortest document, tokens.", default=512)
    max_len: int = _doc("Longest document, tokens.", default=4096)
    tokenizer: str = _doc(TOKENIZER_HELP + " Lengths count its tokens.", default="byte")
    seed: int = _doc("Seed.", default=0)
    tok: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        _require(bool(self.out), "out", "give the .jsonl file to write")
        _require(not Path(self.out).is_dir(), "out", f"{self.out} is a folder; give the .jsonl file to write")
        _positive(self, "n", "min_len", "max_len")
        _require(self.min_len <= self.max_len, "min_len", f"{self.min_len} must not exceed max_len {self.max_len}")
        self.tok = _tokenizer(self.tokenizer)
        shortest = pk.min_prompt_tokens(self.tok)
        _require(
            self.min_len >= shortest,
            "min_len",
            f"{self.min_len} is too short: the pass key line and question alone take ~{shortest} tokens",
        )


def run_passkey_data(opts: PasskeyDataOptions) -> int:
    t0 = time.perf_counter()
    docs = pk.passkey_documents(opts.tok, opts.n, opts.min_len, opts.max_len, opts.seed)
    count = pk.write_passkey_documents(opts.out, docs)
    print(
        f"wrote {count:,} passkey documents of {opts.min_len}-{opts.max_len} tokens to {opts.out} "
        f"in {time.perf_counter() - t0:.1f}s; mix them into training with "
        f"`mmrec train --data passkey={opts.out}:0.3 ...`"
    )
    return 0


# mmrec eval passkey --------------------------------------------------------------------------------------------


@dataclass
class EvalPasskeyOptions(PasskeyGridOptions):
    checkpoint: str = _doc(CHECKPOINT_HELP.rstrip(".") + "; of `mmrec synth passkey`, its --out folder.", default="")
    out: str = _doc("Folder for results.json, results.md and the heatmap (created).", default="")
    seed: int = _doc("Seed of the keys (and of the filler's order).", default=0, group="execution")
    device: str = _doc(DEVICE_HELP, default="auto", group="execution")
    threads: int | None = _doc("CPU threads for PyTorch (default: all cores).", default=None, group="execution")

    def __post_init__(self) -> None:
        _require(bool(self.checkpoint), "checkpoint", "give a run or step directory")
        check_out_folder(self.out)
        self.check_grid()
        if self.threads is not None:
            _positive(self, "threads")


def run_eval_passkey(opts: EvalPasskeyOptions) -> int:
    device = setup(opts)
    loaded = load(opts.checkpoint, device)
    model, tokenizer, trained_len = loaded.model, loaded.tokenizer, loaded.trained_seq_len
    print(f"passkey: {loaded.arch} from {loaded.path} (step {loaded.step}, trained on {trained_len})")
    # Checked before the output folder exists: the shortest prompt depends on the checkpoint's tokenizer.
    pk.check_prompt_lengths(tokenizer, opts.lengths)
    filler = pk.read_filler(tokenizer, opts.filler) if opts.filler else None
    make_out(opts.out)
    results = opts.grade(model, tokenizer, device, trained_len, opts.seed, filler)
    results.update({"checkpoint": str(loaded.path), "step": loaded.step, "device": str(device), "filler": opts.filler})
    table = pkr.passkey_table(results)
    out = write_results(opts.out, results, table)
    png = pkr.plot_passkey_heatmap(results, out / "heatmap.png")
    print(table)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}" + (f" and {png}" if png else ""))
    return 0


SYNTH_PASSKEY = command(
    "passkey",
    SynthPasskeyOptions,
    run_synth_passkey,
    help="passkey retrieval: train on short prompts scored at the key, then grade lengths x depths",
    description="Train a small model on passkey prompts of --train-len tokens (random key, depth and filler "
    "order; the loss is taken at the key only), then grade exact match and digit likelihood on the "
    "lengths x depths grid of `mmrec eval passkey`. The model is saved (a step directory in --out) before the "
    "grid: `mmrec eval passkey --checkpoint OUT` grades it again at other lengths, `mmrec.load(OUT)` loads it. "
    "Model: width 128, 2 layers, 2 heads unless the flags say otherwise.",
)
PASSKEY_DATA = command(
    "passkey-data",
    PasskeyDataOptions,
    run_passkey_data,
    help="write passkey-style training documents (JSONL) to mix into `mmrec train`",
    description="Documents in the passkey layout, answer included, of random length, depth and key. Mix them "
    "into training at short length: mmrec train --data passkey=FILE.jsonl:0.3",
    with_model=False,
)
EVAL_PASSKEY = command(
    "passkey",
    EvalPasskeyOptions,
    run_eval_passkey,
    help="passkey retrieval: exact match and digit likelihood over lengths x depths",
    description="Hide a random 5-digit key at each depth of filler prompts of each length and ask for it. "
    "MM-Rec streams the prompt in windows with constant memory; a Transformer uses its KV cache within "
    "--max-memory-gb and a sliding window of its trained length beyond it.",
    with_model=False,
    required=("checkpoint", "out"),
)
