"""The training configuration: one dataclass, saved beside every run and checkpoint."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mmrec.config import ConfigError, ConfigMixin, _doc, _positive


@dataclass
class TrainConfig(ConfigMixin):
    """Everything ``mmrec train`` needs; the merged config is saved as config.json in the run."""

    # Data
    data: list[str] = _doc(
        "Training text: file, folder, glob, 'builtin' or 'hf:NAME[:SPLIT]'; 'NAME=PATH:WEIGHT' names and "
        "weights a source. Repeatable. Default: the built-in corpus (Python standard library source).",
        default_factory=list,
    )
    text_field: str = _doc("Field holding the text in JSONL / Parquet / HF sources.", default="text")
    val_fraction: float = _doc("Share of documents held out for validation (chosen by hash of the id).", default=0.02)
    tokenizer: str = _doc("'byte', or a tokenizer.json from `mmrec tokenizer train`.", default="byte")
    data_cache: str | None = _doc("Folder for prepared token shards (default ~/.cache/mmrec/data).", default=None)
    # Model
    arch: str = _doc("Model: mmrec or transformer.", default="mmrec")
    preset: str = _doc("Transformer style: gpt, llama or mistral.", default="llama")
    d_model: int = _doc("Width of the residual stream.", default=256)
    n_layers: int = _doc("Number of blocks.", default=4)
    n_heads: int = _doc("Heads (short-term recurrence for mmrec, attention for transformer).", default=4)
    chunk_size: int = _doc("MM-Rec chunk size: long-term memory is written once per chunk.", default=64)
    mem_slots: int = _doc("MM-Rec long-term memory slots per layer.", default=32)
    summary_window: int = _doc("MM-Rec chunk summaries kept in the level-1 FIFO.", default=8)
    decay_max: float = _doc("MM-Rec: initial decay of the longest-memory short-term head.", default=0.999)
    selective_write: bool = _doc(
        "MM-Rec: Mamba-2-style selection in the short-term memory (decay from the convolved features, "
        "writes scaled by 1 - decay).",
        default=False,
    )
    sparse_write: bool = _doc(
        "MM-Rec: with selective_write, a gate relu(W x + b) also scales each step, so a token whose gate is at or "
        "below zero leaves the short-term state exactly unchanged.",
        default=False,
    )
    write_l1: float = _doc(
        "MM-Rec with sparse_write: weight of a penalty on the mean write gate, added to the loss; it switches "
        "off the writes the task does not need (0 disables).",
        default=0.0,
    )
    write_l1_warmup: int = _doc(
        "Steps over which the write_l1 penalty rises linearly from 0 to its weight (0: full from the start).",
        default=0,
    )
    window: int | None = _doc("Sliding attention window of the mistral preset.", default=None)
    match_params: bool = _doc(
        "Size a transformer's MLP to the parameter count of the MM-Rec with the same flags.", default=True
    )
    # Optimisation
    max_steps: int = _doc("Optimizer steps to train.", default=200)
    seq_len: int = _doc("Tokens per training window (the curriculum may change it).", default=512)
    batch_size: int = _doc(
        "Sequences per step at --seq-len, over all processes; the curriculum keeps batch x length constant.",
        default=8,
    )
    grad_accum: int = _doc("Micro-batches per optimizer step.", default=1)
    lr: float = _doc("Peak learning rate (AdamW).", default=2e-3)
    min_lr_ratio: float = _doc("Final learning rate as a fraction of --lr (cosine decay).", default=0.1)
    warmup_steps: int = _doc("Linear warm-up steps.", default=50)
    weight_decay: float = _doc("AdamW weight decay (matrices only).", default=0.1)
    beta1: float = _doc("AdamW beta1.", default=0.9)
    beta2: float = _doc("AdamW beta2.", default=0.95)
    grad_clip: float = _doc("Clip the gradient norm to this (0 disables).", default=1.0)
    seq_len_schedule: str = _doc(
        "Curriculum of window lengths by tokens seen, e.g. '0:256,1M:1024,4M:4096' (K/M/G suffixes).", default=""
    )
    mixture_schedule: str = _doc(
        "Curriculum of source weights by tokens seen, e.g. '0:simple=1,hard=0;2M:simple=1,hard=1'.", default=""
    )
    carry_state: bool | None = _doc(
        "Carry the recurrent state (detached) from each window to the next of the same stream; "
        "default on for mmrec, off for transformer.",
        default=None,
    )
    carry_windows: int | None = _doc(
        "With carry_state: carry the state across at most this many consecutive windows, then start every "
        "stream from a fresh state (0: no limit). A state that is never reset holds writes made by parameters "
        "of long-gone steps, and a model whose heads can keep a state forever (sparse_write: decay exactly 1) "
        "learns to depend on it and fails from a fresh state. Default: 8 with selective_write (and so with "
        "sparse_write), else 0.",
        default=None,
    )
    # Evaluation, logging, checkpoints
    eval_every: int = _doc("Evaluate on validation data every N steps (and at the end).", default=50)
    eval_tokens: int = _doc("Validation tokens per source per evaluation.", default=32768)
    eval_seq_len: int | None = _doc("Window of the evaluation (default: the longest training window).", default=None)
    track_stages: bool = _doc(
        "Measure the five learning stages at every evaluation (stages.json, stages.png).", default=True
    )
    stage_probes: int = _doc("Examples per stage probe (knowledge, induction, key-value lookup).", default=32)
    log_every: int = _doc("Print a log line every N steps.", default=10)
    checkpoint_every: int = _doc("Save a checkpoint every N steps (and at the end).", default=100)
    keep_checkpoints: int = _doc("Keep the newest K checkpoints.", default=3)
    out: str | None = _doc(
        "Run directory (checkpoints, metrics.csv, TensorBoard, plots); default runs/ARCH-DATE-TIME.", default=None
    )
    resume: str | None = _doc("'auto' (newest complete checkpoint in --out) or a checkpoint directory.", default=None)
    max_bad_steps: int = _doc("Stop after this many NaN/Inf steps in a row (each is skipped).", default=5)
    sample_tokens: int = _doc("Tokens to generate as a sample at the end (0: none).", default=256)
    # Execution
    seed: int = _doc("Random seed (model init and data order).", default=0)
    device: str = _doc("auto, cpu, cuda or cuda:N.", default="auto")
    dtype: str = _doc("auto (bf16 autocast on CUDA, float32 on CPU), fp32 or bf16.", default="auto")
    compile: bool = _doc("torch.compile the model.", default=False)
    fsdp: bool = _doc("Shard the model with FSDP2 across processes (instead of DDP).", default=False)
    threads: int | None = _doc("CPU threads for PyTorch (default: all cores).", default=None)

    def __post_init__(self) -> None:
        _positive(
            self,
            "d_model",
            "n_layers",
            "n_heads",
            "chunk_size",
            "mem_slots",
            "summary_window",
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
        if self.arch not in ("mmrec", "transformer"):
            raise ConfigError(f"arch: must be mmrec or transformer, got {self.arch!r}")
        if self.preset not in ("gpt", "llama", "mistral"):
            raise ConfigError(f"preset: must be gpt, llama or mistral, got {self.preset!r}")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"dtype: must be auto, fp32 or bf16, got {self.dtype!r}")
        for name in ("lr", "beta1", "beta2", "val_fraction", "min_lr_ratio", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name}: must be a finite number >= 0, got {v!r}")
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if not (isinstance(self.decay_max, (int, float)) and 0 < self.decay_max < 1):
            raise ConfigError(f"decay_max: must be between 0 and 1 (exclusive), got {self.decay_max!r}")
        if self.sparse_write and not self.selective_write:
            raise ConfigError("sparse_write: needs selective_write (--selective-write --sparse-write)")
        if not (isinstance(self.write_l1, (int, float)) and math.isfinite(self.write_l1) and self.write_l1 >= 0):
            raise ConfigError(f"write_l1: must be a number >= 0, got {self.write_l1!r}")
        if not (isinstance(self.write_l1_warmup, int) and self.write_l1_warmup >= 0):
            raise ConfigError(f"write_l1_warmup: must be an integer >= 0, got {self.write_l1_warmup!r}")
        if self.write_l1 > 0 and not (self.sparse_write and self.arch == "mmrec"):
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
            self.carry_windows = 8 if self.selective_write else 0
        if not (isinstance(self.carry_windows, int) and self.carry_windows >= 0):
            raise ConfigError(f"carry_windows: must be an integer >= 0, got {self.carry_windows!r}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum
