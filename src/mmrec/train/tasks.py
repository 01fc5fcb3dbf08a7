"""Train a model on a synthetic task: the loop of ``mmrec synth``, on the components of ``mmrec train``.

The tasks (``mmrec.evals.synthetic``, ``mmrec.evals.passkey``) are generated
on the fly, so training is a plain loop: draw a batch, step. The optimiser
groups, the schedule and the clipping are those of ``mmrec train``
(:mod:`mmrec.train.optim`), the mixed precision that of every command
(:func:`mmrec.utils.device.autocast_for`), and a trained model is saved as a
step directory of the one checkpoint format (:mod:`mmrec.models.checkpoint`),
which ``mmrec.load`` and ``mmrec eval passkey`` read. What the tasks add: the
loss is taken at the scored positions only, batches are drawn ahead in a
thread, and a time budget fixes the step count. :func:`sweep_lr` trains one
model per learning rate, chooses on validation batches and scores the choice
on evaluation batches of another seed stream.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmrec.evals.context import MakeBatch, TaskEval, evaluate_task
from mmrec.evals.synthetic import IGNORE, stream_seed
from mmrec.models.checkpoint import save_checkpoint
from mmrec.train.metrics import MetricsWriter
from mmrec.train.optim import clip_gradients, cosine_lr, make_optimizer, set_lr
from mmrec.train.schedule import penalty_ramp
from mmrec.utils.device import autocast_for, resolve_device

# AdamW betas of the synthetic tasks: a shorter second-moment memory than `mmrec train` (0.95), with which
# the tasks' runs were tuned (their learning rates and step counts in docs/results).
TASK_BETAS = (0.9, 0.98)

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


@dataclass
class TaskOutput:
    """Where a task run writes as it trains: metrics.csv, and the trained model as a step directory."""

    out: Path
    trained_seq_len: int  # the longest training sequence (how far `mmrec eval` may read without sliding)
    tokenizer: Any = None  # saved beside the weights; None for tasks on raw token ids
    config: dict[str, Any] = field(default_factory=dict)  # the command's settings, kept in meta.json


def save_task_model(output: TaskOutput, model: nn.Module, step: int) -> Path:
    """The step directory of ``model`` in ``output.out`` (kind "synth"), loadable with ``mmrec.load``."""
    return save_checkpoint(
        output.out,
        model,
        output.tokenizer,  # None for tasks on raw token ids (MQAR, induction, selective copying)
        kind="synth",
        step=step,
        trained_seq_len=output.trained_seq_len,
        config=output.config,
    )


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
    betas: tuple[float, float] = TASK_BETAS,
    weight_decay: float = 0.1,
    warmup_steps: int | None = None,
    grad_clip: float = 1.0,
    eval_batches: int = 8,
    log: Callable[[str], None] | None = print,
    max_seconds: float | None = None,
    write_l1: float = 0.0,
    write_l1_warmup: int = 0,
    output: TaskOutput | None = None,
) -> dict[str, Any]:
    """Train ``model`` on fresh batches from ``make_batch(batch_size, generator)``.

    AdamW with ``betas`` (weight decay on matrices only), linear warm-up
    (default: a tenth of the steps, at most 100) then cosine decay to a tenth
    of ``lr``, gradient clipping: :mod:`mmrec.train.optim`, as in ``mmrec
    train``. bf16 autocast on CUDA, float32 on CPU. Batches come from a
    generator seeded with ``seed``, drawn a few steps ahead in a background
    thread; the loss and logits are computed at the scored positions only
    (``scored_forward``). With ``write_l1`` (an MM-Rec with sparse writes) a
    penalty on the mean write gate is added to the loss, rising over
    ``write_l1_warmup`` steps. The final accuracy comes from ``eval_fn`` or, by
    default, from ``eval_batches`` batches of a different stream.

    With ``max_seconds``, the step time is measured after ``CALIBRATION_STEPS``
    steps and the step count lowered so that training ends inside the budget
    with its whole schedule (warm-up and decay); it is measured again at every
    logging point and the count lowered further if the steps became slower
    (other jobs on the device). The steps actually run are returned as ``steps``.

    With ``output``, a row of metrics.csv is written at every logging point and
    the trained model is saved as a step directory before the final
    evaluation (returned as ``checkpoint``), so an evaluation cut short loses
    no training.

    Returns ``history`` (loss per step), ``train_accuracy`` (per step, at the
    scored positions of that step's batch), ``accuracy`` (by default on the
    evaluation stream of ``seed``, :func:`mmrec.evals.synthetic.stream_seed`), ``steps``,
    ``train_seconds``, ``seconds_per_step`` and ``checkpoint`` (or None).
    """
    if steps < 1 or batch_size < 1 or log_every < 1:
        raise ValueError(f"steps, batch_size and log_every must be >= 1, got {steps}, {batch_size}, {log_every}")
    if eval_fn is None:
        stream_seed(seed, "evaluation")  # a seed whose streams could collide fails before training, not after
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
    opt = make_optimizer(model, lr, weight_decay, betas, device)
    metrics = MetricsWriter(output.out) if output is not None else None
    batches = _Prefetcher(make_batch, batch_size, torch.Generator().manual_seed(seed), device.type == "cuda")
    losses: list[Tensor] = []  # per step, on the device; read at the logging points
    corrects: list[Tensor] = []
    counts: list[int] = []
    history: list[float] = []
    train_acc: list[float] = []
    grad_norm = torch.zeros(())

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
        # A batch with nothing to score has no accuracy (NaN), not a zero one.
        train_acc.extend(h / n if n else math.nan for h, n in zip(hits, counts, strict=True))
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
            set_lr(opt, cosine_lr(step, steps, lr, warmup))
            inputs, positions, picked, n = batches.next()
            inputs, positions, picked = (t.to(device, non_blocking=True) for t in (inputs, positions, picked))
            with autocast_for(device):
                loss, correct = scored_forward(model, inputs, positions, picked)
            opt.zero_grad(set_to_none=True)
            if write_l1 > 0:  # the logged loss stays the task's
                weight = write_l1 * penalty_ramp(step, write_l1_warmup)
                (loss + weight * model.write_gate_mean()).backward()  # type: ignore[operator]
            else:
                loss.backward()
            grad_norm = clip_gradients(params, grad_clip)
            opt.step()
            losses.append(loss.detach())
            corrects.append(correct)
            counts.append(n)
            step += 1
            if step % log_every == 0 or step == steps:
                drain()
                refit = True
                elapsed = time.perf_counter() - t0
                current_lr = opt.param_groups[0]["lr"]
                if metrics is not None:
                    metrics.train(
                        {
                            "step": step,
                            "loss": history[-1],
                            "lr": current_lr,
                            "grad_norm": float(grad_norm),
                            "batch_size": batch_size,
                            "elapsed_s": round(elapsed, 3),
                        }
                    )
                if log is not None:
                    log(
                        f"step {step}/{steps}  loss {history[-1]:.4f}  batch accuracy {train_acc[-1]:.3f}  "
                        f"lr {current_lr:.2e}  grad norm {float(grad_norm):.2f}  {elapsed / step * 1e3:.0f} ms/step"
                    )
        drain()
    finally:
        batches.close()
        if metrics is not None:
            metrics.close()
    train_seconds = time.perf_counter() - t0
    checkpoint = save_task_model(output, model, steps) if output is not None else None
    accuracy: float | None
    if eval_fn is not None:
        accuracy = float(eval_fn(model))
    else:
        result = evaluate_task(
            model, make_batch, eval_batches, batch_size, device, seed=stream_seed(seed, "evaluation")
        )
        accuracy = result.accuracy  # None when no position was scored: not evaluated, never 0
    return {
        "history": history,
        "train_accuracy": train_acc,
        "accuracy": accuracy,
        "steps": steps,
        "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / steps,
        "checkpoint": checkpoint,
    }


@dataclass
class SweepRun:
    """One learning rate of a sweep: its training run and its accuracy on the validation stream."""

    lr: float
    validation: TaskEval | None  # None when training diverged
    final_loss: float | None  # mean training loss of the last 10 steps
    trained: dict[str, Any] | None
    note: str = ""


@dataclass
class LrSweep:
    """The learning rate chosen on the validation stream, and its model's score on the evaluation stream."""

    runs: list[SweepRun]
    chosen: SweepRun | None  # None when every learning rate diverged
    evaluation: TaskEval | None
    model: nn.Module | None  # the chosen run's trained model


