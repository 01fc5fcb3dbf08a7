"""The stages of a finished ``mmrec train`` run, measured over its checkpoints (``mmrec stages RUN``)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from mmrec.data.cache import cached_dataset, source_specs
from mmrec.data.shards import PreparedDataset
from mmrec.models.checkpoint import LoadedModel, list_checkpoints, load, run_data_settings
from mmrec.stages.tracker import REFS_FILE, StageTracker


def run_dataset(loaded: LoadedModel) -> PreparedDataset:
    """The prepared dataset of a training run, where the trainer keeps it (prepared there, quietly, when missing)."""
    data, text_field, val_fraction, data_cache = run_data_settings(loaded)
    specs = source_specs(data, text_field)
    return cached_dataset(
        specs, loaded.tokenizer, val_fraction, data_cache, log=lambda _: None, progress=False, verify=False
    )


def _read_eval_csv(path: Path) -> dict[int, dict[str, float]]:
    if not path.is_file():
        return {}
    rows: dict[int, dict[str, float]] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            try:
                step = int(r["step"])
                rows[step] = {
                    "tokens": float(r.get("tokens") or "nan"),
                    "val_loss": float(r.get("val_loss") or "nan"),
                    "val_bpb": float(r.get("val_bpb") or "nan"),
                }
            except (KeyError, ValueError):
                continue
    return rows


def track_run(run_dir: str | Path, device: str = "cpu", **tracker_kwargs: Any) -> dict[str, Any]:
    """Measure the stages over the checkpoints of a finished ``mmrec train`` run; writes stages.json/png into it.

    Every complete checkpoint is loaded and measured; the validation curve
    comes from the run's ``eval.csv``. The references are cached in the run
    directory (``stage_refs.json``), so a second call, or the trainer's own
    tracker, reuses them.
    """
    run = Path(run_dir)
    found = list_checkpoints(run)
    if not found:
        raise ValueError(f"{run} holds no complete checkpoint (step-NNNNNN directories) of `mmrec train`")
    evals = _read_eval_csv(run / "eval.csv")
    first = load(found[0], device)
    cfg, tokenizer = first.config, first.tokenizer
    dataset = run_dataset(first)
    kwargs = {"seed": cfg.get("seed", 0), "cache_path": run / REFS_FILE, "device": device, **tracker_kwargs}
    tracker = StageTracker(dataset, tokenizer, cfg.get("eval_seq_len") or first.trained_seq_len, **kwargs)
    for step, row in sorted(evals.items()):
        n_tokens = int(row["tokens"]) if math.isfinite(row["tokens"]) else 0
        tracker.record_eval(step, n_tokens, row["val_loss"], row["val_bpb"])
    for path in found:
        lm = first if path == found[0] else load(path, device)
        meta = lm.meta
        row = evals.get(lm.step, {})
        tracker.measure(
            lm.model,
            lm.step,
            int(meta.get("tokens", row.get("tokens", 0))),
            row.get("val_loss", math.nan),
            row.get("val_bpb", math.nan),
        )
    tracker.save(run)
    return tracker.stages()
