"""``mmrec eval lm``: the local lm-eval tasks for one or more checkpoints, side by side.

The tasks are built once from held-out text (the validation split of the first checkpoint's training run,
or ``--data``), then every checkpoint is scored on the same items by :class:`~mmrec.evals.lm_harness.MMRecEvalLM`
through ``lm_eval.simple_evaluate``. Written to ``--out``: ``tasks/`` (the YAMLs and their JSON lines, reusable
with ``lm_eval --include_path``), one ``<model>/lm_eval.json`` per checkpoint, and results.json / results.md
with the table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmrec.evals.common import write_results
from mmrec.evals.lm_tasks import TASKS, TaskSizes, write_tasks
from mmrec.models.checkpoint import LoadedModel, load, run_data_settings
from mmrec.models.mmrec import MMRecLM
from mmrec.utils.device import resolve_device

# (task, metric, lower is better) in the table's order.
METRICS = (
    ("mmrec_rolling", "bits_per_byte", True),
    ("mmrec_rolling", "word_perplexity", True),
    ("mmrec_cloze", "acc", False),
    ("mmrec_cloze", "perplexity", True),
    ("mmrec_choice", "acc", False),
    ("mmrec_choice", "acc_norm", False),
)


def heldout_texts(loaded: LoadedModel, data: list[str]) -> tuple[Iterator[str], str]:
    """The texts to build the tasks from, and where they come from: ``data``, else the run's validation split."""
    from mmrec.data.cache import cached_dataset, source_specs
    from mmrec.data.sources import SkipStats, iter_documents

    if data:

        def read() -> Iterator[str]:
            stats = SkipStats()
            for spec in source_specs(data):
                for _, text in iter_documents(spec, stats):
                    yield text

        return read(), f"--data {' '.join(data)}"
    sources, text_field, val_fraction, data_cache = run_data_settings(loaded)
    tok = loaded.tokenizer
    dataset = cached_dataset(source_specs(sources, text_field), tok, val_fraction, data_cache)

    def validation() -> Iterator[str]:
        for src in dataset.sources.values():
            for i in range(src.val.n_docs):
                yield tok.decode(src.val.doc(i).tolist())

    return validation(), f"validation split of {loaded.path.parent.name} (documents held out from its training)"


def _label(loaded: LoadedModel, taken: set[str]) -> str:
    label = f"{loaded.arch} ({loaded.path.parent.name})"
    n, base = 2, label
    while label in taken:
        label, n = f"{base} #{n}", n + 1
    taken.add(label)
    return label


def _how(loaded: LoadedModel, lm: Any, first: LoadedModel, data: list[str]) -> str:
    if isinstance(loaded.model, MMRecLM):
        how = "whole documents streamed through the state (all earlier tokens as context)"
    else:
        how = f"inputs cut to the last {lm.max_length} tokens; rolling windows of {lm.max_length}"
    if not data and loaded is not first and _data_of(loaded) != _data_of(first):
        how += f"; trained on other data than {first.path.parent.name}, so the task text may not be held out from it"
    return how


def _data_of(loaded: LoadedModel) -> tuple[Any, ...] | None:
    try:
        data, text_field, val_fraction, _ = run_data_settings(loaded)
    except ValueError:  # not a training run: no split
        return None
    return tuple(data), text_field, val_fraction


def table(results: dict[str, Any]) -> str:
    """results.md: one row per task metric, one column per model."""
    labels = list(results["models"])
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [
        "## lm-eval, local tasks",
        "",
        f"Task text: {results['source']}. Items: "
        + ", ".join(f"{t} {n}" for t, n in results["items"].items())
        + ". Arrows: which way is better.",
        "",
        "| task | metric | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for task, metric, lower in METRICS:
        if task not in results["tasks"]:
            continue
        cells = []
        for label in labels:
            r = results["models"][label]["metrics"].get(task, {})
            value, err = r.get(metric), r.get(f"{metric}_stderr")
            cells.append(fmt(value) + (f" ± {err:.4f}" if isinstance(err, float) else ""))
        lines.append(f"| {task} | {metric} {'↓' if lower else '↑'} | " + " | ".join(cells) + " |")
    lines += ["", "How each model saw the text:", ""]
    lines += [f"- {label}: {m['scoring']}" for label, m in results["models"].items()]
    return "\n".join(lines)


def _metrics(raw: dict[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's ``{"acc,none": .., "acc_stderr,none": ..}`` as ``{"acc": .., "acc_stderr": ..}`` per task."""
    out: dict[str, dict[str, float]] = {}
    for task, values in raw.items():
        out[task] = {k.split(",")[0]: float(v) for k, v in values.items() if "," in k and isinstance(v, (int, float))}
    return out


def run_eval_lm(
    checkpoints: list[str],
    out: str | Path,
    tasks: tuple[str, ...] = TASKS,
    data: list[str] | None = None,
    sizes: TaskSizes | None = None,
    device: str = "cpu",
    max_length: int | None = None,
    stream_window: int = 4096,
    bootstrap_iters: int = 200,
) -> dict[str, Any]:
    """Build the tasks, score every checkpoint, write the results; returns results.json's content."""
    # Everything is local: no hub look-ups, and lm-eval's bootstrap without a process pool.
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "DISABLE_MULTIPROC"):
        os.environ.setdefault(var, "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from mmrec.evals.lm_harness import MMRecEvalLM

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"--tasks: unknown {', '.join(unknown)}; the local tasks are {', '.join(TASKS)}")
    out = Path(out)
    dev = resolve_device(device)
    first = load(checkpoints[0], dev)
    texts, source = heldout_texts(first, list(data or []))
    items = write_tasks(texts, out / "tasks", sizes)
    manager = TaskManager(include_path=str(out / "tasks"), include_defaults=False)
    results: dict[str, Any] = {
        "source": source,
        "tasks": list(tasks),
        "items": {t: items[t] for t in tasks},
        "models": {},
    }
    taken: set[str] = set()
    for i, checkpoint in enumerate(checkpoints):
        loaded = first if i == 0 else load(checkpoint, dev)
        lm = MMRecEvalLM(loaded=loaded, max_length=max_length, stream_window=stream_window)
        evaluated = simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=manager, bootstrap_iters=bootstrap_iters, log_samples=False
        )
        assert evaluated is not None
        label = _label(loaded, taken)
        folder = out / label.replace(" ", "_").replace("(", "").replace(")", "").replace("#", "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "lm_eval.json").write_text(json.dumps(evaluated["results"], indent=1, default=str) + "\n")
        results["models"][label] = {
            "checkpoint": str(loaded.path),
            "step": loaded.step,
            "trained_seq_len": loaded.trained_seq_len,
            "scoring": _how(loaded, lm, first, list(data or [])),
            "metrics": _metrics(evaluated["results"]),
        }
        del loaded, lm
    text = table(results)
    write_results(out, results, text)
    print(text)
    return results
