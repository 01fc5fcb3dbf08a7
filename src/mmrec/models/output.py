"""What a language model's forward returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class LMOutput:
    logits: Tensor  # [B, T, vocab]
    state: Any  # the model's state after the last token (MMRecState or KVCache)
    loss: Tensor | None = None  # mean next-token cross-entropy when targets were given


def lm_loss(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy in nats, computed in float32 whatever the logits' dtype."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=ignore_index)


def check_input_ids(input_ids: Any, vocab_size: int) -> Tensor:
    """Validate a [B, T] integer tensor of ids in range; explain what is wrong otherwise."""
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of shape [batch, time], got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"input_ids must hold integer token ids (int64), got dtype {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch, time], got shape {tuple(input_ids.shape)}")
    if input_ids.size(0) < 1:
        raise ValueError("input_ids has batch size 0")
    if input_ids.numel():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"token id {bad} is out of range for vocab_size {vocab_size} (ids must be 0..{vocab_size - 1})"
            )
    return input_ids.long()
