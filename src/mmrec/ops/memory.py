"""The long-term memory (levels 1-3 of MM-Rec): write completed chunks, read them.

The stream is cut into chunks of C tokens. Writing a completed chunk X [C, d]
(keys and values K, V = X W_wk^T, X W_wv^T, multi-head attention with learned
queries Q_w, one per slot and one for the summary):

    U, s   = attend(Q_w, K, V)                       candidates [n_slots, d_mem], summary [d_mem]
    a      = sigmoid(U w + b)                         one write gate per slot
    slots  <- (1 - a) * slots + a * U                 level 3
    sequence <- lam * sequence + (1 - lam) * s        level 2, lam = sigmoid(sequence_decay)
    summaries <- summaries[1:] ++ [s]                 level 1, a FIFO of W summaries, oldest first

Reading: every token of chunk c attends (multi-head softmax, queries x W_rq^T)
over the entries [slots; summaries; sequence; null] as they stood *entering*
chunk c, with keys and values from W_rk, W_rv. FIFO entries of chunks that
never existed (the first W chunks of a stream) are masked; the learned null
entry, always there, lets a token read nothing.

U and a depend on the chunk only, never on the slots, so the slots follow a
linear recurrence over chunks: all chunks' states come out of one
:func:`~mmrec.ops.scan.linear_scan`, and the reads of all chunks are one
batched attention. Implementations, sharing no code but the math:

* :func:`memory_write_naive`, :func:`memory_read_naive` - loops over chunks
  with plain softmax; the reference for tests.
* :func:`memory_write`, :func:`memory_read` - all chunks at once, for
  training and prefill.
* :func:`memory_read_step` - the read of one token, for decoding.

Shapes: chunks and tokens [B, n, C, d]; a :class:`MemoryState` holds slots
[B, n_slots, d_mem], summaries [B, W, d_mem] and sequence [B, d_mem], with a
chunk axis after the batch axis where it holds the states entering n chunks.
States come back in float32 (float64 for a float64 state); reads in the
tokens' dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mmrec.ops.scan import accumulation_dtype, linear_scan


class MemoryParams(NamedTuple):
    """The parameter tensors of the write and the read (owned by the layer, passed in)."""

    write_kv: Tensor  # [2 * d_mem, d]: keys, then values, of a chunk's tokens
    write_queries: Tensor  # [n_slots + 1, d_mem]: one query per slot, then the summary's
    gate_weight: Tensor  # [d_mem]: w of the write gate
    gate_bias: Tensor  # [n_slots]: b of the write gate, one per slot
    sequence_decay: Tensor  # [d_mem]: logit of the level-2 decay lam
    read_q: Tensor  # [d_mem, d]: queries of the reading tokens
    read_kv: Tensor  # [2 * d_mem, d_mem]: keys, then values, of the entries
    null_entry: Tensor  # [d_mem]


class MemoryState(NamedTuple):
    """Levels 1-3 of a batch of streams (with a chunk axis after the batch axis: entering each chunk)."""

    slots: Tensor  # [B, n_slots, d_mem]: level 3
    summaries: Tensor  # [B, W, d_mem]: level 1, oldest first
    sequence: Tensor  # [B, d_mem]: level 2


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """[..., L, d_mem] -> [..., heads, L, d_mem / heads]."""
    return x.unflatten(-1, (heads, -1)).transpose(-2, -3)


def _merge_heads(x: Tensor) -> Tensor:
    """[..., heads, L, dh] -> [..., L, heads * dh]."""
    return x.transpose(-2, -3).flatten(-2)


def _fifo_valid(completed: int, n: int, window: int, device: torch.device) -> Tensor | None:
    """[n, W] True where FIFO entry w of chunk c holds a real summary, or None when all do.

    Chunk c is entered after ``completed + c`` chunks of the stream; its FIFO
    holds the last W summaries, oldest first, so entry w is real once
    ``completed + c >= W - w``.
    """
    if completed >= window:
        return None
    c = torch.arange(n, device=device).unsqueeze(1)
    w = torch.arange(window, device=device)
    return c + w >= window - completed


def _cast(state: MemoryState, dtype: torch.dtype) -> MemoryState:
    return MemoryState(*(t.to(dtype) for t in state))


def memory_write_naive(
    chunks: Tensor, state: MemoryState, params: MemoryParams, heads: int
) -> tuple[MemoryState, MemoryState]:
    """Reference: write the chunks one by one. Returns (states entering each chunk, final state)."""
    n_slots = params.gate_bias.numel()
    acc = accumulation_dtype(state.slots.dtype)
    slots, summaries, sequence = _cast(state, acc)
    w_k, w_v = params.write_kv.to(acc).chunk(2)  # [d_mem, d] each
    queries = _split_heads(params.write_queries.to(acc), heads)  # [h, n_slots + 1, dh]
    lam = torch.sigmoid(params.sequence_decay.to(acc))  # [d_mem]
    entering = []
    for c in range(chunks.size(1)):
        entering.append(MemoryState(slots, summaries, sequence))
        x = chunks[:, c].to(acc)  # [B, C, d]
        k, v = _split_heads(x @ w_k.T, heads), _split_heads(x @ w_v.T, heads)  # [B, h, C, dh]
        p = torch.softmax(queries @ k.transpose(-1, -2) / k.size(-1) ** 0.5, dim=-1)  # [B, h, n_slots + 1, C]
        pooled = _merge_heads(p @ v)  # [B, n_slots + 1, d_mem]
        candidates, summary = pooled[:, :n_slots], pooled[:, n_slots]
        a = torch.sigmoid(candidates @ params.gate_weight.to(acc) + params.gate_bias.to(acc)).unsqueeze(-1)
        slots = (1 - a) * slots + a * candidates
        sequence = lam * sequence + (1 - lam) * summary
        summaries = torch.cat([summaries[:, 1:], summary.unsqueeze(1)], dim=1)
    final = MemoryState(slots, summaries, sequence)
    if not entering:
        return MemoryState(*(t.unsqueeze(1)[:, :0] for t in final)), final
    return MemoryState(*(torch.stack(ts, dim=1) for ts in zip(*entering, strict=True))), final


def memory_write(
    chunks: Tensor, state: MemoryState, params: MemoryParams, heads: int, scan_block: int = 16
) -> tuple[MemoryState, MemoryState]:
    """All chunks at once, same contract as :func:`memory_write_naive`.

    Pooling is one attention over all chunks; the slots and the level-2
    summary are linear recurrences over chunks (decays log(1 - a) and log lam),
    each one :func:`linear_scan`; the FIFO entering chunk c is a window of the
    old FIFO followed by the new summaries.
    """
    B, n, C, _ = chunks.shape
    n_slots, d_mem = params.gate_bias.numel(), params.null_entry.numel()
    window = state.summaries.size(1)
    acc = accumulation_dtype(state.slots.dtype)
    slots, summaries, sequence = _cast(state, acc)
    if n == 0:
        return MemoryState(*(t.unsqueeze(1)[:, :0] for t in (slots, summaries, sequence))), MemoryState(
            slots, summaries, sequence
        )
    k, v = F.linear(chunks, params.write_kv).view(B * n, C, 2, heads, -1).permute(2, 0, 3, 1, 4)  # [B*n, h, C, dh]
    queries = _split_heads(params.write_queries, heads).to(k.dtype)  # [h, n_slots + 1, dh]
    pooled = F.scaled_dot_product_attention(queries.expand(B * n, *queries.shape), k, v)  # [B*n, h, n_slots+1, dh]
    pooled = _merge_heads(pooled).view(B, n, n_slots + 1, d_mem).to(acc)
    candidates, summary = pooled[:, :, :n_slots], pooled[:, :, n_slots]  # [B, n, n_slots, d_mem], [B, n, d_mem]

    logit = candidates @ params.gate_weight.to(acc) + params.gate_bias.to(acc)  # [B, n, n_slots]
    slots_enter, slots_final = linear_scan(
        F.logsigmoid(-logit).transpose(1, 2),  # log(1 - a)
        (torch.sigmoid(logit).unsqueeze(-1) * candidates).transpose(1, 2),  # a * U
        slots,
        scan_block,
    )  # [B, n_slots, n, d_mem], [B, n_slots, d_mem]
    decay = params.sequence_decay.to(acc)
    # Level 2 has one decay per channel: channels as the scan's heads, a feature width of 1.
    sequence_enter, sequence_final = linear_scan(
        F.logsigmoid(decay).view(1, d_mem, 1).expand(B, d_mem, n),  # log lam
        (torch.sigmoid(-decay) * summary).transpose(1, 2).unsqueeze(-1),  # (1 - lam) * s
        sequence.unsqueeze(-1),
        scan_block,
    )  # [B, d_mem, n, 1], [B, d_mem, 1]
    fifo = torch.cat([summaries, summary], dim=1)  # [B, W + n, d_mem]
    entering = MemoryState(
        slots_enter.transpose(1, 2),  # [B, n, n_slots, d_mem]
        fifo.unfold(1, window, 1)[:, :n].transpose(-1, -2),  # [B, n, W, d_mem]
        sequence_enter.squeeze(-1).transpose(1, 2),  # [B, n, d_mem]
    )
    return entering, MemoryState(slots_final, fifo[:, n:], sequence_final.squeeze(-1))


def _read_mask(completed: int, n: int, n_slots: int, window: int, device: torch.device) -> Tensor | None:
    """[n, E] True where an entry of chunk c may be read, or None when all may."""
    valid = _fifo_valid(completed, n, window, device)
    if valid is None:
        return None
    always = torch.ones(n, 1, dtype=torch.bool, device=device)
    return torch.cat([always.expand(n, n_slots), valid, always, always], dim=1)


def memory_read_naive(
    tokens: Tensor, entering: MemoryState, params: MemoryParams, heads: int, completed: int
) -> Tensor:
    """Reference: chunk by chunk, plain softmax. tokens [B, n, C, d]; ``entering`` the states entering
    each of the n chunks; ``completed`` the chunks of the stream completed before chunk 0.
    Returns the reads [B, n, C, d_mem] (before the layer's output projection)."""
    B, n, C, _ = tokens.shape
    n_slots, window, d_mem = entering.slots.size(2), entering.summaries.size(2), params.null_entry.numel()
    acc = accumulation_dtype(entering.slots.dtype)
    w_q = params.read_q.to(acc)  # [d_mem, d]
    w_k, w_v = params.read_kv.to(acc).chunk(2)  # [d_mem, d_mem] each
    reads = []
    for c in range(n):
        entries = torch.cat(
            [
                entering.slots[:, c].to(acc),
                entering.summaries[:, c].to(acc),
                entering.sequence[:, c, None].to(acc),
                params.null_entry.to(acc).expand(B, 1, d_mem),
            ],
            dim=1,
        )  # [B, E, d_mem]
        q = _split_heads(tokens[:, c].to(acc) @ w_q.T, heads)  # [B, h, C, dh]
        k, v = _split_heads(entries @ w_k.T, heads), _split_heads(entries @ w_v.T, heads)  # [B, h, E, dh]
        scores = q @ k.transpose(-1, -2) / q.size(-1) ** 0.5  # [B, h, C, E]
        # The FIFO ends with the summaries of the chunks completed so far, at most W of them.
        missing = window - min(window, completed + c)
        scores[..., n_slots : n_slots + missing] = float("-inf")
        reads.append(_merge_heads(torch.softmax(scores, dim=-1) @ v))  # [B, C, d_mem]
    if not reads:
        return tokens.new_zeros(B, 0, C, d_mem)
    return torch.stack(reads, dim=1).to(tokens.dtype)


def memory_read(tokens: Tensor, entering: MemoryState, params: MemoryParams, heads: int, completed: int) -> Tensor:
    """All chunks at once, same contract as :func:`memory_read_naive`: one attention with the chunks
    folded into the batch, each chunk's tokens over its own entries."""
    B, n, C, _ = tokens.shape
    n_slots, window, d_mem = entering.slots.size(2), entering.summaries.size(2), params.null_entry.numel()
    null = params.null_entry.to(entering.slots.dtype).expand(B, n, 1, d_mem)
    entries = torch.cat(
        [entering.slots, entering.summaries, entering.sequence.unsqueeze(2), null], dim=2
    )  # [B, n, E, d_mem]
    E = entries.size(2)
    kv = F.linear(entries.to(tokens.dtype), params.read_kv).view(B, n, E, 2, heads, -1).permute(3, 0, 1, 4, 2, 5)
    kv = kv.flatten(1, 2)  # [2, B*n, h, E, dh]
    q = F.linear(tokens, params.read_q).view(B, n, C, heads, -1).transpose(2, 3).flatten(0, 1)  # [B*n, h, C, dh]
    mask = _read_mask(completed, n, n_slots, window, tokens.device)
    if mask is not None:
        mask = mask.view(1, n, 1, 1, E).expand(B, n, 1, 1, E).flatten(0, 1)  # [B*n, 1, 1, E]
    o = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask)  # [B*n, h, C, dh]
    return _merge_heads(o).view(B, n, C, d_mem)


