"""Checkpoint directories: written under a temporary name, then renamed.

    out/step-000123/
        model.safetensors      weights (never pickled)
        optimizer.pt           AdamW state (loaded with weights_only=True)
        state-rank0.safetensors  carried recurrent states of rank 0's streams
        rank0.json             data cursor and RNG states of rank 0
        tokenizer.json         the tokenizer of the run
        meta.json              step, tokens seen, config - written last

A directory counts as complete only under its final name and with meta.json;
``--resume auto`` ignores anything else (a half-written checkpoint from a
killed run) and says so.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def is_complete(path: Path) -> bool:
    return bool(STEP_DIR.match(path.name)) and (path / "meta.json").is_file() and (path / "model.safetensors").is_file()


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    complete = [p for p in found if is_complete(p)]
    for p in sorted(set(found) - set(complete)):
        warnings.warn(f"ignoring incomplete checkpoint {p} (no meta.json or weights)", stacklevel=2)
    return sorted(complete, key=lambda p: int(STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


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


def begin(out: Path, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of ``step``."""
    tmp = out / f".{step_dir_name(step)}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, meta: dict[str, Any], keep: int) -> Path:
    """Write meta.json, rename into place, drop all but the newest ``keep``."""
    _write_json(tmp / "meta.json", meta)
    final = tmp.parent / tmp.name[1:].removesuffix(".tmp")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(final.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    _write_json(path, data)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


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
