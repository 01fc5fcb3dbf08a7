"""Fault campaign: kills, damaged files, a full disk, NaN/Inf and interrupted data preparation (issue 16).

    python benchmarks/faults.py                       # the whole campaign, about 10 minutes on 2 cores
    python benchmarks/faults.py --quick               # a smoke run, about 2 minutes
    python benchmarks/faults.py --out docs/results/reliability-DATE   # also writes faults.json there

Cases (each against a tiny model trained by the real command line, one thread per run):

- kills: SIGKILL a training run over and over, ``--resume auto`` after each; the kill moments are random
  times (startup, data loading, steps, checkpoint writes) and chosen points inside checkpoint and shard
  writes, some leaving a file half written (the run is a child process of this script that kills itself
  there). After each kill every checkpoint under its final name must verify and the data cache must be
  absent or intact; at the end the loss of every step equals an uninterrupted run's (<= 1e-6).
- damaged files: every file of a checkpoint, of the prepared data and a saved state, cut short at a random
  length or with a random byte flipped: the error must name the file, ``--resume auto`` must pass over a
  damaged checkpoint (and, run for real, continue from the previous one with the same losses).
- disk full: a real small tmpfs (mounted here when allowed; otherwise injected ENOSPC, said so in the
  table) filled to a few levels below a checkpoint's size; the same for data preparation.
- NaN/Inf: injected into gradients and into a batch's embeddings at random steps.
- interrupted preparation: SIGTERM / SIGKILL at a random moment of `mmrec data prepare` and of a training
  run's own preparation.

Prints a table (case, trials, detected or survived, data lost) and writes it with all details as JSON.
Exit status 1 when any case fails.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
WORDS = (  # noqa: SIM905
    "the king shall speak of love and war while the queen keeps her counsel in the hall "
    "for every word that falls from noble lips is weighed by those who listen"
).split()
MODEL = ["--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--chunk-size", "8", "--mem-slots", "4"]
MODEL += ["--summary-window", "2", "--seq-len", "32", "--batch-size", "4", "--eval-tokens", "512"]
RUN = ["--sample-tokens", "0", "--log-every", "10", "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "100000"]
RUN += ["--checkpoint-every", "2", "--keep-checkpoints", "3", "--no-track-stages", "--threads", "1"]
CHECKPOINT_FILES = ["model.safetensors", "optimizer.pt", "tokenizer.json", "meta.json", "rank0.json"]
CHECKPOINT_FILES += ["state-rank0.safetensors"]
LOADED = {"model.safetensors", "tokenizer.json", "meta.json"}


# The child: `mmrec` with timing changes and a kill point -------------------------------------------------


def child(spec: dict[str, Any], argv: list[str]) -> int:
    """Run the mmrec command line in this process, slowed down or set to SIGKILL itself at a chosen point.

    spec["slow_prepare"]: (documents per batch, seconds to sleep after each shard append);
    spec["kill"]: {"hook": where, "nth": which occurrence, "torn": leave that file half written first}.
    Only timing changes and the kill: what is computed is the command's own."""
    import torch

    import mmrec.data.prepare as prepare
    import mmrec.data.shards as shards
    import mmrec.models.checkpoint as model_ckpt
    import mmrec.train.checkpoint as train_ckpt

    if spec.get("slow_prepare"):
        per_batch, pause = spec["slow_prepare"]
        prepare.BATCH_DOCS = per_batch
        add = shards.SplitWriter.add

        def slow_add(self: Any, *args: Any) -> None:
            add(self, *args)
            time.sleep(pause)

        shards.SplitWriter.add = slow_add  # type: ignore[method-assign]

    kill = spec.get("kill")
    if not kill:
        from mmrec.cli import main

        return main(argv)
    hook, nth, torn = kill["hook"], kill["nth"], kill.get("torn", False)
    seen = {"n": 0}

    def die(half: Path | None = None) -> None:
        if half is not None and half.is_file():
            with open(half, "r+b") as f:
                f.truncate(half.stat().st_size // 2)
        os.kill(os.getpid(), signal.SIGKILL)

    def due() -> bool:
        seen["n"] += 1
        return seen["n"] == nth

    if hook in ("weights", "state"):
        real_save = train_ckpt.save_tensors
        target = "model.safetensors" if hook == "weights" else "state-rank0.safetensors"

        def save_tensors(tensors: Any, path: Any, *args: Any, **kwargs: Any) -> None:
            now = Path(path).name == target and due()
            if now and not torn:
                die()
            real_save(tensors, path, *args, **kwargs)
            if now:
                die(Path(path))

        train_ckpt.save_tensors = save_tensors  # type: ignore[assignment]
    elif hook == "optimizer":
        real_torch_save = torch.save

        def torch_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            now = str(getattr(f, "name", f)).endswith("optimizer.pt") and due()
            if now and not torn:
                die()
            real_torch_save(obj, f, *args, **kwargs)
            if now:
                f.flush()
                die(Path(f.name))

        torch.save = torch_save  # type: ignore[assignment]
    elif hook == "rank":
        real_json = train_ckpt.write_json

        def write_json(path: Path, data: Any) -> None:
            if due():
                if torn:
                    Path(path).write_text(json.dumps(data)[:100])
                die()
            real_json(path, data)

        train_ckpt.write_json = write_json  # type: ignore[assignment]
    elif hook == "meta":
        real_write = model_ckpt.write_bytes_durably

        def write_bytes_durably(path: Path, data: bytes) -> None:
            now = path.name == "meta.json" and due()
            if now and torn:
                path.write_bytes(data[: len(data) // 2])
                die()
            real_write(path, data)
            if now:
                die()  # written, not yet renamed into place

        model_ckpt.write_bytes_durably = write_bytes_durably  # type: ignore[assignment]
    elif hook == "rename":
        real_fsync = model_ckpt.fsync_dir

        def fsync_dir(path: Path) -> None:
            real_fsync(path)
            if not path.name.startswith(".step-") and due():
                die()  # renamed into place, older checkpoints not yet dropped

        model_ckpt.fsync_dir = fsync_dir  # type: ignore[assignment]
    elif hook == "retire":
        real_retire = model_ckpt._retire

        def retire(path: Path) -> None:
            if due():
                gone = path.with_name(f".{path.name}.del")
                os.replace(path, gone)
                (gone / "optimizer.pt").unlink()
                die()  # half deleted
            real_retire(path)

        model_ckpt._retire = retire
    elif hook == "shard":
        real_array = shards._write_array

        def write_array(f: Any, array: Any) -> None:
            if due():
                if torn:
                    f.write(array.tobytes()[: array.nbytes // 2])
                    f.flush()
                die()
            real_array(f, array)

        shards._write_array = write_array
    elif hook == "manifest":
        real_manifest = prepare.write_bytes_durably

        def write_manifest(path: Path, data: bytes) -> None:
            if due():
                if torn:
                    path.write_bytes(data[: len(data) // 2])
                die()
            real_manifest(path, data)

        prepare.write_bytes_durably = write_manifest  # type: ignore[assignment]
    else:
        raise SystemExit(f"unknown hook {hook}")
    from mmrec.cli import main

    return main(argv)


# Helpers ------------------------------------------------------------------------------------------------


def write_corpus(folder: Path, n_docs: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."
            for _ in range(rng.randint(3, 15))
        ]
        (folder / f"doc{i:04d}.txt").write_text("\n".join(lines) + "\n")
    return folder


def launch(argv: list[str], spec: dict[str, Any] | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "default"}
    return subprocess.Popen(
        [sys.executable, str(HERE), "--child", json.dumps(spec or {}), "--", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def losses(run: Path) -> dict[int, float]:
    with open(run / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def damage(path: Path, how: str, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        n = rng.randrange(len(data))
        path.write_bytes(bytes(data[:n]))
        return f"cut to {n}/{len(data)} bytes"
    i = rng.randrange(len(data))
    data[i] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(data))
    return f"byte {i}/{len(data)} flipped"


def audit_run(run: Path) -> list[str]:
    """Problems of the checkpoints under their final names (torn or half-used ones); [] when all verify."""
    from mmrec.models.checkpoint import STEP_DIR, is_complete
    from mmrec.train.checkpoint import verify_for_resume

    problems = []
    if not run.is_dir():
        return problems
    for p in sorted(run.iterdir()):
        if not (p.is_dir() and STEP_DIR.match(p.name)):
            continue
        if not is_complete(p):
            problems.append(f"{p.name}: incomplete under its final name")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                verify_for_resume(p)
        except Exception as e:
            problems.append(f"{p.name}: {e}")
    return problems


def audit_cache(cache: Path) -> list[str]:
    """A prepared data set under a final name in ``cache`` must load with every checksum verified."""
    from mmrec.data.shards import load_dataset

    problems = []
    if not cache.is_dir():
        return problems
    for p in cache.iterdir():
        if p.is_dir() and re.fullmatch(r"[0-9a-f]{16}", p.name):
            try:
                load_dataset(p, verify=True)
            except Exception as e:
                problems.append(f"{p.name}: {e}")
    return problems


def leftovers(*folders: Path) -> list[str]:
    out = []
    for folder in folders:
        if folder.is_dir():
            out += [p.name for p in folder.iterdir() if re.search(r"\.(tmp|old|del)(-|$)", p.name)]
    return sorted(out)


def row(case: str, trials: int, passed: int, verb: str, lost: str, notes: str = "") -> dict[str, Any]:
    return {
        "case": case,
        "trials": trials,
        "passed": passed,
        "result": f"{verb} {passed}/{trials}",
        "ok": passed == trials and trials > 0,
        "data_lost": lost,
        "notes": notes,
    }


# Kills ------------------------------------------------------------------------------------------------------


# Points inside a checkpoint write (hook, leave the file half written first), in the order they are used.
CKPT_POINTS = [
    ("weights", False),
    ("optimizer", True),
    ("meta", False),
    ("weights", True),
    ("state", True),
    ("rank", True),
    ("rename", False),
    ("retire", False),
    ("meta", True),
    ("optimizer", False),
]
SHARD_POINTS = [("shard", True), ("random-during-prepare", False), ("manifest", True), ("shard", False)]


def kill_plan(n: int, rng: random.Random) -> list[dict[str, Any]]:
    """Kinds of the ``n`` kills: half inside checkpoint writes, a fifth in data preparation, the rest at random
    moments: "in the loop" (within 16 steps of the run's first new step) or "from launch" (uniform over the
    reference run's startup time: imports, data, model, reading the checkpoint - or the first steps when this
    run starts faster); shuffled."""
    n_ckpt, n_shard = max(1, n // 2), max(1, n // 5)
    plan: list[dict[str, Any]] = [
        {"kind": "checkpoint", "hook": hook, "torn": torn} for hook, torn in (CKPT_POINTS * n)[:n_ckpt]
    ]
    plan += [{"kind": "shard", "hook": hook, "torn": torn} for hook, torn in (SHARD_POINTS * n)[:n_shard]]
    n_random = max(0, n - n_ckpt - n_shard)
    plan += [{"kind": "random", "phase": ("in the loop", "from launch")[i % 2]} for i in range(n_random)]
    rng.shuffle(plan)
    return plan


def _modified_since(path: Path, t: float) -> bool:
    try:
        return path.stat().st_mtime >= t
    except OSError:
        return False


def _logged(run: Path) -> list[int]:
    """Steps in metrics.csv now (read while the run appends to it)."""
    try:
        with open(run / "metrics.csv", newline="") as f:
            return [int(r[0]) for r in csv.reader(f) if r and r[0].isdigit()]
    except OSError:
        return []


def campaign_kills(work: Path, corpus: Path, steps: int, n_kills: int, rng: random.Random) -> dict[str, Any]:
    from mmrec.models.checkpoint import list_checkpoints, step_of

    base = ["train", *MODEL, *RUN, "--data", str(corpus), "--max-steps", str(steps)]
    ref_dir, run, cache = work / "ref", work / "killed", work / "cache-killed"
    t0 = time.perf_counter()
    proc = launch([*base, "--out", str(ref_dir), "--data-cache", str(work / "cache-ref")])
    out, err = proc.communicate(timeout=1200)
    ref_wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the reference run failed:\n{err[-3000:]}")
    reference = losses(ref_dir)
    # Startup (imports, data, model) and time per step (checkpoints included), to aim the random kills.
    with open(ref_dir / "metrics.csv", newline="") as f:
        loop_s = float(list(csv.DictReader(f))[-1]["elapsed_s"])
    step_s, startup_s = loop_s / steps, max(ref_wall - loop_s, 1.0)
    segments: list[dict[str, Any]] = []
    torn: list[str] = []
    failures: list[str] = []
    plan = kill_plan(n_kills, rng)
    for k, what in enumerate(plan):
        spec: dict[str, Any] = {}
        if what["kind"] in ("checkpoint", "shard"):
            if what["kind"] == "shard":
                shutil.rmtree(cache, ignore_errors=True)  # the run must prepare its data again
                spec["slow_prepare"] = (4, 0.02)
            if what["hook"] != "random-during-prepare":
                nth = rng.randint(1, 2) if what["kind"] == "checkpoint" else rng.randint(1, 12)
                nth = 1 if what["hook"] == "manifest" else nth  # one manifest per preparation
                spec["kill"] = {"hook": what["hook"], "nth": nth, "torn": what["torn"]}
        before = losses(run) if (run / "metrics.csv").exists() else {}
        newest = max((step_of(p) for p in list_checkpoints(run)), default=0)
        started = time.time()
        proc = launch([*base, "--out", str(run), "--data-cache", str(cache), "--resume", "auto"], spec)
        if "kill" in spec:
            out, err = proc.communicate(timeout=600)
        else:
            if what["kind"] == "shard":  # wait for the preparation to start, then a random moment of it
                while proc.poll() is None and not list(cache.glob("*.tmp-*")):
                    time.sleep(0.005)
                delay = rng.uniform(0.0, 1.0)
            elif what["phase"] == "in the loop":  # once this run logs its first new step, within the next 16 steps
                while proc.poll() is None and not (
                    _modified_since(run / "metrics.csv", started) and max(_logged(run), default=0) > newest
                ):
                    time.sleep(0.005)
                delay = rng.uniform(0.0, 16 * step_s)
            else:
                delay = rng.uniform(0.2, startup_s)
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
            out, err = proc.communicate(timeout=600)
        in_flight = [p.name for p in [*run.glob(".step-*"), *cache.glob("*.tmp-*")] if p.stat().st_mtime >= started]
        resumed = re.findall(r"resume: continuing from (\S+)", out)
        # Steps this segment computed: from the step it resumed at (0 from scratch) to the last one it logged.
        start_step = step_of(Path(resumed[0])) if resumed else 0 if "starting from scratch" in out else None
        logged = _logged(run) if _modified_since(run / "metrics.csv", started) else []
        after = losses(run) if (run / "metrics.csv").exists() else {}
        problems = audit_run(run) + audit_cache(cache)
        torn += [f"kill {k + 1}: {p}" for p in problems]
        seg = {
            "kill": k + 1,
            **what,
            "spec": spec.get("kill"),
            "returncode": proc.returncode,
            "resumed_from": resumed[0].rsplit("/", 1)[-1] if resumed else None,
            "steps_computed": max(0, max(logged, default=0) - start_step) if start_step is not None else 0,
            "steps_before": max(before, default=0),
            "steps_logged": max(after, default=0),
            "killed_while_writing": in_flight,
            "problems": problems,
        }
        segments.append(seg)
        if proc.returncode != -signal.SIGKILL:
            failures.append(f"kill {k + 1} ({what}): exit {proc.returncode}: {err[-1500:]}")
        print(
            f"  kill {k + 1:>2}/{len(plan)} {what['kind']:<10} {what.get('hook', what.get('phase', '')):<22} "
            f"resumed from {seg['resumed_from'] or '-':<12} logged {seg['steps_logged']:>4} steps; "
            f"{'in ' + ', '.join(in_flight) if in_flight else ''} {'PROBLEM ' + str(problems) if problems else ''}",
            flush=True,
        )
    proc = launch([*base, "--out", str(run), "--data-cache", str(cache), "--resume", "auto"])
    out, err = proc.communicate(timeout=1200)
    if proc.returncode != 0:
        failures.append(f"final resume: exit {proc.returncode}: {err[-1500:]}")
    got = losses(run) if (run / "metrics.csv").exists() else {}
    diffs = [abs(got[s] - reference[s]) for s in reference if s in got]
    max_diff = max(diffs, default=math.inf)
    complete = sorted(got) == sorted(reference)
    kills_done = sum(1 for s in segments if s["returncode"] == -signal.SIGKILL)
    survived = kills_done if (complete and max_diff <= 1e-6 and not torn and not failures) else 0
    final_start = re.findall(r"resume: continuing from (\S+)", out)
    final_computed = steps - (step_of(Path(final_start[0])) if final_start else 0)
    redone = sum(s["steps_computed"] for s in segments) + final_computed - steps
    written = sum(1 for s in segments if s["killed_while_writing"])
    return {
        "row": row(
            f"SIGKILL during training ({steps} steps, checkpoint every 2), --resume auto after each",
            len(plan),
            survived,
            "survived",
            f"none; {redone} steps recomputed in all; torn or half-used checkpoints: {len(torn)}",
            f"{written} kills inside a checkpoint or shard write; max |loss - uninterrupted| = {max_diff:.1e}",
        ),
        "reference_wall_s": ref_wall,
        "reference_step_s": step_s,
        "reference_startup_s": startup_s,
        "max_loss_diff": max_diff,
        "steps_equal": complete,
        "torn": torn,
        "failures": failures,
        "segments": segments,
        "ref_dir": str(ref_dir),
        "ref_cache": str(work / "cache-ref"),
    }


# Damaged files --------------------------------------------------------------------------------------------


def campaign_damage(
    work: Path, corpus: Path, ref_dir: Path, ref_cache: Path, steps: int, repeats: int, e2e: int, rng: random.Random
) -> list[dict[str, Any]]:
    import mmrec
    from mmrec.data.shards import load_dataset
    from mmrec.models.checkpoint import list_checkpoints
    from mmrec.models.state import MMRecState
    from mmrec.train.checkpoint import find_resume, verify_for_resume

    cases: list[dict[str, Any]] = []
    checkpoints = list_checkpoints(ref_dir)
    newest, previous = checkpoints[-1], checkpoints[-2]
    scratch = work / "damaged-run"
    e2e_left = e2e
    reference = losses(ref_dir)
    for name in CHECKPOINT_FILES:
        for how in ("flip", "truncate"):
            for r in range(repeats):
                shutil.rmtree(scratch, ignore_errors=True)
                shutil.copytree(ref_dir, scratch)
                target = scratch / newest.name / name
                done = damage(target, how, rng)
                checks: dict[str, Any] = {"file": f"checkpoint/{name}", "how": how, "done": done}
                try:
                    verify_for_resume(target.parent)
                    checks["verify"] = "loaded silently"
                except Exception as e:
                    checks["verify"] = "named" if str(target) in str(e) else f"unnamed: {e}"
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        chosen = find_resume(scratch, "auto")
                    except Exception as e:
                        chosen = None
                        checks["resume_error"] = str(e)
                named = any(str(target) in str(w.message) for w in caught)
                checks["fallback"] = chosen is not None and chosen.name == previous.name and named
                if name in LOADED:
                    try:
                        mmrec.load(target.parent)
                        checks["load"] = "loaded silently"
                    except Exception as e:
                        checks["load"] = "named" if str(target) in str(e) else f"unnamed: {e}"
                if r == 0 and e2e_left > 0:  # the real thing: the command line resumes from the previous one
                    e2e_left -= 1
                    base = ["train", *MODEL, *RUN, "--data", str(corpus), "--max-steps", str(steps)]
                    proc = launch([*base, "--out", str(scratch), "--data-cache", str(ref_cache), "--resume", "auto"])
                    out, err = proc.communicate(timeout=600)
                    got = losses(scratch)
                    same = all(abs(got[s] - reference[s]) <= 1e-6 for s in reference) and sorted(got) == sorted(
                        reference
                    )
                    checks["e2e"] = (
                        proc.returncode == 0
                        and f"continuing from {scratch / previous.name}" in out
                        and str(target) in err
                        and same
                    )
                ok = checks["verify"] == "named" and checks["fallback"] and checks.get("load", "named") == "named"
                checks["detected"] = bool(ok and checks.get("e2e", True))
                cases.append(checks)
    # Prepared data.
    (data_root,) = [p for p in ref_cache.iterdir() if re.fullmatch(r"[0-9a-f]{16}", p.name)]
    (source,) = [p.name for p in data_root.iterdir() if p.is_dir()]
    data_files = ["manifest.json", "tokenizer.json"] + [
        f"{source}/{split}.{kind}.bin" for split in ("train", "val") for kind in ("tokens", "offsets")
    ]
    scratch_data = work / "damaged-data" / data_root.name
    for name in data_files:
        for how in ("flip", "truncate"):
            for _ in range(repeats):
                shutil.rmtree(scratch_data, ignore_errors=True)
                shutil.copytree(data_root, scratch_data)
                target = scratch_data / name
                done = damage(target, how, rng)
                checks = {"file": f"data/{name}", "how": how, "done": done}
                try:
                    load_dataset(scratch_data)
                    checks["load"] = "loaded silently"
                except Exception as e:
                    checks["load"] = "named" if str(target) in str(e) else f"unnamed: {e}"
                checks["detected"] = checks["load"] == "named"
                cases.append(checks)
    # A saved state.
    loaded = mmrec.load(newest)
    model = loaded.model
    import torch

    state = model(torch.randint(0, 257, (2, 37)), state=model.init_state(2)).state
    state_path = work / "state.safetensors"
    for how in ("flip", "truncate"):
        for _ in range(repeats * 3):
            state.save(state_path, config=model.config.to_dict())
            done = damage(state_path, how, rng)
            checks = {"file": "state.safetensors", "how": how, "done": done}
            try:
                MMRecState.load(state_path, config=model.config.to_dict())
                checks["load"] = "loaded silently"
            except Exception as e:
                checks["load"] = "named" if str(state_path) in str(e) else f"unnamed: {e}"
            checks["detected"] = checks["load"] == "named"
            cases.append(checks)
    return cases


# Disk full --------------------------------------------------------------------------------------------------


def _mount_tmpfs(where: Path, size: int) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
        )
    except OSError:
        return False
    return done.returncode == 0


def _fill(fs: Path, leave: int) -> Path:
    filler = fs / "filler.bin"
    free = shutil.disk_usage(fs).free
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def campaign_disk_full(work: Path, corpus: Path, ref_dir: Path, ref_cache: Path, quick: bool) -> dict[str, Any]:
    from mmrec.models.checkpoint import list_checkpoints

    ckpt_bytes = sum(p.stat().st_size for p in list_checkpoints(ref_dir)[-1].iterdir())
    fs = work / "tmpfs"
    size = max(2 << 20, 4 * ckpt_bytes + (1 << 20))
    mounted = _mount_tmpfs(fs, size)
    trials: list[dict[str, Any]] = []
    base = ["train", *MODEL, *RUN, "--data", str(corpus)]
    try:
        if not mounted:
            return {"mounted": False, "trials": _disk_full_injected(work, corpus, ref_cache)}
        # Checkpoints: a run to step 2, the disk filled to a level, resumed to step 4 (its checkpoint fails).
        for fraction in (0.6,) if quick else (0.05, 0.3, 0.6, 0.9):
            run = fs / "run"
            shutil.rmtree(run, ignore_errors=True)
            first = launch([*base, "--max-steps", "2", "--out", str(run), "--data-cache", str(ref_cache)])
            _, err = first.communicate(timeout=600)
            if first.returncode != 0:
                trials.append({"case": "checkpoint", "fraction": fraction, "ok": False, "error": err[-800:]})
                continue
            filler = _fill(fs, int(fraction * ckpt_bytes))
            proc = launch(
                [*base, "--max-steps", "4", "--out", str(run), "--data-cache", str(ref_cache), "--resume", "auto"]
            )
            _, err = proc.communicate(timeout=600)
            message = next((line for line in err.splitlines() if "no space left" in line), "")
            intact = audit_run(run) == [] and [p.name for p in list_checkpoints(run)] == ["step-000002"]
            left = leftovers(run)
            filler.unlink()
            again = launch(
                [*base, "--max-steps", "4", "--out", str(run), "--data-cache", str(ref_cache), "--resume", "auto"]
            )
            again.communicate(timeout=600)
            ok = (
                proc.returncode == 1
                and "step-000002 is intact" in message
                and "Traceback" not in err
                and intact
                and not left
                and again.returncode == 0
                and audit_run(run) == []
            )
            trials.append(
                {
                    "case": "checkpoint",
                    "free_bytes": int(fraction * ckpt_bytes),
                    "checkpoint_bytes": ckpt_bytes,
                    "returncode": proc.returncode,
                    "message": message,
                    "previous_intact": intact,
                    "leftovers": left,
                    "resumed_after_freeing": again.returncode == 0,
                    "ok": ok,
                }
            )
            shutil.rmtree(run, ignore_errors=True)
        # Data preparation: `mmrec data prepare`, and a training run's own cache.
        for which in ("mmrec data prepare", "training run's cache"):
            filler = _fill(fs, 16 << 10)
            target = fs / "data" if which == "mmrec data prepare" else fs / "cache"
            if which == "mmrec data prepare":
                argv = ["data", "prepare", "--data", str(corpus), "--out", str(target)]
            else:
                argv = [*base, "--max-steps", "2", "--out", str(work / "run-cache"), "--data-cache", str(target)]
            proc = launch(argv)
            _, err = proc.communicate(timeout=600)
            message = next((line for line in err.splitlines() if "no space left" in line), "")
            nothing = not target.exists() or not any(target.iterdir())
            filler.unlink()
            again = launch(argv)
            again.communicate(timeout=600)
            ok = proc.returncode == 1 and bool(message) and "Traceback" not in err and nothing
            ok = ok and again.returncode == 0 and not leftovers(fs, target)
            trials.append(
                {
                    "case": which,
                    "returncode": proc.returncode,
                    "message": message,
                    "nothing_left": nothing,
                    "prepared_after_freeing": again.returncode == 0,
                    "ok": ok,
                }
            )
            shutil.rmtree(target, ignore_errors=True)
    finally:
        if mounted:
            subprocess.run(["umount", str(fs)], capture_output=True)
    return {"mounted": True, "tmpfs_bytes": size, "trials": trials}


def _disk_full_injected(work: Path, corpus: Path, ref_cache: Path) -> list[dict[str, Any]]:
    """Where no filesystem can be mounted: OSError(ENOSPC) injected into the writers, in this process."""
    import errno

    import mmrec.data.shards as shards
    import mmrec.train.checkpoint as train_ckpt
    from mmrec.data.prepare import prepare_dataset
    from mmrec.data.sources import SourceSpec
    from mmrec.models.checkpoint import list_checkpoints
    from mmrec.tokenizer import ByteTokenizer
    from mmrec.train.config import TrainConfig
    from mmrec.train.trainer import Trainer
    from mmrec.utils.files import DiskFullError

    def config(run: Path, max_steps: int, resume: str | None = None) -> TrainConfig:
        values = dict(d_model=32, n_layers=2, n_heads=2, chunk_size=8, mem_slots=4, summary_window=2, seq_len=32)
        values.update(batch_size=4, eval_tokens=512, sample_tokens=0, track_stages=False, checkpoint_every=2)
        values.update(data=[str(corpus)], data_cache=str(ref_cache), out=str(run), max_steps=max_steps)
        values.update(eval_every=100000, resume=resume)
        return TrainConfig.from_flat(values)

    trials = []
    real = train_ckpt.save_tensors

    def full(tensors: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        if "step-000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, *args, **kwargs)

    run = work / "injected-run"
    Trainer(config(run, 2)).fit()
    train_ckpt.save_tensors = full  # type: ignore[assignment]
    try:
        Trainer(config(run, 4, "auto")).fit()
        message = ""
    except DiskFullError as e:
        message = str(e)
    finally:
        train_ckpt.save_tensors = real  # type: ignore[assignment]
    ok = "step-000002 is intact" in message and [p.name for p in list_checkpoints(run)] == ["step-000002"]
    trials.append({"case": "checkpoint (injected)", "message": message, "ok": ok and not leftovers(run)})
    real_array = shards._write_array

    def full_array(f: Any, array: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    shards._write_array = full_array
    try:
        prepare_dataset([SourceSpec(str(corpus))], ByteTokenizer(), work / "injected-data", progress=False)
        message = ""
    except DiskFullError as e:
        message = str(e)
    finally:
        shards._write_array = real_array
    ok = "no space left" in message and not (work / "injected-data").exists() and not leftovers(work)
    trials.append({"case": "mmrec data prepare (injected)", "message": message, "ok": ok})
    return trials


# NaN / Inf ---------------------------------------------------------------------------------------------------


def campaign_bad_numbers(work: Path, corpus: Path, ref_cache: Path, n_bad: int, rng: random.Random) -> dict[str, Any]:
    import torch

    import mmrec.train.trainer as trainer_mod
    from mmrec.train.config import TrainConfig
    from mmrec.train.distributed import unwrap
    from mmrec.train.trainer import Trainer

    steps = 4 * n_bad + 4
    kinds = ["gradient NaN", "gradient Inf", "batch NaN", "batch Inf"]
    bad_steps = sorted(rng.sample(range(2, steps + 1), n_bad))
    plan = {s: kinds[i % len(kinds)] for i, s in enumerate(bad_steps)}
    now = {"step": 0}
    real_forward, real_clip = Trainer.forward_loss, trainer_mod.clip_gradients

    def forward(self: Any, inputs: Any, targets: Any, state: Any) -> Any:
        now["step"] = self.step + 1
        kind = plan.get(now["step"], "")
        if not kind.startswith("batch"):
            return real_forward(self, inputs, targets, state)
        value = math.nan if kind.endswith("NaN") else math.inf
        hook = unwrap(self.model).embed.register_forward_hook(lambda m, i, out: out + value)
        try:
            return real_forward(self, inputs, targets, state)
        finally:
            hook.remove()

    def clip(params: Any, max_norm: float) -> Any:
        params = list(params)
        kind = plan.get(now["step"], "")
        if kind.startswith("gradient"):
            params[rng.randrange(len(params))].grad.view(-1)[0] = math.nan if kind.endswith("NaN") else math.inf
        return real_clip(params, max_norm)

    Trainer.forward_loss = forward  # type: ignore[method-assign]
    trainer_mod.clip_gradients = clip
    try:
        values = dict(d_model=32, n_layers=2, n_heads=2, chunk_size=8, mem_slots=4, summary_window=2, seq_len=32)
        values.update(batch_size=4, eval_tokens=512, sample_tokens=0, track_stages=False, checkpoint_every=steps)
        values.update(data=[str(corpus)], data_cache=str(ref_cache), out=str(work / "nan-run"), max_steps=steps)
        values.update(eval_every=steps, max_bad_steps=n_bad + 1, threads=1)
        trainer = Trainer(TrainConfig.from_flat(values))
        summary = trainer.fit()
    finally:
        Trainer.forward_loss = real_forward  # type: ignore[method-assign]
        trainer_mod.clip_gradients = real_clip
    with open(work / "nan-run" / "metrics.csv", newline="") as f:
        skipped = sorted(int(r["step"]) for r in csv.DictReader(f) if r["skipped"] == "1")
    updates = max(int(s["step"]) for s in trainer.opt.state.values())
    finite = all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
    ok_steps = [s for s in bad_steps if s in skipped]
    ok = summary["steps"] == steps and skipped == bad_steps and updates == steps - n_bad and finite
    return {
        "row": row(
            "NaN/Inf in a gradient or a batch",
            n_bad,
            len(ok_steps) if ok else 0,
            "skipped and counted",
            "none; the run finished",
            f"{steps} steps, {summary['skipped_steps']} skipped ({', '.join(f'{s}: {plan[s]}' for s in bad_steps)}); "
            f"at most {updates} optimizer updates per parameter; weights finite: {finite}",
        ),
        "plan": {str(s): k for s, k in plan.items()},
        "skipped": skipped,
        "summary_skipped": summary["skipped_steps"],
    }


# Interrupted preparation ----------------------------------------------------------------------------------


def campaign_prepare(work: Path, corpus: Path, n: int, rng: random.Random) -> dict[str, Any]:
    from mmrec.data.prepare import prepare_dataset
    from mmrec.data.shards import load_dataset
    from mmrec.data.sources import SourceSpec
    from mmrec.tokenizer import ByteTokenizer

    trials = []
    slow = {"slow_prepare": (4, 0.02)}
    for i in range(n):
        sig = signal.SIGTERM if i % 2 == 0 else signal.SIGKILL
        trainer = i % 3 == 2  # every third: the trainer's own preparation
        folder = work / f"prep-{i}"
        folder.mkdir()
        if trainer:
            target = folder / "cache"
            argv = ["train", *MODEL, *RUN, "--data", str(corpus), "--max-steps", "2", "--out", str(folder / "run")]
            argv += ["--data-cache", str(target)]
            pattern = (target, "*.tmp-*")
        else:
            target = folder / "data"
            argv = ["data", "prepare", "--data", str(corpus), "--out", str(target)]
            pattern = (folder, "data.tmp-*")
        proc = launch(argv, slow)
        while proc.poll() is None and not list(pattern[0].glob(pattern[1])):
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 1.0))
        during = bool(list(pattern[0].glob(pattern[1])))
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=600)
        if trainer:
            half_used = audit_cache(target)
            data_dirs = (
                [p for p in target.iterdir() if re.fullmatch(r"[0-9a-f]{16}", p.name)] if target.exists() else []
            )
            again = launch(argv)
            out2, err2 = again.communicate(timeout=600)
            redone = "preparing" in out2 if data_dirs == [] else "reusing" in out2
            ok = again.returncode == 0 and not half_used and redone and not leftovers(target)
        else:
            half_used = [] if not target.exists() else ["data: present after the kill"]
            if target.exists():  # finished before the signal: it must then be whole
                try:
                    load_dataset(target)
                    half_used = []
                except Exception as e:
                    half_used = [str(e)]
            prepare_dataset([SourceSpec(str(corpus))], ByteTokenizer(), target, progress=False)
            ok = not half_used and load_dataset(target) is not None and not leftovers(folder)
        expected = 143 if sig == signal.SIGTERM else -signal.SIGKILL
        ok = ok and (proc.returncode == expected or not during)
        trials.append(
            {
                "where": "training run's own preparation" if trainer else "mmrec data prepare",
                "signal": signal.Signals(sig).name,
                "during_shard_writes": during,
                "returncode": proc.returncode,
                "sigterm_message": next((ln for ln in err.splitlines() if "stopped by SIGTERM" in ln), ""),
                "half_used": half_used,
                "ok": ok,
            }
        )
        shutil.rmtree(folder, ignore_errors=True)
    return {"trials": trials}


# Main -----------------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import torch

    cpu = ""
    if Path("/proc/cpuinfo").is_file():
        names = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else ""
    return {
        "nproc": subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip(),
        "cpu": cpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def commit() -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=HERE.parent.parent).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run of every case (about 2 minutes)")
    p.add_argument("--kills", type=int, default=None, help="SIGKILLs of the training run (default 20; quick 4)")
    p.add_argument("--repeats", type=int, default=None, help="damaged-file cases per file and kind (3; quick 1)")
    p.add_argument("--steps", type=int, default=None, help="steps of the killed run (default 160; quick 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for faults.json (default: the work folder)")
    p.add_argument("--work", default=None, help="scratch folder (default: a new temporary one, removed after)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        return child(json.loads(args.child), args.rest)
    kills = args.kills or (4 if args.quick else 20)
    repeats = args.repeats or (1 if args.quick else 3)
    steps = args.steps or (60 if args.quick else 160)
    rng = random.Random(args.seed)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mmrec-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    corpus = write_corpus(work / "corpus", 120, seed=args.seed)
    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {}

    print(f"kills: {kills} SIGKILLs of a {steps}-step run", flush=True)
    t0 = time.perf_counter()
    k = campaign_kills(work, corpus, steps, kills, rng)
    rows.append(k["row"])
    details["kills"] = {key: v for key, v in k.items() if key != "row"} | {"wall_s": time.perf_counter() - t0}
    ref_dir, ref_cache = Path(k["ref_dir"]), Path(k["ref_cache"])

    print("damaged files", flush=True)
    t0 = time.perf_counter()
    e2e = 2 if args.quick else len(CHECKPOINT_FILES) * 2
    cases = campaign_damage(work, corpus, ref_dir, ref_cache, steps, repeats, e2e, rng)
    for group, label in (("checkpoint/", "checkpoint"), ("data/", "prepared data"), ("state", "saved state")):
        mine = [c for c in cases if c["file"].startswith(group)]
        files = sorted({c["file"].split("/", 1)[-1] for c in mine})
        runs = sum(1 for c in mine if "e2e" in c)
        note = f"files: {', '.join(files)}; truncation and byte flip"
        if group == "checkpoint/":
            note += f"; --resume auto falls back to the previous checkpoint, {runs} of them resumed for real"
        lost = "the damaged checkpoint (2 steps recomputed)" if group == "checkpoint/" else "the damaged file"
        if group == "data/":
            lost = "none: a damaged cache is prepared again"
        rows.append(
            row(
                f"damaged {label} file", len(mine), sum(c["detected"] for c in mine), "detected, file named", lost, note
            )
        )
    details["damage"] = {"cases": cases, "wall_s": time.perf_counter() - t0}

    print("disk full", flush=True)
    t0 = time.perf_counter()
    d = campaign_disk_full(work, corpus, ref_dir, ref_cache, args.quick)
    how = "real tmpfs" if d["mounted"] else "injected ENOSPC (mount refused)"
    for case in ("checkpoint", "data"):
        mine = [t for t in d["trials"] if (t["case"].startswith("checkpoint")) == (case == "checkpoint")]
        lost = "none: previous checkpoint intact, nothing partial left" if case == "checkpoint" else "none"
        rows.append(
            row(
                f"disk full during a {'checkpoint' if case == 'checkpoint' else 'data preparation'} ({how})",
                len(mine),
                sum(bool(t["ok"]) for t in mine),
                "clear error, recovered",
                lost,
                "; ".join(t.get("message", "")[:160] for t in mine[:1]),
            )
        )
    details["disk_full"] = d | {"wall_s": time.perf_counter() - t0}

    print("NaN/Inf", flush=True)
    t0 = time.perf_counter()
    b = campaign_bad_numbers(work, corpus, ref_cache, 4 if args.quick else 8, rng)
    rows.append(b["row"])
    details["bad_numbers"] = {key: v for key, v in b.items() if key != "row"} | {"wall_s": time.perf_counter() - t0}

    print("interrupted preparation", flush=True)
    t0 = time.perf_counter()
    prep = campaign_prepare(work, corpus, 3 if args.quick else 6, rng)
    trials = prep["trials"]
    during = sum(t["during_shard_writes"] for t in trials)
    rows.append(
        row(
            "SIGTERM/SIGKILL during data preparation",
            len(trials),
            sum(bool(t["ok"]) for t in trials),
            "never used, prepared again",
            "none",
            f"{during} signals landed during shard writes; "
            + ", ".join(f"{t['signal']} in {t['where']}" for t in trials),
        )
    )
    details["prepare"] = prep | {"wall_s": time.perf_counter() - t0}

    wall = time.perf_counter() - t_start
    print()
    print("| case | trials | detected or survived | data lost |")
    print("|---|---:|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['trials']} | {r['result']}{'' if r['ok'] else ' FAILED'} | {r['data_lost']} |")
    print()
    for r in rows:
        if r["notes"]:
            print(f"- {r['case']}: {r['notes']}")
    print(f"\nwall time {wall:.0f} s")
    result = {
        "command": " ".join(["python", *sys.argv]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        **commit(),
        "machine": machine(),
        "quick": args.quick,
        "seed": args.seed,
        "wall_s": wall,
        "rows": rows,
        "details": details,
    }
    out = Path(args.out) if args.out else work
    out.mkdir(parents=True, exist_ok=True)
    (out / "faults.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {out / 'faults.json'}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
