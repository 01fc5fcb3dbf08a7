"""Read long inputs in bounded memory, and score a model on a synthetic task at any length.

Evaluation at lengths far beyond training is where the two model families differ:

* MM-Rec carries a fixed-size state, so a 64K-token test sequence is fed in
  windows of ``window`` tokens with the state carried: memory stays constant
  and the logits equal those of one whole-sequence call.
* A Transformer's state is its KV cache, which grows with every token. It is
  used while the cache fits ``max_memory_bytes``; beyond the length the model
  was trained on it can attend over a sliding window of that length instead
  (RoPE presets); otherwise the length is reported as skipped, with the
  reason, rather than run out of memory.

``plan_context`` makes that decision once per (model, length, batch) and
``ContextPlan.feed`` applies it, so the synthetic tasks (``evaluate_task``) and
passkey retrieval share one policy. Training on the tasks is
``mmrec.train.tasks.train_task``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from mmrec.evals.synthetic import IGNORE, score
from mmrec.models import KVCache, LMOutput, MMRecLM, TransformerLM
from mmrec.utils.device import autocast_for, resolve_device

GIB = 2**30
DEFAULT_MAX_MEMORY_BYTES = 8 * GIB
BEYOND_MODES = ("sliding", "full", "skip")

# make_batch(batch_size, generator) -> (inputs [B, T], targets [B, T]); targets are IGNORE where unscored.
MakeBatch = Callable[[int, torch.Generator], tuple[Tensor, Tensor]]


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def state_floats(model: nn.Module, seq_len: int) -> int:
    """Floats of state one stream holds after ``seq_len`` tokens.

    MM-Rec: its recurrent state, the same at every length. Transformer: the
    KV cache, 2 x layers x d_model per token kept (all tokens, or the last
    ``window`` for the mistral preset).
    """
    if isinstance(model, MMRecLM):
        state = model.init_state(1)
        return state.nbytes() // state.short.element_size()
    if isinstance(model, TransformerLM):
        c = model.config
        kept = seq_len if c.window is None else min(seq_len, c.window)
        return 2 * c.n_layers * c.d_model * kept
    raise TypeError(f"state_floats needs an MMRecLM or TransformerLM, got {type(model).__name__}")


def kv_cache_bytes(model: TransformerLM, tokens: int, batch: int = 1) -> int:
    """Bytes of a KV cache holding ``tokens`` positions for ``batch`` streams."""
    c = model.config
    return 2 * c.n_layers * c.d_model * model.embed.weight.element_size() * tokens * batch


@dataclass
class ContextPlan:
    """How a model reads a long sequence: decided once, before any memory is spent."""

    mode: str  # "recurrent", "full", "window" (mistral's own), "sliding", or "skipped"
    window: int  # tokens per forward call
    keep: int | None  # KV positions kept between calls (manual sliding window); None: the model decides
    memory_bytes: int  # state or KV cache held at the end, all streams together
    note: str  # what was done, or why the length was skipped, for people

    @property
    def skipped(self) -> bool:
        return self.mode == "skipped"

    def feed(self, model: nn.Module, ids: Tensor, state: Any) -> LMOutput:
        """One forward call with the plan's cache policy applied to the returned state."""
        out: LMOutput = model(ids, state=state)
        if self.keep is not None and isinstance(out.state, KVCache) and out.state.keys.size(3) > self.keep:
            st = out.state
            # clone: a view would keep the whole cache's storage alive.
            out.state = KVCache(
                position=st.position,
                keys=st.keys[:, :, :, st.keys.size(3) - self.keep :].clone(),
                values=st.values[:, :, :, st.values.size(3) - self.keep :].clone(),
            )
        return out

    def windows(self, seq_len: int) -> Iterator[tuple[int, int]]:
        """(start, stop) of each forward call over ``seq_len`` tokens."""
        for start in range(0, seq_len, self.window):
            yield start, min(seq_len, start + self.window)


def is_recurrent(model: nn.Module) -> bool:
    """A model that reads any length through a fixed-size state: MM-Rec, or any module with ``init_state``
    whose forward takes and returns that state (the stand-ins of the evaluators' tests)."""
    return isinstance(model, MMRecLM) or (
        not isinstance(model, TransformerLM) and callable(getattr(model, "init_state", None))
    )


