"""Recall by distance at equal parameters and tokens: the LLaMA ceiling, the baselines and MM-Rec's levers (issue 13).

    python benchmarks/recall_ceiling.py --out runs/ceiling --dry-run        # every command, the token budget
    python benchmarks/recall_ceiling.py --out runs/ceiling --measure-speed 20 --dry-run   # + measured tok/s, hours
    python benchmarks/recall_ceiling.py --out runs/ceiling                  # the whole grid; run it again to resume
    python benchmarks/recall_ceiling.py --out runs/ceiling --sitting-minutes 110   # stop cleanly after ~110 min
    python benchmarks/recall_ceiling.py --out runs/ceiling --report-only    # the reports from what exists
    python benchmarks/recall_ceiling.py --out runs/smoke --smoke            # micro models, tiny budget (minutes)

For each corpus x model x seed x learning rate the runner trains with ``mmrec train`` (a subprocess; an
unfinished run is resumed with ``--resume auto``, a finished one skipped), chooses each model's learning
rate on validation loss, then scores the chosen run with ``mmrec eval recall`` and ``mmrec eval bpb`` on the
evaluation documents, the same ones for every model, and writes ``results.json``, ``results.md``, one figure
per corpus (``recall_CORPUS.png``) and a ``PROVENANCE.md`` stub to ``--out``.

**Three disjoint sets of documents per corpus.** The corpus's documents are ranked by length and every
``eval_period``-th one (ranks p//2, p//2 + p, ...: a spread of lengths, long ones included) is an
evaluation document; the longest ``--eval-docs`` of them are scored (each cut to ``--eval-max-tokens``).
The others are copied to ``OUT/data/CORPUS/train/`` and that folder is what every model trains on; the
trainer holds out ``val_fraction`` of it by a hash of the document id (its validation split), which is the
selection split: the learning rate is the one with the lowest final validation loss there
(``summary.json``'s ``val_loss``, mean over seeds). Evaluation documents are written to
``OUT/data/CORPUS/evaluation/`` and are read only by the evaluation commands, after the choice.

**Equal tokens, not equal time.** Every model trains for the same number of optimizer steps of the same
number of tokens (``--tokens-per-step``; batch = tokens per step / window), with the same warm-up and
cosine schedule, seed and data; wall time is recorded beside it. The Transformers are sized to the
parameter count of the default MM-Rec (``mmrec train``'s ``--match-params``).

**The recall curve.** Every model is cut to the same ``--cut`` (1024 tokens): the saved fraction of a
bucket is 1 - bits(full context) / bits(context cut to 1024 tokens). LLaMA at 1K windows saves nothing by
construction (its full context is the cut); LLaMA at 4K windows is the ceiling inside 4K (distances 1K-4K);
only memory can save anything beyond 4K.

Models are rows of ``MODELS`` (one line each: a name, the window, the flags of ``mmrec train``); corpora
are rows of ``CORPORA`` (``--data NAME=PATH`` adds or replaces one).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "shakespeare" / "*.txt"


@dataclass(frozen=True)
class ModelSpec:
    """One row of the comparison: ``mmrec train`` flags and the training window."""

    key: str
    label: str
    seq_len: int
    flags: tuple[str, ...] = ()
    window: int | None = None  # mistral's sliding attention window
    reference: bool = False  # the LLaMA rows the others are read against
    default: bool = True  # in the grid when --models is not given


LLAMA = ("--arch", "transformer", "--preset", "llama")
MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("llama-1k", "LLaMA-style, 1K windows", 1024, LLAMA, reference=True),
    ModelSpec("llama-4k", "LLaMA-style, 4K windows (the ceiling inside 4K)", 4096, LLAMA, reference=True),
    # Trained on 4K windows with a 1K sliding window: four layers reach 4K back through the window.
    ModelSpec(
        "mistral", "Mistral-style, 1K sliding window, 4K windows", 4096,
        ("--arch", "transformer", "--preset", "mistral"), window=1024,
    ),
    ModelSpec("mmrec", "MM-Rec as it is", 1024),
    ModelSpec("mmrec-delta", "MM-Rec, --short-term delta", 1024, ("--short-term", "delta")),
    ModelSpec(
        "mmrec-sparse", "MM-Rec, sparse writes (write_l1 0.01)", 1024,
        ("--selective-write", "--sparse-write", "--write-l1", "0.01"), default=False,
    ),
    # Needs mmrec train's --long-term option (being added); asking for it before then fails in the preflight.
    ModelSpec("mmrec-assoc", "MM-Rec, --long-term assoc", 1024, ("--long-term", "assoc"), default=False),
)  # fmt: skip
MODEL_KEYS = tuple(m.key for m in MODELS)


@dataclass(frozen=True)
class CorpusSpec:
    """A corpus: an ``mmrec`` data source (``builtin``, a folder or a glob of text files) and how it is split."""

    key: str
    source: str
    label: str
    eval_period: int  # every eval_period-th document by length rank is an evaluation document
    val_fraction: float  # of the rest: the trainer's validation split, used to choose the learning rate


CORPORA: tuple[CorpusSpec, ...] = (
    CorpusSpec("code", "builtin", "the built-in Python corpus (the standard library's source)", 20, 0.03),
    CorpusSpec("prose", str(SHAKESPEARE), "Shakespeare (../shared/data/shakespeare)", 6, 0.1),
)

# Smoke mode: micro models (the shape of `mmrec compare --preset micro`), windows / 8, a few steps.
SMOKE_SHAPE = ("--d-model", "64", "--n-layers", "2", "--n-heads", "2", "--chunk-size", "16", "--mem-slots", "8",
               "--summary-window", "4")  # fmt: skip
SMOKE_SCALE = 8


class PlanError(ValueError):
    """The grid cannot run as asked; the message says what to change."""


@dataclass
class Options:
    out: str
    corpora: list[str] = field(default_factory=lambda: [c.key for c in CORPORA])
    models: list[str] = field(default_factory=lambda: [m.key for m in MODELS if m.default])
    seeds: list[int] = field(default_factory=lambda: [0])
    lrs: list[float] = field(default_factory=lambda: [1e-3, 2e-3, 4e-3])
    tokens: int = 4_194_304
    minutes: float | None = None
    tokens_per_step: int = 8192
    cut: int = 1024
    eval_docs: int = 8
    eval_max_tokens: int = 131072
    eval_tokens: int = 65536  # validation tokens per trainer evaluation (the selection loss)
    skip_bpb: bool = False  # the total bits/byte then comes from the recall scores (the same tokens and context)
    evals_per_run: int = 5
    checkpoint_every: int = 50
    device: str = "auto"
    threads: int | None = None
    data: list[str] = field(default_factory=list)  # NAME=PATH: add or replace a corpus
    smoke: bool = False
    dry_run: bool = False
    report_only: bool = False
    measure_speed: float = 0.0
    sitting_minutes: float | None = None
    command: list[str] = field(default_factory=list)


@dataclass
class Run:
    """One training run of the grid."""

    corpus: str
    model: str
    seed: int
    lr: float
    dir: Path
    argv: list[str]  # mmrec train ... (without --resume)
    max_steps: int
    seq_len: int
    batch_size: int

    @property
    def tokens(self) -> int:
        return self.max_steps * self.seq_len * self.batch_size


# Plan --------------------------------------------------------------------------------------------------------


def corpora_of(opts: Options) -> dict[str, CorpusSpec]:
    table = {c.key: c for c in CORPORA}
    for item in opts.data:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise PlanError(f"--data: write NAME=PATH (a folder, a glob of text files, or builtin), got {item!r}")
        base = table.get(name, CorpusSpec(name, path, path, 6, 0.1))
        table[name] = dataclasses.replace(base, source=path, label=base.label if path == base.source else path)
    unknown = [c for c in opts.corpora if c not in table]
    if unknown:
        raise PlanError(
            f"--corpus: unknown {', '.join(unknown)}; choose from {', '.join(table)} or add --data NAME=PATH"
        )
    return {c: table[c] for c in opts.corpora}


def models_of(opts: Options) -> list[ModelSpec]:
    unknown = [m for m in opts.models if m not in MODEL_KEYS]
    if unknown:
        raise PlanError(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODEL_KEYS)}")
    return [m for m in MODELS if m.key in opts.models]


def scaled(n: int, smoke: bool) -> int:
    return max(16, n // SMOKE_SCALE) if smoke else n


def lr_name(lr: float) -> str:
    return f"{lr:g}"


def run_dir(out: Path, corpus: str, model: str, seed: int, lr: float) -> Path:
    return out / "runs" / corpus / model / f"seed{seed}-lr{lr_name(lr)}"


def data_dir(out: Path, corpus: str) -> Path:
    return out / "data" / corpus


def steps_for(opts: Options) -> int:
    return max(1, math.ceil(opts.tokens / opts.tokens_per_step))


def train_argv(opts: Options, corpus: CorpusSpec, model: ModelSpec, seed: int, lr: float) -> tuple[list[str], int, int]:
    """The ``mmrec train`` command of one run, its window and its batch."""
    out = Path(opts.out)
    seq_len = scaled(model.seq_len, opts.smoke)
    if opts.tokens_per_step % seq_len:
        raise PlanError(f"--tokens-per-step {opts.tokens_per_step} is not a multiple of {model.key}'s window {seq_len}")
    batch = opts.tokens_per_step // seq_len
    steps = steps_for(opts)
    argv = [
        "train",
        "--data", f"{corpus.key}={data_dir(out, corpus.key) / 'train'}",
        "--val-fraction", f"{corpus.val_fraction:g}",
        "--data-cache", str(out / "cache"),
        "--out", str(run_dir(out, corpus.key, model.key, seed, lr)),
        "--seed", str(seed),
        "--lr", lr_name(lr),
        "--max-steps", str(steps),
        "--seq-len", str(seq_len),
        "--batch-size", str(batch),
        "--warmup-steps", str(max(1, round(0.05 * steps))),
        "--eval-every", str(max(1, math.ceil(steps / opts.evals_per_run))),
        "--eval-tokens", str(opts.eval_tokens),
        "--checkpoint-every", str(max(1, min(opts.checkpoint_every, steps))),
        "--keep-checkpoints", "1",
        "--log-every", str(max(1, steps // 20)),
        "--no-track-stages",
        "--sample-tokens", "0",
        "--device", opts.device,
    ]  # fmt: skip
    if opts.threads:
        argv += ["--threads", str(opts.threads)]
    argv += list(model.flags)
    if model.window is not None:
        argv += ["--window", str(scaled(model.window, opts.smoke))]
    if opts.smoke:
        argv += list(SMOKE_SHAPE)
    return argv, seq_len, batch


def build_plan(opts: Options) -> list[Run]:
    """Every training run, corpus by corpus, model by model, seed by seed, learning rate by learning rate."""
    if not opts.smoke and len(opts.lrs) < 3:
        raise PlanError("--lrs: give at least 3 learning rates (every model gets the same sweep; --smoke allows fewer)")
    if len(set(opts.lrs)) != len(opts.lrs) or any(not (lr > 0 and math.isfinite(lr)) for lr in opts.lrs):
        raise PlanError(f"--lrs: distinct positive numbers, got {opts.lrs}")
    if len(set(opts.seeds)) != len(opts.seeds):
        raise PlanError(f"--seeds: distinct, got {opts.seeds}")
    if opts.tokens < 1 or opts.tokens_per_step < 1:
        raise PlanError("--tokens and --tokens-per-step must be positive")
    out = Path(opts.out)
    runs = []
    for corpus in corpora_of(opts).values():
        for model in models_of(opts):
            for seed in opts.seeds:
                for lr in opts.lrs:
                    argv, seq_len, batch = train_argv(opts, corpus, model, seed, lr)
                    path = run_dir(out, corpus.key, model.key, seed, lr)
                    runs.append(Run(corpus.key, model.key, seed, lr, path, argv, steps_for(opts), seq_len, batch))
    return runs


def eval_argvs(opts: Options, corpus: str, run: Path, dest: Path) -> dict[str, list[str]]:
    """The ``mmrec eval recall`` and ``mmrec eval bpb`` commands of a chosen run."""
    common = [
        "--checkpoint", str(run),
        "--data", str(data_dir(Path(opts.out), corpus) / "evaluation"),
        "--cut", str(scaled(opts.cut, opts.smoke)),
        "--max-tokens", str(opts.eval_max_tokens),
        "--device", opts.device,
    ]  # fmt: skip
    argvs = {"recall": ["eval", "recall", *common, "--out", str(dest / "recall")]}
    if not opts.skip_bpb:
        argvs["bpb"] = ["eval", "bpb", *common, "--out", str(dest / "bpb")]
    return argvs


# Flags that say where a command runs, not what it computes: a run may resume, or be scored, with others.
EXECUTION_FLAGS = ("--device", "--threads")


def what_runs(argv: list[str]) -> list[str]:
    """``argv`` without its execution flags (and their values)."""
    kept, skip = [], False
    for a in argv:
        if skip or a in EXECUTION_FLAGS:
            skip = not skip
            continue
        kept.append(a)
    return kept


def eval_dir(out: Path, corpus: str, model: str, seed: int) -> Path:
    return out / "eval" / corpus / model / f"seed{seed}"


def mmrec_cmd(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "mmrec", *argv]


def shell(argv: list[str]) -> str:
    return shlex.join(["mmrec", *argv])


# Models: flags checked and parameters counted by mmrec's own parser, before anything runs -------------------------


def parse_train(argv: list[str], model: str) -> Any:
    """The TrainConfig ``mmrec train`` would build from ``argv`` (PlanError naming the model if it cannot)."""
    import contextlib
    import io

    from mmrec.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = build_parser().parse_args(argv)
        return args._command.build(args)
    except SystemExit:
        raise PlanError(f"{model}: mmrec train does not accept its flags: {err.getvalue().strip()}") from None
    except ValueError as e:
        raise PlanError(f"{model}: {e}") from e


def count_parameters(cfg: Any) -> int:
    import torch

    from mmrec.models.factory import build_model

    with torch.device("meta"):
        return int(sum(p.numel() for p in build_model(cfg.model).parameters()))


def preflight(opts: Options, plan: list[Run]) -> dict[str, dict[str, Any]]:
    """Every model's flags parsed as mmrec train parses them; its parameter count and window."""
    info: dict[str, dict[str, Any]] = {}
    for run in plan:
        if run.model in info:
            continue
        cfg = parse_train(run.argv, run.model)
        info[run.model] = {
            "parameters": count_parameters(cfg),
            "seq_len": run.seq_len,
            "batch_size": run.batch_size,
            "flags": list(next(m for m in MODELS if m.key == run.model).flags),
            "model_config": cfg.model.to_dict(),
        }
    return info