@functools.lru_cache(maxsize=256)
def _cached_step_blocked(completed: int, n_slots: int, window: int, device: torch.device) -> Tensor | None:
    """:func:`step_blocked` for one count, kept: a decoding step needs it for every token of a stream's
    first W chunks. Its users only read it."""
    mask = _read_mask(completed, 1, n_slots, window, device)
    return None if mask is None else ~mask.view(1, 1, -1)


def step_blocked(completed: int | Sequence[int], n_slots: int, window: int, device: torch.device) -> Tensor | None:
    """[B or 1, 1, E] True where a stream may *not* read an entry (FIFO entries of chunks that never
    existed), or None when it may read all: one step of streams that completed ``completed`` chunks,
    one count for all or one per stream."""
    if isinstance(completed, int):
        return _cached_step_blocked(min(completed, window), n_slots, window, device)
    if min(completed) >= window:
        return None
    done = torch.tensor(list(completed), device=device).unsqueeze(1)  # [B, 1]
    missing = done + torch.arange(window, device=device) < window  # [B, W]: not yet real, as in _fifo_valid
    never = torch.zeros(missing.size(0), 1, dtype=torch.bool, device=device)
    return torch.cat([never.expand(-1, n_slots), missing, never, never], dim=1).unsqueeze(1)


