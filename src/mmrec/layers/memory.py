"""Levels 1-3 of MM-Rec as a layer: chunk summaries, the sequence summary and long-term slots.

The maths lives in :mod:`mmrec.ops.memory`; this layer owns the parameters
and the stream's bookkeeping. The stream is cut into chunks of ``chunk_size``
tokens, counted from the start of the stream (not of the call): the inputs of
the unfinished chunk wait in ``pending`` until it completes, then the chunk is
written. Each token reads the memory as it stood after the last chunk
completed before its own, so it never sees its own chunk or later ones.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmrec.config import MMRecConfig
from mmrec.ops import MemoryParams, MemoryState, memory_read, memory_write
from mmrec.ops.memory import memory_read_step_masked, step_blocked


class MemoryOutput(NamedTuple):
    """What :class:`LongTermMemory` returns: its output and the streams' new state (named as in MMRecState)."""

    y: Tensor  # [B, T, d] ([B, d] from a step)
    memory: Tensor  # [B, n_slots, d_mem]: the slots (level 3)
    summaries: Tensor  # [B, W, d_mem]: the level-1 FIFO, oldest first
    sequence: Tensor  # [B, d_mem]: level 2
    pending: Tensor  # [B, C, d]: inputs of the unfinished chunk, zero beyond it


