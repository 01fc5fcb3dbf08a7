"""Associative long-term memory: a key-value matrix per head, written once per chunk by the gated delta rule.

For each stream and head the memory is a matrix ``A`` in R^{dk x dv} (Titans' long-term memory, Behrouz,
Zhong and Mirrokni 2024, with the gated delta rule of :mod:`mmrec.ops.delta` as its update). The stream
is cut into chunks of C tokens, counted from its start (not from the start of a call). Token t of chunk
c reads the memory as it stood after chunks 0..c-1, in :mod:`mmrec.ops.delta`'s layout (row vectors,
the query on the left):

    o_t = q_t A_c                                          q_t [dk], A_c [dk, dv], o_t [dv]

and once chunk c is complete the memory takes in the chunk's tokens by the gated delta rule, in order:

    A <- exp(log_g_i) (I - beta_i k_i^T k_i) A + beta_i k_i^T v_i        i over chunk c, from A = A_c
    A_{c+1} = A

So ``A_{c+1}`` is the state :func:`~mmrec.ops.delta.delta_naive` leaves after chunk c's tokens,
started from ``A_c``. The read is what differs from the delta rule as a short-term mixer: a token sees
no write of its own chunk or of later ones (those reach it through the short-term memory), so the
memory is causal by chunk, and a decoder writes it once per chunk.

The decay is per token (``log_g`` [B, H, T], <= 0); a per-chunk decay ``d_c`` is ``log d_c`` on one
token of the chunk, or ``log d_c / C`` on each. As in :mod:`mmrec.ops.delta`, keys should be unit
length and ``beta`` in [0, 1] (the state then never grows); the ops do not check either.

The state of a stream (:class:`AssocState`) is the memory of its completed chunks plus the keys,
values, decays and betas of the tokens of its unfinished chunk (``n_pending`` of them, zero beyond), so
feeding a sequence whole or in pieces of any lengths gives the same outputs and the same final state.

Implementations of one contract:

* :func:`assoc_naive` - a token loop; the chunk's write is :func:`~mmrec.ops.delta.delta_naive`. The
  reference for tests.
* :func:`assoc_chunked` - training and prefill: the states entering every chunk come from
  :func:`delta_chunk_states` (the WY form of :func:`~mmrec.ops.delta.delta_chunked` with one delta
  chunk per memory chunk: all chunks' triangular systems at once, then a loop over chunks of two
  small matrix products), then the reads of all chunks are one batched product.
* :func:`assoc_step` - one token, for decoding: it reads, joins the pending buffer, and when it
  completes its chunk the chunk is written (:func:`delta_chunk_states` on one chunk).

Shapes: q, k [B, H, T, dk]; v [B, H, T, dv]; log_g, beta [B, H, T]. The memory and the pending
buffer are kept in float32 (float64 for float64 inputs) even under autocast; outputs come back in
v's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mmrec.ops.delta import _check_shapes, delta_chunk_states, delta_naive
from mmrec.ops.scan import accumulation_dtype

Count = int | tuple[int, ...]


class AssocState(NamedTuple):
    """The associative memory of a batch of streams, with its unfinished chunk."""

    memory: Tensor  # [B, H, dk, dv]: A after the stream's completed chunks
    keys: Tensor  # [B, H, C, dk]: keys of the unfinished chunk's tokens, zero from row `n_pending` on
    values: Tensor  # [B, H, C, dv]
    log_g: Tensor  # [B, H, C]
    beta: Tensor  # [B, H, C]
    # Tokens in the unfinished chunk, 0..C-1 (the stream's position mod C): one for every stream, or,
    # for assoc_step only, one per stream.
    n_pending: Count

    @property
    def chunk_size(self) -> int:
        return self.keys.size(2)

    @property
    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """memory, keys, values, log_g, beta: the state's tensors (streams on dim 0)."""
        return self.memory, self.keys, self.values, self.log_g, self.beta

    @property
    def pending(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """keys, values, log_g, beta of the unfinished chunk."""
        return self.keys, self.values, self.log_g, self.beta


def assoc_init_state(
    batch_size: int,
    heads: int,
    dk: int,
    dv: int,
    chunk_size: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> AssocState:
    """Fresh streams: an empty memory, no pending token. ``dtype`` is the state's (float32 or float64)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    z = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
    B, H, C = batch_size, heads, chunk_size
    return AssocState(z(B, H, dk, dv), z(B, H, C, dk), z(B, H, C, dv), z(B, H, C), z(B, H, C), 0)


def _start(q: Tensor, v: Tensor, state: AssocState | None, chunk_size: int | None) -> AssocState:
    """The state to start from, cast to the accumulation dtype and checked against q and v."""
    B, H, _, dk = q.shape
    dv = v.size(-1)
    acc = accumulation_dtype(v.dtype)
    if state is None:
        return assoc_init_state(B, H, dk, dv, 64 if chunk_size is None else chunk_size, acc, v.device)
    C = state.keys.size(2) if state.keys.dim() == 4 else -1
    if chunk_size is not None and chunk_size != C:
        raise ValueError(f"chunk_size {chunk_size} differs from the state's chunk of {C} tokens")
    want = {
        "memory": (B, H, dk, dv),
        "keys": (B, H, C, dk),
        "values": (B, H, C, dv),
        "log_g": (B, H, C),
        "beta": (B, H, C),
    }
    for name, shape in want.items():
        got = tuple(getattr(state, name).shape)
        if got != shape:
            raise ValueError(f"state.{name} must be {list(shape)} (B, H, C, dk, dv of the input); got {list(got)}")
    counts = (state.n_pending,) if isinstance(state.n_pending, int) else state.n_pending
    if isinstance(state.n_pending, tuple) and len(counts) != B:
        raise ValueError(f"state.n_pending holds {len(counts)} counts for {B} streams")
    if any(not 0 <= c < C for c in counts):
        raise ValueError(f"state.n_pending must lie in [0, {C}); got {state.n_pending}")
    memory, keys, values, log_g, beta = (t.to(acc) for t in state.tensors)
    return AssocState(memory, keys, values, log_g, beta, state.n_pending)


def _pack(memory: Tensor, pending: Sequence[Tensor], n_pending: Count) -> AssocState:
    keys, values, log_g, beta = pending
    return AssocState(memory, keys, values, log_g, beta, n_pending)


def _write(pending: Sequence[Tensor], memory: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """:func:`delta_chunk_states` of whole chunks of (keys, values, log_g, beta)."""
    k, v, log_g, beta = pending
    return delta_chunk_states(k, v, log_g, beta, memory, chunk_size)


def _uniform_count(state: AssocState) -> int:
    if isinstance(state.n_pending, int):
        return state.n_pending
    if len(set(state.n_pending)) == 1:
        return state.n_pending[0]
    raise ValueError(
        f"streams with different numbers of pending tokens {state.n_pending} can only be fed one token at a time"
    )


def assoc_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_g: Tensor,
    beta: Tensor,
    state: AssocState | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, AssocState]:
    """Reference: one token at a time; a completed chunk is written by :func:`delta_naive`.

    ``chunk_size`` is the state's C (it may be omitted with a state; 64 for fresh streams without one).
    Returns (o [B, H, T, dv], the new state).
    """
    _check_shapes(q, k, v, log_g, beta, None)
    st = _start(q, v, state, chunk_size)
    r = _uniform_count(st)
    A, C, acc = st.memory, st.chunk_size, st.memory.dtype
    pending = [list(t[:, :, :r].unbind(2)) for t in st.pending]  # per field, one tensor per pending token
    outs = []
    for t in range(q.size(2)):
        outs.append((q[:, :, t, None, :].to(acc) @ A).squeeze(-2))
        for rows, x in zip(pending, (k, v, log_g, beta), strict=True):
            rows.append(x[:, :, t].to(acc))
        if len(pending[0]) == C:
            kc, vc, gc, bc = (torch.stack(rows, dim=2) for rows in pending)
            _, A = delta_naive(kc, kc, vc, gc, bc, A)  # its outputs (keys as queries) are not used
            pending = [[], [], [], []]
    fields = []
    for rows, empty in zip(pending, st.pending, strict=True):
        filled = torch.stack(rows, dim=2) if rows else empty[:, :, :0]
        fields.append(torch.cat([filled, torch.zeros_like(empty[:, :, filled.size(2) :])], dim=2))
    o = torch.stack(outs, dim=2).to(v.dtype) if outs else v.new_zeros(v.shape)
    return o, _pack(A, fields, len(pending[0]))


def assoc_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_g: Tensor,
    beta: Tensor,
    state: AssocState | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, AssocState]:
    """All chunks at once, same contract as :func:`assoc_naive`.

    The unfinished chunk's pending tokens are put in front of the input, so the chunks are those of
    the stream; the chunks completed in this call are written by :func:`delta_chunk_states`, which
    also gives the memory entering each of them; the reads are one product per chunk, batched.
    """
    _check_shapes(q, k, v, log_g, beta, None)
    st = _start(q, v, state, chunk_size)
    r = _uniform_count(st)
    B, H, T, dk = q.shape
    dv, C, acc = v.size(-1), st.chunk_size, st.memory.dtype
    if T == 0:
        return v.new_zeros(B, H, 0, dv), st
    total = r + T
    n_done, n_read = total // C, -(-total // C)  # chunks completed in this call; chunks with tokens in it
    with torch.autocast(device_type=v.device.type, enabled=False):
        new = [t.to(acc) for t in (k, v, log_g, beta)]
        seq = [torch.cat([p[:, :, :r], x], dim=2) if r else x for p, x in zip(st.pending, new, strict=True)]
        entering, A = _write([x[:, :, : n_done * C] for x in seq], st.memory, C)  # [B, H, n_done, dk, dv]
        if n_read > n_done:  # the unfinished last chunk reads the memory after the last write
            entering = torch.cat([entering, A.unsqueeze(2)], dim=2)
        q_grid = F.pad(q.to(acc), (0, 0, r, n_read * C - total)).view(B, H, n_read, C, dk)  # q on the chunk grid
        o = (q_grid @ entering).view(B, H, n_read * C, dv)[:, :, r : r + T]
        pad = C - (total - n_done * C)
        tail = [F.pad(x[:, :, n_done * C :], (0, 0, 0, pad) if x.dim() == 4 else (0, pad)) for x in seq]
    return o.to(v.dtype), _pack(A, tail, total - n_done * C)


def assoc_step(
    q: Tensor, k: Tensor, v: Tensor, log_g: Tensor, beta: Tensor, state: AssocState
) -> tuple[Tensor, AssocState]:
    """One decoding step: q, k [B, H, dk]; v [B, H, dv]; log_g, beta [B, H]. Returns (o [B, H, dv], state).

    The token reads the memory of the completed chunks, then joins its stream's pending row
    ``n_pending``; a stream whose chunk it completes is written. ``state.n_pending`` may differ per stream
    (a tuple): each token then goes to its own stream's row, and only the completed streams are written.
    """
    _check_shapes(q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), log_g.unsqueeze(2), beta.unsqueeze(2), None)
    st = _start(q.unsqueeze(2), v.unsqueeze(2), state, None)
    A, C, acc = st.memory, st.chunk_size, st.memory.dtype
    B, device = q.size(0), q.device
    with torch.autocast(device_type=v.device.type, enabled=False):
        o = (q.to(acc).unsqueeze(-2) @ A).squeeze(-2)  # [B, H, dv]
        rows = torch.arange(C, device=device)
        if isinstance(st.n_pending, int):
            at, after = (rows == st.n_pending).view(1, 1, C), (rows > st.n_pending).view(1, 1, C)
            counts = (st.n_pending,) * B
        else:
            counts = st.n_pending
            offset = torch.tensor(counts, device=device).view(B, 1, 1)
            at, after = rows == offset, rows > offset  # [B, 1, C]
        # New tensors: the token in its row, the rows after it zero (as the chunked form leaves them).
        fields = []
        for old, x in zip(st.pending, (k, v, log_g, beta), strict=True):
            x = x.to(acc).unsqueeze(2)  # [B, H, 1(, d)]
            mask_at, mask_after = (at, after) if old.dim() == 3 else (at.unsqueeze(-1), after.unsqueeze(-1))
            fields.append(torch.where(mask_at, x, old.masked_fill(mask_after, 0.0)))
        done = [b for b, c in enumerate(counts) if c == C - 1]
        if len(done) == B:
            _, A = _write(fields, A, C)
            fields = [torch.zeros_like(f) for f in fields]
        elif done:
            idx = torch.tensor(done, device=device)
            _, written = _write([f.index_select(0, idx) for f in fields], A.index_select(0, idx), C)
            A = A.index_copy(0, idx, written)
            fields = [f.index_fill(0, idx, 0.0) for f in fields]
    n: Count = (st.n_pending + 1) % C if isinstance(st.n_pending, int) else tuple((c + 1) % C for c in counts)
    return o.to(v.dtype), _pack(A, fields, n)