def _train_step(model: Any, opt: Any, ids: Any) -> None:
    model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure_speed(plan: list[Run], seconds: float, log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Training tokens/s of each model at its window and batch on this CPU: forward + backward + AdamW steps on
    random ids for about ``seconds`` after one warm-up step (``mmrec.evals.speed.train_throughput``'s step,
    bounded by time rather than by a count of steps)."""
    import statistics

    import torch

    from mmrec.models.factory import build_model

    speeds: dict[str, dict[str, Any]] = {}
    for run in plan:
        if run.model in speeds:
            continue
        cfg = parse_train(run.argv, run.model)
        torch.manual_seed(0)
        model = build_model(cfg.model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(0, cfg.model.vocab_size, (run.batch_size, run.seq_len + 1))

        _train_step(model, opt, ids)
        times: list[float] = []
        t0 = time.perf_counter()
        while not times or time.perf_counter() - t0 < seconds:
            t = time.perf_counter()
            _train_step(model, opt, ids)
            times.append(time.perf_counter() - t)
        tokens = run.batch_size * run.seq_len
        speeds[run.model] = {
            "tokens_per_s": tokens * len(times) / sum(times),
            "median_tokens_per_s": tokens / statistics.median(times),
            "steps": len(times),
            "seconds": sum(times),
            "threads": torch.get_num_threads(),
        }
        log(
            f"speed: {run.model} at T={run.seq_len}, batch {run.batch_size}: "
            f"{speeds[run.model]['tokens_per_s']:,.0f} tokens/s ({len(times)} steps in {sum(times):.0f}s)"
        )
    return speeds


# Data: evaluation documents set aside, the rest copied for training ----------------------------------------------


def _documents(source: str) -> Iterator[tuple[str, str]]:
    from mmrec.data.cache import source_specs
    from mmrec.data.sources import SkipStats, iter_documents

    stats = SkipStats()
    for spec in source_specs([source]):
        yield from iter_documents(spec, stats)


def _relative(doc_id: str) -> str:
    """The document's path inside its source (ids are SOURCE/RELATIVE/PATH); '#' of JSONL rows made safe."""
    rel = doc_id.split("/", 1)[1] if "/" in doc_id else doc_id
    parts = [p for p in rel.replace("#", "_").split("/") if p not in ("", ".", "..")]
    return "/".join(parts) or "document"


def split_corpus(docs: list[tuple[str, str]], eval_period: int, eval_docs: int) -> dict[str, Any]:
    """Which documents are evaluation documents (every eval_period-th by length rank) and which are scored."""
    sizes = {doc_id: len(text.encode("utf-8")) for doc_id, text in docs}
    ranked = sorted(sizes, key=lambda d: (sizes[d], d))
    evaluation = [d for r, d in enumerate(ranked) if r % eval_period == eval_period // 2]
    if not evaluation or len(evaluation) == len(ranked):
        raise PlanError(f"the corpus has {len(ranked)} documents: too few to set evaluation documents apart")
    scored = sorted(evaluation, key=lambda d: (-sizes[d], d))[:eval_docs]
    digest = hashlib.sha256()
    for doc_id, text in sorted(docs):
        digest.update(doc_id.encode() + b"\0" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())
    return {
        "documents": len(ranked),
        "bytes": sum(sizes.values()),
        "evaluation": evaluation,
        "scored": [{"id": d, "bytes": sizes[d]} for d in scored],
        "train_documents": len(ranked) - len(evaluation),
        "train_bytes": sum(sizes.values()) - sum(sizes[d] for d in evaluation),
        "digest": digest.hexdigest()[:16],
    }


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def prepare_corpus(opts: Options, corpus: CorpusSpec, log: Callable[[str], None] = print) -> dict[str, Any]:
    """OUT/data/CORPUS/{train,evaluation}/ and split.json, made once (atomically) and reused; a changed corpus
    or split setting is refused rather than mixed with runs trained on the old one."""
    from mmrec.data.prepare import split_of

    dest = data_dir(Path(opts.out), corpus.key)
    settings = {"source": corpus.source, "eval_period": corpus.eval_period, "eval_docs": opts.eval_docs}
    docs = list(_documents(corpus.source))
    split = split_corpus(docs, corpus.eval_period, opts.eval_docs)
    if (dest / "split.json").is_file():
        saved = json.loads((dest / "split.json").read_text())
        if saved["settings"] != settings or saved["digest"] != split["digest"]:
            raise PlanError(
                f"{dest} was made from other documents or settings ({saved['settings']}, corpus digest "
                f"{saved['digest']}; now {settings}, {split['digest']}); its runs were trained on that split. "
                "Use another --out, or delete the folder and its runs"
            )
        return saved
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    evaluation = set(split["evaluation"])
    scored = [d["id"] for d in split["scored"]]
    selection = []
    for doc_id, text in docs:
        if doc_id in evaluation:
            if doc_id in scored:
                _write(tmp / "evaluation" / f"{scored.index(doc_id):03d}-{_relative(doc_id).replace('/', '__')}", text)
            continue
        rel = _relative(doc_id)
        _write(tmp / "train" / rel, text)
        if split_of(f"{corpus.key}/{rel}", corpus.val_fraction) == "val":
            selection.append(f"{corpus.key}/{rel}")
    split.update(settings=settings, selection=selection, val_fraction=corpus.val_fraction)
    (tmp / "split.json").write_text(json.dumps(split, indent=1) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(dest)
    log(
        f"data: {corpus.key}: {split['documents']:,} documents; {len(evaluation)} set aside for evaluation "
        f"({len(scored)} scored), {split['train_documents']:,} to train on, of which about {len(selection)} "
        f"are the validation (selection) split -> {dest}"
    )
    return split


# Runs: state, resume, skip ---------------------------------------------------------------------------------------


def checkpoints(path: Path) -> list[Path]:
    return sorted(p for p in path.glob("step-*") if p.is_dir() and (p / "meta.json").is_file())


# Exit codes of a run that was stopped (Ctrl-C, SIGTERM: mmrec train saves a checkpoint) rather than failed.
STOPPED = (0, 130, 143, -2, -15)


def failed(path: Path) -> int | None:
    """The exit code of a run whose last sitting failed (an error, not a stop) without finishing, else None."""
    lines = _lines(path / "sittings.jsonl")
    code = json.loads(lines[-1]).get("exit_code") if lines else None
    return code if code not in STOPPED and code is not None and not (path / "summary.json").is_file() else None


def run_state(run: Run) -> str:
    """'done' (summary.json at the planned step), 'failed' (its last sitting ended in an error: not retried),
    'partial' (checkpoints to resume from) or 'new'."""
    plan_file = run.dir / "plan.json"
    if plan_file.is_file():
        planned = json.loads(plan_file.read_text())["argv"]
        if what_runs(planned) != what_runs(run.argv):
            diff = sorted(set(what_runs(planned)) ^ set(what_runs(run.argv)))
            raise PlanError(
                f"{run.dir} was started with another command (differs in {' '.join(diff)}); finish it with the "
                "same settings, or use another --out"
            )
    summary = run.dir / "summary.json"
    if summary.is_file():
        steps = json.loads(summary.read_text()).get("steps")
        if steps == run.max_steps:
            return "done"
        raise PlanError(f"{run.dir} finished at step {steps}, the plan says {run.max_steps}; use another --out")
    if failed(run.dir) is not None:
        return "failed"
    return "partial" if checkpoints(run.dir) else "new"


Execute = Callable[[list[str], Path, float | None], int]


def execute(argv: list[str], log_path: Path, timeout: float | None) -> int:
    """Run ``mmrec ARGV`` with its output appended to ``log_path``; at ``timeout`` seconds it is sent SIGTERM
    (mmrec train saves a checkpoint and exits) and its exit code returned."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as f:
        f.write(f"$ {shell(argv)}\n")
        f.flush()
        proc = subprocess.Popen(mmrec_cmd(argv), stdout=f, stderr=subprocess.STDOUT)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            return proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class Sitting:
    """The time left in this sitting (--sitting-minutes), or none."""

    def __init__(self, minutes: float | None) -> None:
        self.deadline = time.monotonic() + minutes * 60 if minutes else None

    def left(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def over(self) -> bool:
        left = self.left()
        return left is not None and left <= 0


def train_run(run: Run, run_exec: Execute, sitting: Sitting, log: Callable[[str], None]) -> str:
    """Train one run (resumed when unfinished, skipped when done); returns its state afterwards."""
    state = run_state(run)
    name = f"[{run.corpus} {run.model} seed {run.seed} lr {lr_name(run.lr)}]"
    if state == "done":
        log(f"{name} done; skipped")
        return state
    if state == "failed":
        log(f"{name} failed in an earlier sitting (exit code {failed(run.dir)}; {run.dir / 'train.log'}): not retried, "
            "and its learning rate counts as worst; delete the folder to retry it")  # fmt: skip
        return state
    if sitting.over():
        return state
    argv = run.argv + (["--resume", "auto"] if state == "partial" else [])
    run.dir.mkdir(parents=True, exist_ok=True)
    if not (run.dir / "plan.json").is_file():
        (run.dir / "plan.json").write_text(json.dumps({"argv": run.argv}, indent=1) + "\n")
    log(f"{name} {state}: {shell(argv)}")
    t0, git = time.time(), git_state()  # the code this sitting ran: others may commit between sittings
    code = run_exec(argv, run.dir / "train.log", sitting.left())
    seconds = time.time() - t0
    with open(run.dir / "sittings.jsonl", "a") as f:
        f.write(json.dumps({"started": t0, "seconds": seconds, "exit_code": code, "argv": argv, "git": git}) + "\n")
    after = run_state(run)
    if code != 0 and after != "done":
        log(f"  exit code {code} after {seconds:.0f}s; log {run.dir / 'train.log'}:\n{_tail(run.dir / 'train.log')}")
    else:
        log(f"  {after} after {seconds:.0f}s")
    return after


# Choice of learning rate: validation (selection split) only ------------------------------------------------------


def validation_loss(run_path: Path) -> float | None:
    """The final validation loss of a finished run (the trainer's validation split of the training folder);
    inf for a run that failed or ended with a non-finite loss (diverged), None for one not finished yet."""
    summary = run_path / "summary.json"
    if not summary.is_file():
        return math.inf if failed(run_path) is not None else None
    value = json.loads(summary.read_text()).get("val_loss")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.inf


def choose_lr(val_losses: dict[float, list[float | None]]) -> float | None:
    """The learning rate with the lowest mean validation loss over seeds; None until every run of every lr has
    finished, or when every one failed. Ties go to the smaller lr."""
    if not val_losses or any(v is None or not vs for vs in val_losses.values() for v in vs or [None]):
        return None
    means = {lr: sum(vs) / len(vs) for lr, vs in val_losses.items()}  # type: ignore[arg-type]
    best = min(means, key=lambda lr: (means[lr], lr))
    return best if math.isfinite(means[best]) else None


# The grid --------------------------------------------------------------------------------------------------------


def run_grid(
    opts: Options,
    plan: list[Run],
    run_exec: Execute = execute,
    log: Callable[[str], None] = print,
    info: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train, choose, evaluate, corpus by corpus and model by model; the report is written at the end (and
    after every model, so an interrupted grid leaves one)."""
    out = Path(opts.out)
    sitting = Sitting(opts.sitting_minutes)
    info = info if info is not None else preflight(opts, plan)
    corpora = corpora_of(opts)
    for corpus in corpora.values():
        prepare_corpus(opts, corpus, log)
    for key in corpora:
        for model in models_of(opts):
            cell = [r for r in plan if r.corpus == key and r.model == model.key]
            for run in cell:
                train_run(run, run_exec, sitting, log)
            for seed in opts.seeds:
                losses = {lr: [validation_loss(r.dir) for r in cell if r.lr == lr] for lr in opts.lrs}
                lr = choose_lr(losses)
                if lr is None or sitting.over():
                    continue
                chosen = run_dir(out, key, model.key, seed, lr)
                dest = eval_dir(out, key, model.key, seed)
                for what, argv in eval_argvs(opts, key, chosen, dest).items():
                    made = _read_json(dest / what / "argv.json")
                    if (dest / what / "results.json").is_file() and made and what_runs(made) == what_runs(argv):
                        continue
                    if sitting.over():
                        break
                    log(f"[{key} {model.key} seed {seed}] lr {lr_name(lr)} chosen on validation; {shell(argv)}")
                    t0, git = time.time(), git_state()
                    shutil.rmtree(dest / what, ignore_errors=True)
                    code = run_exec(argv, dest / f"{what}.log", None)
                    if code != 0:
                        log(f"  exit code {code}; log {dest / f'{what}.log'}:\n{_tail(dest / f'{what}.log')}")
                        continue
                    (dest / what / "argv.json").write_text(json.dumps(argv) + "\n")
                    made = {"seconds": time.time() - t0, "git": git}
                    (dest / what / "seconds.json").write_text(json.dumps(made) + "\n")
            write_reports(opts, plan, info)
    return write_reports(opts, plan, info)


# Results ---------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _eval_rows(path: Path) -> list[dict[str, Any]]:
    import csv

    try:
        with open(path) as f:
            return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
    except OSError:
        return []


def _number(v: str) -> Any:
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["torch"] = None
    return info


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": git("rev-parse", "HEAD").strip() or None,
        # Uncommitted changes to the code the runs used: the commit alone does not say what ran.
        "modified": [line[3:] for line in git("status", "--porcelain", "--", "src", "benchmarks").splitlines()],
    }


def collect(opts: Options, plan: list[Run], info: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every raw number the grid has produced so far (missing ones as null), with how they were made."""
    out = Path(opts.out)
    corpora = corpora_of(opts)
    result: dict[str, Any] = {
        "command": opts.command,
        "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_state(),
        "machine": machine(),
        "settings": {
            **{k: v for k, v in dataclasses.asdict(opts).items() if k not in ("command", "dry_run", "report_only")},
            "steps": steps_for(opts),
            "tokens_per_run": steps_for(opts) * opts.tokens_per_step,
        },
        "lr_choice": "lowest mean over seeds of the final validation loss (summary.json val_loss) on the trainer's "
        "validation split of the training folder; evaluation documents are not in that folder",
        "corpora": {},
    }
    for key, corpus in corpora.items():
        split = _read_json(data_dir(out, key) / "split.json") or {}
        models: dict[str, Any] = {}
        for model in models_of(opts):
            runs = {}
            for r in (r for r in plan if r.corpus == key and r.model == model.key):
                summary = _read_json(r.dir / "summary.json")
                sittings = [json.loads(x) for x in _lines(r.dir / "sittings.jsonl")]
                runs[f"seed{r.seed}-lr{lr_name(r.lr)}"] = {
                    "seed": r.seed,
                    "lr": r.lr,
                    "dir": str(r.dir),
                    "command": shell(r.argv),
                    "state": "done"
                    if summary
                    else "failed"
                    if failed(r.dir) is not None
                    else ("partial" if checkpoints(r.dir) else "new"),  # fmt: skip
                    "val_loss": _finite(validation_loss(r.dir)),
                    "summary": summary,
                    "eval_curve": _eval_rows(r.dir / "eval.csv"),
                    "sittings": sittings,
                    "wall_seconds": sum(s["seconds"] for s in sittings),
                }
            seeds = {}
            for seed in opts.seeds:
                lr = choose_lr({lr: [validation_loss(run_dir(out, key, model.key, s, lr)) for s in opts.seeds]
                                for lr in opts.lrs})  # fmt: skip
                dest = eval_dir(out, key, model.key, seed)
                evals = {}
                for what in ("recall", "bpb"):
                    res = _read_json(dest / what / "results.json") if lr is not None else None
                    made = _read_json(dest / what / "seconds.json") or {}
                    evals[what] = {
                        "command": _read_json(dest / what / "argv.json"),
                        "seconds": made.get("seconds"),
                        "git": made.get("git"),
                        "results": res,
                    }
                recall = (evals["recall"]["results"] or {}).get("models") or [None]
                seeds[str(seed)] = {"chosen_lr": lr, **evals, "total_bpb_from_recall": total_bpb(recall[0])}
            models[model.key] = {
                "label": model.label,
                "reference": model.reference,
                **info.get(model.key, {}),
                "runs": runs,
                "seeds": seeds,
            }
        result["corpora"][key] = {"label": corpus.label, "source": corpus.source, "split": split, "models": models}
    return result


def total_bpb(recall: dict[str, Any] | None) -> float | None:
    """Full-context bits per byte of every scored token, from a model's recall results: its groups (repeats
    by distance, span starts, control) partition the tokens, so this is what ``mmrec eval bpb`` reports as
    overall_full_bpb for the same documents and context."""
    if not recall:
        return None
    groups = [(b, n) for b, n in zip(recall["full_bpb"], recall["repeat_bytes"], strict=True)]
    groups += [(recall[g]["full_bpb"], recall[g]["bytes"]) for g in ("span_starts", "control")]
    nbytes = sum(n for _, n in groups)
    return sum(b * n for b, n in groups if b is not None) / nbytes if nbytes else None


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _lines(path: Path) -> list[str]:
    try:
        return [x for x in path.read_text().splitlines() if x.strip()]
    except OSError:
        return []


def _f(v: Any, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def _recall_model(model: dict[str, Any], seed: str) -> dict[str, Any] | None:
    res = model["seeds"][seed]["recall"]["results"]
    return res["models"][0] if res and res.get("models") else None


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        "# Recall by distance: the LLaMA ceiling, the baselines and MM-Rec (issue 13)",
        "",
        f"Command: `{shlex.join(results['command'])}`  ",
        f"Commit {results['git']['commit']}"
        + (
            f" with uncommitted changes to {', '.join(results['git']['modified'])}"
            if results["git"]["modified"]
            else ""
        )
        + f"; {results['machine']['cpu']}, {results['machine']['cores']} cores, torch {results['machine']['torch']}; "
        f"written {results['written']}.",
        "",
        f"Budget: {s['tokens_per_run']:,} tokens per model ({s['steps']:,} steps of {s['tokens_per_step']:,} tokens; "
        "equal tokens, not equal time: wall time is shown beside it). Every model gets the same learning-rate "
        f"sweep ({', '.join(lr_name(x) for x in s['lrs'])}), chosen on **validation loss** of the trainer's "
        "validation split of the training documents (a held-out split distinct from the evaluation documents); "
        "evaluation numbers never enter the choice. Held-out evaluation documents only, the same for every model.",
        "",
        "Saved: the fraction of repeat bits that full context saves over context cut to "
        f"{scaled(s['cut'], s['smoke'])} tokens (1 - full/cut), by distance back to the repeat's previous "
        "occurrence; the same cut for every model, so LLaMA at 1K windows saves nothing by construction and "
        "LLaMA at 4K windows is the ceiling inside 4K. "
        "'-': not measured yet, or a bucket without tokens.",
    ]
    for key, corpus in results["corpora"].items():
        split = corpus["split"]
        models = corpus["models"]
        buckets: list[str] = []
        for m in models.values():
            for seed in m["seeds"]:
                rm = _recall_model(m, seed)
                buckets = buckets or (rm["buckets"] if rm else [])
        buckets = buckets or ["<1K", "1K-4K", "4K-16K", "16K-64K", "64K+"]
        scored = split.get("scored") or []
        lines += [
            "",
            f"## {key}: {corpus['label']}",
            "",
            f"{split.get('documents', '?')} documents; {len(split.get('evaluation') or [])} set aside for evaluation "
            f"(every {corpus_period(split)}th by length), the longest {len(scored)} scored "
            f"({sum(d['bytes'] for d in scored):,} bytes before the cut to {s['eval_max_tokens']:,} tokens each); "
            f"{split.get('train_documents', '?')} to train on, of which the trainer holds out about "
            f"{len(split.get('selection') or [])} ({split.get('val_fraction', '?')}) for validation.",
            "",
            "| model | params | tokens trained | lr | held-out bits/byte | "
            + " | ".join(buckets)
            + " | control | train wall |",
            "|---|---:|---:|---|---:|" + "---:|" * len(buckets) + "---:|---:|",
        ]
        order = sorted(models, key=lambda k: not models[k]["reference"])
        for mk in order:
            m = models[mk]
            for seed, sd in m["seeds"].items():
                lr = sd["chosen_lr"]
                run = m["runs"].get(f"seed{seed}-lr{lr_name(lr)}") if lr is not None else None
                summary = (run or {}).get("summary") or {}
                bpb = (sd["bpb"]["results"] or {}).get("overall_full_bpb", sd["total_bpb_from_recall"])
                rm = _recall_model(m, seed)
                saved = rm["saved_fraction"] if rm else [None] * len(buckets)
                control = rm["control"]["saved_fraction"] if rm else None
                name = m["label"] + (" (reference)" if m["reference"] else "")
                name += f", seed {seed}" if len(m["seeds"]) > 1 else ""
                lines.append(
                    f"| {name} | {m.get('parameters', 0):,} | {summary.get('tokens', 0):,} | "
                    f"{lr_name(lr) if lr is not None else 'pending'} | {_f(bpb)} | "
                    + " | ".join(_f(v) for v in saved)
                    + f" | {_f(control)} | {_minutes((run or {}).get('wall_seconds'))} |"
                )
        lines += [
            "",
            "Validation loss (nats/token, selection split) by learning rate; the chosen one in bold:",
            "",
            "| model | " + " | ".join(lr_name(x) for x in s["lrs"]) + " |",
            "|---|" + "---:|" * len(s["lrs"]) + "",
        ]
        for mk in order:
            m = models[mk]
            for seed, sd in m["seeds"].items():
                cells = []
                for lr in s["lrs"]:
                    v = m["runs"][f"seed{seed}-lr{lr_name(lr)}"]["val_loss"]
                    cells.append(f"**{_f(v, 4)}**" if lr == sd["chosen_lr"] else _f(v, 4))
                lines.append(
                    f"| {m['label']}{f', seed {seed}' if len(m['seeds']) > 1 else ''} | " + " | ".join(cells) + " |"
                )
        lines += ["", f"![recall, {key}](recall_{key}.png)"]
    return "\n".join(lines) + "\n"


def corpus_period(split: dict[str, Any]) -> Any:
    return (split.get("settings") or {}).get("eval_period", "?")


def _minutes(seconds: Any) -> str:
    return f"{seconds / 60:.1f} min" if isinstance(seconds, (int, float)) and seconds > 0 else "-"


def plot_corpus(corpus: dict[str, Any], path: Path) -> bool:
    """Saved fraction against distance, one line per model: ``mmrec.evals.recall.plot``."""
    from mmrec.evals.recall import plot

    lines = []
    for m in corpus["models"].values():
        for seed in m["seeds"]:
            rm = _recall_model(m, seed)
            if rm:
                lines.append({**rm, "name": m["label"] + (f", seed {seed}" if len(m["seeds"]) > 1 else "")})
    if not lines:
        return False
    try:
        plot(lines, path)
    except ImportError:
        return False
    return True


PROVENANCE = """# Provenance

Made by `{command}`
at commit {commit}{modified}, first written {written}.

Machine: {cpu}, {cores} cores, torch {torch}, Python {python}.

Kept here: `results.json` (every number, every command line, the machine), `results.md`, the figures.
Not kept in the repository: the run directories (`runs/`: checkpoints, logs, `eval.csv`), the copied
corpora (`data/`) and the prepared shards (`cache/`); they are where the command above was run.

Sittings: each training run's `sittings.jsonl` (copied into `results.json`) records when it ran, for how long,
its exit code and the commit with the files modified at its start; the commit above is the one when this
file was first written.
"""


def write_reports(opts: Options, plan: list[Run], info: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    results = collect(opts, plan, info)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "results.md").write_text(markdown(results))
    for key, corpus in results["corpora"].items():
        plot_corpus(corpus, out / f"recall_{key}.png")
    if not (out / "PROVENANCE.md").is_file():
        g, m = results["git"], results["machine"]
        (out / "PROVENANCE.md").write_text(
            PROVENANCE.format(
                command=shlex.join(results["command"]),
                commit=g["commit"],
                modified=f" (uncommitted changes to {', '.join(g['modified'])})" if g["modified"] else "",
                written=results["written"],
                **{k: m.get(k) for k in ("cpu", "cores", "torch", "python")},
            )
        )
    return results


# Dry run and budget ----------------------------------------------------------------------------------------------


def describe(opts: Options, plan: list[Run], info: dict[str, Any], speeds: dict[str, Any] | None) -> str:
    steps = steps_for(opts)
    per_run = steps * opts.tokens_per_step
    lines = [
        f"budget: {per_run:,} tokens per run ({steps:,} steps of {opts.tokens_per_step:,} tokens); {len(plan)} runs "
        f"({len(corpora_of(opts))} corpora x {len(models_of(opts))} models x {len(opts.seeds)} seeds x "
        f"{len(opts.lrs)} learning rates) = {per_run * len(plan):,} training tokens",
        "",
        "| model | params | window | batch | tokens/s | training hours, all its runs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    total = 0.0
    for key, m in info.items():
        n = sum(1 for r in plan if r.model == key)
        tps = (speeds or {}).get(key, {}).get("tokens_per_s")
        hours = n * per_run / tps / 3600 if tps else None
        total += hours or 0.0
        lines.append(
            f"| {key} | {m['parameters']:,} | {m['seq_len']:,} | {m['batch_size']} | "
            f"{f'{tps:,.0f}' if tps else 'not measured'} | {f'{hours:.1f}' if hours else '-'} |"
        )
    if speeds:
        lines.append(
            f"\ntraining alone: {total:.1f} hours at the measured speeds (plus evaluations during training and "
            "the recall / bpb scoring of each chosen run)"
        )
    lines += ["", "commands:"]
    corpora = corpora_of(opts)
    for key, corpus in corpora.items():
        lines.append(
            f"# {key}: copy {corpus.source} to {data_dir(Path(opts.out), key)}/train, setting aside every "
            f"{corpus.eval_period}th document by length for evaluation/ (the longest {opts.eval_docs} scored)"
        )
        for run in (r for r in plan if r.corpus == key):
            lines.append(shell(run.argv))
        for model in models_of(opts):
            for seed in opts.seeds:
                chosen = run_dir(Path(opts.out), key, model.key, seed, 0.0).with_name(f"seed{seed}-lr<chosen>")
                for argv in eval_argvs(opts, key, chosen, eval_dir(Path(opts.out), key, model.key, seed)).values():
                    lines.append(shell(argv))
    return "\n".join(lines)


def tokens_for_minutes(opts: Options, speeds: dict[str, dict[str, Any]]) -> int:
    """The largest whole number of steps the slowest model trains in --minutes, in tokens."""
    slowest = min(s["tokens_per_s"] for s in speeds.values())
    steps = max(1, int(opts.minutes * 60 * slowest / opts.tokens_per_step))  # type: ignore[operator]
    return steps * opts.tokens_per_step


# Command line ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> Options:
    d = Options(out="")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--out", required=True, help="folder for the runs, data, results.json / .md, figures")
    p.add_argument("--corpus", nargs="+", default=d.corpora, help=f"corpora (default: {' '.join(d.corpora)})")
    p.add_argument(
        "--models", nargs="+", default=d.models, help=f"of {', '.join(MODEL_KEYS)} (default: {' '.join(d.models)})"
    )
    p.add_argument("--seeds", nargs="+", type=int, default=d.seeds)
    p.add_argument("--lrs", nargs="+", type=float, default=d.lrs, help="the sweep every model gets (at least 3)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--tokens", type=int, default=None, help=f"training tokens per run (default {d.tokens:,})")
    budget.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="training minutes of the slowest model, made tokens by measuring speed",
    )
    p.add_argument("--tokens-per-step", type=int, default=d.tokens_per_step)
    p.add_argument("--cut", type=int, default=d.cut, help="context of the cut condition, the same for every model")
    p.add_argument("--eval-docs", type=int, default=d.eval_docs, help="evaluation documents scored (the longest)")
    p.add_argument("--eval-max-tokens", type=int, default=d.eval_max_tokens, help="each scored document cut to this")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="validation tokens per trainer evaluation")
    p.add_argument(
        "--skip-bpb",
        action="store_true",
        help="no mmrec eval bpb: the total comes from the recall scores (half the time)",
    )
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data", nargs="+", default=[], help="NAME=PATH: add a corpus, or replace one's source")
    p.add_argument(
        "--smoke", action="store_true", help="micro models, windows / 8, 8 steps of 1K tokens, 2 lrs, prose, 2 models"
    )
    p.add_argument("--dry-run", action="store_true", help="print the budget and every command; run nothing")
    p.add_argument("--report-only", action="store_true", help="write the reports from what exists; run nothing")
    p.add_argument(
        "--measure-speed", type=float, default=0.0, metavar="SECONDS", help="measure each model's tokens/s this long"
    )
    p.add_argument(
        "--sitting-minutes", type=float, default=None, help="stop after this long (training saves a checkpoint)"
    )
    a = p.parse_args(argv)
    opts = Options(
        out=a.out, corpora=a.corpus, models=a.models, seeds=a.seeds, lrs=a.lrs,
        tokens=a.tokens if a.tokens is not None else d.tokens, minutes=a.minutes,
        tokens_per_step=a.tokens_per_step, cut=a.cut, eval_docs=a.eval_docs, eval_max_tokens=a.eval_max_tokens,
        eval_tokens=a.eval_tokens, skip_bpb=a.skip_bpb, checkpoint_every=a.checkpoint_every, device=a.device,
        threads=a.threads,
        data=a.data, smoke=a.smoke, dry_run=a.dry_run, report_only=a.report_only, measure_speed=a.measure_speed,
        sitting_minutes=a.sitting_minutes, command=["python", "benchmarks/recall_ceiling.py", *(argv or sys.argv[1:])],
    )  # fmt: skip
    if a.smoke:
        explicit = set(argv or sys.argv[1:])
        opts.tokens = a.tokens if a.tokens is not None else 8 * 1024
        opts.tokens_per_step = a.tokens_per_step if "--tokens-per-step" in explicit else 1024
        opts.lrs = a.lrs if "--lrs" in explicit else [1e-3, 3e-3]
        opts.eval_docs = a.eval_docs if "--eval-docs" in explicit else 2
        opts.eval_max_tokens = a.eval_max_tokens if "--eval-max-tokens" in explicit else 2048
        opts.eval_tokens = a.eval_tokens if "--eval-tokens" in explicit else 2048
        opts.evals_per_run = 2
        opts.corpora = a.corpus if "--corpus" in explicit else ["prose"]
        opts.models = a.models if "--models" in explicit else ["llama-1k", "mmrec"]
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    try:
        plan = build_plan(opts)
        info = preflight(opts, plan)
        if opts.threads:  # the speed measured with the threads the runs will use
            import torch

            torch.set_num_threads(opts.threads)
        speeds = measure_speed(plan, opts.measure_speed or 20.0) if opts.measure_speed or opts.minutes else None
        if opts.minutes:
            assert speeds is not None
            opts.tokens = tokens_for_minutes(opts, speeds)
            print(f"budget: {opts.minutes:g} minutes of the slowest model -> {opts.tokens:,} tokens per run")
            plan = build_plan(opts)
        if opts.dry_run:
            print(describe(opts, plan, info, speeds))
            return 0
        if opts.report_only:
            write_reports(opts, plan, info)
        else:
            if speeds:
                print(describe(opts, plan, info, speeds).split("\ncommands:")[0])
            run_grid(opts, plan, info=info)
    except PlanError as e:
        print(f"recall_ceiling: error: {e}", file=sys.stderr)
        return 2
    print(f"results: {Path(opts.out) / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
