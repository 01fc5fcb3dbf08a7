"""The training loop: next-token prediction with a curriculum, exact resume and scale-out.

``Trainer(cfg).fit()`` runs a whole job: prepare (or reuse) token shards,
build the model, train with AdamW + warmup + cosine, evaluate, checkpoint,
and finish with a summary and a sample. Run under ``torchrun`` it trains with
DDP (gloo on CPU, nccl on CUDA) or FSDP2.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any, cast

import torch

from mmrec.config import ConfigError
from mmrec.data.cache import cached_dataset, source_specs
from mmrec.data.loader import StreamLoader, eval_windows
from mmrec.data.shards import PreparedDataset
from mmrec.data.sources import DataError, SourceSpec
from mmrec.models import MMRecLM, TransformerLM, build_model
from mmrec.models.factory import label
from mmrec.tokenizer import load_tokenizer
from mmrec.train import checkpoint as ckpt
from mmrec.train.checkpoint import TrainerCheckpoints
from mmrec.train.config import TrainConfig
from mmrec.train.distributed import (
    DistInfo,
    all_reduce_max_int,
    all_reduce_sum,
    barrier,
    init_distributed,
    unwrap,
    wrap_model,
)
from mmrec.train.metrics import MetricsWriter
from mmrec.train.optim import clip_gradients, cosine_lr, make_optimizer, set_lr
from mmrec.train.schedule import Curriculum, penalty_ramp
from mmrec.utils.cpu import tune_glibc_malloc
from mmrec.utils.device import autocast_for, resolve_device
from mmrec.utils.fmt import human_time

LN2 = math.log(2.0)

# Settings that change what is computed: a resumed run must keep them.
RESUME_MUST_MATCH = (
    "data",
    "text_field",
    "val_fraction",
    "tokenizer",
    "arch",
    "model",  # the whole model config
    "seq_len",
    "batch_size",
    "grad_accum",
    "seq_len_schedule",
    "mixture_schedule",
    "carry_state",
    "seed",
    "fsdp",
)


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what was kept."""


