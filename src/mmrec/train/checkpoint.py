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
killed run) and says so. Every file is checked against the size and sha256
meta.json records before a resume: ``--resume auto`` passes over a damaged
checkpoint with a warning naming the file and takes the newest intact one.
A checkpoint that cannot be written (a full disk) is removed whole; the
previous ones stay as they were.
"""

from __future__ import annotations

import datetime as dt
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from mmrec.config import ConfigError
from mmrec.models import MMRecState
from mmrec.models.checkpoint import (
    CheckpointError,
    abandon,
    begin,
    commit,
    is_complete,
    list_checkpoints,
    model_meta,
    read_json,
    step_dir_name,
    tensor_bytes,
    verify,
    write_json,
)
from mmrec.train.distributed import (
    all_reduce_sum,
    barrier,
    full_state_dict,
    load_full_state_dict,
    load_optimizer_state,
    optimizer_state,
    unwrap,
)
from mmrec.utils.files import save_tensors

__all__ = [
    "CheckpointError",
    "begin",
    "commit",
    "find_resume",
    "is_complete",
    "list_checkpoints",
    "TrainerCheckpoints",
    "read_json",
    "rng_state",
    "set_rng_state",
    "step_dir_name",
    "verify_for_resume",
    "write_json",
]


class DamagedCheckpointWarning(UserWarning):
    """``--resume auto`` passed over a checkpoint whose files do not match their checksums."""


def verify_for_resume(path: Path) -> dict[str, Any]:
    """meta.json of ``path`` after checking every file a resume reads; CheckpointError names a bad one."""
    meta = verify(path)
    if "files" in meta:  # written with checksums: what a resume reads must have been written with it
        ranks = [f"rank{r}.json" for r in range(int(meta.get("world_size", 1)))]
        verify(path, names=[], require=("model.safetensors", "optimizer.pt", *ranks))
    return meta


def find_resume(out: Path, resume: str) -> Path | None:
    """The checkpoint ``--resume`` names: 'auto' -> the newest intact one in ``out`` (None if there is none).

    A newer checkpoint with a damaged, cut or missing file is passed over with a warning that names the
    file; if every checkpoint is damaged, CheckpointError (nothing is started over silently)."""
    if resume == "auto":
        damaged = []
        for path in reversed(list_checkpoints(out)):
            try:
                verify_for_resume(path)
            except CheckpointError as e:
                warnings.warn(f"resume: passing over {path.name}: {e}", DamagedCheckpointWarning, stacklevel=2)
                damaged.append(str(e))
                continue
            return path
        if damaged:
            raise CheckpointError(
                f"resume: no intact checkpoint in {out}: {'; '.join(damaged)}. Nothing was changed; move the "
                "damaged step directories away to start from scratch, or restore them from a copy"
            )
        return None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume: no checkpoint directory {path}")
    if not is_complete(path):
        raise ValueError(f"--resume: {path} is not a complete checkpoint (no meta.json or model.safetensors)")
    try:
        verify_for_resume(path)
    except CheckpointError as e:
        raise CheckpointError(f"--resume: {e}; nothing was changed (resume from another checkpoint)") from e
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


class TrainerCheckpoints:
    """The trainer's checkpoints: the model checkpoint every command writes, plus optimiser, carried states,
    data cursor and RNG of every rank (mixed into :class:`mmrec.train.trainer.Trainer`)."""

    cfg: Any
    dist: Any
    model: Any
    opt: Any
    out: Path
    step: int
    tokens: int
    skipped: int
    bad_in_row: int
    states: list[Any]
    loader: Any
    stage_index: int
    logged_weights: Any
    tokenizer: Any
    dataset: Any
    curriculum: Any
    device: torch.device

    def save_checkpoint(self) -> Path:
        """A complete step directory, or none: a write that fails (a full disk) on any rank removes the
        partial one on rank 0 and raises on every rank, with the previous checkpoints untouched."""
        cfg = self.cfg
        tmp = self.out / f".{step_dir_name(self.step)}.tmp"
        if self.dist.is_main:
            tmp = begin(self.out, self.step)
        barrier(self.dist)
        weights = full_state_dict(self.model, self.dist, cfg.fsdp)
        opt_state = optimizer_state(self.model, self.opt, self.dist, cfg.fsdp)
        r = self.dist.rank
        states = {
            f"{m}.{k}": v.detach().cpu().contiguous()
            for m, st in enumerate(self.states)
            if st is not None
            for k, v in st.tensors().items()
        }
        needed = tensor_bytes([weights, opt_state, states]) * (self.dist.world_size if states else 1)
        failure: Exception | None = None
        try:
            if self.dist.is_main:
                save_tensors(weights, tmp / "model.safetensors")
                # Through a Python file: torch.save then reports a full disk as an OSError it was caused by.
                with open(tmp / "optimizer.pt", "wb") as f:
                    torch.save(opt_state, f)
                self.tokenizer.save(tmp / "tokenizer.json")
            if states:
                save_tensors(states, tmp / f"state-rank{r}.safetensors")
            write_json(
                tmp / f"rank{r}.json",
                {
                    "loader": self.loader.state_dict(),
                    "rng": rng_state(),
                    "positions": [st.position if st is not None else None for st in self.states],
                    "stage_index": self.stage_index,
                },
            )
        except Exception as e:
            failure = e
        path = self.out / step_dir_name(self.step)
        self._raise_if_any_failed(failure, tmp, needed)
        if self.dist.is_main:
            meta = model_meta(
                unwrap(self.model),
                kind="train",
                step=self.step,
                trained_seq_len=self.curriculum.max_seq_len,
                tokens=self.tokens,
                skipped=self.skipped,
                bad_in_row=self.bad_in_row,
                world_size=self.dist.world_size,
                config=cfg.to_dict(),
                data=self._data_signature(),
                time=dt.datetime.now().isoformat(timespec="seconds"),
            )
            try:
                path = commit(tmp, meta, cfg.keep_checkpoints)
            except Exception as e:
                failure = e
        self._raise_if_any_failed(failure, tmp, needed)
        return path

    def _raise_if_any_failed(self, failure: Exception | None, tmp: Path, needed: int) -> None:
        """Agree across ranks whether the checkpoint is being written; on failure remove it and raise."""
        failed = all_reduce_sum([0.0 if failure is None else 1.0], self.dist, self.device)[0] > 0
        if not failed:
            return
        barrier(self.dist)  # every rank has stopped writing into tmp
        advice = "Free some space (or lower --keep-checkpoints) and continue with --resume auto."
        if failure is None:
            if self.dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"checkpoint {tmp.name[1:-4]}: another process could not write its part")
        abandon(tmp, failure, needed, advice, remove=self.dist.is_main)
        raise failure

    def _data_signature(self) -> dict[str, list[int]]:
        """Documents and tokens of each source's train and validation split, recorded in checkpoints."""
        return {
            name: [src.train.n_docs, src.train.n_tokens, src.val.n_docs, src.val.n_tokens]
            for name, src in self.dataset.sources.items()
        }

    def _load_checkpoint(self, path: Path) -> None:
        meta = read_json(path / "meta.json")
        if meta["world_size"] != self.dist.world_size:
            raise ConfigError(
                f"resume: {path} was written by {meta['world_size']} process(es); resume with the "
                f"same number (now {self.dist.world_size})"
            )
        saved_data, data = meta.get("data"), self._data_signature()
        if saved_data is not None and saved_data != data:
            raise ConfigError(
                f"resume: the data differs from what {path} was trained on (documents and tokens per source "
                f"[train docs, train tokens, val docs, val tokens]: then {saved_data}, now {data}); a changed "
                "source or source name moves the train/validation split. Resume with the same data or start a "
                "new --out (nothing was changed)"
            )
        weights = load_file(str(path / "model.safetensors"))
        load_full_state_dict(self.model, weights, self.dist, self.cfg.fsdp)
        opt_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        load_optimizer_state(self.model, self.opt, opt_state, self.dist, self.cfg.fsdp)
        rank = read_json(path / f"rank{self.dist.rank}.json")
        self.loader.load_state_dict(rank["loader"])
        set_rng_state(rank["rng"])
        self.step, self.tokens = meta["step"], meta["tokens"]
        self.skipped, self.bad_in_row = meta["skipped"], meta["bad_in_row"]
        self.stage_index = rank["stage_index"]
        self.logged_weights = dict(self.loader.weights)
        state_file = path / f"state-rank{self.dist.rank}.safetensors"
        tensors = load_file(str(state_file), device=str(self.device)) if state_file.exists() else {}
        self.states = []
        for m, position in enumerate(rank["positions"]):
            if position is None:
                self.states.append(None)
                continue
            fields = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{m}.")}
            self.states.append(MMRecState(position=position, **fields))
