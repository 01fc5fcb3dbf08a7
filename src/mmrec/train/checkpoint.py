"""What a training checkpoint adds to the model checkpoint of :mod:`mmrec.models.checkpoint`.

    out/step-000123/
        model.safetensors      weights (never pickled)          } the format every
        tokenizer.json         the tokenizer of the run         } command writes
        meta.json              model config, step, tokens seen, training config - written last
        optimizer.pt           AdamW state (loaded with weights_only=True)
        state-rank0.safetensors  carried recurrent states of rank 0's streams
        rank0.json             data cursor and RNG states of rank 0

A directory counts as complete only under its final name and with meta.json;
``--resume auto`` ignores anything else (a half-written checkpoint from a
killed run) and says so.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmrec.models.checkpoint import (
    begin,
    commit,
    is_complete,
    list_checkpoints,
    read_json,
    step_dir_name,
    write_json,
)

__all__ = [
    "begin",
    "commit",
    "find_resume",
    "is_complete",
    "list_checkpoints",
    "read_json",
    "rng_state",
    "set_rng_state",
    "step_dir_name",
    "write_json",
]


def find_resume(out: Path, resume: str) -> Path | None:
    """The checkpoint ``--resume`` names: 'auto' -> newest complete in ``out`` (None if none)."""
    if resume == "auto":
        found = list_checkpoints(out)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume: no checkpoint directory {path}")
    if not is_complete(path):
        raise ValueError(f"--resume: {path} is not a complete checkpoint (no meta.json or model.safetensors)")
    return path


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": _jsonable(random.getstate()),
        "numpy": _jsonable(np.random.get_state(legacy=False)),
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {**numpy_state["state"], "key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _jsonable(x: Any) -> Any:
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.integer):
        return int(x)
    return x
