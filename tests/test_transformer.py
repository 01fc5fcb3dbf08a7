"""Transformer baselines: the same contracts as MM-Rec, with a growing KV cache."""

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from mmrec import ConfigError, KVCache, MMRecConfig, MMRecLM, StateError, TransformerConfig, TransformerLM
from mmrec.layers.attention import causal_attention
from mmrec.models.transformer import matched_transformer_config

PRESETS = ["gpt", "llama", "mistral"]


def tiny(preset: str, **kw) -> TransformerLM:
    base = dict(preset=preset, vocab_size=256, d_model=32, n_layers=2, n_heads=4, max_seq_len=512)
    if preset == "mistral":
        base["window"] = 8
    return TransformerLM(TransformerConfig(**{**base, **kw})).eval()


@pytest.mark.parametrize("preset", PRESETS)
def test_causality(preset):
    model = tiny(preset).double()
    ids = torch.randint(0, 256, (2, 40))
    base = model(ids).logits
    for t in (1, 8, 17, 39):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % 256
        logits = model(changed).logits
        assert (logits[:, :t] - base[:, :t]).abs().max() <= 1e-6
        assert (logits[:, t] - base[:, t]).abs().max() > 1e-6


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("split", [1, 7, 8, 9, 25])
def test_streaming_equals_full_pass(preset, split):
    model = tiny(preset)
    ids = torch.randint(0, 256, (2, 40))
    full = model(ids).logits
    a = model(ids[:, :split])
    b = model(ids[:, split:], state=a.state)
    assert rel_err(torch.cat([a.logits, b.logits], 1), full) <= 1e-4
    state, steps = None, []
    for t in range(40):
        out = model(ids[:, t : t + 1], state=state)
        state, _ = out.state, steps.append(out.logits)
    assert rel_err(torch.cat(steps, 1), full) <= 1e-4


def test_kv_cache_grows_but_the_window_bounds_it():
    ids = torch.randint(0, 256, (1, 100))
    llama = tiny("llama")(ids).state
    mistral = tiny("mistral")(ids).state
    assert isinstance(llama, KVCache) and llama.keys.size(3) == 100
    assert mistral.keys.size(3) == 7  # window - 1
    mmrec_small = MMRecLM(MMRecConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, chunk_size=8))
    assert llama.nbytes() > 0 and mmrec_small.init_state(1).nbytes() > 0


@pytest.mark.parametrize(
    ("Tq", "Tk", "window"),
    [(50, 53, 8), (50, 50, 8), (9, 9, 8), (3, 10, 8), (1, 8, 8), (64, 64, 16), (7, 7, None), (5, 12, None)],
)
def test_attention_matches_dense_masked_reference(Tq, Tk, window):
    q = torch.randn(2, 3, Tq, 4, dtype=torch.float64)
    k = torch.randn(2, 3, Tk, 4, dtype=torch.float64)
    v = torch.randn(2, 3, Tk, 4, dtype=torch.float64)
    i = torch.arange(Tq)[:, None] + (Tk - Tq)
    j = torch.arange(Tk)[None]
    mask = (j <= i) & ((j > i - window) if window else True)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert rel_err(causal_attention(q, k, v, window), ref) < 1e-12


def test_matched_config_hits_the_target_parameter_count():
    target = MMRecLM(MMRecConfig()).num_parameters()
    for preset in PRESETS:
        cfg = matched_transformer_config(target, preset=preset, d_model=256, n_layers=4)
        n = TransformerLM(cfg).num_parameters()
        assert abs(n - target) / target < 0.01, (preset, n, target)
    with pytest.raises(ValueError, match="cannot match"):
        matched_transformer_config(1000, preset="llama", d_model=256, n_layers=4)