def memory_read_step(
    token: Tensor, state: MemoryState, params: MemoryParams, heads: int, completed: int | Sequence[int]
) -> Tensor:
    """The read of one token per stream (decoding): token [B, d], ``state`` as it stands now,
    ``completed`` chunks completed so far: one count for every stream, or one per stream (streams at
    different positions read different parts of their FIFO). Returns [B, d_mem].

    Instead of projecting every entry to keys and values, the query is
    projected into entry space, q . (W_k e) = (W_k^T q) . e, and the
    attention-weighted entries are projected once, sum p_e W_v e = W_v sum p_e e:
    about 5x fewer FLOPs per token than :func:`memory_read` on one token.
    """
    n_slots, window = state.slots.size(1), state.summaries.size(1)
    blocked = step_blocked(completed, n_slots, window, token.device)
    return memory_read_step_masked(token, state, params.read_q, params.read_kv, params.null_entry, heads, blocked)


def memory_read_step_masked(
    token: Tensor,
    state: MemoryState,
    read_q: Tensor,
    read_kv: Tensor,
    null_entry: Tensor,
    heads: int,
    blocked: Tensor | None,
) -> Tensor:
    """:func:`memory_read_step` with the read's weights passed alone and the entries a stream may not
    read given as a mask (:func:`step_blocked`, worked out once per decoding step for all layers):
    no Python branch on positions, so a compiled decoding step stays one graph."""
    B = token.size(0)
    dtype = token.dtype
    d_mem = null_entry.numel()
    null = null_entry.expand(B, 1, d_mem)
    if null.dtype != state.slots.dtype:
        null = null.to(state.slots.dtype)
    entries = torch.cat([state.slots, state.summaries, state.sequence.unsqueeze(1), null], dim=1)  # [B, E, d_mem]
    read_kv = read_kv if read_kv.dtype == dtype else read_kv.to(dtype)
    if entries.dtype != dtype:
        entries = entries.to(dtype)
    w_k, w_v = read_kv.view(2, heads, -1, d_mem)  # [h, dh, d_mem] each
    q = F.linear(token, read_q).view(B, heads, 1, -1)  # [B, h, 1, dh]
    q_entry = torch.matmul(q, w_k).view(B, heads, d_mem)  # [B, h, d_mem]: W_k^T q per head
    scores = torch.bmm(q_entry, entries.transpose(1, 2)) * q.size(-1) ** -0.5  # [B, h, E]
    if blocked is not None:
        scores = scores.masked_fill(blocked, float("-inf"))
    # At least float32 for the softmax under bf16; float64 stays float64.
    acc = accumulation_dtype(dtype)
    p = torch.softmax(scores if scores.dtype == acc else scores.to(acc), dim=-1)  # [B, h, E]
    read = torch.bmm(p if p.dtype == dtype else p.to(dtype), entries).unsqueeze(2)  # [B, h, 1, d_mem]
    return torch.matmul(read, w_v.transpose(-1, -2)).view(B, d_mem)  # W_v of the read, per head
