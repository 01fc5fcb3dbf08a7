"""The options of ``train``, ``data``, ``tokenizer``, ``eval bpb``, ``eval recall``, ``compare``, ``generate``,
``stages``, ``demo``.

Each options dataclass declares its flags once (help, default, allowed values);
each run function makes one call into the layer that does the work.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmrec.cli.command import Command
from mmrec.compare import MODELS, PRESETS, CompareOptions, run_compare
from mmrec.config import MMRecConfig, TransformerConfig, _doc, _positive, _require
from mmrec.demo import DemoOptions, run_demo
from mmrec.models.factory import MMREC_FIELDS, MODEL_FIELDS, SHARED_FIELDS, TRANSFORMER_FIELDS
from mmrec.train.config import TrainConfig
from mmrec.utils.errors import ConfigError
from mmrec.utils.options import add_options, given, load_config_file

DEVICE_HELP = "auto (CUDA when available), cpu, cuda or cuda:N."
CHECKPOINT_HELP = "A run directory (its newest checkpoint) or a step-NNNNNN directory of any mmrec command."
STREAM_WINDOW_HELP = "Tokens per forward call when streaming a long text through a model (memory, not results)."


# Model options: the fields of MMRecConfig and TransformerConfig, for every command that builds a model ----------


def add_model_options(parser: argparse.ArgumentParser, defaults: dict[str, str] | None = None) -> None:
    """``--d-model``, ``--chunk-size``, ``--preset``, ... from the two model configs, in three help groups.

    ``defaults`` replaces the default shown in the help (a command's own preset sizes)."""
    skip = ("vocab_size",)  # always the tokenizer's
    shown = {"norm_eps": "1e-06 for mmrec, 1e-05 for transformer", **(defaults or {})}
    add_options(
        parser,
        MMRecConfig,
        only=[n for n in SHARED_FIELDS if n not in skip],
        group="model (both architectures)",
        defaults=shown,
    )
    add_options(
        parser,
        MMRecConfig,
        only=[n for n in MMREC_FIELDS if n not in SHARED_FIELDS],
        group="model: MM-Rec",
        defaults=shown,
    )
    add_options(
        parser,
        TransformerConfig,
        only=[n for n in TRANSFORMER_FIELDS if n not in SHARED_FIELDS],
        group="model: Transformer (--arch transformer)",
        defaults=shown,
    )


def model_values(args: argparse.Namespace) -> dict[str, Any]:
    """The model options given on the command line."""
    return given(args, MODEL_FIELDS)


# mmrec train ---------------------------------------------------------------------------------------------------


def _train_extend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML or JSON file of options (flags override it)")
    add_model_options(parser)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Dataclass defaults < --config FILE < flags; model options may be flat or under ``model:`` in the file."""
    values = load_config_file(args.config) if args.config else {}
    names = [n for n in TrainConfig.__dataclass_fields__ if n != "model"]
    values.update(given(args, names))
    if isinstance(values.get("model"), dict):
        values["model"] = {**values["model"], **model_values(args)}
    else:
        values.update(model_values(args))
    return TrainConfig.from_flat(values)


def _train(cfg: TrainConfig) -> int:
    from mmrec.train.trainer import main_entry

    return main_entry(cfg)


TRAIN = Command(
    "train",
    TrainConfig,
    _train,
    help="train MM-Rec or a Transformer baseline (default: MM-Rec on the built-in corpus)",
    description="Train by next-token prediction. Options come from --config (YAML or JSON) and are overridden by "
    "flags; the merged config is saved as config.json in the run directory. Model options are the fields of "
    "MMRecConfig and TransformerConfig.",
    shown_defaults={"carry_state": "on for mmrec, off for transformer", "carry_windows": "8 with selective_write"},
    skip=("model",),
    extend=_train_extend,
    parse=train_config_from_args,
)


# mmrec data prepare / mmrec tokenizer train ---------------------------------------------------------------------


@dataclass
class PrepareOptions:
    out: str = _doc("Output folder for the shards and manifest.", default="")
    data: list[str] = _doc("Source (repeatable); default: the built-in corpus.", default_factory=list)
    tokenizer: str = _doc("'byte' or a tokenizer.json.", default="byte")
    text_field: str = _doc("Text field of JSONL / Parquet / HF sources.", default="text")
    val_fraction: float = _doc("Share of documents held out for validation.", default=0.02)

    def __post_init__(self) -> None:
        _require(0 < self.val_fraction < 1, "val_fraction", f"must be between 0 and 1, got {self.val_fraction}")


def _prepare(opts: PrepareOptions) -> int:
    from mmrec.data.cache import source_specs
    from mmrec.data.prepare import prepare_dataset
    from mmrec.tokenizer import load_tokenizer

    specs = source_specs(opts.data, opts.text_field)
    tok = load_tokenizer(opts.tokenizer)
    manifest = prepare_dataset(specs, tok, opts.out, val_fraction=opts.val_fraction)
    total_bytes = sum(s["train"]["n_bytes"] + s["val"]["n_bytes"] for s in manifest["sources"].values())
    seconds = max(manifest["prepare_seconds"], 1e-9)
    print(
        f"prepared {len(specs)} source(s) into {opts.out}: {total_bytes / 1e6:,.1f} MB of text in "
        f"{seconds:.1f}s ({total_bytes / 1e6 / seconds:,.1f} MB/s)"
    )
    for name, src in manifest["sources"].items():
        train, val = src["train"], src["val"]
        print(
            f"  {name}: train {train['n_docs']:,} docs / {train['n_tokens']:,} tokens, "
            f"val {val['n_docs']:,} docs / {val['n_tokens']:,} tokens; skipped: {src.get('skipped', {})}"
        )
    return 0


PREPARE = Command(
    "prepare",
    PrepareOptions,
    _prepare,
    help="tokenize sources once into memory-mapped shards with a manifest",
    required=("out",),
)


@dataclass
class TokenizerTrainOptions:
    out: str = _doc("tokenizer.json to write.", default="")
    data: list[str] = _doc("Source (repeatable); default: the built-in corpus.", default_factory=list)
    vocab_size: int = _doc("Vocabulary size.", default=8192)
    min_frequency: int = _doc("Minimum pair frequency.", default=2)
    max_bytes: int = _doc("Stop reading after this many bytes (0: all).", default=0)
    text_field: str = _doc("Text field of JSONL / Parquet / HF sources.", default="text")

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "min_frequency")
        _require(self.max_bytes >= 0, "max_bytes", f"must be >= 0, got {self.max_bytes}")


def _tokenizer_train(opts: TokenizerTrainOptions) -> int:
    from mmrec.data.cache import source_specs
    from mmrec.data.sources import SkipStats, iter_documents
    from mmrec.tokenizer import train_bpe

    specs = source_specs(opts.data, opts.text_field)
    stats = SkipStats()

    def texts() -> Any:
        seen = 0
        for spec in specs:
            for _, text in iter_documents(spec, stats):
                yield text
                seen += len(text.encode("utf-8", "surrogatepass"))
                if opts.max_bytes and seen >= opts.max_bytes:
                    return

    tok = train_bpe(texts(), vocab_size=opts.vocab_size, min_frequency=opts.min_frequency)
    tok.save(opts.out)
    print(
        f"trained a byte-level BPE tokenizer of {tok.vocab_size:,} tokens on {stats.documents:,} documents; "
        f"saved {opts.out} (id {tok.id})"
    )
    return 0


TOKENIZER_TRAIN = Command(
    "train",
    TokenizerTrainOptions,
    _tokenizer_train,
    help="train a byte-level BPE tokenizer locally (Hugging Face tokenizers)",
    required=("out",),
)


# mmrec eval bpb ------------------------------------------------------------------------------------------------


@dataclass
class ScoringOptions:
    """What the evaluations that score documents share (`eval bpb`, `eval recall`)."""

    out: str = _doc("Folder for results.json, results.md and the figure.", default="")
    data: list[str] = _doc(
        "Text files / folders to score (default: the validation split of the run's data).", default_factory=list
    )
    cut: int | None = _doc("Tokens of context in the cut condition.", default=None)
    stream_window: int = _doc(STREAM_WINDOW_HELP, default=4096)
    max_docs: int | None = _doc("Score at most this many documents.", default=None)
    max_tokens: int | None = _doc("Truncate documents to this many tokens.", default=None)
    device: str = _doc(DEVICE_HELP, default="auto")

    def __post_init__(self) -> None:
        _positive(self, "stream_window")
        _require(self.cut is None or self.cut >= 2, "cut", f"must be >= 2 tokens, got {self.cut}")
        _require(self.max_docs is None or self.max_docs >= 1, "max_docs", f"must be >= 1, got {self.max_docs}")
        _require(self.max_tokens is None or self.max_tokens >= 2, "max_tokens", f"must be >= 2, got {self.max_tokens}")


@dataclass
class BpbOptions(ScoringOptions):
    checkpoint: str = _doc(CHECKPOINT_HELP, default="")
    cut: int | None = _doc("Tokens of context in the cut condition (default: min(2048, trained length)).", default=None)


def _eval_bpb(opts: BpbOptions) -> int:
    from mmrec.evals.bpb import run

    run(
        opts.checkpoint,
        opts.data,
        opts.out,
        cut=opts.cut,
        window=opts.stream_window,
        max_docs=opts.max_docs,
        max_tokens=opts.max_tokens,
        device=opts.device,
    )
    return 0


EVAL_BPB = Command(
    "bpb",
    BpbOptions,
    _eval_bpb,
    help="bits per byte by position bucket, full context vs context cut to 2K",
    description="Score documents with full context (MM-Rec streams them through its state; a Transformer uses a "
    "sliding window beyond its trained length) and with the context cut to --cut tokens; report bits per byte "
    "per position bucket.",
    required=("checkpoint", "out"),
)


# mmrec eval recall ---------------------------------------------------------------------------------------------


@dataclass
class RecallOptions(ScoringOptions):
    checkpoint: list[str] = _doc(CHECKPOINT_HELP + " Several: the models side by side.", default_factory=list)
    cut: int | None = _doc(
        "Tokens of context in the cut condition (default: each model's trained window; give one value to compare "
        "models at the same cut).",
        default=None,
    )
    min_span: int = _doc("A repeat is a span of at least this many bytes seen earlier in the document.", default=16)

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(bool(self.checkpoint), "checkpoint", "name at least one run or step directory")
        _positive(self, "min_span")


def _eval_recall(opts: RecallOptions) -> int:
    from mmrec.evals.recall import run

    run(
        opts.checkpoint,
        opts.data,
        opts.out,
        cut=opts.cut,
        min_span=opts.min_span,
        window=opts.stream_window,
        max_docs=opts.max_docs,
        max_tokens=opts.max_tokens,
        device=opts.device,
    )
    return 0


EVAL_RECALL = Command(
    "recall",
    RecallOptions,
    _eval_recall,
    help="bits per byte on repeated spans by distance: the fraction of repeat bits that context saves",
    description="Find the spans of at least --min-span bytes that occurred earlier in the same document and score "
    "their tokens (from each span's second on) with full context and with context cut to --cut tokens, by "
    "distance back to the previous occurrence (<1K, 1K-4K, 4K-16K, 16K-64K, 64K+); non-repeated tokens are the "
    "control. Several --checkpoint values put the models side by side.",
    required=("checkpoint", "out"),
)


# mmrec compare -------------------------------------------------------------------------------------------------


COMPARE_MODELS = tuple(m[0] for m in MODELS)


@dataclass
class CompareFlags:
    out: str = _doc("Output folder (one run directory per model inside).", default="")
    preset: str = _doc(
        "Budget: " + "; ".join(f"{k}: {p.description}" for k, p in PRESETS.items()) + ".",
        default="micro",
        choices=tuple(PRESETS),
    )
    data: list[str] = _doc("Training text as for mmrec train (default: the built-in corpus).", default_factory=list)
    models: list[str] = _doc(
        f"Model to compare (repeatable; default: all of {', '.join(COMPARE_MODELS)}).",
        default_factory=lambda: list(COMPARE_MODELS),
    )
    seed: int = _doc("Seed shared by every model.", default=0)
    device: str = _doc(DEVICE_HELP, default="auto")
    max_steps: int | None = _doc("Override the preset's training steps.", default=None)
    data_cache: str | None = _doc("Folder for prepared token shards.", default=None)

    def __post_init__(self) -> None:
        unknown = [m for m in self.models if m not in COMPARE_MODELS]
        if unknown:
            raise ConfigError(f"models: unknown {', '.join(unknown)}; choose from {', '.join(COMPARE_MODELS)}")
        if self.max_steps is not None:
            _positive(self, "max_steps")


def _compare(opts: CompareFlags) -> int:

    report = run_compare(
        CompareOptions(
            out=opts.out,
            preset=opts.preset,
            data=opts.data,
            seed=opts.seed,
            device=opts.device,
            models=opts.models,
            data_cache=opts.data_cache,
            overrides={} if opts.max_steps is None else {"max_steps": opts.max_steps},
        )
    )
    print(f"report: {report}")
    return 0


# mmrec generate ------------------------------------------------------------------------------------------------


@dataclass
class GenerateOptions:
    checkpoint: str = _doc(CHECKPOINT_HELP, default="")
    prompt: str | None = _doc("Text to continue; '-' reads it from standard input.", default=None)
    prompt_file: str | None = _doc("File (UTF-8) whose text to continue; '-' is standard input.", default=None)
    max_new_tokens: int = _doc("Tokens to generate.", default=200)
    temperature: float = _doc("Sampling temperature; 0 is greedy.", default=0.8)
    top_k: int | None = _doc("Sample from the k most likely tokens (0 or none: all).", default=50)
    top_p: float | None = _doc("Nucleus sampling mass (none: off).", default=None)
    seed: int = _doc("Sampling seed.", default=0)
    device: str = _doc(DEVICE_HELP, default="auto")
    state_in: str | None = _doc("Continue the session saved in this state file.", default=None)
    state_out: str | None = _doc("Save the state after this call (safetensors).", default=None)
    compile: bool = _doc(
        "Decode through torch.compile (MM-Rec only; needs a C++ compiler on the CPU): pays off for long "
        "generations, the first token waits for the compiler (10-60 s).",
        default=False,
    )

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.prompt_file is None):
            raise ConfigError("prompt: give exactly one of --prompt TEXT (or -) and --prompt-file FILE (or -)")
        _require(self.max_new_tokens >= 0, "max_new_tokens", f"must be >= 0, got {self.max_new_tokens}")
        _require(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        _require(self.top_k is None or self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        _require(self.top_p is None or 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")

    def read_prompt(self) -> str:
        if self.prompt is not None and self.prompt != "-":
            return self.prompt
        source = self.prompt_file if self.prompt_file is not None else "-"
        if source == "-":
            return sys.stdin.read()
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"prompt_file: no such file {path}")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"prompt_file: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _generate(opts: GenerateOptions) -> int:
    from mmrec.generate import run_generate

    run_generate(
        opts.checkpoint,
        opts.read_prompt(),
        opts.max_new_tokens,
        opts.temperature,
        opts.top_k or None,
        opts.top_p,
        opts.seed,
        opts.device,
        opts.state_in,
        opts.state_out,
        compile=opts.compile,
    )
    return 0


GENERATE = Command(
    "generate",
    GenerateOptions,
    _generate,
    help="generate text from a checkpoint, streamed; sessions keep memory",
    description="Continue a prompt with a trained model, printing text as it is sampled. --state-out saves the "
    "model's state after the call and --state-in continues from it, so a session keeps its long-term memory "
    "without re-reading its history.",
    required=("checkpoint",),
)


# mmrec stages / mmrec demo -------------------------------------------------------------------------------------


@dataclass
class StagesOptions:
    run: str = _doc("Run directory of mmrec train.", default="")
    device: str = _doc(DEVICE_HELP, default="cpu")


def _stages(opts: StagesOptions) -> int:
    from mmrec.stages.finished_run import track_run

    data = track_run(opts.run, device=opts.device)
    for rec in data["stages"]:
        when = f"step {rec['step']} ({rec['tokens']:,} tokens)" if rec["reached"] else "not reached"
        print(f"stage {rec['id']} {rec['name']}: {when}")
    print(f"wrote {opts.run}/stages.json and stages.png")
    return 0


STAGES = Command(
    "stages",
    StagesOptions,
    _stages,
    help="measure the learning stages over a finished training run",
    positional=("run",),
)


def _demo(opts: DemoOptions) -> int:
    run_demo(opts)
    return 0


DEMO = Command("demo", DemoOptions, _demo, help="stream the built-in text through a fresh MM-Rec; show constant state")
COMPARE = Command(
    "compare",
    CompareFlags,
    _compare,
    help="train MM-Rec and GPT/LLaMA/Mistral-style baselines on the same data; write report.md and figures",
    description="Train MM-Rec and parameter-matched GPT-, LLaMA- and Mistral-style Transformers on the same "
    "data, tokens, curriculum and seed; track the learning stages; measure bits per byte by position, speed "
    "and memory against length; write report.md, figures and results.json to --out.",
    required=("out",),
)
