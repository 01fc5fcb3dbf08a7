"""The associative long-term memory: chunked == naive == step (outputs, states, gradients), causal by
chunk, splits equal the whole, and it stores key -> value associations; its layer likewise."""

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from mmrec.layers.assoc_memory import AssociativeMemory
from mmrec.ops.assoc import (
    AssocState,
    assoc_chunked,
    assoc_init_state,
    assoc_naive,
    assoc_step,
    delta_chunk_states,
)
from mmrec.ops.delta import delta_chunked

# (low, high) of log decay per token: exp(-20) ~ 2e-9 (strong), 1 - 1e-6 (weak), and a mix.
DECAYS = {"strong": (-20.0, -20.0), "weak": (-1e-6, -1e-6), "mixed": (-20.0, -1e-7)}
# beta near 0 (a write barely moves the memory), near 1 (full replacement), and spread.
BETAS = {"low": (1e-6, 1e-6), "high": (1 - 1e-6, 1 - 1e-6), "spread": (0.0, 1.0)}
C = 8
FIELDS = ["memory", "keys", "values", "log_g", "beta"]


def _uniform(shape, bounds, dtype):
    lo, hi = bounds
    return torch.empty(shape, dtype=dtype).uniform_(lo, hi) if lo != hi else torch.full(shape, lo, dtype=dtype)


def _inputs(T, decay="mixed", beta="spread", dtype=torch.float64, B=2, H=3, dk=6, dv=5):
    q = torch.randn(B, H, T, dk, dtype=dtype)
    k = F.normalize(torch.randn(B, H, T, dk, dtype=dtype), dim=-1)
    v = torch.randn(B, H, T, dv, dtype=dtype)
    return q, k, v, _uniform((B, H, T), DECAYS[decay], dtype), _uniform((B, H, T), BETAS[beta], dtype)


def _state(count, decay="mixed", beta="spread", dtype=torch.float64, B=2, H=3, dk=6, dv=5, chunk=C):
    """A carried state: a random memory and ``count`` pending tokens (zero beyond them, as the ops leave it)."""
    _, k, v, g, b = _inputs(chunk, decay, beta, dtype, B, H, dk, dv)
    keep = (torch.arange(chunk) < count).to(dtype)
    return AssocState(
        0.5 * torch.randn(B, H, dk, dv, dtype=dtype), k * keep[:, None], v * keep[:, None], g * keep, b * keep, count
    )


def _steps(inputs, state):
    outs = []
    for t in range(inputs[0].size(2)):
        o, state = assoc_step(*(x[:, :, t] for x in inputs), state)
        outs.append(o)
    return torch.stack(outs, dim=2), state


def _with_grad(state):
    return AssocState(*(t.detach().clone().requires_grad_() for t in state.tensors), state.n_pending)


# Lengths around the chunk at mixed gates, with and without pending tokens; every gate extreme at 3C + 5.
CASES = [(T, "mixed", "spread", r) for T in (1, C - 1, C, C + 1, 3 * C + 5) for r in (0, 3)]
CASES += [(3 * C + 5, d, b, 5) for d in DECAYS for b in BETAS]


