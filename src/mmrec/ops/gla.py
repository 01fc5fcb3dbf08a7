"""Gated linear attention with one input-dependent decay per head (level 0, h_t).

For each head, with key width dk and value width dv:

    S_t = exp(log_g_t) * S_{t-1} + k_t^T v_t        S in R^{dk x dv}, log_g_t <= 0
    o_t = q_t S_t

Three implementations of one contract, sharing no code but the math:

* :func:`gla_naive`   - a step loop; the reference for tests.
* :func:`gla_chunked` - the parallel form for training and prefill: masked
  matrix products inside chunks, a scan of chunk states between them.
* :func:`gla_step`    - one token, for decoding.

Shapes: q, k [B, H, T, dk]; v [B, H, T, dv]; log_g [B, H, T];
state [B, H, dk, dv]. States are accumulated in float32 (float64 for float64
inputs) whatever the input dtype; outputs come back in v's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmrec.ops.scan import accumulation_dtype, linear_scan, segsum


def _initial_state(q: Tensor, v: Tensor, state: Tensor | None) -> Tensor:
    B, H, _, dk = q.shape
    acc = accumulation_dtype(v.dtype)
    if state is None:
        return torch.zeros(B, H, dk, v.size(-1), dtype=acc, device=v.device)
    return state.to(acc)


def gla_naive(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Reference: the recurrence one token at a time. Returns (o, final state)."""
    S = _initial_state(q, v, state)
    acc = S.dtype
    outs = []
    for t in range(q.size(2)):
        S = torch.exp(log_g[:, :, t].to(acc))[..., None, None] * S + (
            k[:, :, t, :, None].to(acc) * v[:, :, t, None, :].to(acc)
        )
        outs.append((q[:, :, t, None, :].to(acc) @ S).squeeze(-2))
    if not outs:
        return v.new_zeros(v.shape), S
    return torch.stack(outs, dim=2).to(v.dtype), S


def gla_step(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """One decoding step. q, k [B, H, dk]; v [B, H, dv]; log_g [B, H].

    Heads folded into the batch of two batched products (the update as an outer product added to the
    decayed state, then the read): at one token the time goes to the number of ops, not to arithmetic,
    so casts and the autocast guard are skipped where they would change nothing."""
    B, H, dk = k.shape
    dv = v.size(-1)
    acc = accumulation_dtype(v.dtype)
    if torch.is_autocast_enabled(v.device.type):
        with torch.autocast(device_type=v.device.type, enabled=False):
            return gla_step(q, k, v, log_g, state)
    cast = lambda t: t if t.dtype == acc else t.to(acc)  # noqa: E731
    if torch.compiler.is_compiling():
        # Under torch.compile the update and the read as broadcasts: inductor fuses the update into one
        # pass over the state, where the batched products take two and a temporary (2x faster for 16
        # streams on a 2-core CPU; the same maths, the read summed in another order).
        S = cast(state) * torch.exp(cast(log_g))[..., None, None] + cast(k)[..., :, None] * cast(v)[..., None, :]
        o = (cast(q)[..., :, None] * S).sum(-2)
        return (o if o.dtype == v.dtype else o.to(v.dtype)), S
    g = torch.exp(cast(log_g)).view(B * H, 1, 1)
    S = torch.baddbmm(
        cast(state).reshape(B * H, dk, dv) * g, cast(k).reshape(B * H, dk, 1), cast(v).reshape(B * H, 1, dv)
    )  # [B*H, dk, dv]
    o = torch.bmm(cast(q).reshape(B * H, 1, dk), S).view(B, H, dv)
    return (o if o.dtype == v.dtype else o.to(v.dtype)), S.view(B, H, dk, dv)


def gla_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_g: Tensor,
    state: Tensor | None = None,
    chunk_size: int = 64,
    scan_block: int = 16,
) -> tuple[Tensor, Tensor]:
    """Chunked parallel form. Any T (padded internally), any chunk size >= 1.

    Inside a chunk: o_i = sum_{j<=i} (q_i . k_j) exp(sum_{j<m<=i} log_g_m) v_j,
    a masked matrix product whose decay factors are all <= 1. Between chunks:
    the state entering each chunk comes from :func:`linear_scan` over the
    chunks' own state contributions, then o_i += exp(sum_{m<=i} log_g_m) q_i S.
    """
    B, H, T, dk = q.shape
    dv = v.size(-1)
    S0 = _initial_state(q, v, state)
    acc = S0.dtype
    if T == 0:
        return v.new_zeros(B, H, 0, dv), S0
    C = max(1, min(chunk_size, T))
    n = -(-T // C)
    pad = n * C - T
    if pad:
        # Padded steps carry no key/value and decay 1: they leave the state as is.
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        log_g = F.pad(log_g, (0, pad))
    qc = q.view(B, H, n, C, dk)
    kc = k.view(B, H, n, C, dk)
    vc = v.view(B, H, n, C, dv)
    g = log_g.to(acc).view(B, H, n, C)

    decay = torch.exp(segsum(g))  # [B, H, n, C, C], lower triangular, <= 1
    scores = qc @ kc.transpose(-1, -2)  # [B, H, n, C, C]
    o_intra = (scores * decay).to(vc.dtype) @ vc  # [B, H, n, C, dv]

    # Each chunk's own contribution to the state at its end.
    to_end = decay[..., -1, :]  # [B, H, n, C] = exp(sum_{j<m<=C-1} g_m)
    dS = (kc * to_end.unsqueeze(-1).to(kc.dtype)).transpose(-1, -2) @ vc  # [B, H, n, dk, dv]
    entering, final = linear_scan(g.sum(-1), dS.reshape(B, H, n, dk * dv), S0.reshape(B, H, dk * dv), scan_block)
    entering = entering.reshape(B, H, n, dk, dv)

    with torch.autocast(device_type=v.device.type, enabled=False):
        q_decay = torch.exp(g.cumsum(-1)).unsqueeze(-1)  # [B, H, n, C, 1]
        o_inter = (qc.to(acc) * q_decay) @ entering  # [B, H, n, C, dv]
        o = o_intra.to(acc) + o_inter
    o = o.reshape(B, H, n * C, dv)[:, :, :T]
    return o.to(v.dtype), final.view(B, H, dk, dv)
