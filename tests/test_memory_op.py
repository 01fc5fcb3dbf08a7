"""The long-term memory op (ops/memory.py) against its naive twin, and the layer's stream bookkeeping.

Everything in float64, where the chunked and the naive forms agree to ~1e-15;
the bound of 1e-10 leaves room for rounding and none for a wrong entry, a
missed mask or a state off by one chunk.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from conftest import rel_err
from mmrec import MMRecConfig
from mmrec.layers import LongTermMemory, MemoryOutput
from mmrec.ops import (
    MemoryState,
    memory_read,
    memory_read_naive,
    memory_read_step,
    memory_write,
    memory_write_naive,
)

TOL = 1e-10
HEADS = 2
WINDOW = 3
N_SLOTS = 3
D_MODEL, D_MEM = 8, 6
WRITE_FIELDS = ("write_kv", "write_queries", "gate_weight", "gate_bias", "sequence_decay")
READ_FIELDS = ("read_q", "read_kv", "null_entry")


def _layer(chunk_size: int = 4, scan_block: int = 2) -> LongTermMemory:
    """A float64 layer with every parameter moved off its initial value (gates neither shut nor saturated).
    ``scan_block`` 2 makes the scans over chunks cross blocks."""
    cfg = MMRecConfig(
        vocab_size=16,
        d_model=D_MODEL,
        n_heads=2,
        chunk_size=chunk_size,
        mem_slots=N_SLOTS,
        summary_window=WINDOW,
        d_mem=D_MEM,
        mem_heads=HEADS,
        scan_block=scan_block,
    )
    layer = LongTermMemory(cfg).double()
    layer.reset_gates()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


def _state(B: int, *, chunk_axis: int | None = None) -> MemoryState:
    """Random leaf tensors; FIFO entries that the mask must hide are random too, so a leak shows."""
    n = () if chunk_axis is None else (chunk_axis,)
    return MemoryState(
        torch.randn(B, *n, N_SLOTS, D_MEM, dtype=torch.float64, requires_grad=True),
        torch.randn(B, *n, WINDOW, D_MEM, dtype=torch.float64, requires_grad=True),
        torch.randn(B, *n, D_MEM, dtype=torch.float64, requires_grad=True),
    )


def _grads(outputs: list[Tensor], inputs: list[Tensor], weights: list[Tensor]) -> tuple[Tensor, ...]:
    """Gradients of a random linear functional of all outputs (the same ``weights`` for both twins); zero
    for an input a call does not use (pending at a chunk boundary, the write weights when nothing is written)."""
    loss = sum((o * w).sum() for o, w in zip(outputs, weights, strict=True))
    return torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)


def _close(got: list[Tensor] | tuple[Tensor, ...], want: list[Tensor] | tuple[Tensor, ...], what: str) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.shape == b.shape, f"{what}[{i}]: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert rel_err(a, b) < TOL, f"{what}[{i}]: relative error {rel_err(a, b):.2e}"


@pytest.mark.parametrize("n", [0, 1, 3, 9])
def test_write_equals_naive_on_states_and_all_gradients(n):
    layer = _layer()
    params = layer.params()
    chunks = torch.randn(2, n, 4, D_MODEL, dtype=torch.float64, requires_grad=True)
    state = _state(2)
    fast_enter, fast_final = memory_write(chunks, state, params, HEADS, scan_block=2)
    ref_enter, ref_final = memory_write_naive(chunks, state, params, HEADS)
    _close(fast_enter, ref_enter, "entering")
    _close(fast_final, ref_final, "final")
    if n == 0:
        _close(fast_final, state, "final of no chunks")
        return
    # The first chunk enters with the given state; the last chunk's entry is not the final state.
    _close([t[:, 0] for t in fast_enter], state, "entering chunk 0")
    assert rel_err(fast_enter.slots[:, -1], fast_final.slots) > 1e-3

    inputs = [chunks, *state, *(getattr(params, f) for f in WRITE_FIELDS)]
    outs_fast, outs_ref = [*fast_enter, *fast_final], [*ref_enter, *ref_final]
    weights = [torch.randn_like(o) for o in outs_ref]
    _close(_grads(outs_fast, inputs, weights), _grads(outs_ref, inputs, weights), "gradients")


@pytest.mark.parametrize("completed", [0, 1, WINDOW - 1, WINDOW, 7])
@pytest.mark.parametrize("n, C", [(1, 1), (3, 4), (5, 3)])
def test_read_equals_naive_on_outputs_and_all_gradients(completed, n, C):
    layer = _layer()
    params = layer.params()
    tokens = torch.randn(2, n, C, D_MODEL, dtype=torch.float64, requires_grad=True)
    entering = _state(2, chunk_axis=n)
    fast = memory_read(tokens, entering, params, HEADS, completed)
    ref = memory_read_naive(tokens, entering, params, HEADS, completed)
    _close([fast], [ref], "read")
    inputs = [tokens, *entering, *(getattr(params, f) for f in READ_FIELDS)]
    weights = [torch.randn_like(ref)]
    _close(_grads([fast], inputs, weights), _grads([ref], inputs, weights), "gradients")


@pytest.mark.parametrize("completed", [0, 1, WINDOW, 9])
def test_read_step_equals_the_read_of_one_token(completed):
    layer = _layer()
    params = layer.params()
    token = torch.randn(2, D_MODEL, dtype=torch.float64, requires_grad=True)
    state = _state(2)
    step = memory_read_step(token, state, params, HEADS, completed)
    ref = memory_read_naive(
        token.view(2, 1, 1, D_MODEL), MemoryState(*(t.unsqueeze(1) for t in state)), params, HEADS, completed
    )
    _close([step], [ref.view(2, D_MEM)], "read")
    inputs = [token, *state, *(getattr(params, f) for f in READ_FIELDS)]
    weights = [torch.randn_like(step)]
    _close(_grads([step], inputs, weights), _grads([ref.view(2, D_MEM)], inputs, weights), "gradients")


def test_masked_fifo_entries_are_unread_until_their_chunk_exists():
    """Entering chunk c after ``completed + c`` chunks, the FIFO holds that many real summaries (newest last)."""
    layer = _layer()
    params = layer.params()
    tokens = torch.randn(1, 4, 2, D_MODEL, dtype=torch.float64)
    entering = _state(1, chunk_axis=4)
    base = memory_read(tokens, entering, params, HEADS, completed=1)
    for c, real in enumerate([1, 2, 3, 3]):
        for w in range(WINDOW):
            moved = entering.summaries.detach().clone()
            moved[:, c, w] += 1.0
            out = memory_read(tokens, MemoryState(entering.slots, moved, entering.sequence), params, HEADS, 1)
            if w < WINDOW - real:
                assert torch.equal(out, base), f"chunk {c} read FIFO entry {w}, which does not exist yet"
            else:
                assert not torch.allclose(out[:, c], base[:, c]), f"chunk {c} ignored its FIFO entry {w}"


def _ops_stream(
    layer: LongTermMemory, chunks: Tensor, tokens: Tensor, state: MemoryState, completed: int
) -> tuple[Tensor, MemoryState]:
    """Write ``chunks`` and read ``tokens`` [B, n, C, d] chunk by chunk, as the layer does for aligned calls."""
    entering, final = memory_write(chunks, state, layer.params(), HEADS, layer.scan_block)
    return memory_read(tokens, entering, layer.params(), HEADS, completed), final


def test_a_chunk_never_changes_the_reads_of_itself_or_earlier_chunks():
    layer = _layer()
    chunks = torch.randn(1, 6, 4, D_MODEL, dtype=torch.float64)
    state = MemoryState(*(t.detach() for t in _state(1)))
    base, _ = _ops_stream(layer, chunks, chunks, state, completed=0)
    for c in range(6):
        written = chunks.clone()
        written[:, c] += torch.randn_like(written[:, c])
        # Only what is written changes; every chunk reads with its own tokens as before.
        out, _ = _ops_stream(layer, written, chunks, state, completed=0)
        assert torch.equal(out[:, : c + 1], base[:, : c + 1]), f"chunk {c} reached a read of chunk <= {c}"
        if c < 5:
            assert rel_err(out[:, c + 1 :], base[:, c + 1 :]) > 1e-6, f"chunk {c} never reached later chunks"


def test_a_token_reaches_only_itself_and_later_chunks_through_the_layer():
    C, T = 4, 22
    layer = _layer(C)
    x = torch.randn(1, T, D_MODEL, dtype=torch.float64)
    state = _stream_state(1, C, position=3)
    with torch.no_grad():
        base = layer(x, *state, position=3).y
        for t in (0, 4, 5, 12):
            moved = x.clone()
            moved[:, t] += 1.0
            y = layer(moved, *state, position=3).y
            end = t + C - (3 + t) % C  # first position of the next chunk of the stream
            assert torch.equal(y[:, :t], base[:, :t]), f"token {t} changed an earlier output"
            assert not torch.allclose(y[:, t], base[:, t]), f"token {t} did not change its own read"
            assert torch.equal(y[:, t + 1 : end], base[:, t + 1 : end]), f"token {t} reached its own chunk"
            if end < T:
                assert rel_err(y[:, end:], base[:, end:]) > 1e-6, f"token {t} never reached later chunks"


def _stream_state(B: int, C: int, position: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(memory, summaries, sequence, pending) leaves of a stream at ``position``: pending real up to
    position % C and zero beyond, as the layer leaves it."""
    memory, summaries, sequence = _state(B)
    pending = torch.randn(B, C, D_MODEL, dtype=torch.float64)
    pending[:, position % C :] = 0
    return memory, summaries, sequence, pending.requires_grad_()


