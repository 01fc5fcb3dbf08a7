"""Causal self-attention for the Transformer baselines, with RoPE and sliding windows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rope(x: Tensor, start: int | Tensor, theta: float) -> Tensor:
    """Rotary position embedding of x [B, H, T, dh] at positions start .. start+T-1.

    ``start`` is one int for every row, or a tensor [B] with one start per row (streams at different
    positions decoded together); a row's result does not depend on the other rows.
    """
    T, dh = x.size(2), x.size(3)
    inv_freq = theta ** (-torch.arange(0, dh, 2, device=x.device, dtype=torch.float32) / dh)
    if isinstance(start, Tensor):
        pos = (start.to(x.device)[:, None] + torch.arange(T, device=x.device)).float()[:, None]  # [B, 1, T]
    else:
        pos = torch.arange(start, start + T, device=x.device, dtype=torch.float32)  # [T]
    angles = pos[..., None] * inv_freq  # [T, dh/2] or [B, 1, T, dh/2]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # interleaved pairs
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.to(x.dtype)


def causal_attention(
    q: Tensor, k: Tensor, v: Tensor, window: int | None = None, key_lengths: Tensor | None = None
) -> Tensor:
    """Attention of queries q [B, H, Tq, dh] over keys/values [B, H, Tk, dh], Tk >= Tq.

    The keys end with the queries' own positions (the first Tk - Tq are cached).
    Query i attends key j when j <= i and, with a window W, j > i - W. For
    Tq > W the window is computed block by block: memory O(T W), not O(T^2).

    ``key_lengths`` [B] (streams at different positions in one batch): row b's keys are its first
    ``key_lengths[b]`` slots, ending with its queries; the slots after them are padding, never attended.
    """
    if key_lengths is not None:
        return _ragged_attention(q, k, v, window, key_lengths)
    Tq, Tk = q.size(2), k.size(2)
    offset = Tk - Tq
    if window is not None and Tq > window:
        return _blocked_window_attention(q, k, v, window)
    if window is None and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if Tq == 1:
        if window is not None:
            k, v = k[:, :, -window:], v[:, :, -window:]
        return _one_query_attention(q, k, v)
    i = torch.arange(Tq, device=q.device)[:, None] + offset
    j = torch.arange(Tk, device=q.device)[None, :]
    mask = j <= i
    if window is not None:
        mask = mask & (j > i - window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _one_query_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Decoding: a plain product for one query [B, H, 1, dh]; ``mask`` [B, 1, 1, Tk] says which keys count.

    Fused SDPA backends plan per key length, and the cache grows by one every step (measured on an
    H100: 62 ms per token through SDPA for a 4-layer model)."""
    scores = (q @ k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * q.size(-1) ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


def _ragged_attention(q: Tensor, k: Tensor, v: Tensor, window: int | None, key_lengths: Tensor) -> Tensor:
    """causal_attention with the keys of row b in slots [0, key_lengths[b]), its queries the last Tq of them.

    Padding slots get weight exactly 0, so they must hold finite numbers (the KV cache zero-fills them).
    A dense mask: memory O(Tq Tk) per row, meant for decoding (Tq = 1)."""
    Tq, Tk = q.size(2), k.size(2)
    lengths = key_lengths.to(q.device)[:, None, None]  # [B, 1, 1]
    i = lengths - Tq + torch.arange(Tq, device=q.device)[:, None]  # [B, Tq, 1] slot of each query
    j = torch.arange(Tk, device=q.device)  # [Tk]
    mask = j <= i  # [B, Tq, Tk]
    if window is not None:
        mask = mask & (j > i - window)
    mask = mask[:, None]  # [B, 1, Tq, Tk]
    if Tq == 1:
        return _one_query_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _blocked_window_attention(q: Tensor, k: Tensor, v: Tensor, W: int) -> Tensor:
    B, H, Tq, dh = q.shape
    offset = k.size(2) - Tq
    nq = -(-Tq // W)
    # Padded key index p holds the key at query-relative position p - W, so
    # query block b needs padded keys [bW, bW + 2W).
    front, back = W - offset, nq * W + W - (W - offset) - k.size(2)
    kp = F.pad(k, (0, 0, front, back)).unfold(2, 2 * W, W).transpose(-1, -2)  # [B, H, nq, 2W, dh]
    vp = F.pad(v, (0, 0, front, back)).unfold(2, 2 * W, W).transpose(-1, -2)
    qp = F.pad(q, (0, 0, 0, nq * W - Tq)).view(B, H, nq, W, dh)
    i = torch.arange(W, device=q.device)[:, None]
    j = torch.arange(2 * W, device=q.device)[None, :]
    band = (j > i) & (j <= i + W)  # [W, 2W]
    blocks = torch.arange(nq, device=q.device)[:, None, None]
    exists = (blocks * W + j[None]) >= front  # keys before the cache start do not exist
    mask = (band[None] & exists).unsqueeze(1)  # [nq, 1, W, 2W]
    to_batch = lambda t: t.transpose(1, 2).flatten(0, 1)  # noqa: E731  [B*nq, H, ., dh]
    o = F.scaled_dot_product_attention(
        to_batch(qp), to_batch(kp), to_batch(vp), attn_mask=mask.expand(B, nq, 1, W, 2 * W).flatten(0, 1)
    )
    return o.view(B, nq, H, W, dh).transpose(1, 2).reshape(B, H, nq * W, dh)[:, :, :Tq]
