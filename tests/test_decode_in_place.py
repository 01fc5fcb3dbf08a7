"""Decoding writes each token's row of the slot memory's pending buffer in place, with copy on write:
the newest state may write, an older one (a branch) copies first, so no state's results ever change
under it, whatever order branches are decoded in."""

import copy

import pytest
import torch

from mmrec import MMRecConfig, MMRecLM
from mmrec.models.state import MMRecState

C, VOCAB = 4, 40


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = MMRecConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, chunk_size=C, mem_slots=3, summary_window=2)
    return MMRecLM(cfg).double().eval()


def tokens(n, batch=1, seed=0):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def decode(model, state, ids):
    """Logits [B, T, V] of feeding ids one token per call, and the final state."""
    logits = []
    for t in range(ids.size(1)):
        out = model(ids[:, t : t + 1], state=state)
        logits.append(out.logits)
        state = out.state
    return torch.cat(logits, dim=1), state


def interleaved(model, root, a_ids, b_ids):
    """Two continuations of ``root`` decoded a step of each in turn: (logits, state) of a, then of b."""
    sa = sb = root
    got_a, got_b = [], []
    for t in range(a_ids.size(1)):
        out = model(a_ids[:, t : t + 1], state=sa)
        got_a.append(out.logits)
        sa = out.state
        out = model(b_ids[:, t : t + 1], state=sb)
        got_b.append(out.logits)
        sb = out.state
    return torch.cat(got_a, 1), sa, torch.cat(got_b, 1), sb


def assert_states_equal(a, b):
    assert a.position == b.position
    for name, t in a.tensors().items():
        torch.testing.assert_close(t, b.tensors()[name], rtol=0, atol=0, msg=name)


@torch.no_grad()
def test_the_newest_state_writes_its_row_in_place(model):
    state = model(tokens(C + 1), state=None).state  # mid-chunk, made by the chunked path: no buffer yet
    first = model(tokens(1, seed=1), state=state).state
    assert first.pending is not state.pending  # a state the step did not make is copied once
    second = model(tokens(1, seed=2), state=first).state
    assert second.pending is first.pending  # then rows go into the same buffer
    # A completed chunk moves on to a new buffer (older states keep theirs whole).
    pos = second.position
    state = second
    for t in range(C - pos % C):
        state = model(tokens(1, seed=3 + t), state=state).state
    assert state.position % C == 0 and state.pending is not second.pending
    assert not state.pending.any()  # an empty chunk: zeros, as the chunked path leaves it


@torch.no_grad()
@pytest.mark.parametrize("start", [0, 1, C - 1, 2 * C + 2])
def test_branches_decoded_in_any_order_equal_each_alone(model, start):
    """Two continuations of one state, decoded step by step interleaved, then the old state again: every
    logit and the final states equal those of the same continuations from private copies."""
    root = model(tokens(start), state=None).state if start else model.init_state(1)
    root = model(tokens(1, seed=9), state=root).state  # a state the model made: its buffer is writable
    a_ids, b_ids = tokens(2 * C + 1, seed=10), tokens(2 * C + 1, seed=11)
    want_a, want_a_state = decode(model, copy.deepcopy(root), a_ids)
    want_b, want_b_state = decode(model, copy.deepcopy(root), b_ids)
    got_a, sa, got_b, sb = interleaved(model, root, a_ids, b_ids)
    torch.testing.assert_close(got_a, want_a, rtol=0, atol=0)
    torch.testing.assert_close(got_b, want_b, rtol=0, atol=0)
    assert_states_equal(sa, want_a_state)
    assert_states_equal(sb, want_b_state)
    again, _ = decode(model, root, a_ids)  # the root once more, after both branches wrote
    torch.testing.assert_close(again, want_a, rtol=0, atol=0)


@torch.no_grad()
def test_batches_at_mixed_positions_branch_safely(model):
    """Streams at different positions write each its own row in place; a branch of the batch is copied."""
    states = [model(tokens(p, seed=p), state=None).state if p else model.init_state(1) for p in (0, 1, 5, 8)]
    batch = model(tokens(1, 4, seed=20), state=MMRecState.cat(states)).state
    assert batch.position == (1, 2, 6, 9)  # no chunk completes at the next step: the branches share a buffer
    ids_a, ids_b = tokens(C + 2, 4, seed=21), tokens(C + 2, 4, seed=22)
    want_a, _ = decode(model, copy.deepcopy(batch), ids_a)
    want_b, _ = decode(model, copy.deepcopy(batch), ids_b)
    got_a, sa, got_b, _ = interleaved(model, batch, ids_a, ids_b)
    torch.testing.assert_close(got_a, want_a, rtol=0, atol=0)
    torch.testing.assert_close(got_b, want_b, rtol=0, atol=0)
    assert sa.position == tuple(p + C + 2 for p in batch.position)
    again, _ = decode(model, batch, ids_a)
    torch.testing.assert_close(again, want_a, rtol=0, atol=0)


def test_steps_that_take_gradients_never_write_in_place(model):
    """With autograd recording, every step makes a new buffer: backward through several steps works
    (an in-place write would break it) and the state before the steps is unchanged."""
    model = copy.deepcopy(model).train()
    state = model(tokens(1, seed=4), state=model(tokens(2), state=None).state).state  # made by a step
    assert state.pending.requires_grad
    before = state.pending.detach().clone()
    logits, _ = decode(model, state, tokens(C + 1, seed=5))
    logits.sum().backward()
    assert model.embed.weight.grad is not None
    torch.testing.assert_close(state.pending.detach(), before, rtol=0, atol=0)
