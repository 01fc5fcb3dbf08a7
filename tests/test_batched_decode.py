"""Streams at different positions decoded in one batch: each row equals the stream decoded alone."""

import pytest
import torch

from mmrec import MMRecConfig, MMRecLM, TransformerConfig, TransformerLM
from mmrec.layers.basic import rms_norm_step
from mmrec.models.state import KVCache, MMRecState, StateError

C, W = 4, 2  # chunk_size, summary_window: positions > W * C have a full FIFO
# 0, 1, C-1, C, 3C+5 and two past the FIFO's fill (> W*C), one of them about to complete a chunk.
POSITIONS = (0, 1, C - 1, C, 3 * C + 5, 6 * C - 1)
VOCAB = 50


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = MMRecConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, chunk_size=C, mem_slots=3, summary_window=W)
    return MMRecLM(cfg).double().eval()


def prefilled(model, positions, seed=1):
    """One batch-1 state per position (a fresh state at 0), with the prompts that made them."""
    g = torch.Generator().manual_seed(seed)
    states, prompts = [], []
    for p in positions:
        ids = torch.randint(0, VOCAB, (1, p), generator=g)
        states.append(model(ids).state if p else model.init_state(1))
        prompts.append(ids)
    return states, prompts


def assert_states_equal(a, b, atol=1e-12):
    assert a.positions == b.positions
    for name, t in a.tensors().items():
        torch.testing.assert_close(t, b.tensors()[name], rtol=0, atol=atol, msg=name)


@torch.no_grad()
def test_streams_at_different_positions_decode_together_as_each_alone(model):
    states, prompts = prefilled(model, POSITIONS)
    batch = MMRecState.cat(states)
    assert batch.position == POSITIONS and batch.positions == POSITIONS
    steps = 2 * C + 3  # every stream crosses at least two chunk boundaries, each at its own step
    tokens = torch.randint(0, VOCAB, (len(POSITIONS), steps), generator=torch.Generator().manual_seed(2))
    alone = list(states)
    for t in range(steps):
        out = model(tokens[:, t : t + 1], state=batch)
        for i, st in enumerate(alone):
            ref = model(tokens[i : i + 1, t : t + 1], state=st)
            torch.testing.assert_close(out.logits[i : i + 1], ref.logits, rtol=0, atol=1e-12)
            alone[i] = ref.state
        batch = out.state
        assert batch.positions == tuple(p + t + 1 for p in POSITIONS)
    for got, want in zip(batch.split(), alone, strict=True):
        assert_states_equal(got, want)
    # And each row equals the stream's whole sequence in one chunked pass (to the float32 rounding of the
    # decays, which the model computes in float32 even for float64 weights).
    for i, prompt in enumerate(prompts):
        full = model(torch.cat([prompt, tokens[i : i + 1]], dim=1)).logits[:, -1]
        torch.testing.assert_close(out.logits[i], full, rtol=1e-6, atol=1e-7)


@torch.no_grad()
def test_the_callers_state_is_not_changed_by_a_batched_step(model):
    batch = MMRecState.cat(prefilled(model, (C - 1, 2 * C + 1))[0])
    before = batch.clone()
    model(torch.tensor([[3], [4]]), state=batch)
    assert_states_equal(batch, before, atol=0)


@torch.no_grad()
def test_greedy_generate_on_a_cat_batch_equals_each_stream_alone(model):
    positions = (1, C, 3 * C + 2)
    states, _ = prefilled(model, positions, seed=3)
    last = torch.tensor([[5], [7], [11]])
    ids, state = model.generate(last, 2 * C, temperature=0.0, state=MMRecState.cat(states), return_state=True)
    for i, st in enumerate(states):
        ids_i, state_i = model.generate(last[i : i + 1], 2 * C, temperature=0.0, state=st, return_state=True)
        assert torch.equal(ids[i : i + 1], ids_i)
        assert_states_equal(state.select([i]), state_i)


def test_cat_select_split_round_trip(model):
    states, _ = prefilled(model, (2, C + 1, 5 * C))
    batch = MMRecState.cat(states)
    assert batch.batch_size == 3 and batch.batch_key == states[0].batch_key
    for part, st in zip(batch.split(), states, strict=True):
        assert part.batch_size == 1 and isinstance(part.position, int)
        assert_states_equal(part, st, atol=0)
    picked = batch.select([2, 0])
    assert picked.position == (5 * C, 2)
    assert_states_equal(MMRecState.cat([states[2], states[0]]), picked, atol=0)
    assert_states_equal(batch.select(torch.tensor([1, 1])), MMRecState.cat([states[1], states[1]]), atol=0)
    # Streams at one position keep an int position, as a state that never was batched.
    same = MMRecState.cat([states[1], states[1].clone()])
    assert same.position == C + 1 and same.select([1]).position == C + 1
    # Nested: a batch of batches.
    assert_states_equal(MMRecState.cat([batch.select([0, 1]), batch.select([2])]), batch, atol=0)