@functools.lru_cache(maxsize=1024)
def _pending_masks(chunk_size: int, row: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """[C, 1] ones before ``row`` and [C, 1] one at ``row``: a step at that offset keeps the chunk's
    earlier rows of ``pending``, puts its token in ``row`` and zeros after it. Two small kernels where a
    masked fill and a scatter took four times as long; kept, since every step needs one; only read."""
    rows = torch.arange(chunk_size, device=device).unsqueeze(-1)
    return (rows < row).to(dtype), (rows == row).to(dtype)


class LongTermMemory(nn.Module):
    """Writes completed chunks into levels 1-3 and lets every token read them."""

    def __init__(self, cfg: MMRecConfig) -> None:
        super().__init__()
        assert cfg.d_mem is not None and cfg.mem_heads is not None
        d, dm = cfg.d_model, cfg.d_mem
        self.chunk_size, self.n_slots, self.window = cfg.chunk_size, cfg.mem_slots, cfg.summary_window
        self.heads, self.d_mem = cfg.mem_heads, dm
        self.scan_block = cfg.scan_block
        # Write side: keys/values of the chunk, the slot queries and the summary query.
        self.write_kv = nn.Linear(d, 2 * dm, bias=False)
        self.write_queries = nn.Parameter(torch.randn(self.n_slots + 1, dm))
        self.gate_weight = nn.Parameter(torch.zeros(dm))
        self.gate_bias = nn.Parameter(torch.zeros(self.n_slots))
        self.sequence_decay = nn.Parameter(torch.zeros(dm))
        # The slots of a fresh stream (read by the model, which builds states).
        self.memory_init = nn.Parameter(torch.zeros(self.n_slots, dm))
        # Read side.
        self.read_q = nn.Linear(d, dm, bias=False)
        self.read_kv = nn.Linear(dm, 2 * dm, bias=False)
        self.null_entry = nn.Parameter(torch.zeros(dm))
        self.out = nn.Linear(dm, d, bias=False)

    def reset_gates(self) -> None:
        """Slots write at rates from 1/2 to 1/100 per chunk; level 2 forgets over 10..100 chunks."""
        with torch.no_grad():
            rates = torch.logspace(math.log10(0.5), math.log10(0.01), self.n_slots)
            self.gate_bias.copy_(torch.logit(rates))
            lam = 1 - 1 / torch.logspace(1, 2, self.d_mem)
            self.sequence_decay.copy_(torch.logit(lam))

    def params(self) -> MemoryParams:
        """The parameter tensors the ops take (read at call time, where FSDP2 has gathered them)."""
        return MemoryParams(
            write_kv=self.write_kv.weight,
            write_queries=self.write_queries,
            gate_weight=self.gate_weight,
            gate_bias=self.gate_bias,
            sequence_decay=self.sequence_decay,
            read_q=self.read_q.weight,
            read_kv=self.read_kv.weight,
            null_entry=self.null_entry,
        )

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        summaries: Tensor,
        sequence: Tensor,
        pending: Tensor,
        position: int | tuple[int, ...],
    ) -> MemoryOutput:
        """x: [B, T, d] normed block input; memory [B, n_slots, d_mem] (the slots); summaries
        [B, W, d_mem] (oldest first); sequence [B, d_mem]; pending [B, C, d] (inputs of the
        unfinished chunk); position: tokens of the streams consumed before x, one int for all or
        (for T = 1 only) one per stream."""
        B, T, d = x.shape
        C = self.chunk_size
        if T == 0:
            return MemoryOutput(x.new_zeros(B, 0, d), memory, summaries, sequence, pending)
        if T == 1:
            y, *new = self.step(x[:, 0], memory, summaries, sequence, pending, position)
            return MemoryOutput(y.unsqueeze(1), *new)
        if not isinstance(position, int):
            raise ValueError(f"streams at different positions {position} can only be fed one token at a time")
        params = self.params()
        state = MemoryState(memory, summaries, sequence)
        r = position % C  # tokens of the current chunk seen before this call
        xs = torch.cat([pending[:, :r].to(x.dtype), x], dim=1) if r else x  # [B, r+T, d]
        total = r + T
        n_done = total // C  # chunks completed in this call
        n_read = -(-total // C)  # chunks that have tokens in this call

        chunks = xs[:, : n_done * C].reshape(B, n_done, C, d)
        entering, final = memory_write(chunks, state, params, self.heads, self.scan_block)
        if n_read > n_done:  # the unfinished last chunk reads the state after the last write
            entering = MemoryState(
                *(torch.cat([e, f.unsqueeze(1)], dim=1) for e, f in zip(entering, final, strict=True))
            )
        tokens = F.pad(x, (0, 0, r, n_read * C - total)).view(B, n_read, C, d)  # x on the chunk grid
        o = memory_read(tokens, entering, params, self.heads, completed=position // C)  # [B, n_read, C, d_mem]
        y = self.out(o.view(B, n_read * C, self.d_mem)[:, r : r + T])

        tail = xs[:, n_done * C :]  # [B, total % C, d]
        return MemoryOutput(
            y,
            final.slots.to(memory.dtype),
            final.summaries.to(summaries.dtype),
            final.sequence.to(sequence.dtype),
            F.pad(tail, (0, 0, 0, C - tail.size(1))).to(pending.dtype),
        )

    def step(
        self,
        x: Tensor,
        memory: Tensor,
        summaries: Tensor,
        sequence: Tensor,
        pending: Tensor,
        position: int | tuple[int, ...],
    ) -> MemoryOutput:
        """One token per stream (decoding), x [B, d] -> y [B, d]: the same read and write as the chunked
        path, in fewer ops. ``position``: one for all streams, or one per stream. The three parts
        (:func:`decode_masks`, :meth:`read_step` with the pending update, :meth:`write_rows`) are
        what the model's decoding step calls, its layers' reads first and the writes after."""
        keep, row, blocked, done = decode_masks(position, self.chunk_size, self.n_slots, self.window, pending)
        y = self.read_step(x, memory, summaries, sequence, blocked)
        pending = torch.addcmul(pending * keep, row, x.unsqueeze(1))
        return MemoryOutput(y, *self.write_rows(pending, memory, summaries, sequence, done, x.dtype))

    def read_step(
        self, x: Tensor, memory: Tensor, summaries: Tensor, sequence: Tensor, blocked: Tensor | None
    ) -> Tensor:
        """The read of one token per stream, x [B, d] -> y [B, d] (after the output projection);
        ``blocked`` from :func:`decode_masks`."""
        state = MemoryState(memory, summaries, sequence)
        o = memory_read_step_masked(
            x, state, self.read_q.weight, self.read_kv.weight, self.null_entry, self.heads, blocked
        )
        return F.linear(o, self.out.weight)

    def write_rows(
        self,
        pending: Tensor,
        memory: Tensor,
        summaries: Tensor,
        sequence: Tensor,
        done: list[int] | None,
        dtype: torch.dtype,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Write the completed chunks held in ``pending`` [B, C, d] into the memory of the streams
        ``done`` (from :func:`decode_masks`: [] none, None all) and empty their ``pending``; the chunk
        is written in ``dtype`` (the tokens' dtype). The streams not written keep their tensors."""
        if done is not None and not done:
            return memory, summaries, sequence, pending
        state = MemoryState(memory, summaries, sequence)
        if done is None:
            _, final = memory_write(pending.to(dtype).unsqueeze(1), state, self.params(), self.heads, self.scan_block)
            memory, summaries, sequence = (f.to(t.dtype) for f, t in zip(final, state, strict=True))
            return memory, summaries, sequence, torch.zeros_like(pending)
        idx = torch.tensor(done, device=pending.device)
        entering = MemoryState(*(t.index_select(0, idx) for t in state))
        chunk = pending.index_select(0, idx).to(dtype).unsqueeze(1)  # [len(done), 1, C, d]
        _, final = memory_write(chunk, entering, self.params(), self.heads, self.scan_block)
        memory, summaries, sequence = (t.index_copy(0, idx, f.to(t.dtype)) for t, f in zip(state, final, strict=True))
        return memory, summaries, sequence, pending.index_fill(0, idx, 0.0)


def decode_masks(
    position: int | tuple[int, ...], chunk_size: int, n_slots: int, window: int, pending: Tensor
) -> tuple[Tensor, Tensor, Tensor | None, list[int] | None]:
    """What one decoding step of streams at ``position`` (one for all, or one per stream) needs to know
    of the positions, worked out on the host (no device sync) and shared by every layer:

    - ``keep``, ``row`` ([C, 1] for one position, [B, C, 1] for one per stream; ``pending``'s dtype):
      the step's pending buffer is ``pending * keep + row * x``: the chunk's earlier rows, the token in
      its row, zeros after it (as the chunked path leaves them, whatever the rows from there on held
      before);
    - ``blocked`` ([1 or B, 1, E] or None): entries a stream may not read (FIFO entries of chunks
      that never existed);
    - ``done``: the streams whose chunk this token completes (None: all of them; [] none).
    """
    C = chunk_size
    if isinstance(position, int):
        r = position % C
        keep, row = _pending_masks(C, r, pending.device, pending.dtype)
        blocked = step_blocked(position // C, n_slots, window, pending.device)
        return keep, row, blocked, (None if r == C - 1 else [])
    offsets = torch.tensor([p % C for p in position], device=pending.device).view(-1, 1, 1)
    rows = torch.arange(C, device=pending.device).view(1, C, 1)
    keep, row = (rows < offsets).to(pending.dtype), (rows == offsets).to(pending.dtype)
    blocked = step_blocked(tuple(p // C for p in position), n_slots, window, pending.device)
    done = [b for b, p in enumerate(position) if p % C == C - 1]
    return keep, row, blocked, (None if len(done) == len(position) else done)
