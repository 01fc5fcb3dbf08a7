"""Levels 1-3 of MM-Rec: chunk summaries, the sequence summary and long-term slots.

The stream is cut into chunks of ``chunk_size`` tokens, counted from the start
of the stream (not of the call). When a chunk is complete it is written:

* level 1: a learned query pools the chunk into one summary vector, kept in a
  FIFO of the last ``summary_window`` summaries;
* level 2: a running summary z <- lam * z + (1 - lam) * summary (lam learned
  per channel);
* level 3: ``mem_slots`` learned slot queries pool the chunk into candidates
  U; a per-slot gate a = sigmoid(w . U + b_slot) decides how much each slot
  takes: M <- (1 - a) * M + a * U.

Candidates and gates depend on the chunk only, never on M, so M is a linear
recurrence over chunks: all chunks' memories come out of one scan, and the
reads of all chunks are one batched attention. Each token of chunk c reads
[M; FIFO; z] as they stood after chunk c-1 (plus a learned null entry), so
a token never sees memory built from its own chunk or later ones. A learned
null entry, always present, lets a token read nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmrec.config import MMRecConfig
from mmrec.ops import linear_scan
from mmrec.ops.scan import accumulation_dtype


class MemoryRead(nn.Module):
    """Writes completed chunks into levels 1-3 and lets every token read them."""

    def __init__(self, cfg: MMRecConfig) -> None:
        super().__init__()
        assert cfg.d_mem is not None and cfg.mem_heads is not None
        d, dm = cfg.d_model, cfg.d_mem
        self.chunk, self.slots, self.window = cfg.chunk_size, cfg.mem_slots, cfg.summary_window
        self.heads, self.head_dim, self.d_mem = cfg.mem_heads, dm // cfg.mem_heads, dm
        self.scan_block = cfg.scan_block
        # Write side: keys/values of the chunk, the slot queries and the summary query.
        self.write_kv = nn.Linear(d, 2 * dm, bias=False)
        self.write_queries = nn.Parameter(torch.randn(self.slots + 1, dm))
        self.gate_weight = nn.Parameter(torch.zeros(dm))
        self.gate_bias = nn.Parameter(torch.zeros(self.slots))
        self.sequence_decay = nn.Parameter(torch.zeros(dm))
        self.memory_init = nn.Parameter(torch.zeros(self.slots, dm))
        # Read side.
        self.read_q = nn.Linear(d, dm, bias=False)
        self.read_kv = nn.Linear(dm, 2 * dm, bias=False)
        self.null_entry = nn.Parameter(torch.zeros(dm))
        self.out = nn.Linear(dm, d, bias=False)

    def reset_gates(self) -> None:
        """Slots write at rates from 1/2 to 1/100 per chunk; level 2 forgets over 10..100 chunks."""
        with torch.no_grad():
            rates = torch.logspace(math.log10(0.5), math.log10(0.01), self.slots)
            self.gate_bias.copy_(torch.logit(rates))
            lam = 1 - 1 / torch.logspace(1, 2, self.d_mem)
            self.sequence_decay.copy_(torch.logit(lam))

    def _write(self, chunks: Tensor, memory: Tensor, sequence: Tensor) -> tuple[Tensor, ...]:
        """chunks: [B, n, C, d] completed chunks -> states entering each chunk and after the last."""
        B, n, C, _ = chunks.shape
        h, dh, S, dm = self.heads, self.head_dim, self.slots, self.d_mem
        acc = memory.dtype
        k, v = self.write_kv(chunks).view(B * n, C, 2, h, dh).permute(2, 0, 3, 1, 4)  # [B*n, h, C, dh]
        queries = self.write_queries.view(S + 1, h, dh).transpose(0, 1).to(k.dtype)
        pooled = F.scaled_dot_product_attention(queries.expand(B * n, h, S + 1, dh), k, v)
        pooled = pooled.transpose(1, 2).reshape(B, n, S + 1, dm).to(acc)
        U, summary = pooled[:, :, :S], pooled[:, :, S]  # [B, n, S, dm], [B, n, dm]

        logit = U @ self.gate_weight.to(acc) + self.gate_bias.to(acc)  # [B, n, S]
        mem_enter, mem_final = linear_scan(
            F.logsigmoid(-logit).transpose(1, 2),  # log(1 - a)
            (torch.sigmoid(logit).unsqueeze(-1) * U).transpose(1, 2),  # a * U
            memory,
            self.scan_block,
        )  # [B, S, n, dm], [B, S, dm]
        log_lam = F.logsigmoid(self.sequence_decay.to(acc))  # [dm]
        seq_enter, seq_final = linear_scan(
            log_lam.view(1, dm, 1).expand(B, dm, n),
            (torch.sigmoid(-self.sequence_decay.to(acc)) * summary).transpose(1, 2).unsqueeze(-1),
            sequence.unsqueeze(-1),
            self.scan_block,
        )  # [B, dm, n, 1], [B, dm, 1]
        return (
            mem_enter.transpose(1, 2),
            mem_final,
            seq_enter.squeeze(-1).transpose(1, 2),
            seq_final.squeeze(-1),
            summary,
        )

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        summaries: Tensor,
        sequence: Tensor,
        pending: Tensor,
        position: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """x: [B, T, d] normed block input; memory [B, S, dm]; summaries [B, W, dm] (oldest
        first); sequence [B, dm]; pending [B, C, d] (inputs of the unfinished chunk);
        position: tokens of the stream consumed before x. Returns y and the new state."""
        B, T, d = x.shape
        C, W, S, h, dh = self.chunk, self.window, self.slots, self.heads, self.head_dim
        if T == 0:
            return x.new_zeros(B, 0, d), memory, summaries, sequence, pending
        if T == 1:
            return self._step(x, memory, summaries, sequence, pending, position)
        acc = accumulation_dtype(memory.dtype)
        r = position % C  # tokens of the current chunk seen before this call
        xs = torch.cat([pending[:, :r].to(x.dtype), x], dim=1) if r else x  # [B, r+T, d]
        total = r + T
        n_done = total // C  # chunks completed in this call
        n_read = -(-total // C)  # chunks that have tokens in this call

        if n_done:
            chunks = xs[:, : n_done * C].reshape(B, n_done, C, d)
            mem_enter, memory, seq_enter, sequence, new_summaries = self._write(
                chunks, memory.to(acc), sequence.to(acc)
            )
            mem_read = torch.cat([mem_enter, memory.unsqueeze(1)], dim=1)[:, :n_read]  # [B, n_read, S, dm]
            seq_read = torch.cat([seq_enter, sequence.unsqueeze(1)], dim=1)[:, :n_read]  # [B, n_read, dm]
            fifo = torch.cat([summaries.to(acc), new_summaries], dim=1)  # [B, W + n_done, dm]
        else:
            mem_read, seq_read, fifo = memory.unsqueeze(1), sequence.unsqueeze(1), summaries
        windows = fifo.unfold(1, W, 1)[:, :n_read].transpose(-1, -2)  # [B, n_read, W, dm]

        # Level-1 entries exist only for chunks completed since the stream began.
        valid_before = min(W, position // C)
        mask = None
        if valid_before < W:
            valid = torch.cat(
                [
                    torch.arange(W, device=x.device) >= W - valid_before,
                    torch.ones(n_done, dtype=torch.bool, device=x.device),
                ]
            ).unfold(0, W, 1)[:n_read]  # [n_read, W]
            always = torch.ones(n_read, 1, dtype=torch.bool, device=x.device)
            mask = torch.cat([always.expand(n_read, S), valid, always, always], dim=1)  # [n_read, E]

        null = self.null_entry.to(mem_read.dtype).expand(B, n_read, 1, self.d_mem)
        entries = torch.cat([mem_read, windows, seq_read.unsqueeze(2), null], dim=2)  # [B, n_read, E, dm]
        E = entries.size(2)
        kv = self.read_kv(entries.to(x.dtype)).view(B, n_read, E, 2, h, dh).permute(3, 0, 1, 4, 2, 5)
        kv = kv.flatten(1, 2)  # [2, B*n_read, h, E, dh]

        q = self.read_q(x).view(B, T, h, dh)
        q = F.pad(q, (0, 0, 0, 0, r, n_read * C - r - T))  # align the tokens to the chunk grid
        q = q.view(B, n_read, C, h, dh).transpose(2, 3).flatten(0, 1)  # [B*n_read, h, C, dh]
        if mask is not None:
            mask = mask.view(1, n_read, 1, 1, E).expand(B, n_read, 1, 1, E).flatten(0, 1)
        o = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask)
        o = o.view(B, n_read, h, C, dh).transpose(2, 3).reshape(B, n_read * C, self.d_mem)[:, r : r + T]
        y = self.out(o)

        tail = xs[:, n_done * C :]  # [B, total % C, d]
        pending = F.pad(tail, (0, 0, 0, C - tail.size(1))).to(pending.dtype)
        summaries = fifo[:, fifo.size(1) - W :].to(summaries.dtype)
        return y, memory, summaries, sequence, pending

    def _step(
        self, x: Tensor, memory: Tensor, summaries: Tensor, sequence: Tensor, pending: Tensor, position: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """One token (decoding): the same read and write as :meth:`forward`, cheaper.

        Instead of projecting every memory entry to keys and values, the query
        is projected into entry space: q . (W_k e) = (W_k^T q) . e, and the
        attention-weighted entries are projected once: sum p_e W_v e = W_v sum p_e e.
        """
        B, _, d = x.shape
        C, W, h, dh, dm = self.chunk, self.window, self.heads, self.head_dim, self.d_mem
        r = position % C
        null = self.null_entry.to(memory.dtype).expand(B, 1, dm)
        entries = torch.cat([memory, summaries, sequence.unsqueeze(1), null], dim=1).to(x.dtype)  # [B, E, dm]
        w_k, w_v = self.read_kv.weight.to(x.dtype).view(2, h, dh, dm)
        q = self.read_q(x[:, 0]).view(B, h, dh)
        scores = torch.einsum("bhm,bem->bhe", torch.einsum("bhk,hkm->bhm", q, w_k), entries) * dh**-0.5
        valid_before = min(W, position // C)
        if valid_before < W:
            hidden = torch.zeros(entries.size(1), dtype=torch.bool, device=x.device)
            hidden[self.slots : self.slots + W - valid_before] = True
            scores = scores.masked_fill(hidden, float("-inf"))
        p = torch.softmax(scores.float(), dim=-1).to(x.dtype)
        o = torch.einsum("bhm,hkm->bhk", torch.einsum("bhe,bem->bhm", p, entries), w_v)  # [B, h, dh]
        y = self.out(o.reshape(B, 1, dm))

        pending = pending.clone()
        pending[:, r] = x[:, 0].to(pending.dtype)
        if r + 1 == C:  # this token completes the chunk: write it
            acc = accumulation_dtype(memory.dtype)
            _, memory, _, sequence, summary = self._write(
                pending.to(x.dtype).unsqueeze(1), memory.to(acc), sequence.to(acc)
            )
            summaries = torch.cat([summaries[:, 1:], summary.to(summaries.dtype)], dim=1)
            pending = torch.zeros_like(pending)
        return y, memory, summaries, sequence, pending