@pytest.mark.parametrize(("T", "decay", "beta", "count"), CASES)
def test_chunked_and_step_match_naive_with_gradients(T, decay, beta, count):
    inputs = [t.requires_grad_() for t in _inputs(T, decay, beta)]
    state = _with_grad(_state(count, decay, beta))
    o_ref, s_ref = assoc_naive(*inputs, state)
    assert s_ref.n_pending == (count + T) % C
    weights = [torch.randn_like(o_ref)] + [torch.randn_like(t) for t in s_ref.tensors]

    def loss(o, s):
        return sum((a * w.to(a.dtype)).sum() for a, w in zip([o, *s.tensors], weights, strict=True))

    leaves = [*inputs, *state.tensors]
    grads_ref = torch.autograd.grad(loss(o_ref, s_ref), leaves, allow_unused=True, materialize_grads=True)
    runs = [("chunked", assoc_chunked, torch.float64, 1e-10), ("chunked", assoc_chunked, torch.float32, 1e-5)]
    runs.append(("step", lambda *a: _steps(a[:5], a[5]), torch.float64, 1e-10))
    for name, fn, dtype, tol in runs:
        ins = [t.detach().to(dtype).requires_grad_() for t in inputs]
        st = AssocState(*(t.detach().to(dtype).requires_grad_() for t in state.tensors), count)
        o, s = fn(*ins, st)
        assert o.dtype == dtype and o.shape == o_ref.shape and s.n_pending == s_ref.n_pending
        assert rel_err(o, o_ref) <= tol, f"{name} output {dtype}"
        for field, a, b in zip(FIELDS, s.tensors, s_ref.tensors, strict=True):
            assert a.dtype == dtype and rel_err(a, b) <= tol, f"{name} state.{field} {dtype}"
        grads = torch.autograd.grad(loss(o, s), [*ins, *st.tensors], allow_unused=True, materialize_grads=True)
        names = ["q", "k", "v", "log_g", "beta", *(f"state.{f}" for f in FIELDS)]
        for g_name, a, b in zip(names, grads, grads_ref, strict=True):
            assert torch.isfinite(a).all(), f"{name} grad of {g_name} {dtype}"
            assert rel_err(a, b) <= tol, f"{name} grad of {g_name} {dtype}"


def test_gradcheck_chunked_and_step():
    inputs = [t.requires_grad_() for t in _inputs(7, B=1, H=2, dk=3, dv=2)]
    state = _with_grad(_state(2, B=1, H=2, dk=3, dv=2, chunk=3))

    def chunked(*a):
        o, s = assoc_chunked(*a[:5], AssocState(*a[5:], 2))
        return o, *s.tensors

    def stepped(*a):
        o, s = _steps(a[:5], AssocState(*a[5:], 2))
        return o, *s.tensors

    # fast_mode checks random projections of every input's Jacobian; the test above compares every
    # gradient with the loop's.
    for fn in (chunked, stepped):
        assert torch.autograd.gradcheck(fn, [*inputs, *state.tensors], fast_mode=True)


@pytest.mark.parametrize("count", [0, 3])
def test_a_token_sees_no_token_of_its_own_chunk_or_later(count):
    """Causal by chunk, read off the gradients: the output of token t depends on q_t, on the tokens of
    earlier chunks and on the carried state, and on nothing else."""
    T = 3 * C + 5
    inputs = [t.requires_grad_() for t in _inputs(T)]
    state = _with_grad(_state(count))
    for t in (0, C - count - 1, C - count, 2 * C - count + 3, T - 1):
        grads = torch.autograd.grad(
            assoc_chunked(*inputs, state)[0][:, :, t].sum(),
            [*inputs, *state.tensors],
            allow_unused=True,
            materialize_grads=True,
        )
        start = (t + count) // C * C - count  # the call's index of the first token of t's chunk (< 0: pending)
        for name, g in zip(["q", "k", "v", "log_g", "beta"], grads[:5], strict=True):
            g = g.clone()
            if name == "q":
                g[:, :, t] = 0  # its own query, the one thing of its own chunk it uses
            assert torch.count_nonzero(g[:, :, max(start, 0) :]) == 0, f"token {t} sees {name} of its chunk or later"
            if start > 0 and name != "q":  # and it does see the chunks before its own
                assert torch.count_nonzero(g[:, :, :start]) > 0, f"token {t} never sees {name} of earlier chunks"
        pending_grads = grads[6:]  # keys, values, log_g, beta of the state's unfinished chunk
        if start < 0:  # t is in the chunk the state left unfinished: those tokens are its own chunk's
            assert all(torch.count_nonzero(g) == 0 for g in pending_grads), f"token {t} sees its chunk's pending tokens"
        elif count:
            assert all(torch.count_nonzero(g) > 0 for g in pending_grads), f"token {t} never sees the pending tokens"


