"""Train and evaluate a model on a synthetic task, and stream long inputs in bounded memory.

The synthetic tasks (``mmrec.evals.synthetic``) are generated on the fly, so
training is a plain loop: draw a batch, step AdamW. Evaluation at lengths far
beyond training is where the two model families differ:

* MM-Rec carries a fixed-size state, so a 64K-token test sequence is fed in
  windows of ``window`` tokens with the state carried: memory stays constant
  and the logits equal those of one whole-sequence call.
* A Transformer's state is its KV cache, which grows with every token. It is
  used while the cache fits ``max_memory_bytes``; beyond the length the model
  was trained on it can attend over a sliding window of that length instead
  (RoPE presets); otherwise the length is reported as skipped, with the
  reason, rather than run out of memory.

``plan_context`` makes that decision once per (model, length, batch) and
``ContextPlan.feed`` applies it, so the synthetic tasks and passkey retrieval
share one policy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mmrec.config import MMRecConfig, TransformerConfig
from mmrec.evals.synthetic import IGNORE, score
from mmrec.models import KVCache, LMOutput, MMRecLM, TransformerLM, matched_transformer_config
from mmrec.train.schedule import penalty_ramp

GIB = 2**30
DEFAULT_MAX_MEMORY_BYTES = 8 * GIB
ARCHS = ("mmrec", "llama", "gpt", "mistral")
BEYOND_MODES = ("sliding", "full", "skip")

MakeBatch = Callable[[int, torch.Generator], tuple[Tensor, Tensor]]


def resolve_device(spec: str | torch.device) -> torch.device:
    """``auto`` is CUDA when torch sees a device, else the CPU; anything else is checked."""
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise ValueError(f"--device: {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda was requested but torch sees no CUDA device; use --device cpu")
    return device


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    # bf16 on CUDA for the tensor cores; float32 on CPU, where bf16 is slower at these sizes.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def build_task_model(
    arch: str,
    vocab_size: int,
    d_model: int,
    n_layers: int = 2,
    n_heads: int = 2,
    chunk_size: int = 64,
    mem_slots: int = 32,
    summary_window: int = 8,
    max_seq_len: int = 1024,
    attn_window: int | None = None,
    match_params: bool = True,
    decay_max: float = 0.999,
    selective_write: bool = False,
    sparse_write: bool = False,
) -> nn.Module:
    """An MM-Rec, or a Transformer of the same width and depth sized to MM-Rec's parameter count.

    ``max_seq_len`` is the gpt preset's learned position table (and recorded by
    the RoPE presets); ``attn_window`` is the mistral preset's sliding window.
    ``decay_max``, ``selective_write`` and ``sparse_write`` are MM-Rec's (see ``MMRecConfig``).
    When the smallest Transformer MLP is already larger than MM-Rec, the
    Transformer keeps its default MLP instead of failing.
    """
    if arch not in ARCHS:
        raise ValueError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    mm_cfg = MMRecConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        chunk_size=chunk_size,
        mem_slots=mem_slots,
        summary_window=summary_window,
        decay_min=min(0.9, decay_max),
        decay_max=decay_max,
        selective_write=selective_write,
        sparse_write=sparse_write,
    )
    if arch == "mmrec":
        return MMRecLM(mm_cfg)
    kwargs: dict[str, Any] = dict(
        preset=arch,
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        max_seq_len=max_seq_len,
        window=attn_window if arch == "mistral" else None,
    )
    if match_params:
        with torch.device("meta"):
            target = MMRecLM(mm_cfg).num_parameters()
        with contextlib.suppress(ValueError):
            return TransformerLM(matched_transformer_config(target, **kwargs))
    return TransformerLM(TransformerConfig(**kwargs))


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
    if not isinstance(model, (MMRecLM, TransformerLM)):
        raise TypeError(f"plan_context needs an MMRecLM or TransformerLM, got {type(model).__name__}")
    w = seq_len if window is None else min(window, seq_len)
    # Every call returns [B, w, V] float32 logits; keep them within an eighth of the budget.
    w = max(1, min(w, (max_memory_bytes // 8) // (batch * model.config.vocab_size * 4)))
    if isinstance(model, MMRecLM):
        per_stream = model.init_state(1).nbytes()
        return ContextPlan(
            "recurrent",
            w,
            None,
            per_stream * batch,
            f"MM-Rec streams {seq_len:,} tokens in windows of {w:,} with a constant state of "
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
    accuracy: float | None  # None when skipped
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
                if not (targets[:, start:] != -100).any():
                    # Nothing left to score: the rest of the sequence cannot change the result.
                    break
                with _autocast(device):
                    out = plan.feed(model, inputs[:, start:stop], state)
                state = out.state
                c, n = score(out.logits, targets[:, start:stop])
                correct, total = correct + c, total + n
                del out
    finally:
        model.train(was_training)
    assert plan is not None
    return TaskEval(
        T,
        correct / total if total else 0.0,
        correct,
        total,
        plan.mode,
        plan.note,
        plan.memory_bytes,
        time.perf_counter() - t0,
    )


def cosine_lr(step: int, steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_ratio * lr`` at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# A time budget fixes the step count from the time of steps WARMUP_STEPS..CALIBRATION_STEPS: the first
# steps include one-off costs (CUDA context, kernel selection) that overstated the step time 2-3x on an H100.
WARMUP_STEPS = 10
CALIBRATION_STEPS = 30


def scored_positions(targets: Tensor) -> tuple[Tensor, Tensor]:
    """The scored positions of each row, first ``K`` columns: ``(positions [B, K], targets [B, K])``.

    ``K`` is the most scored positions in any row; shorter rows are padded with
    position 0 and target ``IGNORE``. Training computes logits at these
    positions only: the loss and the accuracy are those of the full logits
    (every other target is ignored), at a fraction of the head's cost.
    """
    mask = targets != IGNORE
    k = max(1, int(mask.sum(dim=1).max()))
    # A stable descending sort puts each row's scored positions first, in order.
    order = mask.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :k]
    picked = targets.gather(1, order)
    positions = torch.where(picked != IGNORE, order, torch.zeros_like(order))
    return positions, picked


def scored_forward(model: nn.Module, inputs: Tensor, positions: Tensor, picked: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy and correct-prediction count at the scored positions (both stay on the device)."""
    hidden, _ = model.hidden_states(inputs)  # type: ignore[operator]
    at = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))  # [B, K, d]
    logits = model.lm_head(at).float()  # type: ignore[operator]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), picked.flatten(), ignore_index=IGNORE)
    correct = ((logits.argmax(dim=-1) == picked) & (picked != IGNORE)).sum()
    return loss, correct


