"""What every evaluation needs: a model from a checkpoint (:func:`mmrec.load`), and a place to write results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmrec.models.checkpoint import CheckpointError, LoadedModel, load, resolve_checkpoint, run_data_settings

__all__ = [
    "CheckpointError",
    "LoadedModel",
    "load_checkpoint",
    "resolve_checkpoint",
    "run_data_settings",
    "write_results",
]

load_checkpoint = load


def write_results(out: str | Path, results: dict[str, Any], table: str) -> Path:
    """results.json and results.md in ``out`` (created)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "results.md").write_text(table.rstrip() + "\n")
    return out