def test_perturbing_a_token_changes_only_later_chunks():
    T = 3 * C + 5
    q, k, v, g, b = _inputs(T, decay="weak")  # a strong decay would erase the perturbed write
    o, _ = assoc_chunked(q, k, v, g, b, chunk_size=C)
    for s in (0, C - 1, C, 2 * C + 3):
        k2, v2, b2 = k.clone(), v.clone(), b.clone()
        k2[:, :, s] = F.normalize(torch.randn_like(k2[:, :, s]), dim=-1)
        v2[:, :, s] += 1.0
        b2[:, :, s] = 0.9
        o2, _ = assoc_chunked(q, k2, v2, g, b2, chunk_size=C)
        end = (s // C + 1) * C  # the first token of the next chunk
        assert torch.equal(o2[:, :, :end], o[:, :, :end]), f"perturbing token {s} changed its chunk or earlier"
        if end < T:
            assert not torch.allclose(o2[:, :, end:], o[:, :, end:]), f"token {s} never reached a later chunk"


@pytest.mark.parametrize("cuts", [(1,), (C,), (5, 6, 2 * C), (C - 1, C + 1, C + 2, 4 * C - 3), tuple(range(1, 30))])
def test_split_and_carry_the_state_equals_the_whole(cuts):
    """Any split, pieces of one token through the decoding step and the others chunked, gives the whole."""
    T = 4 * C + 3
    inputs = _inputs(T)
    state = _state(4)
    whole, s_whole = assoc_chunked(*inputs, state)
    pieces, s = [], state
    for lo, hi in zip((0, *cuts), (*cuts, T), strict=True):
        piece = [x[:, :, lo:hi] for x in inputs]
        if hi - lo == 1:
            o, s = assoc_step(*(x[:, :, 0] for x in piece), s)
            o = o.unsqueeze(2)
        else:
            o, s = assoc_chunked(*piece, s)
        pieces.append(o)
    assert rel_err(torch.cat(pieces, 2), whole) < 1e-12
    assert s.n_pending == s_whole.n_pending == (4 + T) % C
    for field, a, b in zip(FIELDS, s.tensors, s_whole.tensors, strict=True):
        assert rel_err(a, b) < 1e-12, field


def test_streams_with_different_pending_counts_step_together():
    """assoc_step with one count per stream equals each stream stepped alone."""
    prefixes = (5, C - 1, 2 * C)  # pending counts 5, C - 1 and 0
    streams = [_inputs(L + 12, B=1) for L in prefixes]
    alone, states = [], []
    for L, inputs in zip(prefixes, streams, strict=True):
        _, s = assoc_chunked(*(x[:, :, :L] for x in inputs), chunk_size=C)
        states.append(s)
        alone.append(_steps([x[:, :, L:] for x in inputs], s))
    batch = AssocState(*(torch.cat(ts) for ts in zip(*(s.tensors for s in states), strict=True)), (5, C - 1, 0))
    tails = [torch.cat([x[:, :, L:] for L, x in zip(prefixes, xs, strict=True)]) for xs in zip(*streams, strict=True)]
    o, s = _steps(tails, batch)
    assert s.n_pending == tuple((c + 12) % C for c in (5, C - 1, 0))
    for i, (o_i, s_i) in enumerate(alone):
        assert rel_err(o[i : i + 1], o_i) < 1e-12
        for field, a, b in zip(FIELDS, s.tensors, s_i.tensors, strict=True):
            assert rel_err(a[i : i + 1], b) < 1e-12, f"stream {i} state.{field}"
    with pytest.raises(ValueError, match="one token at a time"):
        assoc_chunked(*(x[:, :, :2] for x in tails), batch)


@pytest.mark.parametrize("chunk", [1, 7, C])
def test_memory_is_the_delta_rule_state_of_the_completed_chunks(chunk):
    T = 3 * C + 5
    q, k, v, g, b = _inputs(T)
    s0 = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    start = AssocState(s0, *assoc_init_state(2, 3, 6, 5, chunk, torch.float64)[1:])
    o, s = assoc_chunked(q, k, v, g, b, start)
    done = T // chunk * chunk
    _, want = delta_chunked(q[:, :, :done], k[:, :, :done], v[:, :, :done], g[:, :, :done], b[:, :, :done], s0, 16)
    assert rel_err(s.memory, want) < 1e-12
    entering, final = delta_chunk_states(k[:, :, :done], v[:, :, :done], g[:, :, :done], b[:, :, :done], s0, chunk)
    assert rel_err(final, want) < 1e-12
    # Every token of chunk c reads the memory entering it.
    reads = q[:, :, :done].unflatten(2, (-1, chunk)) @ entering
    assert rel_err(o[:, :, :done], reads.flatten(2, 3)) < 1e-12


def test_it_stores_associations_and_a_full_write_replaces():
    """Chunks of 2 tokens, no decay, beta 1, orthonormal keys k1, k2:
    chunk 0 writes k1 -> v1, k2 -> v2; chunk 1 reads k1 and k2 (v1, v2), then writes k1 -> v3;
    chunk 2 reads k1 (v3, not v1 + v3) and k2 (still v2)."""
    dk, dv = 4, 3
    k1, k2 = torch.eye(dk, dtype=torch.float64)[:2]
    v1, v2, v3 = (torch.randn(dv, dtype=torch.float64) for _ in range(3))
    zk, zv = torch.zeros(dk, dtype=torch.float64), torch.zeros(dv, dtype=torch.float64)
    k = torch.stack([k1, k2, k1, zk, zk, zk]).view(1, 1, 6, dk)
    v = torch.stack([v1, v2, v3, zv, zv, zv]).view(1, 1, 6, dv)
    beta = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64).view(1, 1, 6)
    q = torch.stack([zk, zk, k1, k2, k1, k2]).view(1, 1, 6, dk)
    log_g = torch.zeros(1, 1, 6, dtype=torch.float64)
    state = assoc_init_state(1, 1, dk, dv, 2, torch.float64)
    for name, fn in (
        ("naive", assoc_naive),
        ("chunked", assoc_chunked),
        ("step", lambda *a: _steps(a[:5], a[5])),
    ):
        o, s = fn(q, k, v, log_g, beta, state)
        o = o[0, 0]
        assert torch.equal(o[:2], torch.zeros(2, dv, dtype=torch.float64)), f"{name}: chunk 0 reads an empty memory"
        assert torch.allclose(o[2], v1, atol=1e-12) and torch.allclose(o[3], v2, atol=1e-12), name
        assert torch.allclose(o[4], v3, atol=1e-12), f"{name}: the second write to k1 did not replace the first"
        assert torch.allclose(o[5], v2, atol=1e-12), f"{name}: writing k1 disturbed k2"
        assert torch.allclose(k1 @ s.memory[0, 0], v3, atol=1e-12), name


