"""The MM-Rec language model: embedding -> blocks of dual memory -> RMSNorm -> tied head."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmrec.config import MMRecConfig
from mmrec.layers.basic import SwiGLU, rms_norm_step
from mmrec.layers.memory import LongTermMemory, decode_masks
from mmrec.layers.short_term import ShortTermMixer
from mmrec.models.generation import GenerationMixin
from mmrec.models.output import LMOutput, check_input_ids, lm_loss
from mmrec.models.state import MMRecState, Position, StateError, position_problem
from mmrec.ops.scan import accumulation_dtype


@functools.lru_cache(maxsize=64)
def _nothing_blocked(batch: int, entries: int, device: torch.device) -> Tensor:
    """An all-False read mask [batch, 1, entries] (kept; only read)."""
    return torch.zeros(batch, 1, entries, dtype=torch.bool, device=device)


class MMRecBlock(nn.Module):
    """x += ShortTermMixer(norm x); x += LongTermMemory(norm x); x += SwiGLU(norm x)."""

    def __init__(self, cfg: MMRecConfig) -> None:
        super().__init__()
        assert cfg.d_ff is not None
        self.norm1 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.short_term = ShortTermMixer(cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.memory = LongTermMemory(cfg)
        self.norm3 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(
        self, x: Tensor, st: dict[str, Tensor], position: Position, fresh: bool = False
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``fresh``: the streams start here, with the memory slots at their learned start
        (read inside the block, where FSDP2 has gathered the block's parameters)."""
        y, short, conv = self.short_term(self.norm1(x), st["short"], st["conv"])
        x = x + y
        memory = st["memory"]
        if fresh:  # a copy: FSDP2 frees the gathered parameter after the block, and a state may outlive it
            memory = self.memory.memory_init.to(memory.dtype).expand_as(memory).clone()
        long_term = self.memory(self.norm2(x), memory, st["summaries"], st["sequence"], st["pending"], position)
        x = x + long_term.y
        x = x + self.mlp(self.norm3(x))
        new = {
            "short": short,
            "conv": conv,
            "memory": long_term.memory,
            "summaries": long_term.summaries,
            "sequence": long_term.sequence,
            "pending": long_term.pending,
        }
        return x, new

    def step(
        self,
        x: Tensor,
        short: Tensor,
        conv: Tensor,
        memory: Tensor,
        summaries: Tensor,
        sequence: Tensor,
        pending: Tensor,
        keep: Tensor,
        row: Tensor,
        blocked: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One token per stream (decoding), x [B, d], without the memory's chunk write: returns x and the
        new (short, conv, pending); ``keep``, ``row``, ``blocked`` from
        :func:`~mmrec.layers.memory.decode_masks`. The maths of :meth:`forward`, called as plain
        functions (at one token the time goes to per-op overhead, not arithmetic), with no Python
        branch on positions: the caller writes completed chunks after all layers have read."""
        n1, n2, n3 = self.norm1, self.norm2, self.norm3
        y, short, conv = self.short_term.step(rms_norm_step(x, n1.weight, n1.eps), short, conv)
        x = x + y
        h = rms_norm_step(x, n2.weight, n2.eps)
        x = x + self.memory.read_step(h, memory, summaries, sequence, blocked)
        pending = torch.addcmul(pending * keep, row, h.unsqueeze(1))
        gate, up = F.linear(rms_norm_step(x, n3.weight, n3.eps), self.mlp.w13.weight).chunk(2, -1)
        x = x + F.linear(F.silu(gate) * up, self.mlp.w2.weight)
        return x, short, conv, pending


class MMRecLM(nn.Module, GenerationMixin):
    """Decoder-only LM with short-term recurrence and hierarchical long-term memory.

    ``model(input_ids, state=None)`` -> LMOutput(logits [B, T, V], state). Feeding
    a sequence whole or in pieces with the state carried gives the same logits.
    """

    def __init__(self, config: MMRecConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(MMRecBlock(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self._compiled_reads: Any = None  # set by compile_decoding
        self.reset_parameters()

    @property
    def layers(self) -> list[MMRecBlock]:
        """The blocks, typed (iterating an nn.ModuleList yields plain Modules)."""
        return cast(list[MMRecBlock], list(self.blocks))

    def reset_parameters(self) -> None:
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() == 2 and "memory_init" not in name:
                nn.init.normal_(p, 0.0, std)
        for block in self.layers:
            # GPT-2: residual projections scaled down by depth.
            for lin in (block.short_term.out, block.memory.out, block.mlp.w2):
                nn.init.normal_(lin.weight, 0.0, std / math.sqrt(2 * self.config.n_layers))
            nn.init.normal_(block.memory.write_queries, 0.0, 1.0)
            nn.init.normal_(block.memory.memory_init, 0.0, std)
            nn.init.zeros_(block.short_term.decay.weight)
            block.short_term.reset_decay()
            block.memory.reset_gates()

    def write_gate_mean(self) -> Tensor:
        """Mean sparse-write gate relu(W_s x + b_s) of the last training forward, over layers, heads and
        tokens (``sparse_write`` only): a penalty on it drives the gates of tokens that need not be written
        to exactly zero."""
        means = [blk.short_term.last_gate_mean for blk in self.layers]
        if not self.config.sparse_write or any(m is None for m in means):
            raise RuntimeError("write_gate_mean needs sparse_write and a forward pass in training mode")
        return torch.stack([cast(Tensor, m) for m in means]).mean()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def init_state(self, batch_size: int = 1) -> MMRecState:
        """The state of ``batch_size`` fresh streams (memory slots at their learned start)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        state = self._zero_state(batch_size)
        memory = torch.stack([blk.memory.memory_init.to(state.memory.dtype) for blk in self.layers])  # [L, n_slots, dm]
        return dataclasses.replace(state, memory=memory.unsqueeze(1).expand_as(state.memory).clone())

    def _zero_state(self, batch_size: int) -> MMRecState:
        c, B, dev = self.config, batch_size, self.device
        acc = accumulation_dtype(self.embed.weight.dtype)
        L, d, dm = c.n_layers, c.d_model, c.d_mem
        assert dm is not None
        zeros = lambda *shape: torch.zeros(*shape, dtype=acc, device=dev)  # noqa: E731
        return MMRecState(
            position=0,
            short=zeros(L, B, c.n_heads, c.head_dim, c.head_dim),
            conv=zeros(L, B, max(c.conv_size - 1, 0), d),
            memory=zeros(L, B, c.mem_slots, dm),
            summaries=zeros(L, B, c.summary_window, dm),
            sequence=zeros(L, B, dm),
            pending=zeros(L, B, c.chunk_size, d),
        )

    def check_state(self, state: Any, batch_size: int) -> MMRecState:
        if not isinstance(state, MMRecState):
            raise StateError(
                f"state must be an MMRecState (from init_state or a forward output), got {type(state).__name__}"
            )
        if state.batch_size != batch_size:
            raise StateError(f"state holds {state.batch_size} stream(s) but input_ids has batch size {batch_size}")
        c = self.config
        shapes = {
            "short": (c.n_layers, batch_size, c.n_heads, c.head_dim, c.head_dim),
            "conv": (c.n_layers, batch_size, max(c.conv_size - 1, 0), c.d_model),
            "memory": (c.n_layers, batch_size, c.mem_slots, c.d_mem),
            "summaries": (c.n_layers, batch_size, c.summary_window, c.d_mem),
            "sequence": (c.n_layers, batch_size, c.d_mem),
            "pending": (c.n_layers, batch_size, c.chunk_size, c.d_model),
        }
        for name, t in state.tensors().items():
            if tuple(t.shape) != shapes[name]:
                raise StateError(
                    f"state does not match this model: '{name}' has shape {tuple(t.shape)}, expected "
                    f"{shapes[name]} (was the state made by a model with another config?)"
                )
            if t.device != self.device:
                raise StateError(f"state is on {t.device} but the model is on {self.device}; use state.to(device)")
        problem = position_problem(state.position, batch_size)
        if problem is not None:
            raise StateError(problem)
        return state

    def forward(self, input_ids: Tensor, state: MMRecState | None = None, targets: Tensor | None = None) -> LMOutput:
        hidden, new_state = self.hidden_states(input_ids, state)
        logits = self.lm_head(hidden)  # [B, T, V]
        loss = lm_loss(logits, targets) if targets is not None else None
        return LMOutput(logits=logits, state=new_state, loss=loss)

    def lm_head(self, hidden: Tensor) -> Tensor:
        """Logits of final hidden states [..., d] (the head is tied to the embedding)."""
        return hidden @ self.embed.weight.t()

    def hidden_states(self, input_ids: Tensor, state: MMRecState | None = None) -> tuple[Tensor, MMRecState]:
        """The final normed hidden states [B, T, d] and the new state: ``forward`` without the head,
        for callers that need logits at a few positions only (``lm_head(hidden[..., picked, :])``)."""
        ids = check_input_ids(input_ids, self.config.vocab_size)
        B, T = ids.shape
        fresh = state is None
        if state is None:
            if not isinstance(B, int) or B < 1:
                raise ValueError(f"batch_size must be an integer >= 1, got {B!r}")
            state = self._zero_state(B)
        else:
            state = self.check_state(state, B)
        position = state.position
        if isinstance(position, tuple):
            if len(set(position)) == 1:
                position = position[0]
            elif T != 1:
                raise StateError(
                    f"the streams of this state are at different positions {position}: they can be decoded "
                    f"together one token at a time, but a call of {T} tokens must feed the streams separately "
                    "(prefill each stream alone, then cat the states and decode them together)"
                )
        if T == 1:
            return self._step_hidden(ids[:, 0], state, position, fresh)
        x = self.embed(ids)  # [B, T, d]
        per_layer: list[dict[str, Tensor]] = []
        for i, block in enumerate(self.layers):
            st = {name: t[i] for name, t in state.tensors().items()}
            x, new = block(x, st, position, fresh)
            per_layer.append(new)
        new_state = MMRecState(
            position=position + T if isinstance(position, int) else tuple(p + T for p in position),
            **{name: torch.stack([layer[name] for layer in per_layer]) for name in per_layer[0]},
        )
        return self.norm(x), new_state

    def _step_hidden(
        self, ids: Tensor, state: MMRecState, position: Position, fresh: bool
    ) -> tuple[Tensor, MMRecState]:
        """:meth:`hidden_states` of one token per stream, ids [B]: every layer reads (:meth:`_decode_reads`,
        compiled after :meth:`compile_decoding`), then the streams whose chunk this token completes are
        written, layer by layer."""
        c = self.config
        memory = state.memory
        if fresh:  # a copy: a state may outlive the parameter
            memory = torch.stack([blk.memory.memory_init.to(memory.dtype) for blk in self.layers])
            memory = memory.unsqueeze(1).expand_as(state.memory).clone()
        keep, row, blocked, done = decode_masks(position, c.chunk_size, c.mem_slots, c.summary_window, state.pending)
        reads = self._decode_reads
        if self._compiled_reads is not None:
            reads = self._compiled_reads
            if blocked is None:  # one graph whether or not a stream may read everything
                blocked = _nothing_blocked(
                    1 if isinstance(position, int) else len(position),
                    memory.size(2) + c.summary_window + 2,
                    memory.device,
                )
        hidden, short, conv, pending = reads(
            ids, state.short, state.conv, memory, state.summaries, state.sequence, state.pending, keep, row, blocked
        )
        summaries, sequence = state.summaries, state.sequence
        if done is None or done:
            dtype = self.embed.weight.dtype
            written = [
                blk.memory.write_rows(pending[i], memory[i], summaries[i], sequence[i], done, dtype)
                for i, blk in enumerate(self.layers)
            ]
            memory, summaries, sequence, pending = (torch.stack(ts) for ts in zip(*written, strict=True))
        new_position = position + 1 if isinstance(position, int) else tuple(p + 1 for p in position)
        return hidden.unsqueeze(1), MMRecState(new_position, short, conv, memory, summaries, sequence, pending)

    def _decode_reads(
        self,
        ids: Tensor,
        short: Tensor,
        conv: Tensor,
        memory: Tensor,
        summaries: Tensor,
        sequence: Tensor,
        pending: Tensor,
        keep: Tensor,
        row: Tensor,
        blocked: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The final normed hidden state [B, d] of one token per stream and the stacked new short, conv
        and pending: all of a decoding step but the chunk writes, no Python branch on positions."""
        x = F.embedding(ids, self.embed.weight)  # [B, d]
        shorts, convs, pendings = [], [], []
        for i, block in enumerate(self.layers):
            x, s, cv, p = block.step(
                x, short[i], conv[i], memory[i], summaries[i], sequence[i], pending[i], keep, row, blocked
            )
            shorts.append(s)
            convs.append(cv)
            pendings.append(p)
        n = self.norm
        return rms_norm_step(x, n.weight, n.eps), torch.stack(shorts), torch.stack(convs), torch.stack(pendings)

    def compile_decoding(self, enabled: bool = True, warm_up: tuple[int, ...] = (1,), **compile_kwargs: Any) -> None:
        """Decode one token per stream through ``torch.compile``: the default inductor backend fuses the
        step's few hundred small ops (on the CPU it needs a C++ compiler). Chunk writes stay eager.
        Outputs equal the eager step's to rounding (tests/test_compiled_decode.py).

        A graph is compiled for one stream and one for several (any count; streams at one position and
        at different positions each have one): ``warm_up`` compiles them now for these batch sizes (a
        size above 1 warms the graphs of every size above 1), so that a compile error shows here and the
        first steps do not stall (seconds to a minute each). ``enabled=False`` goes back to eager."""
        if not enabled:
            self._compiled_reads = None
            return
        self._compiled_reads = torch.compile(self._decode_reads, **compile_kwargs)
        sizes = sorted({b for b in warm_up if b == 1} | ({2, 3} if any(b > 1 for b in warm_up) else set()))
        with torch.no_grad():
            for b in sizes:
                ids = torch.zeros(b, 1, dtype=torch.long, device=self.device)
                self.hidden_states(ids, self.init_state(b))
                if b > 1:  # streams at different positions, before and after the FIFO is full
                    c = self.config
                    late = c.chunk_size * c.summary_window
                    for positions in (tuple(range(b)), tuple(late + i for i in range(b))):
                        self.hidden_states(ids, dataclasses.replace(self.init_state(b), position=positions))
