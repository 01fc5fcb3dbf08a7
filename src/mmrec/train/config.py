"""The training configuration: one dataclass, saved beside every run and checkpoint."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from mmrec.config import ConfigError, ConfigMixin, MMRecConfig, TransformerConfig, _doc, _positive
from mmrec.models.factory import ARCHS, MODEL_FIELDS, MODEL_HINTS, model_config_from_dict, resolve_model_config
from mmrec.tokenizer import load_tokenizer
from mmrec.utils.counts import longest_window
from mmrec.utils.options import convert_values


@dataclass
class TrainConfig(ConfigMixin):
    """Everything ``mmrec train`` needs; the merged config is saved as config.json in the run."""

    # Data
    data: list[str] = _doc(
        "Training text: file, folder, glob, 'builtin' or 'hf:NAME[:SPLIT]'; 'NAME=PATH:WEIGHT' names and "
        "weights a source. Repeatable. Default: the built-in corpus (Python standard library source).",
        group="data",
        default_factory=list,
    )
    text_field: str = _doc("Field holding the text in JSONL / Parquet / HF sources.", group="data", default="text")
    val_fraction: float = _doc(
        "Share of documents held out for validation (chosen by hash of the id).", group="data", default=0.02
    )
    tokenizer: str = _doc("'byte', or a tokenizer.json from `mmrec tokenizer train`.", group="data", default="byte")
    data_cache: str | None = _doc(
        "Folder for prepared token shards (default ~/.cache/mmrec/data).", group="data", default=None
    )
    # Model: the architecture, its config (every model option is a field of MMRecConfig or
    # TransformerConfig, declared there once), and how a baseline is sized.
    arch: str = _doc("Model family.", group="model", default="mmrec", choices=ARCHS)
    model: MMRecConfig | TransformerConfig | None = _doc(
        "The model config (MMRecConfig or TransformerConfig, by arch); its vocab_size is the tokenizer's.",
        group="model",
        default=None,
    )
    match_params: bool = _doc(
        "Size a transformer's MLP to the parameter count of the MM-Rec with the same options.",
        group="model",
        default=True,
    )
    write_l1: float = _doc(
        "MM-Rec with sparse_write: weight of a penalty on the mean write gate, added to the loss; it switches "
        "off the writes the task does not need (0 disables).",
        group="model",
        default=0.0,
    )
    write_l1_warmup: int = _doc(
        "Steps over which the write_l1 penalty rises linearly from 0 to its weight (0: full from the start).",
        group="model",
        default=0,
    )
    # Optimisation
    max_steps: int = _doc("Optimizer steps to train.", group="optimisation", default=200)
    seq_len: int = _doc("Tokens per training window (the curriculum may change it).", group="optimisation", default=512)
    batch_size: int = _doc(
        "Sequences per step at --seq-len, over all processes; the curriculum keeps batch x length constant.",
        group="optimisation",
        default=8,
    )
    grad_accum: int = _doc("Micro-batches per optimizer step.", group="optimisation", default=1)
    lr: float = _doc("Peak learning rate (AdamW).", group="optimisation", default=2e-3)
    min_lr_ratio: float = _doc(
        "Final learning rate as a fraction of --lr (cosine decay).", group="optimisation", default=0.1
    )
    warmup_steps: int = _doc("Linear warm-up steps.", group="optimisation", default=50)
    weight_decay: float = _doc("AdamW weight decay (matrices only).", group="optimisation", default=0.1)
    beta1: float = _doc("AdamW beta1.", group="optimisation", default=0.9)
    beta2: float = _doc("AdamW beta2.", group="optimisation", default=0.95)
    grad_clip: float = _doc("Clip the gradient norm to this (0 disables).", group="optimisation", default=1.0)
    seq_len_schedule: str = _doc(
        "Curriculum of window lengths by tokens seen, e.g. '0:256,1M:1024,4M:4096' (K/M/G suffixes).",
        group="optimisation",
        default="",
    )
    mixture_schedule: str = _doc(
        "Curriculum of source weights by tokens seen, e.g. '0:simple=1,hard=0;2M:simple=1,hard=1'.",
        group="optimisation",
        default="",
    )
    carry_state: bool | None = _doc(
        "Carry the recurrent state (detached) from each window to the next of the same stream; "
        "default on for mmrec, off for transformer.",
        group="optimisation",
        default=None,
    )
    carry_windows: int | None = _doc(
        "With carry_state: carry the state across at most this many consecutive windows, then start every "
        "stream from a fresh state (0: no limit). A state that is never reset holds writes made by parameters "
        "of long-gone steps, and a model whose heads can keep a state forever (sparse_write: decay exactly 1) "
        "learns to depend on it and fails from a fresh state. Default: 8 with selective_write (and so with "
        "sparse_write), else 0.",
        group="optimisation",
        default=None,
    )
    # Evaluation, logging, checkpoints
    eval_every: int = _doc(
        "Evaluate on validation data every N steps (and at the end).",
        group="evaluation, logging, checkpoints",
        default=50,
    )
    eval_tokens: int = _doc(
        "Validation tokens per source per evaluation.", group="evaluation, logging, checkpoints", default=32768
    )
    eval_seq_len: int | None = _doc(
        "Window of the evaluation (default: the longest training window).",
        group="evaluation, logging, checkpoints",
        default=None,
    )
    track_stages: bool = _doc(
        "Measure the five learning stages at every evaluation (stages.json, stages.png).",
        group="evaluation, logging, checkpoints",
        default=True,
    )
    stage_probes: int = _doc(
        "Examples per stage probe (knowledge, induction, key-value lookup).",
        group="evaluation, logging, checkpoints",
        default=32,
    )
    log_every: int = _doc("Print a log line every N steps.", group="evaluation, logging, checkpoints", default=10)
    checkpoint_every: int = _doc(
        "Save a checkpoint every N steps (and at the end).", group="evaluation, logging, checkpoints", default=100
    )
    keep_checkpoints: int = _doc("Keep the newest K checkpoints.", group="evaluation, logging, checkpoints", default=3)
    out: str | None = _doc(
        "Run directory (checkpoints, metrics.csv, TensorBoard, plots); default runs/ARCH-DATE-TIME.",
        group="evaluation, logging, checkpoints",
        default=None,
    )
    resume: str | None = _doc(
        "'auto' (newest complete checkpoint in --out) or a checkpoint directory.",
        group="evaluation, logging, checkpoints",
        default=None,
    )
    max_bad_steps: int = _doc(
        "Stop after this many NaN/Inf steps in a row (each is skipped).",
        group="evaluation, logging, checkpoints",
        default=5,
    )
    sample_tokens: int = _doc(
        "Tokens to generate as a sample at the end (0: none).", group="evaluation, logging, checkpoints", default=256
    )
    # Execution
    seed: int = _doc("Random seed (model init and data order).", group="execution", default=0)
    device: str = _doc("auto, cpu, cuda or cuda:N.", group="execution", default="auto")
    dtype: str = _doc(
        "auto (bf16 autocast on CUDA, float32 on CPU), fp32 or bf16.",
        group="execution",
        default="auto",
        choices=("auto", "fp32", "bf16"),
    )
    compile: bool = _doc("torch.compile the model.", group="execution", default=False)
    fsdp: bool = _doc("Shard the model with FSDP2 across processes (instead of DDP).", group="execution", default=False)
    threads: int | None = _doc("CPU threads for PyTorch (default: all cores).", group="execution", default=None)

    def __post_init__(self) -> None:
        _positive(
            self,
            "max_steps",
            "seq_len",
            "batch_size",
            "grad_accum",
            "eval_every",
            "eval_tokens",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
            "max_bad_steps",
        )
        if self.eval_seq_len is not None:
            _positive(self, "eval_seq_len")
        if self.threads is not None:
            _positive(self, "threads")
        if self.arch not in ARCHS:
            raise ConfigError(f"arch: must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.model is None:
            self.model = self.resolve_model({})
        expected = MMRecConfig if self.arch == "mmrec" else TransformerConfig
        if not isinstance(self.model, expected):
            raise ConfigError(f"model: arch {self.arch} needs a {expected.__name__}, got {type(self.model).__name__}")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"dtype: must be auto, fp32 or bf16, got {self.dtype!r}")
        for name in ("lr", "beta1", "beta2", "val_fraction", "min_lr_ratio", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name}: must be a finite number >= 0, got {v!r}")
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if not (isinstance(self.write_l1, (int, float)) and math.isfinite(self.write_l1) and self.write_l1 >= 0):
            raise ConfigError(f"write_l1: must be a number >= 0, got {self.write_l1!r}")
        if not (isinstance(self.write_l1_warmup, int) and self.write_l1_warmup >= 0):
            raise ConfigError(f"write_l1_warmup: must be an integer >= 0, got {self.write_l1_warmup!r}")
        if self.write_l1 > 0 and not (isinstance(self.model, MMRecConfig) and self.model.sparse_write):
            raise ConfigError(
                "write_l1: penalises MM-Rec's sparse-write gates, so it needs arch mmrec and sparse_write"
            )
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction: must be between 0 and 1 (exclusive), got {self.val_fraction}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"beta1/beta2: must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.sample_tokens < 0:
            raise ConfigError(f"sample_tokens: must be >= 0, got {self.sample_tokens}")
        if self.data is None:
            self.data = []
        if self.carry_state is None:
            self.carry_state = self.arch == "mmrec"
        if self.carry_state and self.arch != "mmrec":
            raise ConfigError("carry_state: only mmrec carries a fixed-size state between windows")
        if self.carry_windows is None:
            self.carry_windows = 8 if isinstance(self.model, MMRecConfig) and self.model.selective_write else 0
        if not (isinstance(self.carry_windows, int) and self.carry_windows >= 0):
            raise ConfigError(f"carry_windows: must be an integer >= 0, got {self.carry_windows!r}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    @property
    def max_seq_len(self) -> int:
        """The longest training window of the curriculum."""
        return longest_window(self.seq_len, self.seq_len_schedule)

    def resolve_model(self, values: dict[str, Any]) -> MMRecConfig | TransformerConfig:
        """The model config of ``arch`` from model option values, sized and shaped for this run."""
        return _run_model(values, self.arch, self.tokenizer, self.match_params, self.max_seq_len, self.eval_seq_len)

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> TrainConfig:
        """A config from flat option values (flags, a config file): model options beside the run's.

        A nested ``model`` mapping is accepted too; values are converted to their
        field's type first (so ``lr: 1e-3`` in YAML, which reads as a string, works).
        """
        values = dict(values)
        nested = values.pop("model", None) or {}
        if not isinstance(nested, dict):
            raise ConfigError("model: must be a mapping of model options")
        model_values = {**nested, **{k: values.pop(k) for k in list(values) if k in MODEL_FIELDS}}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown option(s): {', '.join(unknown)}")
        train = convert_values(cls, values)
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}

        def get(name: str) -> Any:
            return train.get(name, defaults[name])

        if get("arch") not in ARCHS:
            raise ConfigError(f"arch: must be one of {', '.join(ARCHS)}, got {get('arch')!r}")
        model = _run_model(
            convert_values(MODEL_HINTS, model_values),
            get("arch"),
            get("tokenizer"),
            bool(get("match_params")),
            longest_window(get("seq_len"), get("seq_len_schedule")),
            get("eval_seq_len"),
        )
        return cls(**train, model=model)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """A saved config.json; one written before the model config was nested is read as flat values."""
        if not isinstance(data.get("model"), dict):
            return cls.from_flat({k: v for k, v in data.items() if k != "model"})
        data = {**data, "model": model_config_from_dict(data.get("arch", "mmrec"), data["model"])}
        return super().from_dict(data)  # type: ignore[misc,no-any-return]


def _run_model(
    values: dict[str, Any], arch: str, tokenizer: str, match_params: bool, train_len: int, eval_len: int | None
) -> MMRecConfig | TransformerConfig:
    """The model config of a training run: its vocabulary is the tokenizer's, a baseline matched to MM-Rec."""
    return resolve_model_config(
        arch,
        values,
        vocab_size=load_tokenizer(tokenizer).vocab_size,
        match_params=match_params,
        train_len=train_len,
        eval_len=eval_len,
    )