def test_empty_sequence_keeps_the_state():
    q, k, v, g, b = _inputs(0)
    state = _state(3)
    for fn in (assoc_naive, assoc_chunked):
        o, s = fn(q, k, v, g, b, state)
        assert o.shape == (2, 3, 0, 5) and s.n_pending == 3
        assert all(torch.equal(a, b) for a, b in zip(s.tensors, state.tensors, strict=True))


def test_bf16_autocast_keeps_a_float32_state():
    q, k, v, g, b = _inputs(3 * C + 5, dtype=torch.float32)
    o_ref, s_ref = assoc_naive(q, k, v, g, b, chunk_size=C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, s = assoc_chunked(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, b, chunk_size=C)
        o_step, s_step = assoc_step(
            q[:, :, 0].bfloat16(), k[:, :, 0].bfloat16(), v[:, :, 0].bfloat16(), g[:, :, 0], b[:, :, 0], s
        )
    assert o.dtype == o_step.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in (*s.tensors, *s_step.tensors))
    assert rel_err(o.float(), o_ref) < 3e-2
    assert rel_err(s.memory, s_ref.memory) < 3e-2


def test_bad_shapes_chunk_sizes_and_counts_are_refused_by_name():
    q, k, v, g, b = _inputs(5)
    state = _state(2)
    with pytest.raises(ValueError, match="beta must be"):
        assoc_chunked(q, k, v, g, b[..., :4], state)
    with pytest.raises(ValueError, match=r"state\.values must be"):
        assoc_naive(q, k, v, g, b, state._replace(values=state.values[..., :2]))
    with pytest.raises(ValueError, match="differs from the state's chunk"):
        assoc_chunked(q, k, v, g, b, state, chunk_size=C + 1)
    with pytest.raises(ValueError, match=r"state\.n_pending must lie"):
        assoc_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], g[:, :, 0], b[:, :, 0], state._replace(n_pending=C))
    with pytest.raises(ValueError, match="2 streams"):
        assoc_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], g[:, :, 0], b[:, :, 0], state._replace(n_pending=(1, 2, 3)))
    with pytest.raises(ValueError, match="chunk_size must be"):
        assoc_chunked(q, k, v, g, b, chunk_size=0)


