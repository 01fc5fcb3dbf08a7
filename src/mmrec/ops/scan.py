"""Diagonal linear recurrences over a sequence axis, computed in log space.

    h_t = exp(log_a_t) * h_{t-1} + x_t,       log_a_t <= 0

``log_a`` holds one decay per (batch, head, step); ``x`` and ``h`` carry a
feature axis of width D that shares it. The same op serves three places in
MM-Rec: the short-term mixer's pass of chunk states, the long-term memory M
over chunks, and the level-2 sequence summary.

Both versions return the state *entering* every step (the exclusive scan) and
the final state, because every caller needs "memory as it stood before".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16/bfloat16/float32 inputs, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def segsum(x: Tensor) -> Tensor:
    """Segment sums of the last axis: ``out[..., i, j] = sum_{j < m <= i} x[..., m]``.

    Entries above the diagonal are ``-inf`` so that ``exp(segsum(x))`` is the
    lower-triangular matrix of decay factors between positions. Summing the
    terms themselves (instead of subtracting two prefix sums) keeps the result
    exact to rounding even when the prefix sums are huge (strong decay).
    """
    n = x.size(-1)
    strict = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-1)
    lower = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    terms = x.unsqueeze(-1).expand(*x.shape, n).masked_fill(~strict, 0.0)  # [..., m, j]
    return terms.cumsum(dim=-2).masked_fill(~lower, float("-inf"))  # [..., i, j]


def linear_scan_naive(log_a: Tensor, x: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
    """Reference: one step at a time.

    log_a: [B, H, N]; x: [B, H, N, D]; h0: [B, H, D].
    Returns (states entering each step [B, H, N, D], final state [B, H, D]).
    """
    acc = accumulation_dtype(x.dtype)
    h = h0.to(acc)
    entering = []
    for t in range(x.size(2)):
        entering.append(h)
        h = torch.exp(log_a[:, :, t].to(acc)).unsqueeze(-1) * h + x[:, :, t].to(acc)
    if not entering:
        return x.new_zeros(x.shape, dtype=acc), h
    return torch.stack(entering, dim=2), h


def linear_scan(log_a: Tensor, x: Tensor, h0: Tensor, block_size: int = 16) -> tuple[Tensor, Tensor]:
    """Blocked parallel scan with the same contract as :func:`linear_scan_naive`.

    Inside a block of ``block_size`` steps the recurrence is one matrix product
    with the decay factors ``exp(segsum)`` (all <= 1); a loop over blocks
    passes the state, so the Python loop runs N / block_size times.
    Accumulates in float32 (float64 for float64 inputs) even under autocast.
    """
    B, H, N, D = x.shape
    acc = accumulation_dtype(x.dtype)
    with torch.autocast(device_type=x.device.type, enabled=False):
        if N == 0:
            return x.new_zeros((B, H, 0, D), dtype=acc), h0.to(acc)
        L = max(1, min(block_size, N))
        nb = -(-N // L)
        pad = nb * L - N
        la, xb = log_a.to(acc), x.to(acc)
        if pad:  # padded steps: decay 1, no input
            la, xb = F.pad(la, (0, pad)), F.pad(xb, (0, 0, 0, pad))
        la = la.view(B, H, nb, L)
        xb = xb.view(B, H, nb, L, D)

        seg = segsum(la)  # [B, H, nb, L, L]: sum_{j<m<=i} la_m
        # Exclusive factors: the state entering step i holds x_j (j < i) decayed by sum_{j<m<i}.
        seg_excl = F.pad(seg[..., :-1, :], (0, 0, 1, 0), value=float("-inf"))
        inner = torch.exp(seg_excl) @ xb  # [B, H, nb, L, D] states entering each step, from a zero start
        ends = (torch.exp(seg[..., -1:, :]) @ xb).squeeze(-2)  # [B, H, nb, D] block-end states
        cum_excl = F.pad(la[..., :-1], (1, 0)).cumsum(-1)  # [B, H, nb, L]: sum_{m<i}
        block_decay = la.sum(-1, keepdim=True)  # [B, H, nb, 1]

        # Unbind once: indexing inside the loop would make backward zero-fill
        # a full-size gradient per block.
        ends_b, decay_b = ends.unbind(2), torch.exp(block_decay).unbind(2)
        h = h0.to(acc)
        starts = []
        for b in range(nb):
            starts.append(h)
            h = decay_b[b] * h + ends_b[b]
        start = torch.stack(starts, dim=2)  # [B, H, nb, D]

        entering = inner + torch.exp(cum_excl).unsqueeze(-1) * start.unsqueeze(3)
        entering = entering.view(B, H, nb * L, D)
        return (entering[:, :, :N] if pad else entering), h