def plan_context(
    model: nn.Module,
    seq_len: int,
    batch: int,
    window: int | None = None,
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
    trained_len: int | None = None,
    beyond: str = "sliding",
) -> ContextPlan:
    """Decide how ``model`` reads ``seq_len`` tokens of ``batch`` streams, within ``max_memory_bytes``.

    ``window`` (default: the whole sequence) is the tokens per forward call.
    ``trained_len`` is the longest sequence the model was trained on;
    ``beyond`` says what a Transformer does past it: ``sliding`` (attend over
    the last ``trained_len`` tokens, so no attention distance exceeds what it
    was trained on; RoPE presets only), ``full`` (attend over everything), or
    ``skip``.
    """
    if beyond not in BEYOND_MODES:
        raise ValueError(f"beyond must be one of {', '.join(BEYOND_MODES)}, got {beyond!r}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 token, got {window}")
    if not (isinstance(model, TransformerLM) or is_recurrent(model)):
        raise TypeError(
            f"plan_context needs a TransformerLM or a recurrent model (init_state, as MMRecLM), got "
            f"{type(model).__name__}"
        )
    w = seq_len if window is None else min(window, seq_len)
    # Every call returns [B, w, V] float32 logits; keep them within an eighth of the budget.
    vocab_size: int = cast(Any, model).config.vocab_size
    w = max(1, min(w, (max_memory_bytes // 8) // (batch * vocab_size * 4)))
    if not isinstance(model, TransformerLM):
        per_stream = model.init_state(1).nbytes()  # type: ignore[operator]
        name = "MM-Rec" if isinstance(model, MMRecLM) else type(model).__name__
        return ContextPlan(
            "recurrent",
            w,
            None,
            per_stream * batch,
            f"{name} streams {seq_len:,} tokens in windows of {w:,} with a constant state of "
            f"{_fmt_bytes(per_stream)} per stream",
        )
    c = model.config
    assert c.max_seq_len is not None

    def skipped(why: str) -> ContextPlan:
        return ContextPlan("skipped", w, None, 0, why)

    if c.preset == "gpt" and seq_len > c.max_seq_len:
        return skipped(
            f"skipped: the gpt preset learns positions for {c.max_seq_len:,} tokens only, so it cannot read "
            f"{seq_len:,} (not even through a sliding window: positions are absolute)"
        )
    mode, keep, span, note = "full", None, seq_len, f"full attention over {seq_len:,} tokens"
    if c.window is not None and c.window < seq_len:
        mode, span, note = "window", c.window, f"its own sliding window of {c.window:,} tokens"
    if trained_len is not None and seq_len > trained_len and span > trained_len:
        if beyond == "skip":
            return skipped(f"skipped: {seq_len:,} tokens is beyond the {trained_len:,} the Transformer was trained on")
        if beyond == "sliding":
            # Every query sees at most trained_len keys: calls of w tokens over a cache of trained_len - w.
            span = trained_len
            w = min(w, max(1, trained_len // 2))
            keep = trained_len - w
            mode = "sliding"
            note = (
                f"sliding window of its trained length {trained_len:,} (each token attends to the last "
                f"{keep + 1:,}-{trained_len:,} tokens) over {seq_len:,} tokens"
            )
        else:
            note += f", beyond the {trained_len:,} it was trained on"
    cached = span if keep is None else keep + w
    kv = kv_cache_bytes(model, cached, batch)
    limit = _fmt_bytes(max_memory_bytes)
    if kv > max_memory_bytes:
        return skipped(
            f"skipped: its KV cache for {cached:,} tokens x {batch} stream(s) would take {_fmt_bytes(kv)} "
            f"(2 x {c.n_layers} layers x {c.d_model} x {model.embed.weight.element_size()} bytes per token), over "
            f"the {limit} limit; lower the length or the batch, or raise the memory limit"
        )
    # Attention scores of one call ([B, H, w, cache + w] floats plus the mask) must fit beside the cache;
    # shrink the call if they would not.
    per_query = batch * (c.n_heads * 4 + 1) * (cached + w)
    fit = (max_memory_bytes - kv) // max(per_query, 1)
    if fit < 1:
        return skipped(f"skipped: the attention scores for {cached:,} keys do not fit beside the cache in {limit}")
    if fit < w:
        w = int(fit)
        if keep is not None:
            keep = span - w
    return ContextPlan(mode, w, keep, kv, f"{note}; KV cache {_fmt_bytes(kv)}")


@dataclass
class TaskEval:
    """Accuracy of a model on held-out batches of one task at one length."""

    seq_len: int
    accuracy: float | None  # None when skipped or when no position was scored: not evaluated
    correct: int
    total: int
    mode: str
    note: str
    memory_bytes: int
    seconds: float

    @property
    def skipped(self) -> bool:
        return self.mode == "skipped"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@torch.no_grad()
def evaluate_task(
    model: nn.Module,
    make_batch: MakeBatch,
    n_batches: int,
    batch_size: int,
    device: str | torch.device,
    window: int | None = None,
    *,
    seed: int = 1_000_003,
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
    trained_len: int | None = None,
    beyond: str = "sliding",
) -> TaskEval:
    """Argmax accuracy at the scored positions of ``n_batches`` fresh batches.

    With ``window`` the sequence is fed ``window`` tokens at a time with the
    state carried and each window scored on its own, so no [B, T, V] logits
    of the whole sequence ever exist. A Transformer follows
    :func:`plan_context`; a length it cannot read within ``max_memory_bytes``
    comes back with ``accuracy=None`` and the reason in ``note``.
    """
    if n_batches < 1 or batch_size < 1:
        raise ValueError(f"n_batches and batch_size must be >= 1, got {n_batches} and {batch_size}")
    device = resolve_device(device)
    g = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    correct = total = 0
    plan: ContextPlan | None = None
    try:
        for _ in range(n_batches):
            inputs, targets = make_batch(batch_size, g)
            T = inputs.size(1)
            if plan is None:
                plan = plan_context(model, T, batch_size, window, max_memory_bytes, trained_len, beyond)
                if plan.skipped:
                    return TaskEval(T, None, 0, 0, plan.mode, plan.note, 0, time.perf_counter() - t0)
            inputs, targets = inputs.to(device), targets.to(device)
            state = None
            for start, stop in plan.windows(T):
                if not (targets[:, start:] != IGNORE).any():
                    # Nothing left to score: the rest of the sequence cannot change the result.
                    break
                with autocast_for(device):
                    out = plan.feed(model, inputs[:, start:stop], state)
                state = out.state
                c, n = score(out.logits, targets[:, start:stop])
                correct, total = correct + c, total + n
                del out
    finally:
        model.train(was_training)
    assert plan is not None
    # Nothing scored is no result: None (written as null, "not evaluated"), never an accuracy of 0.
    return TaskEval(
        T,
        correct / total if total else None,
        correct,
        total,
        plan.mode,
        plan.note if total else f"{plan.note}; not evaluated: no position of the batches was scored",
        plan.memory_bytes,
        time.perf_counter() - t0,
    )
