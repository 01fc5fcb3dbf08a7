"""One checkpoint format for every command, and the public loader ``mmrec.load``.

A run directory holds step directories; each is written under a temporary
name and renamed into place, so a directory under its final name is complete::

    run/step-000123/
        model.safetensors      weights (never pickled)
        tokenizer.json         the tokenizer of the run
        meta.json              format, kind, arch, model config, step, trained_seq_len, ... - written last
        (training adds optimizer.pt, state-rankN.safetensors, rankN.json)

meta.json lists the size and sha256 of every other file under ``files`` and
is sealed (it holds the sha256 of its own bytes, ``mmrec.utils.files``):
:func:`verify` finds a truncated, flipped or missing file and names it.
Checkpoints from before the checksums load with a warning that nothing was
verified.

``mmrec train``, ``mmrec synth ...`` and ``mmrec compare`` write it;
:func:`load` reads it back for evaluation, generation and serving, without
importing the trainer. Folders of ``mmrec synth passkey`` from before this
format (results.json beside model.safetensors) and training checkpoints whose
meta.json holds the old flat config still load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from mmrec.config import ModelConfig, TransformerConfig
from mmrec.models.factory import build_model, label, model_config_from_dict, resolve_model_config
from mmrec.tokenizer import load_tokenizer
from mmrec.utils.counts import longest_window
from mmrec.utils.files import (
    SEAL_KEY,
    ChecksumError,
    DiskFullError,
    file_problem,
    file_record,
    free_bytes,
    fsync_dir,
    human_bytes,
    is_disk_full,
    save_tensors,
    seal_problem,
    sealed_json,
    write_bytes_durably,
)

FORMAT = 1
STEP_DIR = re.compile(r"^step-(\d{6,})$")
WEIGHTS = "model.safetensors"
META = "meta.json"


class CheckpointError(ValueError):
    """A path that is not a usable checkpoint; the message says what it is and what to pass instead."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint written before checksums: loaded, but nothing in it could be verified."""


# Directories ------------------------------------------------------------------


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def is_complete(path: Path) -> bool:
    return bool(STEP_DIR.match(path.name)) and (path / META).is_file() and (path / WEIGHTS).is_file()


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints of a run directory, oldest first."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    complete = [p for p in found if is_complete(p)]
    for p in sorted(set(found) - set(complete)):
        warnings.warn(f"ignoring incomplete checkpoint {p} (no meta.json or weights)", stacklevel=2)
    return sorted(complete, key=step_of)


def step_of(path: Path) -> int:
    match = STEP_DIR.match(path.name)
    if match is None:
        raise ValueError(f"{path} is not a step directory")
    return int(match.group(1))


