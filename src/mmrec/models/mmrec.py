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
from mmrec.layers.assoc_memory import AssociativeMemory
from mmrec.layers.basic import SwiGLU, rms_norm_step
from mmrec.layers.memory import LongTermMemory, decode_masks
from mmrec.layers.short_term import ShortTermMixer
from mmrec.models.generation import GenerationMixin
from mmrec.models.output import LMOutput, check_input_ids, lm_loss
from mmrec.models.state import MMRecState, PendingRows, Position, StateError, position_problem
from mmrec.ops.assoc import AssocState
from mmrec.ops.scan import accumulation_dtype


def _sharded(block: MMRecBlock) -> bool:
    """Whether FSDP2 keeps ``block``'s parameters sharded (DTensors) outside the block's own forward: the
    one-token path calls the blocks' ``step`` directly, without the hooks that gather them, so a model
    sharded for training decodes through the blocks' forward instead (same maths, more ops)."""
    return type(block.norm1.weight).__name__ == "DTensor"


@functools.lru_cache(maxsize=64)
def _nothing_blocked(batch: int, entries: int, device: torch.device) -> Tensor:
    """An all-False read mask [batch, 1, entries] (kept; only read)."""
    return torch.zeros(batch, 1, entries, dtype=torch.bool, device=device)


SlotTensors = tuple[Tensor, Tensor, Tensor, Tensor]  # memory, summaries, sequence, pending (one layer or all)
AssocTensors = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]  # memory, keys, values, log_g, beta
AssocPending = tuple[Tensor, Tensor, Tensor, Tensor]  # keys, values, log_g, beta of the unfinished chunk


def _chunk_offsets(position: Position, chunk_size: int) -> int | tuple[int, ...]:
    """Tokens of the unfinished chunk: the position mod C, for all streams or each."""
    if isinstance(position, int):
        return position % chunk_size
    return tuple(p % chunk_size for p in position)


def _append_pending(
    state: MMRecState, memory_in: Tensor, position: Position, keep: Tensor, row: Tensor
) -> tuple[Tensor, PendingRows]:
    """``state``'s pending buffer with one more token's rows, ``memory_in`` [L, B, d] (the slot memory's
    inputs), at each stream's chunk offset, and the :class:`PendingRows` that holds it.

    The newest state on a buffer the model made writes its row in place (4 KiB per layer and stream,
    where a new buffer rewrites all C rows); any other state, or one whose tensors take gradients,
    gets a new buffer: its rows before the offset, the new row, zeros after it (``keep``, ``row``
    from :func:`~mmrec.layers.memory.decode_masks`)."""
    pending = cast(Tensor, state.pending)
    rows = state._pending_rows
    tracked = torch.is_grad_enabled() and (pending.requires_grad or memory_in.requires_grad)
    if rows is not None and rows.writable_by(state) and not tracked:
        C = pending.size(2)
        if isinstance(position, int):
            pending.select(2, position % C).copy_(memory_in)
        else:
            streams = torch.arange(len(position), device=pending.device)
            offsets = torch.tensor([p % C for p in position], device=pending.device)
            pending[:, streams, offsets] = memory_in.to(pending.dtype)
        return pending, rows
    pending = torch.addcmul(pending * keep, row, memory_in.unsqueeze(2).to(pending.dtype))
    return pending, PendingRows(pending, state.position)


