"""``mmrec export hf`` and ``mmrec eval lm``: Hugging Face folders and lm-evaluation-harness scores.

Both need the ``hf`` extra (transformers, lm-eval); without it they stop with the install command.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from mmrec.cli.command import Command
from mmrec.cli.commands import CHECKPOINT_HELP, DEVICE_HELP, STREAM_WINDOW_HELP
from mmrec.config import ConfigError, _doc, _positive, _require
from mmrec.evals.lm_tasks import TASKS


def _need(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"needs {', '.join(missing)}: pip install 'mmrec[hf]'")


@dataclass
class ExportHFOptions:
    checkpoint: str = _doc(CHECKPOINT_HELP, default="")
    out: str = _doc("Folder to write (config, model.safetensors, tokenizer, README.md model card).", default="")
    overwrite: bool = _doc("Replace --out if it exists and is not empty.", default=False)


def _export_hf(opts: ExportHFOptions) -> int:
    _need("transformers")
    from mmrec.hf.export import export_hf

    path = export_hf(opts.checkpoint, opts.out, overwrite=opts.overwrite)
    print(f"wrote {path}: " + ", ".join(sorted(p.name for p in path.iterdir())))
    return 0


EXPORT_HF = Command(
    "hf",
    ExportHFOptions,
    _export_hf,
    help="a checkpoint as a Hugging Face folder (AutoModelForCausalLM.from_pretrained)",
    description="Write a checkpoint as a Hugging Face folder: MM-Rec as MMRecForCausalLM (loads after "
    "`import mmrec`), the llama / mistral / gpt baselines as transformers' LlamaForCausalLM / MistralForCausalLM "
    "/ GPT2LMHeadModel (load with transformers alone); the tokenizer for AutoTokenizer; a model card.",
    required=("checkpoint", "out"),
)


@dataclass
class EvalLMOptions:
    checkpoint: list[str] = _doc(
        CHECKPOINT_HELP + " Several: scored on the same items, side by side.", default_factory=list
    )
    out: str = _doc("Folder for the tasks, results.json and results.md.", default="")
    tasks: list[str] = _doc(
        f"Local tasks to run (default: all of {', '.join(TASKS)}).", default_factory=lambda: list(TASKS)
    )
    data: list[str] = _doc(
        "Text to build the tasks from (default: the validation split of the first checkpoint's run).",
        default_factory=list,
    )
    rolling_docs: int = _doc("Documents scored whole by mmrec_rolling (the longest ones).", default=8)
    rolling_chars: int = _doc("Characters kept of each mmrec_rolling document.", default=16384)
    items: int = _doc("Items of mmrec_cloze and of mmrec_choice.", default=100)
    seed: int = _doc("Seed of the items drawn.", default=0)
    max_length: int | None = _doc(
        "Context of a Transformer baseline: inputs cut to it, rolling windows of it (default: its trained "
        "length). MM-Rec always streams whole documents.",
        default=None,
    )
    stream_window: int = _doc(STREAM_WINDOW_HELP, default=4096)
    device: str = _doc(DEVICE_HELP, default="cpu")

    def __post_init__(self) -> None:
        _require(bool(self.checkpoint), "checkpoint", "give at least one checkpoint")
        unknown = [t for t in self.tasks if t not in TASKS]
        _require(not unknown, "tasks", f"unknown {', '.join(unknown)}; choose from {', '.join(TASKS)}")
        _positive(self, "rolling_docs", "rolling_chars", "items", "stream_window")
        _require(self.max_length is None or self.max_length >= 2, "max_length", f"must be >= 2, got {self.max_length}")


def _eval_lm(opts: EvalLMOptions) -> int:
    _need("transformers", "lm_eval")
    from mmrec.evals.lm_suite import run_eval_lm
    from mmrec.evals.lm_tasks import TaskSizes

    sizes = TaskSizes(
        rolling_docs=opts.rolling_docs, rolling_chars=opts.rolling_chars, items=opts.items, seed=opts.seed
    )
    run_eval_lm(
        opts.checkpoint,
        opts.out,
        tasks=tuple(opts.tasks),
        data=opts.data,
        sizes=sizes,
        device=opts.device,
        max_length=opts.max_length,
        stream_window=opts.stream_window,
    )
    return 0


EVAL_LM = Command(
    "lm",
    EvalLMOptions,
    _eval_lm,
    help="lm-evaluation-harness on local tasks (rolling perplexity, cloze, multiple choice), side by side",
    description="Build three lm-eval tasks from held-out text (rolling log-likelihood of long documents, the "
    "last word of a passage, which line continues a passage), score every --checkpoint on them with "
    "lm-evaluation-harness and write a side-by-side table. MM-Rec streams whole documents through its state.",
    required=("checkpoint", "out"),
)

__all__ = ["EVAL_LM", "EXPORT_HF"]