class Trainer(TrainerCheckpoints):
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.stop_signal: int | None = None
        self.logged_weights: dict[str, float] | None = None
        self.ddp: Any = None

    # Setup -----------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.dist.is_main:
            print(msg, flush=True)

    def _resolve_device(self) -> tuple[torch.device, torch.dtype | None, str]:
        want = self.cfg.device
        if want == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            why = "a CUDA device is available" if device.type == "cuda" else "no CUDA device found"
        else:
            device = resolve_device(want)
            why = "--device"
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        dtype_opt = self.cfg.dtype
        if dtype_opt == "auto":
            dtype = torch.bfloat16 if device.type == "cuda" else None
            how = "bf16 autocast (tensor cores)" if dtype else "float32 (bf16 on CPU is slower at these sizes)"
        else:
            dtype = torch.bfloat16 if dtype_opt == "bf16" else None
            how = f"{dtype_opt} (--dtype)"
        return device, dtype, f"device {device} ({why}), {how}"

    def _prepare_data(self) -> None:
        cfg = self.cfg
        self.specs: list[SourceSpec] = source_specs(cfg.data, cfg.text_field)
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self.dataset: PreparedDataset = cached_dataset(
            self.specs,
            self.tokenizer,
            cfg.val_fraction,
            cfg.data_cache,
            log=self.log,
            prepare=self.dist.is_main,
            wait=lambda: barrier(self.dist),
        )
        for name, src in self.dataset.sources.items():
            self.log(
                f"data: {name}: {src.train.n_docs:,} train documents / {src.train.n_tokens:,} tokens, "
                f"{src.val.n_docs:,} validation documents / {src.val.n_tokens:,} tokens"
            )
        self.token_bytes = torch.tensor(self.tokenizer.token_bytes(), dtype=torch.float64)

    def _run_dir(self) -> Path | None:
        """The run directory, and the checkpoint to resume from (checked before any work)."""
        cfg = self.cfg
        if cfg.out is None or cfg.out == "":
            if cfg.resume:
                raise ConfigError("resume: name the run directory with --out DIR")
            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            cfg.out = f"runs/{cfg.arch}-{stamp}"
        out = Path(cfg.out)
        resume_from = None
        if cfg.resume:
            resume_from = ckpt.find_resume(out, cfg.resume)
            if resume_from is None:
                self.log(f"resume: no complete checkpoint in {out}; starting from scratch")
        elif ckpt.list_checkpoints(out):
            raise ConfigError(
                f"out: {out} already holds checkpoints; continue it with --resume auto, "
                "or choose another --out (nothing was changed)"
            )
        if resume_from is not None:
            saved = TrainConfig.from_dict(ckpt.read_json(resume_from / "meta.json")["config"])
            diff = [k for k in RESUME_MUST_MATCH if k != "model" and getattr(saved, k) != getattr(cfg, k)]
            if saved.arch == cfg.arch and saved.model != cfg.model:  # name the model fields that differ
                old, new = saved.model.to_dict(), cfg.model.to_dict()  # type: ignore[union-attr]
                diff += [k for k in new if old.get(k) != new[k]] or ["model"]
            if diff:
                raise ConfigError(
                    f"resume: {resume_from} was trained with other settings for "
                    f"{', '.join(diff)}; resume with the same ones or start a new --out"
                )
        self.out = out
        return resume_from

    # The job -----------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        tune_glibc_malloc()
        device_type = (
            "cuda" if (cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())) else "cpu"
        )
        self.dist: DistInfo = init_distributed(device_type)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        elif self.dist.enabled and device_type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        self.device, self.amp_dtype, device_msg = self._resolve_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        resume_from = self._run_dir()
        if cfg.batch_size % self.dist.world_size:
            raise ConfigError(
                f"batch_size: {cfg.batch_size} sequences cannot be split over {self.dist.world_size} processes"
            )
        self._prepare_data()
        if cfg.model is None or cfg.model.vocab_size != self.tokenizer.vocab_size:
            raise ConfigError(
                f"model: vocab_size {getattr(cfg.model, 'vocab_size', None)} does not match the tokenizer's "
                f"{self.tokenizer.vocab_size} (build the config with TrainConfig.from_flat or resolve_model)"
            )
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "config.json")
            self.tokenizer.save(self.out / "tokenizer.json")

        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model).to(self.device)
        n_params = sum(p.numel() for p in model.parameters())
        self.model = wrap_model(
            model, self.dist, self.device, cfg.fsdp, find_unused=cfg.arch == "mmrec" and bool(cfg.carry_state)
        )
        self.ddp = self.model if isinstance(self.model, torch.nn.parallel.DistributedDataParallel) else None
        if cfg.compile:
            self.model = torch.compile(self.model)  # type: ignore[assignment]
        # Taken after wrapping: DDP and compile expose the same tensors, FSDP2 the sharded ones.
        self.opt = make_optimizer(self.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), self.device)

        names = sorted(self.dataset.sources)
        weights = {s.name or "": s.weight for s in self.specs}
        self.curriculum = Curriculum(
            cfg.seq_len,
            cfg.batch_size * cfg.grad_accum,
            cfg.seq_len_schedule,
            cfg.mixture_schedule,
            {n: weights.get(n, 1.0) for n in names},
            multiple=self.dist.world_size * cfg.grad_accum,
        )
        self.loader = StreamLoader(self.dataset, self.tokenizer.eot_id, cfg.seed, self.dist.rank, self.dist.world_size)
        eval_len = cfg.eval_seq_len or self.curriculum.max_seq_len
        self.eval_sets = {
            n: eval_windows(self.dataset.sources[n].val, self.tokenizer.eot_id, eval_len, cfg.eval_tokens)
            for n in names
        }

        self.tracker: Any = None
        if cfg.track_stages and (self.dist.is_main or (cfg.fsdp and self.dist.enabled)):
            from mmrec.stages.tracker import StageTracker

            t0 = time.perf_counter()
            self.tracker = StageTracker(
                self.dataset,
                self.tokenizer,
                eval_len,
                seed=cfg.seed,
                n_probe=cfg.stage_probes,
                device=self.device,
                cache_path=self.dataset.path / "stage_references.json",
                window_tokens=cfg.eval_tokens,
                probe_seq_len=min(512, eval_len),
            )
            self.log(f"stages: references and probes ready in {time.perf_counter() - t0:.1f}s")

        self.step, self.tokens, self.skipped, self.bad_in_row = 0, 0, 0, 0
        self.states: list[Any] = []
        self.stage_index = -1
        if resume_from is not None:
            self._load_checkpoint(resume_from)
            self.log(f"resume: continuing from {resume_from} (step {self.step}, {self.tokens:,} tokens)")
            if self.tracker is not None and (self.out / "stages.json").is_file():
                self.tracker.restore(self.out / "stages.json", up_to_step=self.step)
        self.metrics = MetricsWriter(
            self.out, enabled=self.dist.is_main, resume_step=self.step if resume_from is not None else None
        )

        arch = "MM-Rec" if cfg.arch == "mmrec" else f"Transformer ({label(cfg.model).split('-', 1)[1]})"
        self.log(
            f"{arch}: {n_params:,} parameters; {device_msg}; {torch.get_num_threads()} CPU threads; "
            f"{self.dist.world_size} process(es){' FSDP2' if cfg.fsdp and self.dist.enabled else ''}"
        )
        self.log(f"run directory: {self.out}")
        self._install_signal_handlers()
        try:
            summary = self._loop()
        finally:
            self.metrics.close()
        return summary

    # Loop ------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        def request_stop(signum: int, frame: Any) -> None:
            if self.stop_signal is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self.stop_signal = signum
            if self.dist.is_main:
                print(
                    f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint",
                    file=sys.stderr,
                    flush=True,
                )

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                signal.signal(sig, request_stop)

    def _lr(self, step: int) -> float:
        cfg = self.cfg
        return cosine_lr(step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)

    def _autocast(self) -> Any:
        return autocast_for(self.device, self.amp_dtype or torch.float32)

    def _set_stage(self) -> None:
        stage = self.curriculum.at(self.tokens)
        weights = {n: float(stage.weights.get(n, 0.0)) for n in self.loader.names}
        if stage.index != self.stage_index or weights != self.loader.weights:
            max_k = all_reduce_max_int(self.loader.max_k, self.dist, self.device)
            rows = stage.batch_size
            if stage.index != self.stage_index:
                self.log(
                    f"curriculum: windows of {stage.seq_len} tokens, {rows} sequences per step "
                    f"(from {self.tokens:,} tokens)"
                )
                self.states = [None] * self.cfg.grad_accum
            self.loader.set_stage(stage.index, rows, stage.weights, max_k)
            if stage.weights != self.logged_weights:
                self.log("curriculum: source weights " + ", ".join(f"{k}={v:g}" for k, v in stage.weights.items()))
            self.stage_index, self.logged_weights = stage.index, stage.weights
        self.stage = stage

    def forward_loss(self, inputs: torch.Tensor, targets: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """Mean next-token loss (nats) of one micro-batch, and the state after it."""
        with self._autocast():
            out = self.model(inputs, state=state, targets=targets)
        return out.loss, out.state

    def write_penalty(self) -> torch.Tensor | None:
        """The sparse-write penalty of the last forward (``write_l1`` x mean gate), or None when off."""
        if self.cfg.write_l1 <= 0:
            return None
        weight = self.cfg.write_l1 * penalty_ramp(self.step, self.cfg.write_l1_warmup)
        return weight * cast(MMRecLM, unwrap(self.model)).write_gate_mean()

    def _train_step(self) -> dict[str, Any]:
        cfg = self.cfg
        self._set_stage()
        L, accum = self.stage.seq_len, cfg.grad_accum
        rows_local = self.stage.batch_size // (self.dist.world_size * accum)
        nats, n_tok, n_bytes = 0.0, 0.0, 0.0
        finite = True
        new_states: list[Any] = []
        for micro in range(accum):
            inputs, targets = self.loader.next_batch(L, part=micro, parts=accum)
            assert inputs.size(0) == rows_local
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            # DDP: all-reduce gradients once, after the last micro-batch.
            last = micro == accum - 1
            ctx = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
            with ctx:
                loss, state = self.forward_loss(inputs, targets, self.states[micro] if cfg.carry_state else None)
                penalty = self.write_penalty()  # not part of the logged loss
                ((loss if penalty is None else loss + penalty) / accum).backward()
            new_states.append(state.detach() if cfg.carry_state else None)
            value = float(loss.detach())
            finite = finite and math.isfinite(value)
            nats += value * targets.numel()
            n_tok += float(targets.numel())
            n_bytes += float(self.token_bytes[targets.cpu()].sum())
        nats, n_tok, n_bytes, bad = all_reduce_sum(
            [nats, n_tok, n_bytes, 0.0 if finite else 1.0], self.dist, self.device
        )
        grad_norm = float("nan")
        if bad == 0:
            grad_norm = float(clip_gradients(self.model.parameters(), cfg.grad_clip))
        lr = self._lr(self.step)
        if bad == 0 and math.isfinite(grad_norm):
            set_lr(self.opt, lr)
            self.opt.step()
            self.states = new_states
            self.bad_in_row = 0
            skipped = 0
        else:
            # A NaN/Inf step: no update; streams restart from a fresh state (theirs may hold NaN).
            self.skipped += 1
            self.bad_in_row += 1
            self.states = [None] * accum
            skipped = 1
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += int(n_tok)
        if cfg.carry_windows and self.step % cfg.carry_windows == 0:
            self.states = [None] * accum  # bounded state age: every stream starts afresh (see carry_windows)
        return {
            "step": self.step,
            "tokens": self.tokens,
            "loss": nats / n_tok,
            "bpb": nats / max(n_bytes, 1.0) / LN2,
            "lr": lr,
            "grad_norm": grad_norm,
            "seq_len": L,
            "batch_size": self.stage.batch_size,
            "skipped": skipped,
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss and bits per byte per source and overall (windows from a fresh state)."""
        self.model.eval()
        row: dict[str, float] = {}
        total = [0.0, 0.0, 0.0]
        # FSDP runs collectives inside forward: every rank must run every window then.
        sharded = self.cfg.fsdp and self.dist.enabled
        for name, windows in self.eval_sets.items():
            share = windows if sharded else windows[self.dist.rank :: self.dist.world_size]
            sums = [0.0, 0.0, 0.0]
            per_batch = max(1, 16384 // windows.size(1))
            for start in range(0, share.size(0), per_batch):
                batch = share[start : start + per_batch].to(self.device)
                with self._autocast():
                    out = unwrap(self.model)(batch[:, :-1], targets=batch[:, 1:])
                sums[0] += float(out.loss) * batch[:, 1:].numel()
                sums[1] += batch[:, 1:].numel()
                sums[2] += float(self.token_bytes[batch[:, 1:].cpu()].sum())
            if not sharded:
                sums = all_reduce_sum(sums, self.dist, self.device)
            if sums[1]:
                row[f"val_loss_{name}"] = sums[0] / sums[1]
                row[f"val_bpb_{name}"] = sums[0] / max(sums[2], 1.0) / LN2
            total = [a + b for a, b in zip(total, sums, strict=True)]
        row["val_loss"] = total[0] / max(total[1], 1.0)
        row["val_bpb"] = total[0] / max(total[2], 1.0) / LN2
        self.model.train()
        return row

    def _loop(self) -> dict[str, Any]:
        cfg = self.cfg
        self.model.train()
        t_start = time.perf_counter()
        tokens_log, steps_log = self.tokens, 0
        # Throughput counts training steps only, not evaluations or checkpoints between them.
        step_times: list[float] = []
        last_eval: dict[str, float] = {}
        start_tokens = self.tokens
        interrupted = False
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            tokens_before = self.tokens
            row = self._train_step()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - t0)
            steps_log += 1
            row.update(
                tokens_per_s=(self.tokens - tokens_before) / max(step_times[-1], 1e-9),
                elapsed_s=time.perf_counter() - t_start,
            )
            self.metrics.train(row)
            if self.bad_in_row >= cfg.max_bad_steps:
                last = ckpt.list_checkpoints(self.out)
                raise TrainingError(
                    f"{self.bad_in_row} steps in a row had a NaN/Inf loss or gradient (step {self.step}); "
                    f"stopping. The last good checkpoint is {last[-1] if last else 'none (none was saved yet)'}; "
                    "try a lower --lr or --grad-clip"
                )
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                recent = step_times[-steps_log:]
                eta = (cfg.max_steps - self.step) * (sum(recent) / len(recent))
                tps = (self.tokens - tokens_log) / max(sum(recent), 1e-9)
                self.log(
                    f"step {self.step:>6}/{cfg.max_steps} | loss {row['loss']:.4f} | bpb {row['bpb']:.3f} | "
                    f"lr {row['lr']:.2e} | gnorm {row['grad_norm']:.2f} | {tps:,.0f} tok/s | "
                    f"mem {self._memory_gib():.1f} GiB | ETA {human_time(eta)}"
                    + (f" | skipped {self.skipped}" if self.skipped else "")
                )
                tokens_log, steps_log = self.tokens, 0
            stop = self._stop_requested()
            if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                last_eval = self.evaluate()
                stage_msg = self._measure_stages(last_eval)
                self.metrics.eval({"step": self.step, "tokens": self.tokens, **last_eval})
                self.log(
                    f"eval  {self.step:>6} | val loss {last_eval['val_loss']:.4f} | val bpb {last_eval['val_bpb']:.3f}"
                    + stage_msg
                )
                if self.dist.is_main:
                    self.metrics.plot(f"{cfg.arch} - {self.out.name}")
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps or stop:
                path = self.save_checkpoint()
                self.log(f"checkpoint: {path}")
            if stop:
                interrupted = True
                break
        elapsed = time.perf_counter() - t_start
        summary = {
            "steps": self.step,
            "tokens": self.tokens,
            "tokens_per_s": (self.tokens - start_tokens) / max(sum(step_times), 1e-9),
            "train_seconds": sum(step_times),
            "wall_seconds": elapsed,
            "skipped_steps": self.skipped,
            "interrupted": interrupted,
            "signal": signal.Signals(self.stop_signal).name if self.stop_signal else None,
            **last_eval,
        }
        if interrupted:
            self.log(
                f"stopped by {summary['signal']} at step {self.step}; continue with --out {self.out} --resume auto"
            )
            return summary
        self._finish(summary)
        return summary

    def _measure_stages(self, row: dict[str, float]) -> str:
        """Stage metrics into the eval row; stages.json/png written. Returns a note for the log line."""
        if self.tracker is None:
            return ""
        metrics = self.tracker.measure(
            unwrap(self.model), self.step, self.tokens, row["val_loss"], row["val_bpb"], autocast=self._autocast
        )
        row.update({k: v for k, v in metrics.items() if k not in row and isinstance(v, float)})
        if not self.dist.is_main:
            return ""
        self.tracker.save(self.out)
        data = self.tracker.stages()
        reached = [str(r["id"]) for r in data["stages"] if r["reached"]]
        return f" | stages reached: {', '.join(reached) if reached else 'none'}"

    def _stop_requested(self) -> bool:
        flag = 1.0 if self.stop_signal is not None else 0.0
        return all_reduce_sum([flag], self.dist, self.device)[0] > 0

    def _memory_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    def _finish(self, summary: dict[str, Any]) -> None:
        """Summary and sample. Every rank generates (FSDP needs all of them); rank 0 writes."""
        model: Any = unwrap(self.model)
        sample = ""
        n_new = self.cfg.sample_tokens
        windows = next(iter(self.eval_sets.values()))
        prompt = windows[:1, : min(64, windows.size(1))] if windows.numel() else torch.tensor([[self.tokenizer.eot_id]])
        if isinstance(model, TransformerLM) and model.pos_embed is not None:  # gpt: positions are limited
            n_new = min(n_new, model.pos_embed.num_embeddings - prompt.size(1))
        if n_new > 0:
            gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
            with torch.no_grad(), self._autocast():
                ids = model.generate(prompt.to(self.device), n_new, temperature=0.8, top_k=50, generator=gen)
            sample = self.tokenizer.decode(ids[0, prompt.size(1) :].tolist())
            summary["sample_prompt"] = self.tokenizer.decode(prompt[0].tolist())
        if not self.dist.is_main:
            return
        if sample:
            (self.out / "sample.txt").write_text(sample)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        lines = [
            "",
            f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in {human_time(summary['wall_seconds'])} "
            f"({summary['tokens_per_s']:,.0f} tokens/s while training)",
        ]
        if "val_loss" in summary:
            lines.append(f"validation: loss {summary['val_loss']:.4f} nats/token, {summary['val_bpb']:.3f} bits/byte")
        if summary["skipped_steps"]:
            lines.append(f"skipped steps (NaN/Inf): {summary['skipped_steps']}")
        lines.append(f"run directory: {self.out} (metrics.csv, eval.csv, loss.png, tensorboard/, step-*/)")
        if sample:
            lines.append(f"sample after the prompt {summary['sample_prompt'][-60:]!r}:\n{sample}")
        self.log("\n".join(lines))


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run a training job; raises ConfigError / DataError / TrainingError / CheckpointError / DiskFullError
    with a readable message."""
    return Trainer(cfg).fit()


def main_entry(cfg: TrainConfig) -> int:
    """CLI wrapper: readable errors, exit codes 0 (done), 1 (error), 130/143 (stopped by a signal)."""
    try:
        summary = train(cfg)
    except (ConfigError, DataError, TrainingError, ckpt.CheckpointError, OSError) as e:
        # OSError: a missing file, or a DiskFullError saying what was being written and what was kept.
        print(f"mmrec train: error: {e}", file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if summary.get("interrupted"):
        return 130 if summary.get("signal") == "SIGINT" else 143
    return 0
