"""Model configurations: dataclasses whose invalid values fail at construction.

Every field has a one-line doc in ``metadata["help"]``; the command line and
the saved ``config.json`` are built from these dataclasses.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mmrec.utils.errors import ConfigError

__all__ = ["ConfigError", "MMRecConfig", "ModelConfig", "TransformerConfig"]

SHORT_TERM_RULES = ("gla", "delta")
LONG_TERM_MEMORIES = ("slots", "assoc", "both")

T = TypeVar("T")


def _doc(text: str, *, choices: tuple[str, ...] | None = None, group: str | None = None, **kw: Any) -> Any:
    """A dataclass field with its one-line doc (its allowed values, its --help group), from which --help is
    generated."""
    metadata: dict[str, Any] = {"help": text}
    if choices is not None:
        metadata["choices"] = choices
    if group is not None:
        metadata["group"] = group
    return field(metadata=metadata, **kw)


def _require(ok: bool, name: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {msg}")


def _positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        _require(
            isinstance(value, int) and not isinstance(value, bool) and value >= 1,
            name,
            f"must be an integer >= 1, got {value!r}",
        )


def _round_up(x: float, multiple: int) -> int:
    return int(multiple * math.ceil(x / multiple))


class ConfigMixin:
    """Serialisation shared by the configs: plain JSON, unknown keys rejected."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload,no-any-return]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        return cls.from_dict(json.loads(Path(path).read_text()))  # type: ignore[attr-defined,no-any-return]