def test_select_refuses_bad_indices(model):
    batch = MMRecState.cat(prefilled(model, (1, 2))[0])
    for bad, msg in [([2], "out of range"), ([-1], "out of range"), ([], "at least one"), ([True], "out of range")]:
        with pytest.raises(StateError, match=msg):
            batch.select(bad)
    with pytest.raises(StateError, match="integer tensor"):
        batch.select(torch.tensor([0.0]))


def test_cat_refuses_what_cannot_batch(model):
    states, _ = prefilled(model, (1, 2))
    with pytest.raises(StateError, match="at least one"):
        MMRecState.cat([])
    other = MMRecLM(MMRecConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, chunk_size=C)).double()
    with pytest.raises(StateError, match="different models"):
        MMRecState.cat([states[0], other.init_state(1)])
    llama = TransformerLM(TransformerConfig(preset="llama", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2))
    with pytest.raises(StateError, match="KVCache"):
        MMRecState.cat([states[0], llama.init_state(1)])


@torch.no_grad()
def test_kv_caches_batch_at_different_positions():
    # The rest of the KV cache's contracts (every preset, windows, branching): tests/test_transformer.py.
    torch.manual_seed(0)
    llama = TransformerLM(TransformerConfig(preset="llama", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2))
    llama = llama.double().eval()
    a = llama(torch.randint(0, VOCAB, (1, 5))).state
    b = llama(torch.randint(0, VOCAB, (1, 5))).state
    c = llama(torch.randint(0, VOCAB, (1, 6))).state
    assert a.batch_key == b.batch_key == c.batch_key
    batch = KVCache.cat([a, c, b])
    assert batch.position == (5, 6, 5) and batch.keys.size(3) == 6
    out = llama(torch.tensor([[1], [2], [3]]), state=batch)
    for i, st in enumerate((a, c, b)):
        ref = llama(torch.tensor([[i + 1]]), state=st)
        torch.testing.assert_close(out.logits[i : i + 1], ref.logits, rtol=0, atol=1e-12)
        assert_states_equal(out.state.split()[i], ref.state)
    same = KVCache.cat([a, b])
    as_tuple = KVCache(position=(5, 5), keys=same.keys, values=same.values)
    torch.testing.assert_close(
        llama(torch.tensor([[1, 2], [3, 4]]), state=as_tuple).logits,
        llama(torch.tensor([[1, 2], [3, 4]]), state=same).logits,
        rtol=0,
        atol=0,
    )
    with pytest.raises(StateError, match="different positions"):
        llama(torch.tensor([[1, 2], [3, 4]]), state=KVCache.cat([a, c]))


@torch.no_grad()
def test_a_prompt_for_streams_at_different_positions_is_refused(model):
    batch = MMRecState.cat(prefilled(model, (1, 2))[0])
    with pytest.raises(StateError, match="separately"):
        model(torch.zeros(2, 3, dtype=torch.long), state=batch)
    # Streams at one position given as a tuple are one position: a prompt is fine.
    same = MMRecState.cat(prefilled(model, (2, 2))[0])
    tuple_same = MMRecState(position=(2, 2), **same.tensors())
    torch.testing.assert_close(
        model(torch.ones(2, 3, dtype=torch.long), state=tuple_same).logits,
        model(torch.ones(2, 3, dtype=torch.long), state=same).logits,
        rtol=0,
        atol=0,
    )


def test_bad_positions_are_refused(model):
    tensors = MMRecState.cat(prefilled(model, (1, 2))[0]).tensors()
    ids = torch.zeros(2, 1, dtype=torch.long)
    for position, msg in [
        ((1,), "2 stream"),
        ((1, 2, 3), "2 stream"),
        ((1, -1), ">= 0"),
        ((1, 2.0), "integers"),
        ((True, 1), "integers"),
        (-3, ">= 0"),
        (1.5, "integer"),
    ]:
        with pytest.raises(StateError, match=msg):
            model(ids, state=MMRecState(position=position, **tensors))


@torch.no_grad()
def test_save_load_keeps_per_stream_positions(model, tmp_path):
    batch = MMRecState.cat(prefilled(model, (3, C + 2, 4 * C))[0])
    path = tmp_path / "batch.safetensors"
    batch.save(path, config=model.config.to_dict())
    loaded = MMRecState.load(path, config=model.config.to_dict())
    assert loaded.position == (3, C + 2, 4 * C)
    assert_states_equal(loaded, batch, atol=0)
    ids = torch.tensor([[1], [2], [3]])
    torch.testing.assert_close(model(ids, state=loaded).logits, model(ids, state=batch).logits, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(3, 7), (2, 5, 64)])
@pytest.mark.parametrize("eps", [1e-6, None])
def test_the_decoding_rms_norm_equals_torchs(shape, eps):
    x = torch.randn(*shape, dtype=torch.float64) * torch.logspace(-3, 2, shape[-1], dtype=torch.float64)
    w = torch.randn(shape[-1], dtype=torch.float64)
    for weight in (w, None):
        want = torch.nn.functional.rms_norm(x, (shape[-1],), weight, eps)
        torch.testing.assert_close(rms_norm_step(x, weight, eps), want, rtol=1e-12, atol=0)