def begin(out: Path, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of ``step``; leftovers of killed writes are removed."""
    out = Path(out)
    if out.is_dir():
        for stale in out.glob(".step-*"):
            if stale.is_dir() and stale.suffix in (".tmp", ".old", ".del"):
                shutil.rmtree(stale, ignore_errors=True)
    tmp = out / f".{step_dir_name(step)}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _retire(path: Path) -> None:
    """Remove a step directory so that it vanishes at once: renamed to a hidden name first, then deleted."""
    gone = path.with_name(f".{path.name}.del")
    if gone.exists():
        shutil.rmtree(gone, ignore_errors=True)
    os.replace(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


def commit(tmp: Path, meta: dict[str, Any], keep: int) -> Path:
    """Record every file's size and sha256 in a sealed meta.json, flush, rename into place, then drop all
    but the newest ``keep`` checkpoints older than this one (newer ones - left by a resume from an older
    checkpoint - are this run's to replace, not to delete)."""
    files = {p.name: file_record(p, sync=True) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != META}
    data, _ = sealed_json({**meta, "files": files})
    write_bytes_durably(tmp / META, data)
    fsync_dir(tmp)
    final = tmp.parent / tmp.name[1:].removesuffix(".tmp")
    if final.exists():
        aside = final.with_name(f".{final.name}.old")
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)
    older = [p for p in list_checkpoints(final.parent) if step_of(p) < step_of(final)]
    for old in older[: max(0, len(older) - (keep - 1))]:
        _retire(old)
    return final


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nest of dicts, lists and tuples (what writing them needs, about)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def abandon(tmp: Path, error: BaseException, needed: int | None, advice: str, remove: bool = True) -> None:
    """Remove the half-written checkpoint ``tmp`` after ``error``; when the disk filled up, raise a
    DiskFullError saying what, where, how much and what was kept (else the caller re-raises ``error``)."""
    if remove:
        shutil.rmtree(tmp, ignore_errors=True)
    if not is_disk_full(error):
        return
    out, name = tmp.parent, tmp.name[1:].removesuffix(".tmp")
    previous = list_checkpoints(out)
    kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint was saved"
    raise DiskFullError(
        f"checkpoint {name}: no space left on device in {out} (the checkpoint needs about {human_bytes(needed)}; "
        f"{human_bytes(free_bytes(out))} free after removing the partial one); {kept}. {advice}"
    ) from error


def write_json(path: Path, data: Any) -> None:
    """Atomically: to a temporary name, flushed to disk, then renamed."""
    write_bytes_durably(Path(path), json.dumps(data, indent=1).encode("utf-8"))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


# Verifying ------------------------------------------------------------------


def _read_meta(step_dir: Path) -> tuple[dict[str, Any], bytes]:
    path = step_dir / META
    try:
        raw = path.read_bytes()
        meta = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable (damaged or cut short): {e}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is unreadable: it holds no JSON object")
    return meta, raw


def is_sealed(meta: dict[str, Any], raw: bytes) -> bool:
    """Whether a meta.json was written with checksums. Three marks, so that one flipped byte cannot make a
    checkpoint with checksums pass for an older one without them."""
    return "files" in meta or SEAL_KEY in meta or SEAL_KEY.encode() in raw


def verify(step_dir: str | Path, names: list[str] | None = None, require: tuple[str, ...] = ()) -> dict[str, Any]:
    """meta.json of ``step_dir`` after checking it and its files (all listed ones, or ``names`` of them);
    raises CheckpointError naming the first damaged, cut or missing file. ``require``: files that must be
    listed. A checkpoint without checksums (older mmrec) gives an UnverifiedCheckpointWarning."""
    step_dir = Path(step_dir)
    meta, raw = _read_meta(step_dir)
    if not is_sealed(meta, raw):
        warnings.warn(
            f"{step_dir} was written without checksums (an older mmrec); its files are not verified",
            UnverifiedCheckpointWarning,
            stacklevel=2,
        )
        return meta
    problem = seal_problem(raw)
    if problem is not None:
        raise CheckpointError(f"{step_dir / META} {problem}")
    files = meta.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{step_dir / META} has no list of files (damaged)")
    missing = [n for n in require if n not in files]
    if missing:
        raise CheckpointError(f"{step_dir} lacks {', '.join(missing)} (not written with it)")
    for name in sorted(files) if names is None else [n for n in names if n in files]:
        problem = file_problem(step_dir / name, files[name])
        if problem is not None:
            raise CheckpointError(f"{step_dir / name} {problem}")
    return meta


# Writing --------------------------------------------------------------------


def model_meta(model: nn.Module, *, kind: str, step: int, trained_seq_len: int, **extra: Any) -> dict[str, Any]:
    """What every checkpoint's meta.json says about its model; ``extra`` adds the writer's own fields."""
    config: ModelConfig = model.config  # type: ignore[assignment]
    from mmrec.version import __version__

    return {
        "format": FORMAT,
        "kind": kind,
        "arch": "transformer" if isinstance(config, TransformerConfig) else "mmrec",
        "model": config.to_dict(),
        "step": int(step),
        "trained_seq_len": int(trained_seq_len),
        "mmrec_version": __version__,
        **extra,
    }


def write_model_files(directory: Path, state_dict: dict[str, torch.Tensor], tokenizer: Any | None) -> None:
    """model.safetensors and tokenizer.json into ``directory`` (no tokenizer for a task on raw token ids)."""
    save_tensors(state_dict, Path(directory) / WEIGHTS)
    if tokenizer is not None:
        tokenizer.save(Path(directory) / "tokenizer.json")


def save_checkpoint(
    out: Path,
    model: nn.Module,
    tokenizer: Any | None,
    *,
    kind: str,
    step: int,
    trained_seq_len: int,
    keep: int = 1,
    **extra: Any,
) -> Path:
    """A complete step directory of ``model`` in run directory ``out`` (atomic), keeping the newest ``keep``.

    ``tokenizer`` None: a model of raw token ids (a synthetic task); :func:`load` gives it no tokenizer."""
    tmp = begin(Path(out), step)
    weights = model.state_dict()
    try:
        write_model_files(tmp, weights, tokenizer)
        meta = model_meta(model, kind=kind, step=step, trained_seq_len=trained_seq_len, **extra)
        meta["tokenizer"] = None if tokenizer is None else "tokenizer.json"
        return commit(tmp, meta, keep)
    except Exception as e:
        abandon(tmp, e, tensor_bytes(weights), "Free some space and run again.")
        raise


# Loading ----------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model ready to call (eval mode), its tokenizer, and what its checkpoint says about it."""

    model: nn.Module  # MMRecLM or TransformerLM
    tokenizer: Any  # ByteTokenizer or BPETokenizer; None for a synthetic task on raw token ids
    model_config: ModelConfig
    step: int
    path: Path
    trained_seq_len: int  # the longest window the model was trained on
    meta: dict[str, Any] = field(default_factory=dict)  # the whole meta.json (the writer's settings in "config")

    @property
    def arch(self) -> str:
        """'mmrec' or 'transformer-PRESET'."""
        return label(self.model_config)

    @property
    def config(self) -> dict[str, Any]:
        """The settings of the command that wrote the checkpoint (the training config of `mmrec train`)."""
        return dict(self.meta.get("config") or {})


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory, or a run directory (its newest complete checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--checkpoint: {path} does not exist")
    if path.is_dir() and is_complete(path):
        return path
    if path.is_dir():
        found = list_checkpoints(path)
        if found:
            return found[-1]
        if _is_legacy_synth(path):
            return path
    raise CheckpointError(
        f"--checkpoint: {path} is not a checkpoint of mmrec (expected a step-NNNNNN directory with "
        "model.safetensors and meta.json, or a run directory of `mmrec train`, `mmrec synth` or `mmrec compare` "
        "holding one)"
    )


def load(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The model of a run or step directory of any mmrec command, with its weights and tokenizer.

    >>> loaded = mmrec.load("runs/mine")          # doctest: +SKIP
    >>> loaded.model(ids).logits, loaded.tokenizer.encode("text")   # doctest: +SKIP
    """
    step_dir = resolve_checkpoint(path)
    try:
        meta = _legacy_synth_meta(step_dir) if _is_legacy_synth(step_dir) else _verified(step_dir)
        tok_file = step_dir / "tokenizer.json"
        tokenizer: Any = None
        if tok_file.exists():
            tokenizer = load_tokenizer(tok_file)
        elif "tokenizer" not in meta:  # older checkpoints name the run's tokenizer in their config
            tokenizer = load_tokenizer(meta.get("config", {}).get("tokenizer", "byte"))
        if "model" not in meta:
            meta = _upgrade_train_meta(meta, tokenizer.vocab_size)
        model_config = model_config_from_dict(meta["arch"], meta["model"])
    except CheckpointError:
        raise
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"--checkpoint: {step_dir}/{META} is unreadable: {e}") from e
    model = build_model(model_config)
    try:
        model.load_state_dict(load_file(str(step_dir / WEIGHTS)))
    except Exception as e:  # safetensors and load_state_dict raise several types
        raise CheckpointError(f"--checkpoint: weights in {step_dir} do not load: {e}") from e
    model.to(device).eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_config=model_config,
        step=int(meta.get("step", 0)),
        path=step_dir,
        trained_seq_len=int(meta["trained_seq_len"]),
        meta=meta,
    )


def _verified(step_dir: Path) -> dict[str, Any]:
    """meta.json, with the files :func:`load` reads checked (weights, tokenizer, meta.json itself)."""
    try:
        return verify(step_dir, names=[WEIGHTS, "tokenizer.json"])
    except (CheckpointError, ChecksumError) as e:
        others = [p.name for p in list_checkpoints(step_dir.parent) if p != step_dir]
        hint = f"; load an older checkpoint of the run ({', '.join(others)})" if others else ""
        raise CheckpointError(f"--checkpoint: {e}; nothing was loaded{hint}") from e


def run_data_settings(loaded: LoadedModel) -> tuple[list[str], str, float, str | None]:
    """(data, text_field, val_fraction, data_cache) of the training run behind ``loaded``, to find its
    validation split; a checkpoint of a synthetic task has none."""
    cfg = loaded.config
    if loaded.meta.get("kind") != "train" or "val_fraction" not in cfg:
        raise CheckpointError(
            f"--checkpoint: {loaded.path} is not a checkpoint of `mmrec train`, so it has no validation split; "
            "name the text to score with --data"
        )
    return list(cfg.get("data") or []), cfg.get("text_field", "text"), float(cfg["val_fraction"]), cfg.get("data_cache")


def _is_legacy_synth(path: Path) -> bool:
    return (path / "results.json").is_file() and (path / WEIGHTS).is_file() and not (path / META).exists()


def _legacy_synth_meta(folder: Path) -> dict[str, Any]:
    """meta.json as it would be, from the results.json of an older `mmrec synth passkey` folder."""
    results = read_json(folder / "results.json")
    if results.get("task") != "passkey" or "model_config" not in results:
        raise CheckpointError(
            f"--checkpoint: {folder} holds the results of `mmrec synth {results.get('task')}`, which saved no "
            "loadable model in this version; rerun it to get a step directory"
        )
    arch = "mmrec" if results["arch"] == "mmrec" else "transformer"
    return {
        "format": 0,
        "kind": "synth",
        "arch": arch,
        "model": results["model_config"],
        "step": int(results["steps"]),
        "trained_seq_len": int(results["train_len"][-1]),
        "config": {k: v for k, v in results.items() if not isinstance(v, (list, dict)) or k == "train_len"},
    }


def _upgrade_train_meta(meta: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """The meta.json of a training checkpoint written before the model config was nested in it."""
    flat = dict(meta["config"])
    arch = flat.get("arch", "mmrec")
    keys = ("d_model", "n_layers", "n_heads", "chunk_size", "mem_slots", "summary_window", "decay_max")
    values: dict[str, Any] = {k: flat[k] for k in keys if k in flat}
    values["selective_write"] = bool(flat.get("selective_write", False))
    values["sparse_write"] = bool(flat.get("sparse_write", False))
    match_params = bool(flat.get("match_params", True))
    if arch == "transformer":
        if not match_params:
            values = {k: v for k, v in values.items() if k in ("d_model", "n_layers", "n_heads")}
        values.update(preset=flat.get("preset", "llama"), window=flat.get("window"))
    train_len = longest_window(int(flat.get("seq_len", 512)), flat.get("seq_len_schedule", ""))
    model = resolve_model_config(
        arch,
        values,
        vocab_size=vocab_size,
        match_params=match_params,
        train_len=train_len,
        eval_len=flat.get("eval_seq_len"),
    )
    return {**meta, "format": 0, "kind": "train", "arch": arch, "model": model.to_dict(), "trained_seq_len": train_len}
