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