def test_gpt_refuses_positions_beyond_its_table():
    model = tiny("gpt", max_seq_len=16)
    model(torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_bad_states_and_configs():
    model = tiny("llama")
    with pytest.raises(StateError, match="another config"):
        model(torch.zeros(1, 2, dtype=torch.long), state=tiny("llama", d_model=64).init_state(1))
    with pytest.raises(StateError, match="KVCache"):
        model(torch.zeros(1, 2, dtype=torch.long), state=MMRecLM(MMRecConfig(d_model=32, n_heads=4)).init_state(1))
    with pytest.raises(ConfigError, match="preset"):
        TransformerConfig(preset="bert")
    with pytest.raises(ConfigError, match="window"):
        TransformerConfig(preset="llama", window=128)
    with pytest.raises(ConfigError, match="d_model"):
        TransformerConfig(d_model=30, n_heads=4)


def test_kv_cache_save_load(tmp_path):
    model = tiny("mistral")
    ids = torch.randint(0, 256, (1, 30))
    st = model(ids[:, :20]).state
    st.save(tmp_path / "kv.safetensors")
    loaded = KVCache.load(tmp_path / "kv.safetensors")
    assert torch.equal(model(ids[:, 20:], state=loaded).logits, model(ids[:, 20:], state=st).logits)


# The preallocated cache, streams at different positions, branching.

AWKWARD = (0, 1, 7, 8, 9, 15, 16, 17, 30)  # around mistral's window (8) and the first capacities (16, 32)


def tiny64(preset: str, seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    return tiny(preset).double()


def _alone(model: TransformerLM, ids: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
    """Logits of the last token and the state of one stream fed ``ids`` [1, T] in one call (T >= 1)."""
    out = model(ids)
    return out.logits[:, -1], out.state


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("prefill", [1, 7, 9, 16, 17])
@torch.no_grad()
def test_in_place_decoding_equals_the_full_pass(preset, prefill):
    model = tiny64(preset)
    ids = torch.randint(0, 256, (2, 70))
    full = model(ids).logits
    out = model(ids[:, :prefill])
    logits, state, storages = [out.logits], out.state, {id(out.state._storage)}
    for t in range(prefill, 70):
        out = model(ids[:, t : t + 1], state=state)
        logits.append(out.logits)
        state = out.state
        storages.add(id(state._storage))
        if preset == "mistral":  # compacted to the last window - 1 tokens when its storage of 2 windows is full
            assert min(t + 1, 7) <= state.keys.size(3) <= 16
        else:
            assert state.keys.size(3) == t + 1
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=0, atol=1e-12)
    # Capacity doubles (up to the window for mistral): a few storages for 70 tokens, not one per token.
    assert len(storages) <= (12 if preset == "mistral" else 4)
    assert state._storage is not None and state.storage_nbytes() >= state.nbytes()
    assert state.nbytes() == 2 * state.keys.numel() * 8  # the filled part only


@pytest.mark.parametrize("preset", PRESETS)
@torch.no_grad()
def test_streams_at_different_positions_decode_together_as_each_alone(preset):
    model = tiny64(preset)
    prompts = [torch.randint(0, 256, (1, n + 1)) for n in AWKWARD]
    alone = [_alone(model, p) for p in prompts]
    batch = KVCache.cat([s for _, s in alone])
    assert batch.positions == tuple(n + 1 for n in AWKWARD) and batch.batch_key == alone[0][1].batch_key
    assert batch.keys.size(3) == max(s.keys.size(3) for _, s in alone)
    for step in range(12):  # mistral's rows cross the window; capacities are crossed
        tokens = torch.randint(0, 256, (len(prompts), 1))
        out = model(tokens, state=batch)
        for i in range(len(prompts)):
            ref = model(tokens[i : i + 1], state=alone[i][1])
            torch.testing.assert_close(out.logits[i], ref.logits[0], rtol=0, atol=1e-12, msg=f"{step}, {i}")
            alone[i] = (ref.logits, ref.state)
        batch = out.state
    for mine, (_, ref) in zip(batch.split(), alone, strict=True):
        assert mine.position == ref.position
        # Compacted at other times than alone, a window's cache holds another number of tokens, each its last.
        n = min(mine.keys.size(3), ref.keys.size(3))
        assert preset == "mistral" or mine.keys.size(3) == ref.keys.size(3)
        assert n >= min(mine.position, 7)
        torch.testing.assert_close(mine.keys[..., -n:, :], ref.keys[..., -n:, :], rtol=0, atol=1e-12)
        torch.testing.assert_close(mine.values[..., -n:, :], ref.values[..., -n:, :], rtol=0, atol=1e-12)


@pytest.mark.parametrize("preset", PRESETS)
@torch.no_grad()
def test_a_mixed_batch_refuses_a_prompt_but_one_position_as_a_tuple_is_one_position(preset):
    model = tiny64(preset)
    a, b = model(torch.ones(1, 3, dtype=torch.long)).state, model(torch.ones(1, 5, dtype=torch.long)).state
    with pytest.raises(StateError, match="different positions"):
        model(torch.zeros(2, 2, dtype=torch.long), state=KVCache.cat([a, b]))
    same = KVCache.cat([a, a])
    as_tuple = KVCache(position=(3, 3), keys=same.keys, values=same.values)
    ids = torch.randint(0, 256, (2, 4))
    assert torch.equal(model(ids, state=as_tuple).logits, model(ids, state=same).logits)


@pytest.mark.parametrize("preset", PRESETS)
@torch.no_grad()
def test_branching_from_one_state_twice_gives_both_continuations(preset):
    model = tiny64(preset)
    ids = torch.randint(0, 256, (1, 30))
    a, b = torch.randint(0, 256, (1, 6)), torch.randint(0, 256, (1, 6))
    state = model(ids).state
    before = state.clone()

    def continued(start, more):  # noqa: ANN001, ANN202  token by token, then a prompt of two
        logits = []
        for t in range(4):
            out = model(more[:, t : t + 1], state=start)
            logits.append(out.logits)
            start = out.state
        out = model(more[:, 4:], state=start)
        return torch.cat([*logits, out.logits], 1)

    first = continued(state, a)
    second = continued(state, b)  # the same state again: it must not see the first branch's tokens
    again = continued(state, a)
    torch.testing.assert_close(first, model(torch.cat([ids, a], 1)).logits[:, 30:], rtol=0, atol=1e-12)
    torch.testing.assert_close(second, model(torch.cat([ids, b], 1)).logits[:, 30:], rtol=0, atol=1e-12)
    assert torch.equal(first, again)
    assert torch.equal(state.keys, before.keys) and torch.equal(state.values, before.values)
    # A prompt from one state twice, and a token from a state in the middle of a chain.
    x = model(a, state=state)
    y = model(b, state=state)
    torch.testing.assert_close(y.logits, model(torch.cat([ids, b], 1)).logits[:, 30:], rtol=0, atol=1e-12)
    mid = model(a[:, :1], state=state).state
    model(a[:, 1:3], state=mid)
    z = model(b[:, :1], state=mid)
    ref = model(torch.cat([ids, a[:, :1], b[:, :1]], 1)).logits[:, -1:]
    torch.testing.assert_close(z.logits, ref, rtol=0, atol=1e-12)
    assert torch.equal(model(a[:, :1], state=x.state).logits, model(a[:, :1], state=x.state).logits)


@pytest.mark.parametrize("preset", PRESETS)
@torch.no_grad()
def test_save_load_keeps_the_filled_part_exactly(preset, tmp_path):
    model = tiny64(preset)
    ids = torch.randint(0, 256, (1, 40))
    state = model(ids[:, :20]).state
    for t in range(20, 23):  # decoded in place: the state is a view of larger storage
        state = model(ids[:, t : t + 1], state=state).state
    assert state._storage is not None and state._storage.capacity > state.keys.size(3)
    state.save(tmp_path / "kv.safetensors")
    loaded = KVCache.load(tmp_path / "kv.safetensors")
    assert loaded.keys.shape == state.keys.shape == (2, 1, 4, 23 if preset != "mistral" else 10, 8)
    assert torch.equal(loaded.keys, state.keys) and torch.equal(loaded.values, state.values)
    assert torch.equal(model(ids[:, 23:], state=loaded).logits, model(ids[:, 23:], state=state).logits)


@torch.no_grad()
def test_a_window_cache_cut_to_its_last_tokens_continues_exactly():
    model = tiny64("mistral")
    ids = torch.randint(0, 256, (1, 30))
    state = model(ids[:, :21]).state
    assert state.keys.size(3) == 7  # a prompt longer than 2 windows: the last window - 1 tokens
    for keep in (7, 10):  # by hand, from a longer cache
        long = model(ids[:, :10]).state
        for t in range(10, 21):
            long = model(ids[:, t : t + 1], state=long).state
        cut = KVCache(position=21, keys=long.keys[:, :, :, -keep:], values=long.values[:, :, :, -keep:])
        torch.testing.assert_close(model(ids[:, 21:], state=cut).logits, model(ids).logits[:, 21:], rtol=0, atol=1e-12)
    torch.testing.assert_close(model(ids[:, 21:], state=state).logits, model(ids).logits[:, 21:], rtol=0, atol=1e-12)


@torch.no_grad()
def test_select_split_and_cat_keep_each_streams_tokens():
    model = tiny64("llama")
    states = [model(torch.randint(0, 256, (1, n))).state for n in (3, 11, 6)]
    batch = KVCache.cat(states)
    assert batch.keys.size(3) == 11 and batch.filled() == (3, 11, 6)
    assert torch.equal(batch.keys[:, :1, :, 3:], torch.zeros_like(batch.keys[:, :1, :, 3:]))  # padding
    picked = batch.select([2, 0])
    assert picked.position == (6, 3) and picked.keys.size(3) == 6
    for part, ref in zip(batch.split(), states, strict=True):
        assert torch.equal(part.keys, ref.keys) and torch.equal(part.values, ref.values)
    assert KVCache.cat([batch.select([1]), batch.select([0])]).keys.size(3) == 11
    # A cache cut by hand to its last tokens batches only with caches no longer than it.
    cut = KVCache(position=11, keys=states[1].keys[:, :, :, -4:], values=states[1].values[:, :, :, -4:])
    with pytest.raises(StateError, match="last 4 tokens"):
        KVCache.cat([cut, states[2]])
    assert KVCache.cat([cut, states[0]]).filled() == (4, 3)
    with pytest.raises(StateError, match="out of range"):
        batch.select([3])


@pytest.mark.parametrize("preset", PRESETS)
def test_gradients_flow_through_a_carried_cache(preset):
    model = tiny(preset).double()
    ids = torch.randint(0, 256, (2, 24))

    def loss(logits):  # noqa: ANN001, ANN202
        return F.cross_entropy(logits.reshape(-1, 256), ids[:, 11:].reshape(-1))

    state = model(ids[:, :10]).state
    out = model(ids[:, 10:23], state=state)
    loss(out.logits).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss(model(ids[:, :23]).logits[:, 10:]).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-9, atol=1e-12, msg=n)
    assert out.state._storage is None  # recorded by autograd: new tensors, no storage written in place


@pytest.mark.parametrize(("Tq", "Tk", "window"), [(1, 9, None), (1, 9, 4), (3, 9, None), (3, 9, 4)])
def test_attention_with_key_lengths_matches_each_row_alone(Tq, Tk, window):
    q = torch.randn(3, 2, Tq, 4, dtype=torch.float64)
    k = torch.randn(3, 2, Tk, 4, dtype=torch.float64)
    v = torch.randn(3, 2, Tk, 4, dtype=torch.float64)
    lengths = torch.tensor([Tk, Tq, 5])
    out = causal_attention(q, k, v, window, key_lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        ref = causal_attention(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], window)
        torch.testing.assert_close(out[b : b + 1], ref, rtol=0, atol=1e-12)


@torch.no_grad()
def test_rope_per_row_equals_rope_of_each_row():
    from mmrec.layers.attention import rope

    x = torch.randn(3, 2, 1, 8, dtype=torch.float64)
    starts = torch.tensor([0, 17, 4000])
    out = rope(x, starts, 10000.0)
    for b, s in enumerate(starts.tolist()):
        assert torch.equal(out[b : b + 1], rope(x[b : b + 1], s, 10000.0))