@dataclass
class MMRecConfig(ConfigMixin):
    """MM-Rec: a dual-memory recurrent language model (see docs/architecture.md)."""

    vocab_size: int = _doc("Token ids are 0 .. vocab_size-1 (257 = bytes + end-of-document).", default=257)
    d_model: int = _doc("Width of the residual stream.", default=256)
    n_layers: int = _doc("Number of blocks; each owns its short- and long-term memory.", default=4)
    n_heads: int = _doc("Heads of the short-term recurrence; each keeps a (d/h x d/h) state.", default=4)
    chunk_size: int = _doc("Tokens per chunk: the long-term memory is written once per completed chunk.", default=64)
    mem_slots: int = _doc("Long-term memory slots per layer (level 3).", default=32)
    summary_window: int = _doc("Chunk summaries kept in the level-1 FIFO.", default=8)
    d_mem: int | None = _doc("Width of a memory entry; default d_model.", default=None)
    mem_heads: int | None = _doc("Heads of the memory write and read attention; default n_heads.", default=None)
    conv_size: int = _doc("Causal depthwise convolution before q/k/v (0 disables).", default=4)
    d_ff: int | None = _doc("Hidden width of the SwiGLU; default 8/3 d_model rounded up to 64.", default=None)
    decay_min: float | None = _doc(
        "Initial per-step decay of the fastest-forgetting head; default min(0.9, decay_max).", default=None
    )
    decay_max: float = _doc("Initial per-step decay of the longest-memory head.", default=0.999)
    decay_tau: float = _doc("Temperature of the decay: log g = logsigmoid(W x + b) / tau.", default=1.0)
    short_term: str = _doc(
        "Update rule of the short-term memory: gla adds each write k v^T to the decayed state; delta (gated "
        "delta rule) moves what key k reads a learned step beta towards v, so a write replaces what k held.",
        default="gla",
        choices=SHORT_TERM_RULES,
    )
    long_term: str = _doc(
        "Long-term memory of each block: slots (the hierarchy of chunk summaries and memory slots read by "
        "attention); assoc (a key-value matrix per head, written once per completed chunk by the gated delta "
        "rule, so a key's write replaces what it held); both (the two side by side, each its own residual term).",
        default="slots",
        choices=LONG_TERM_MEMORIES,
    )
    selective_write: bool = _doc(
        "Mamba-2-style selection in the short-term memory: the decay g is computed from the convolved features "
        "and each token's write k v^T is scaled by (1 - g), so a token that keeps the state does not write to it.",
        default=False,
    )
    sparse_write: bool = _doc(
        "With selective_write: the step size is also multiplied by relu(W_s x + b_s), so a token whose gate is at "
        "or below zero leaves the short-term state exactly unchanged (decay 1, no write), at any sequence length.",
        default=False,
    )
    norm_eps: float = _doc("Epsilon of the RMSNorms.", default=1e-6)
    init_std: float = _doc("Standard deviation of the weight initialisation.", default=0.02)
    scan_chunk: int | None = _doc(
        "Chunk of the short-term parallel scan (speed knob only); default chunk_size.", default=None
    )
    scan_block: int = _doc("Chunks per block of the state scan (speed knob only).", default=16)

    def __post_init__(self) -> None:
        _positive(
            self,
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "chunk_size",
            "mem_slots",
            "summary_window",
            "scan_block",
        )
        if self.d_mem is None:
            self.d_mem = self.d_model
        if self.mem_heads is None:
            self.mem_heads = self.n_heads
        if self.d_ff is None:
            self.d_ff = _round_up(8 * self.d_model / 3, 64)
        if self.scan_chunk is None:
            self.scan_chunk = self.chunk_size
        if self.decay_min is None and isinstance(self.decay_max, (int, float)):
            self.decay_min = min(0.9, self.decay_max)
        _positive(self, "d_mem", "mem_heads", "d_ff", "scan_chunk")
        _require(
            self.d_model % self.n_heads == 0,
            "d_model",
            f"must be divisible by n_heads ({self.d_model} % {self.n_heads} != 0)",
        )
        _require(
            self.d_mem % self.mem_heads == 0,
            "d_mem",
            f"must be divisible by mem_heads ({self.d_mem} % {self.mem_heads} != 0)",
        )
        _require(
            isinstance(self.conv_size, int) and self.conv_size >= 0,
            "conv_size",
            f"must be an integer >= 0, got {self.conv_size!r}",
        )
        _require(
            isinstance(self.decay_min, (int, float))
            and isinstance(self.decay_max, (int, float))
            and 0.0 < self.decay_min <= self.decay_max < 1.0,
            "decay_min/decay_max",
            f"need 0 < decay_min <= decay_max < 1, got {self.decay_min}, {self.decay_max}",
        )
        _require(self.decay_tau > 0, "decay_tau", f"must be > 0, got {self.decay_tau}")
        _require(
            self.short_term in SHORT_TERM_RULES,
            "short_term",
            f"must be one of {', '.join(SHORT_TERM_RULES)}, got {self.short_term!r}",
        )
        _require(
            self.long_term in LONG_TERM_MEMORIES,
            "long_term",
            f"must be one of {', '.join(LONG_TERM_MEMORIES)}, got {self.long_term!r}",
        )
        _require(
            isinstance(self.selective_write, bool),
            "selective_write",
            f"must be true or false, got {self.selective_write!r}",
        )
        _require(
            isinstance(self.sparse_write, bool), "sparse_write", f"must be true or false, got {self.sparse_write!r}"
        )
        _require(
            not self.sparse_write or self.selective_write,
            "sparse_write",
            "needs selective_write (without it a token's write is not scaled by its step size)",
        )
        _require(self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps}")
        _require(self.init_std > 0, "init_std", f"must be > 0, got {self.init_std}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def uses_slots(self) -> bool:
        """Whether the blocks hold the slot memory and its hierarchy (long_term slots or both)."""
        return self.long_term != "assoc"

    @property
    def uses_assoc(self) -> bool:
        """Whether the blocks hold the associative memory (long_term assoc or both)."""
        return self.long_term != "slots"


PRESETS = ("gpt", "llama", "mistral")


@dataclass
class TransformerConfig(ConfigMixin):
    """A decoder-only Transformer baseline in one of three styles.

    gpt: learned positions, LayerNorm, GELU MLP, biases. llama: RoPE, RMSNorm,
    SwiGLU, no biases. mistral: llama with sliding-window attention.
    """

    preset: str = _doc("Style: gpt, llama or mistral.", default="llama", choices=PRESETS)
    vocab_size: int = _doc("Token ids are 0 .. vocab_size-1.", default=257)
    d_model: int = _doc("Width of the residual stream.", default=256)
    n_layers: int = _doc("Number of blocks.", default=4)
    n_heads: int = _doc("Attention heads.", default=4)
    d_ff: int | None = _doc("MLP hidden width; default 4 d (gpt) or 8/3 d rounded up to 64.", default=None)
    max_seq_len: int | None = _doc(
        "Longest context: the learned position table of gpt (default 1024); RoPE presets only record it (32768).",
        default=None,
    )
    window: int | None = _doc("Sliding attention window of the mistral preset (default 4096).", default=None)
    rope_theta: float = _doc("RoPE base frequency.", default=10000.0)
    norm_eps: float = _doc("Epsilon of the norms.", default=1e-5)
    init_std: float = _doc("Standard deviation of the weight initialisation.", default=0.02)

    def __post_init__(self) -> None:
        _require(self.preset in PRESETS, "preset", f"must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.max_seq_len is None:
            self.max_seq_len = 1024 if self.preset == "gpt" else 32768
        _positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len")
        _require(
            self.d_model % self.n_heads == 0,
            "d_model",
            f"must be divisible by n_heads ({self.d_model} % {self.n_heads} != 0)",
        )
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model if self.preset == "gpt" else _round_up(8 * self.d_model / 3, 64)
        _positive(self, "d_ff")
        if self.preset == "mistral":
            if self.window is None:
                self.window = 4096
            _positive(self, "window")
        else:
            _require(self.window is None, "window", f"only the mistral preset uses a sliding window, got {self.window}")
        _require(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
        _require(self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps}")
        if self.preset != "gpt":
            _require(self.head_dim % 2 == 0, "d_model", f"RoPE needs an even head width, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


ModelConfig = MMRecConfig | TransformerConfig