class _Prefetcher:
    """Draws the training batches in a background thread, in order, a few steps ahead.

    Batches are generated on the CPU from one generator, so the stream is the
    same as drawing them inline; on CUDA they arrive pinned and are copied
    without blocking while the previous step still runs.
    """

    def __init__(self, make_batch: MakeBatch, batch_size: int, generator: torch.Generator, pin: bool) -> None:
        self._make, self._b, self._g, self._pin = make_batch, batch_size, generator, pin
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="task-batches")
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                inputs, targets = self._make(self._b, self._g)
                positions, picked = scored_positions(targets)
                item: Any = (inputs, positions, picked, int((picked != IGNORE).sum()))
                if self._pin:
                    item = (*(t.pin_memory() for t in item[:3]), item[3])
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the training loop, which raises it
            self._queue.put(e)

    def next(self) -> tuple[Tensor, Tensor, Tensor, int]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[no-any-return]

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join(timeout=5)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_task(
    model: nn.Module,
    make_batch: MakeBatch,
    steps: int,
    batch_size: int,
    lr: float,
    device: str | torch.device,
    log_every: int = 50,
    seed: int = 0,
    eval_fn: Callable[[nn.Module], float] | None = None,
    *,
    weight_decay: float = 0.1,
    warmup_steps: int | None = None,
    grad_clip: float = 1.0,
    eval_batches: int = 8,
    log: Callable[[str], None] | None = print,
    max_seconds: float | None = None,
    write_l1: float = 0.0,
    write_l1_warmup: int = 0,
) -> dict[str, Any]:
    """Train ``model`` on fresh batches from ``make_batch(batch_size, generator)``.

    AdamW (weight decay on matrices only), linear warm-up (default: a tenth of
    the steps, at most 100) then cosine decay to a tenth of ``lr``, gradient
    clipping, bf16 autocast on CUDA and float32 on CPU. Batches come from a
    generator seeded with ``seed``, drawn a few steps ahead in a background
    thread; the loss and logits are computed at the scored positions only
    (``scored_forward``), and nothing waits for the device between logging
    points. The final accuracy comes from ``eval_fn`` or, by default, from
    ``eval_batches`` batches of a different stream.

    With ``max_seconds``, the step time is measured after ``CALIBRATION_STEPS``
    steps and the step count lowered so that training ends inside the budget
    with its whole schedule (warm-up and decay); it is measured again at every
    logging point and the count lowered further if the steps became slower
    (other jobs on the device). The steps actually run are returned as ``steps``.

    Returns ``history`` (loss per step), ``train_accuracy`` (per step, at the
    scored positions of that step's batch), ``accuracy``, ``train_seconds``
    and ``seconds_per_step``.
    """
    if steps < 1 or batch_size < 1 or log_every < 1:
        raise ValueError(f"steps, batch_size and log_every must be >= 1, got {steps}, {batch_size}, {log_every}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not (hasattr(model, "hidden_states") and hasattr(model, "lm_head")):
        raise TypeError(f"train_task needs a model with hidden_states and lm_head, got {type(model).__name__}")
    if write_l1 < 0 or (write_l1 > 0 and not getattr(getattr(model, "config", None), "sparse_write", False)):
        raise ValueError(f"write_l1 must be >= 0 and needs an MM-Rec with sparse_write, got {write_l1}")
    if write_l1_warmup < 0:
        raise ValueError(f"write_l1_warmup must be >= 0, got {write_l1_warmup}")
    device = resolve_device(device)
    model.to(device).train()
    warmup = min(100, max(1, steps // 10)) if warmup_steps is None else warmup_steps
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), fused=device.type == "cuda")
    batches = _Prefetcher(make_batch, batch_size, torch.Generator().manual_seed(seed), device.type == "cuda")
    losses: list[Tensor] = []  # per step, on the device; read at the logging points
    corrects: list[Tensor] = []
    counts: list[int] = []
    history: list[float] = []
    train_acc: list[float] = []

    def drain() -> None:
        # One transfer for all steps since the last logging point; a non-finite loss stops training.
        if not losses:
            return
        values = torch.stack(losses).tolist()
        hits = torch.stack(corrects).tolist()
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"the loss became {value} at step {len(history) + i + 1}; lower --lr (now {lr:g}) or check "
                    "the task settings"
                )
        history.extend(values)
        train_acc.extend(h / n if n else 0.0 for h, n in zip(hits, counts, strict=True))
        losses.clear()
        corrects.clear()
        counts.clear()

    t0 = time.perf_counter()
    step = 0
    refit = False
    try:
        while step < steps:
            if step == WARMUP_STEPS:
                _sync(device)
                t_warm = time.perf_counter()
            if max_seconds is not None and step >= CALIBRATION_STEPS and (step == CALIBRATION_STEPS or refit):
                # Fit the step count to the budget at step CALIBRATION_STEPS, then again at every logging
                # point: jobs sharing a device slow each other down once they are all running, and a count
                # fitted once overran its budget by a quarter on an H100. The count only ever shrinks.
                _sync(device)
                per_step = (time.perf_counter() - t_warm) / (step - WARMUP_STEPS)
                fits = max(step + 1, int((max_seconds - (time.perf_counter() - t0)) / per_step) + step)
                if fits < steps:
                    if log is not None and step == CALIBRATION_STEPS:
                        budget = f"time budget {max_seconds:.0f}s at {per_step * 1e3:.0f} ms/step"
                        log(f"{budget}: {fits} steps instead of {steps}")
                    steps = fits
                refit = False
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, steps, lr, warmup)
            inputs, positions, picked, n = batches.next()
            inputs, positions, picked = (t.to(device, non_blocking=True) for t in (inputs, positions, picked))
            with _autocast(device):
                loss, correct = scored_forward(model, inputs, positions, picked)
            opt.zero_grad(set_to_none=True)
            if write_l1 > 0:  # the logged loss stays the task's
                weight = write_l1 * penalty_ramp(step, write_l1_warmup)
                (loss + weight * model.write_gate_mean()).backward()  # type: ignore[operator]
            else:
                loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            losses.append(loss.detach())
            corrects.append(correct)
            counts.append(n)
            step += 1
            if step % log_every == 0 or step == steps:
                drain()
                refit = True
                if log is not None:
                    elapsed = time.perf_counter() - t0
                    log(
                        f"step {step}/{steps}  loss {history[-1]:.4f}  batch accuracy {train_acc[-1]:.3f}  "
                        f"lr {opt.param_groups[0]['lr']:.2e}  {elapsed / step * 1e3:.0f} ms/step"
                    )
        drain()
    finally:
        batches.close()
    train_seconds = time.perf_counter() - t0
    if eval_fn is not None:
        accuracy = float(eval_fn(model))
    else:
        result = evaluate_task(model, make_batch, eval_batches, batch_size, device, seed=seed + 1_000_003)
        accuracy = float(result.accuracy or 0.0)
    return {
        "history": history,
        "train_accuracy": train_acc,
        "accuracy": accuracy,
        "steps": steps,
        "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / steps,
    }