def _layer(dtype=torch.float64, **kw):
    layer = AssociativeMemory(d_model=12, heads=3, chunk_size=C, **kw).to(dtype)
    with torch.no_grad():  # a trained-looking layer: the zero output projection would hide everything
        layer.out.weight.normal_()
        layer.decay.weight.normal_(0.0, 0.3)
    return layer


def test_layer_starts_as_the_identity_of_the_residual_stream():
    layer = AssociativeMemory(d_model=12, heads=3, chunk_size=C).double()
    x = torch.randn(2, 3 * C + 1, 12, dtype=torch.float64)
    y, _ = layer(x)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    assert layer.out.weight.grad is not None and layer.out.weight.grad.abs().sum() > 0
    # The per-chunk decays start spread over heads, decay_min to decay_max, whatever the token.
    per_chunk = torch.sigmoid(layer.decay.bias.double())
    assert torch.allclose(per_chunk[[0, -1]], torch.tensor([0.9, 0.999], dtype=torch.float64), atol=1e-6)
    assert torch.equal(layer.decay.weight, torch.zeros_like(layer.decay.weight))


def test_layer_step_and_pieces_equal_the_whole():
    layer = _layer()
    T = 3 * C + 5
    x = torch.randn(2, T, 12, dtype=torch.float64)
    whole, s_whole = layer(x)
    assert whole.abs().sum() > 0
    state, outs = layer.init_state(2, dtype=torch.float64), []
    for t in range(T):
        y, state = layer.step(x[:, t], state)
        outs.append(y)
    assert rel_err(torch.stack(outs, 1), whole) < 1e-12
    state, outs = None, []
    for lo, hi in ((0, 3), (3, 4), (4, C + 2), (C + 2, T)):
        y, state = layer(x[:, lo:hi], state)
        outs.append(y)
    assert rel_err(torch.cat(outs, 1), whole) < 1e-12
    for s in (state, s_whole):
        assert s.n_pending == T % C
    for field, a, b in zip(FIELDS, state.tensors, s_whole.tensors, strict=True):
        assert rel_err(a, b) < 1e-12, field


def test_layer_gradients_reach_every_parameter_and_stay_causal():
    layer = _layer()
    x = torch.randn(2, 3 * C, 12, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x)
    y[:, C + 2].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    assert torch.count_nonzero(x.grad[:, C + 3 :]) == 0
    assert torch.count_nonzero(x.grad[:, C : C + 2]) == 0  # its chunk's earlier tokens: not yet written


def test_layer_float32_state_size_and_default_bytes():
    layer = AssociativeMemory(d_model=256, heads=4)
    state = layer.init_state(1)
    assert state.memory.shape == (1, 4, 64, 64) and state.keys.shape == (1, 4, 64, 64)
    assert sum(t.numel() * t.element_size() for t in state.tensors) == layer.state_bytes() == 198_656
    x = torch.randn(2, 70, 256)
    y, s = layer(x)
    assert y.dtype == torch.float32 and s.memory.dtype == torch.float32 and s.n_pending == 70 % 64


def test_layer_under_bf16_autocast_keeps_a_float32_state():
    layer = _layer(torch.float32)
    x = torch.randn(2, 2 * C + 3, 12)
    y_ref, s_ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = layer(x)
        y_step, s_step = layer.step(x[:, 0], s)
    assert y.dtype == y_step.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in (*s.tensors, *s_step.tensors))
    assert rel_err(y.float(), y_ref) < 3e-2
    assert rel_err(s.memory, s_ref.memory) < 3e-2
