"""The optimisation pieces every training loop shares: AdamW groups, the learning-rate schedule, clipping.

``mmrec train`` and the synthetic tasks (``mmrec synth``) both step through
these, so a change of optimiser recipe reaches both.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], device: torch.device
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases, gates and other vectors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")


def cosine_lr(step: int, steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``min_ratio * lr`` at step ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def clip_gradients(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to ``max_norm`` (0 or less: measure only); the norm before clipping.

    A tensor, so a loop that does not log every step never waits for the device here."""
    params = list(params)
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad.detach().norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())