class MMRecBlock(nn.Module):
    """x += ShortTermMixer(norm x); x += long-term memory read(s) (norm x); x += SwiGLU(norm x).

    The long-term memory is ``config.long_term``: the slots and their hierarchy (``memory``, LongTermMemory),
    the associative memory (``assoc``, AssociativeMemory), or both, each a residual term with its own
    RMSNorm (``norm2``, ``norm_assoc``); the one not used is None."""

    def __init__(self, cfg: MMRecConfig) -> None:
        super().__init__()
        assert cfg.d_ff is not None
        self.norm1 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.short_term = ShortTermMixer(cfg)
        self.norm2: nn.RMSNorm | None = None
        self.memory: LongTermMemory | None = None
        if cfg.uses_slots:
            self.norm2 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
            self.memory = LongTermMemory(cfg)
        self.norm_assoc: nn.RMSNorm | None = None
        self.assoc: AssociativeMemory | None = None
        if cfg.uses_assoc:
            self.norm_assoc = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
            self.assoc = AssociativeMemory(cfg.d_model, cfg.n_heads, cfg.chunk_size)
        self.norm3 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(
        self, x: Tensor, st: dict[str, Tensor], position: Position, fresh: bool = False
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``fresh``: the streams start here, with the memory slots at their learned start
        (read inside the block, where FSDP2 has gathered the block's parameters)."""
        y, short, conv = self.short_term(self.norm1(x), st["short"], st["conv"])
        x = x + y
        new = {"short": short, "conv": conv}
        if self.memory is not None:
            assert self.norm2 is not None
            memory = st["memory"]
            if fresh:  # a copy: FSDP2 frees the gathered parameter after the block, and a state may outlive it
                memory = self.memory.memory_init.to(memory.dtype).expand_as(memory).clone()
            long_term = self.memory(self.norm2(x), memory, st["summaries"], st["sequence"], st["pending"], position)
            x = x + long_term.y
            new["memory"] = long_term.memory
            new["summaries"] = long_term.summaries
            new["sequence"] = long_term.sequence
            new["pending"] = long_term.pending
        if self.assoc is not None:
            assert self.norm_assoc is not None
            a_memory, a_keys, a_values, a_log_g, a_beta = (st[name] for name in MMRecState.assoc_fields)
            offsets = _chunk_offsets(position, self.assoc.chunk_size)
            assoc_in = AssocState(a_memory, a_keys, a_values, a_log_g, a_beta, offsets)
            y, assoc_out = self.assoc(self.norm_assoc(x), assoc_in)
            x = x + y
            new.update(zip(MMRecState.assoc_fields, assoc_out.tensors, strict=True))
        x = x + self.mlp(self.norm3(x))
        return x, new

    def step(
        self,
        x: Tensor,
        short: Tensor,
        conv: Tensor,
        slots: SlotTensors | None,
        assoc: AssocTensors | None,
        keep: Tensor,
        row: Tensor,
        blocked: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, AssocPending | None]:
        """One token per stream (decoding), x [B, d], without the memories' chunk writes: returns x, the
        new short and conv, the slot memory's input (the token's row of its pending buffer, which the
        caller writes) and the associative memory's new pending tensors (None for a memory the block
        does not have); ``keep``, ``row``, ``blocked`` from
        :func:`~mmrec.layers.memory.decode_masks`. The maths of :meth:`forward`, called as plain
        functions (at one token the time goes to per-op overhead, not arithmetic), with no Python
        branch on positions: the caller writes completed chunks after all layers have read."""
        n1, n3 = self.norm1, self.norm3
        y, short, conv = self.short_term.step(rms_norm_step(x, n1.weight, n1.eps), short, conv)
        x = x + y
        memory_in = None
        if self.memory is not None and slots is not None:
            assert self.norm2 is not None
            memory, summaries, sequence = slots[:3]
            memory_in = rms_norm_step(x, self.norm2.weight, self.norm2.eps)
            x = x + self.memory.read_step(memory_in, memory, summaries, sequence, blocked)
        assoc_pending = None
        if self.assoc is not None and assoc is not None:
            assert self.norm_assoc is not None
            h = rms_norm_step(x, self.norm_assoc.weight, self.norm_assoc.eps)
            y, assoc_pending = self.assoc.read_step(h, assoc[0], assoc[1:], keep, row)
            x = x + y
        gate, up = F.linear(rms_norm_step(x, n3.weight, n3.eps), self.mlp.w13.weight).chunk(2, -1)
        x = x + F.linear(F.silu(gate) * up, self.mlp.w2.weight)
        return x, short, conv, memory_in, assoc_pending


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
            outs = [block.short_term.out] + ([block.memory.out] if block.memory is not None else []) + [block.mlp.w2]
            for lin in outs:
                nn.init.normal_(lin.weight, 0.0, std / math.sqrt(2 * self.config.n_layers))
            if block.memory is not None:
                nn.init.normal_(block.memory.write_queries, 0.0, 1.0)
                nn.init.normal_(block.memory.memory_init, 0.0, std)
            nn.init.zeros_(block.short_term.decay.weight)
            block.short_term.reset_decay()
            if block.memory is not None:
                block.memory.reset_gates()
            if block.assoc is not None:  # zero output projection, decays spread over heads, beta 1/2
                block.assoc.reset_parameters()

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
        """The state of ``batch_size`` fresh streams (memory slots at their learned start; an empty
        associative memory)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        state = self._zero_state(batch_size)
        if state.memory is None:
            return state
        return dataclasses.replace(state, memory=self._initial_slots(state.memory))

    def _initial_slots(self, like: Tensor) -> Tensor:
        """The memory slots at their learned start, a new tensor shaped and typed as ``like`` [L, B, S, dm]."""
        memory = torch.stack([cast(LongTermMemory, blk.memory).memory_init.to(like.dtype) for blk in self.layers])
        return memory.unsqueeze(1).expand_as(like).clone()  # [L, B, S, dm]

    def _state_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        """The shape of each tensor of this model's state for ``batch_size`` streams."""
        c, L, B = self.config, self.config.n_layers, batch_size
        assert c.d_mem is not None
        shapes: dict[str, tuple[int, ...]] = {
            "short": (L, B, c.n_heads, c.head_dim, c.head_dim),
            "conv": (L, B, max(c.conv_size - 1, 0), c.d_model),
        }
        if c.uses_slots:
            shapes["memory"] = (L, B, c.mem_slots, c.d_mem)
            shapes["summaries"] = (L, B, c.summary_window, c.d_mem)
            shapes["sequence"] = (L, B, c.d_mem)
            shapes["pending"] = (L, B, c.chunk_size, c.d_model)
        if c.uses_assoc:
            H, d, C = c.n_heads, c.head_dim, c.chunk_size
            shapes["assoc_memory"] = (L, B, H, d, d)
            shapes["assoc_keys"] = (L, B, H, C, d)
            shapes["assoc_values"] = (L, B, H, C, d)
            shapes["assoc_log_g"] = (L, B, H, C)
            shapes["assoc_beta"] = (L, B, H, C)
        return shapes

    def _zero_state(self, batch_size: int) -> MMRecState:
        acc = accumulation_dtype(self.embed.weight.dtype)
        tensors = {
            name: torch.zeros(*shape, dtype=acc, device=self.device)
            for name, shape in self._state_shapes(batch_size).items()
        }
        return MMRecState(position=0, **tensors)

    def check_state(self, state: Any, batch_size: int) -> MMRecState:
        if not isinstance(state, MMRecState):
            raise StateError(
                f"state must be an MMRecState (from init_state or a forward output), got {type(state).__name__}"
            )
        if state.batch_size != batch_size:
            raise StateError(f"state holds {state.batch_size} stream(s) but input_ids has batch size {batch_size}")
        shapes = self._state_shapes(batch_size)
        if state.long_term != self.config.long_term:
            raise StateError(
                f"state does not match this model: it holds the {state.long_term!r} long-term memory, this model "
                f"has long_term={self.config.long_term!r} (was the state made by a model with another config?)"
            )
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
        if T == 1 and not _sharded(self.layers[0]):
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
        written: the slots layer by layer, the associative memories of all layers in one call."""
        c = self.config
        slots: SlotTensors | None = None
        if state.memory is not None:
            assert state.summaries is not None and state.sequence is not None and state.pending is not None
            # Fresh streams: a copy of the learned start (a state may outlive the parameter).
            memory = self._initial_slots(state.memory) if fresh else state.memory
            slots = (memory, state.summaries, state.sequence, state.pending)
        assoc: AssocTensors | None = None
        if state.assoc_memory is not None:
            assoc = cast(AssocTensors, tuple(getattr(state, name) for name in MMRecState.assoc_fields))
        like = slots[3] if slots is not None else cast(AssocTensors, assoc)[1]  # the masks' dtype and device
        keep, row, blocked, done = decode_masks(position, c.chunk_size, c.mem_slots, c.summary_window, like)
        if slots is None:
            blocked = None  # only the slots' read uses it
        reads = self._decode_reads
        if self._compiled_reads is not None:
            reads = self._compiled_reads
            if blocked is None and slots is not None:  # one graph whether or not a stream may read everything
                blocked = _nothing_blocked(
                    1 if isinstance(position, int) else len(position),
                    slots[0].size(2) + c.summary_window + 2,
                    like.device,
                )
        hidden, short, conv, memory_in, assoc_pending = reads(
            ids, state.short, state.conv, slots, assoc, keep, row, blocked
        )
        new: dict[str, Tensor] = {"short": short, "conv": conv}
        write = done is None or bool(done)
        new_position = position + 1 if isinstance(position, int) else tuple(p + 1 for p in position)
        buffer: PendingRows | None = None
        if slots is not None:
            assert memory_in is not None
            memory, summaries, sequence = slots[:3]
            pending, buffer = _append_pending(state, memory_in, position, keep, row)
            if write:
                dtype = self.embed.weight.dtype
                written = [
                    cast(LongTermMemory, blk.memory).write_rows(
                        pending[i], memory[i], summaries[i], sequence[i], done, dtype
                    )
                    for i, blk in enumerate(self.layers)
                ]
                memory, summaries, sequence, pending = (torch.stack(ts) for ts in zip(*written, strict=True))
                buffer = PendingRows(pending, new_position)  # a new buffer: older states keep theirs whole
            new.update(memory=memory, summaries=summaries, sequence=sequence, pending=pending)
        if assoc is not None:
            assert assoc_pending is not None
            assoc_memory = assoc[0]
            if write:  # no parameters in the write: the layers' streams go as one batch [L * B, ...]
                L, B = assoc_memory.shape[:2]
                rows = None if done is None else [i * B + b for i in range(L) for b in done]
                assoc_memory, flat = AssociativeMemory.write_rows(
                    assoc_memory.flatten(0, 1), [t.flatten(0, 1) for t in assoc_pending], rows
                )
                assoc_memory = assoc_memory.unflatten(0, (L, B))
                assoc_pending = cast(AssocPending, tuple(t.unflatten(0, (L, B)) for t in flat))
            new.update(zip(MMRecState.assoc_fields, (assoc_memory, *assoc_pending), strict=True))
        new_state = MMRecState(new_position, **new)
        if buffer is not None:
            buffer.position = new_state.position
            new_state._pending_rows = buffer
        return hidden.unsqueeze(1), new_state

    def _decode_reads(
        self,
        ids: Tensor,
        short: Tensor,
        conv: Tensor,
        slots: SlotTensors | None,
        assoc: AssocTensors | None,
        keep: Tensor,
        row: Tensor,
        blocked: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, AssocPending | None]:
        """The final normed hidden state [B, d] of one token per stream and the stacked new short, conv,
        slot memory inputs [L, B, d] (the token's pending rows) and associative pending tensors (None for
        a memory the model does not have): all of a decoding step but the pending buffer's row and the
        chunk writes, no Python branch on positions."""
        x = F.embedding(ids, self.embed.weight)  # [B, d]
        shorts, convs, memory_ins, assoc_pendings = [], [], [], []
        for i, block in enumerate(self.layers):
            layer_slots = None if slots is None else cast(SlotTensors, tuple(t[i] for t in slots))
            layer_assoc = None if assoc is None else cast(AssocTensors, tuple(t[i] for t in assoc))
            x, s, cv, p, ap = block.step(x, short[i], conv[i], layer_slots, layer_assoc, keep, row, blocked)
            shorts.append(s)
            convs.append(cv)
            if p is not None:
                memory_ins.append(p)
            if ap is not None:
                assoc_pendings.append(ap)
        n = self.norm
        memory_in = torch.stack(memory_ins) if memory_ins else None
        assoc_pending = None
        if assoc_pendings:
            assoc_pending = cast(AssocPending, tuple(torch.stack(ts) for ts in zip(*assoc_pendings, strict=True)))
        return rms_norm_step(x, n.weight, n.eps), torch.stack(shorts), torch.stack(convs), memory_in, assoc_pending

    def compile_decoding(self, enabled: bool = True, warm_up: tuple[int, ...] = (1,), **compile_kwargs: Any) -> None:
        """Decode one token per stream through ``torch.compile``: the default inductor backend fuses the
        step's few hundred small ops (on the CPU it needs a C++ compiler). Chunk writes stay eager: the
        graph holds every layer's reads and pending-row updates, of the slots and of the associative
        memory (``long_term`` assoc or both) alike, with no branch on positions; the streams whose chunk
        a token completes are written after it, outside the graph.
        Outputs equal the eager step's to rounding (tests/test_compiled_decode.py, tests/test_assoc_wiring.py).

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