def _rank(run: SweepRun) -> tuple[float, float]:
    # Highest validation accuracy first; ties (several at 1.0 is common) go to the lower final training loss.
    assert run.validation is not None
    accuracy = run.validation.accuracy if run.validation.accuracy is not None else -1.0
    return accuracy, -(run.final_loss if run.final_loss is not None else math.inf)


def sweep_lr(
    lrs: list[float],
    build: Callable[[], nn.Module],
    train: Callable[[nn.Module, float, Callable[[nn.Module], float]], dict[str, Any]],
    make_batch: MakeBatch,
    eval_batches: int,
    batch_size: int,
    device: str | torch.device,
    seed: int,
    log: Callable[[str], None] | None = print,
) -> LrSweep:
    """Train one model per learning rate, pick one on validation batches, score it on evaluation batches.

    ``build()`` makes the model, after ``torch.manual_seed(seed)`` each time,
    so runs differ only in their learning rate. ``train(model, lr, eval_fn)``
    trains it (a :func:`train_task` call with everything else fixed, the
    training stream being ``seed``'s) and passes ``eval_fn`` on. The choice is
    made on ``eval_batches`` batches of ``make_batch`` from the validation
    stream of ``seed``; only the chosen model is then scored on as many
    batches from the evaluation stream (:func:`mmrec.evals.synthetic.stream_seed`:
    the three streams never share a generator seed). A learning rate whose
    loss became NaN counts as diverged and is never chosen.
    """
    if not lrs or len(set(lrs)) != len(lrs):
        raise ValueError(f"lrs must be distinct learning rates, at least one, got {lrs}")
    for lr in lrs:
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"every learning rate must be a finite number > 0, got {lr!r}")
    validation_seed, evaluation_seed = stream_seed(seed, "validation"), stream_seed(seed, "evaluation")
    runs: list[SweepRun] = []
    best: tuple[SweepRun, nn.Module] | None = None
    for lr in lrs:
        torch.manual_seed(seed)
        model = build()
        validated: list[TaskEval] = []

        def validate(m: nn.Module, into: list[TaskEval] = validated) -> float:
            ev = evaluate_task(m, make_batch, eval_batches, batch_size, device, seed=validation_seed)
            into.append(ev)
            return math.nan if ev.accuracy is None else ev.accuracy

        try:
            trained = train(model, lr, validate)
        except FloatingPointError as e:
            runs.append(SweepRun(lr, None, None, None, f"diverged: {e}"))
            if log is not None:
                log(f"lr {lr:g}: diverged ({e})")
            continue
        if not validated:  # a `train` that did not call eval_fn
            validate(model)
        tail = trained["history"][-10:]
        run = SweepRun(lr, validated[-1], sum(tail) / len(tail), trained)
        runs.append(run)
        if log is not None:
            log(f"lr {lr:g}: validation accuracy {validated[-1].accuracy}, final training loss {run.final_loss:.4f}")
        if best is None or _rank(run) > _rank(best[0]):
            best = (run, model)
    if best is None:
        return LrSweep(runs, None, None, None)
    chosen, model = best
    evaluation = evaluate_task(model, make_batch, eval_batches, batch_size, device, seed=evaluation_seed)
    return LrSweep(runs, chosen, evaluation, model)
