"""What every evaluation needs: a model from a checkpoint, and a place to write results."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from mmrec.models import MMRecLM, TransformerLM
from mmrec.tokenizer import load_tokenizer
from mmrec.train import checkpoint as ckpt
from mmrec.train.config import TrainConfig


class CheckpointError(ValueError):
    """A path that is not a usable checkpoint; the message says what it is and what to pass instead."""


@dataclass
class LoadedModel:
    model: nn.Module  # MMRecLM or TransformerLM, in eval mode
    tokenizer: Any  # ByteTokenizer or BPETokenizer
    config: TrainConfig
    step: int
    path: Path

    @property
    def arch(self) -> str:
        if isinstance(self.model, TransformerLM):
            return f"transformer-{self.model.config.preset}"
        return "mmrec"

    @property
    def trained_seq_len(self) -> int:
        """The longest window the model was trained on."""
        from mmrec.train.schedule import Curriculum

        c = self.config
        return Curriculum(c.seq_len, c.batch_size, c.seq_len_schedule, "", {"x": 1.0}).max_seq_len


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory, or a run directory (its newest complete checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--checkpoint: {path} does not exist")
    if path.is_dir() and ckpt.is_complete(path):
        return path
    if path.is_dir():
        found = ckpt.list_checkpoints(path)
        if found:
            return found[-1]
    raise CheckpointError(
        f"--checkpoint: {path} is not a checkpoint of `mmrec train` (expected a step-NNNNNN directory with "
        "model.safetensors and meta.json, or a run directory holding one)"
    )


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model of a training checkpoint with its weights and tokenizer."""
    from mmrec.train.trainer import build_model

    step_dir = resolve_checkpoint(path)
    try:
        meta = ckpt.read_json(step_dir / "meta.json")
        cfg = TrainConfig.from_dict(meta["config"])
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"--checkpoint: {step_dir}/meta.json is unreadable: {e}") from e
    tok_file = step_dir / "tokenizer.json"
    tokenizer = load_tokenizer(tok_file if tok_file.exists() else cfg.tokenizer)
    model = build_model(cfg, tokenizer.vocab_size)
    try:
        model.load_state_dict(load_file(str(step_dir / "model.safetensors")))
    except Exception as e:  # safetensors and load_state_dict raise several types
        raise CheckpointError(f"--checkpoint: weights in {step_dir} do not load: {e}") from e
    model.to(device).eval()
    assert isinstance(model, (MMRecLM, TransformerLM))
    return LoadedModel(model=model, tokenizer=tokenizer, config=cfg, step=int(meta["step"]), path=step_dir)


def write_results(out: str | Path, results: dict[str, Any], table: str) -> Path:
    """results.json and results.md in ``out`` (created)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "results.md").write_text(table.rstrip() + "\n")
    return out