def _layer_naive(layer: LongTermMemory, x: Tensor, state: tuple[Tensor, ...], position: int) -> MemoryOutput:
    """The layer's contract token by token from the naive ops: read the state as it stands, then
    write the chunk if this token completes it."""
    C, params = layer.chunk_size, layer.params()
    memory, summaries, sequence, pending = state
    buffer = list(pending[:, : position % C].unbind(1))
    current = MemoryState(memory, summaries, sequence)
    reads = []
    for t in range(x.size(1)):
        p = position + t
        token = x[:, t].view(-1, 1, 1, x.size(-1))
        entering = MemoryState(*(s.unsqueeze(1) for s in current))
        reads.append(memory_read_naive(token, entering, params, HEADS, completed=p // C)[:, 0, 0])
        buffer.append(x[:, t])
        if len(buffer) == C:
            _, current = memory_write_naive(torch.stack(buffer, 1).unsqueeze(1), current, params, HEADS)
            buffer = []
    y = layer.out(torch.stack(reads, 1))
    tail = torch.stack(buffer, 1) if buffer else pending[:, :0]
    pending = torch.cat([tail, tail.new_zeros(tail.size(0), C - tail.size(1), tail.size(2))], dim=1)
    return MemoryOutput(y, *current, pending)


def _layer_inputs(layer: LongTermMemory) -> list[Tensor]:
    """Every parameter the layer reads (memory_init is the model's, for fresh streams)."""
    return [p for name, p in layer.named_parameters() if name != "memory_init"]


@pytest.mark.parametrize("position", [0, 3, 13])
@pytest.mark.parametrize("T", [1, 7, 13, 33])
@pytest.mark.parametrize("C", [4, 8])
def test_layer_equals_naive_token_by_token_on_outputs_states_and_gradients(C, T, position):
    layer = _layer(C)
    x = torch.randn(2, T, D_MODEL, dtype=torch.float64, requires_grad=True)
    state = _stream_state(2, C, position)
    got = layer(x, *state, position=position)
    want = _layer_naive(layer, x, state, position)
    assert isinstance(got, MemoryOutput)
    _close(got, want, "output and state")
    inputs = [x, *state, *_layer_inputs(layer)]
    weights = [torch.randn_like(o) for o in want]
    _close(_grads(list(got), inputs, weights), _grads(list(want), inputs, weights), "gradients")


@pytest.mark.parametrize("position", [0, 3])
@pytest.mark.parametrize("split", [1, 5, 13, 32])
def test_two_calls_at_any_split_equal_one_call(split, position):
    C, T = 4, 33
    layer = _layer(C)
    x = torch.randn(2, T, D_MODEL, dtype=torch.float64, requires_grad=True)
    state = _stream_state(2, C, position)
    whole = layer(x, *state, position=position)
    first = layer(x[:, :split], *state, position=position)
    second = layer(x[:, split:], *first[1:], position=position + split)
    pieces = MemoryOutput(torch.cat([first.y, second.y], dim=1), *second[1:])
    _close(pieces, whole, "output and state")
    inputs = [x, *state, *_layer_inputs(layer)]
    weights = [torch.randn_like(o) for o in whole]
    _close(_grads(list(pieces), inputs, weights), _grads(list(whole), inputs, weights), "gradients")


@pytest.mark.parametrize("position", [0, 2])
def test_token_by_token_steps_equal_the_chunked_path(position):
    C, T = 4, 19
    layer = _layer(C)
    x = torch.randn(2, T, D_MODEL, dtype=torch.float64, requires_grad=True)
    state = _stream_state(2, C, position)
    whole = layer(x, *state, position=position)
    carried: tuple[Tensor, ...] = state
    ys = []
    for t in range(T):
        out = layer(x[:, t : t + 1], *carried, position=position + t)
        ys.append(out.y)
        carried = tuple(out[1:])
    steps = MemoryOutput(torch.cat(ys, dim=1), *carried)
    _close(steps, whole, "output and state")
    inputs = [x, *state, *_layer_inputs(layer)]
    weights = [torch.randn_like(o) for o in whole]
    _close(_grads(list(steps), inputs, weights), _grads(list(whole), inputs, weights), "gradients")


def test_an_empty_call_returns_the_state_unchanged():
    layer = _layer()
    state = _stream_state(2, 4, position=5)
    out = layer(torch.randn(2, 0, D_MODEL, dtype=torch.float64), *state, position=5)
    assert out.y.shape == (2, 0, D_MODEL)
    assert all(a is b for a, b in zip(out[1:], state, strict=True))
