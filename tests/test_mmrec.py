"""MM-Rec model contracts: causality, exact streaming, constant state, stability, persistence."""

import math

import pytest
import torch
from safetensors.torch import load_model, save_model

import mmrec
from conftest import rel_err
from mmrec import MMRecConfig, MMRecLM, MMRecState, StateError


def tiny(**kw) -> MMRecLM:
    base = dict(vocab_size=256, d_model=32, n_layers=2, n_heads=4, chunk_size=8, mem_slots=4, summary_window=3)
    return MMRecLM(MMRecConfig(**{**base, **kw})).eval()


def test_public_api_of_the_design():
    cfg = mmrec.MMRecConfig(
        vocab_size=256, d_model=128, n_layers=2, n_heads=4, chunk_size=64, mem_slots=32, summary_window=8
    )
    model = mmrec.MMRecLM(cfg)
    ids = torch.randint(0, 256, (2, 100))
    out = model(ids)
    assert out.logits.shape == (2, 100, 256)
    out2 = model(torch.randint(0, 256, (2, 5)), state=out.state)
    assert out2.logits.shape == (2, 5, 256) and out2.state.position == 105
    assert isinstance(model.init_state(batch_size=2), MMRecState)
    gen = model.generate(ids[:, :10], max_new_tokens=32, temperature=0.0)
    assert gen.shape == (2, 42)


def test_causality_across_chunks_and_layers():
    model = tiny(n_layers=3, chunk_size=8).double()
    ids = torch.randint(0, 256, (2, 60))  # 7.5 chunks
    base = model(ids).logits
    for t in (0, 5, 7, 8, 9, 23, 24, 40, 59):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1 + torch.randint(0, 254, (2,))) % 256
        logits = model(changed).logits
        assert (logits[:, :t] - base[:, :t]).abs().max() <= 1e-6 if t else True
        assert (logits[:, t:] - base[:, t:]).abs().max() > 1e-6, "the change must reach later positions"


def test_memory_carries_information_across_chunks():
    """A token several chunks back changes later outputs through the memory path alone."""
    model = tiny(n_layers=1, chunk_size=8, conv_size=0).double()
    # Silence level 0 so only levels 1-3 can carry information between chunks.
    with torch.no_grad():
        model.blocks[0].short_term.out.weight.zero_()
    ids = torch.randint(0, 256, (1, 48))
    base = model(ids).logits
    changed = ids.clone()
    changed[0, 3] = (changed[0, 3] + 7) % 256
    diff = (model(changed).logits - base).abs().amax(-1)[0]
    assert diff[4:8].max() == 0, "inside its own chunk, memory must not reveal token 3"
    assert diff[8:].min() > 0, "every later chunk reads the written memory"


WRITES = {
    "plain": {},
    "selective": {"selective_write": True},
    "sparse": {"selective_write": True, "sparse_write": True},
}


def tiny_writes(kind: str, **kw) -> MMRecLM:
    """A tiny model whose decays depend on the input; with sparse writes about half the gates are off."""
    model = tiny(**WRITES[kind], **kw)
    if kind != "plain":
        with torch.no_grad():
            for block in model.layers:
                mixer = block.short_term
                mixer.decay.weight.normal_(0, 0.5)
                if kind == "sparse":
                    mixer.decay.bias[mixer.n_heads :].zero_()
    return model


@pytest.mark.parametrize("split", [1, 7, 8, 9, 16, 33, 63])
@pytest.mark.parametrize("writes", list(WRITES))
def test_streaming_split_equals_full_pass(split, writes):
    model = tiny_writes(writes)
    ids = torch.randint(0, 256, (2, 64))
    full = model(ids)
    a = model(ids[:, :split])
    b = model(ids[:, split:], state=a.state)
    assert rel_err(torch.cat([a.logits, b.logits], 1), full.logits) <= 1e-4
    for name, t in full.state.tensors().items():
        assert rel_err(b.state.tensors()[name], t) <= 1e-4 or t.abs().max() == 0, name


@pytest.mark.parametrize("writes", list(WRITES))
def test_token_by_token_decoding_equals_full_pass(writes):
    model = tiny_writes(writes)
    ids = torch.randint(0, 256, (2, 44))  # 5.5 chunks: writes and FIFO fills happen in step mode
    full = model(ids)
    state, steps = None, []
    for t in range(44):
        out = model(ids[:, t : t + 1], state=state)
        state = out.state
        steps.append(out.logits)
    assert rel_err(torch.cat(steps, 1), full.logits) <= 1e-4
    for name, t in full.state.tensors().items():
        assert rel_err(state.tensors()[name], t) <= 1e-4 or t.abs().max() == 0, name


def test_selective_write_scales_each_write_by_one_minus_the_decay():
    """selective_write is the recurrence S_t = g_t S_{t-1} + (1 - g_t) k_t^T v_t with g_t computed from the
    convolved features, checked against a loop."""
    torch.manual_seed(0)
    model = tiny(selective_write=True, n_layers=1).double()
    mixer = model.blocks[0].short_term
    with torch.no_grad():
        mixer.decay.weight.normal_(0, 0.5)  # input-dependent decays
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    S0 = torch.zeros(2, 4, 8, 8, dtype=torch.float64)
    tail = torch.zeros(2, 3, 32, dtype=torch.float64)
    y, S, _ = mixer(x, S0, tail)
    xc = torch.nn.functional.silu(mixer.conv(x, tail)[0])
    q, k, v = mixer.qkv(xc).view(2, 19, 3, 4, 8).permute(2, 0, 3, 1, 4)
    g = torch.sigmoid(mixer.decay(xc)).transpose(1, 2)  # [B, H, T]
    state = S0.clone()
    for t in range(19):
        gt = g[:, :, t, None, None]
        state = gt * state + (1 - gt) * k[:, :, t, :, None] * v[:, :, t, None, :]
    assert rel_err(S, state) <= 1e-6  # the decays are computed in float32 whatever the model's dtype
    plain = tiny(selective_write=False, n_layers=1).double()
    plain.load_state_dict(model.state_dict())
    assert rel_err(plain.blocks[0].short_term(x, S0, tail)[1], S) > 0.1  # the option changes the recurrence


def test_sparse_write_gate_scales_the_step_and_switches_tokens_off_exactly():
    """sparse_write: log g_t = relu(s_t) logsigmoid(z_t) and the write is (1 - g_t) k_t^T v_t, checked against a
    loop; a token whose gate s_t <= 0 leaves the state bit for bit as it was, at any length."""
    torch.manual_seed(0)
    model = tiny_writes("sparse", n_layers=1).double()
    mixer = model.blocks[0].short_term
    H = mixer.n_heads
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    S0 = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    tail = torch.zeros(2, 3, 32, dtype=torch.float64)
    _, S, _ = mixer(x, S0, tail)
    xc = torch.nn.functional.silu(mixer.conv(x, tail)[0])
    q, k, v = mixer.qkv(xc).view(2, 19, 3, 4, 8).permute(2, 0, 3, 1, 4)
    z, gate = mixer.decay(xc).split(H, dim=-1)
    assert 0.2 < (gate <= 0).double().mean() < 0.8  # both kinds of token are present
    g = (torch.sigmoid(z) ** torch.relu(gate)).transpose(1, 2)  # [B, H, T]
    state = S0.clone()
    for t in range(19):
        gt = g[:, :, t, None, None]
        state = gt * state + (1 - gt) * k[:, :, t, :, None] * v[:, :, t, None, :]
    assert rel_err(S, state) <= 1e-6
    with torch.no_grad():
        mixer.decay.weight[H:].zero_()
        mixer.decay.bias[H:].fill_(-0.5)  # every gate off
    for T in (1, 19, 300):
        xs = torch.randn(2, T, 32, dtype=torch.float64)
        assert torch.equal(mixer(xs, S0, torch.zeros(2, 3, 32, dtype=torch.float64))[1], S0)


def test_write_gate_mean_is_the_mean_relu_gate_of_the_last_training_forward():
    model = tiny_writes("sparse").train()
    inputs = []
    for block in model.layers:
        block.short_term.register_forward_hook(lambda m, args, out: inputs.append((m, args[0], args[2])))
    model(torch.randint(0, 256, (2, 20)))
    gates = []
    for mixer, x, tail in inputs:
        xc = torch.nn.functional.silu(mixer.conv(x, tail)[0])
        gates.append(torch.relu(mixer.decay(xc)[..., mixer.n_heads :]).mean())
    assert torch.allclose(model.write_gate_mean(), torch.stack(gates).mean())
    assert 0 < model.write_gate_mean().item() < 1
    with pytest.raises(RuntimeError, match="sparse_write"):
        tiny().train().write_gate_mean()
    model.eval()
    model(torch.randint(0, 256, (2, 20)))
    with pytest.raises(RuntimeError, match="training mode"):
        model.write_gate_mean()
    with pytest.raises(mmrec.ConfigError, match="sparse_write"):
        MMRecConfig(sparse_write=True)


def test_chunked_scan_size_is_only_a_speed_knob():
    torch.manual_seed(1)
    a = tiny(scan_chunk=8).double()
    b = tiny(scan_chunk=3).double()
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 256, (1, 50))
    assert rel_err(b(ids).logits, a(ids).logits) < 1e-12


def test_state_size_is_constant():
    model = tiny()
    with torch.no_grad():
        s100 = model(torch.randint(0, 256, (1, 100))).state
        s = None
        for _ in range(10):
            s = model(torch.randint(0, 256, (1, 2000)), state=s).state
    assert s.position == 20_000
    assert s100.nbytes() == s.nbytes() > 0


def test_every_layer_owns_its_memory_and_slots_differ():
    model = tiny(n_layers=2)
    st = model(torch.randint(0, 256, (1, 80))).state
    assert not torch.allclose(st.memory[0], st.memory[1])
    rows = st.memory[0, 0]  # [slots, d_mem]
    dist = torch.cdist(rows, rows) + torch.eye(rows.size(0)) * 1e9
    assert dist.min() > 1e-4, "memory slots must not collapse to identical rows"


def test_gradients_flow_through_memory_writes():
    model = tiny(n_layers=1, chunk_size=8).train()
    ids = torch.randint(0, 256, (2, 40))
    out = model(ids[:, :-1], targets=ids[:, 1:])
    out.loss.backward()
    mem = model.blocks[0].memory
    for name in ("write_queries", "gate_weight", "gate_bias", "sequence_decay", "memory_init"):
        grad = getattr(mem, name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_a_fresh_start_equals_an_explicit_initial_state():
    """state=None starts from the learned memory inside each block (where FSDP2 has gathered it);
    init_state() builds the same state outside; both give the same logits, state and gradients."""
    model = tiny(n_layers=2, chunk_size=8).train()
    ids = torch.randint(0, 256, (2, 21))  # ends mid-chunk: the memory slots stay at their start
    grads = []
    for state in (None, model.init_state(2)):
        model.zero_grad()
        out = model(ids[:, :-1], state=state, targets=ids[:, 1:])
        out.loss.backward()
        grads.append((out, [b.memory.memory_init.grad.clone() for b in model.layers]))
    (a, ga), (b, gb) = grads
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    for name, t in a.state.tensors().items():
        torch.testing.assert_close(t, b.state.tensors()[name], rtol=0, atol=0, msg=name)
    for x, y in zip(ga, gb, strict=True):
        assert x.abs().sum() > 0
        torch.testing.assert_close(x, y)


def test_empty_sequence_is_valid():
    model = tiny()
    st = model(torch.randint(0, 256, (2, 13))).state
    out = model(torch.zeros(2, 0, dtype=torch.long), state=st)
    assert out.logits.shape == (2, 0, 256)
    assert out.state.position == 13
    for name, t in st.tensors().items():
        assert torch.equal(out.state.tensors()[name], t), name


def test_long_stream_stays_finite_with_extreme_decays():
    """1,000,000 tokens through a tiny model with decays forced near 0 and near 1."""
    model = tiny(d_model=16, n_heads=2, n_layers=2, chunk_size=64, mem_slots=4, summary_window=2, conv_size=2)
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            sign = -1.0 if i == 0 else 1.0  # layer 0: gamma ~ 0; layer 1: gamma ~ 1 - 1e-9
            block.short_term.decay.bias.fill_(sign * 20.0)
            block.memory.gate_bias.fill_(sign * 20.0)
            block.memory.sequence_decay.fill_(-sign * 20.0)
    ids = torch.randint(0, 256, (1, 1 << 16))
    state = None
    with torch.no_grad():
        for _ in range(16):  # 16 x 65,536 = 1,048,576 tokens
            out = model(ids, state=state)
            state = out.state
            assert torch.isfinite(out.logits).all()
    assert state.position == 1 << 20
    for name, t in state.tensors().items():
        assert torch.isfinite(t).all(), name


def test_weights_save_load_reproduce_logits(tmp_path):
    model = tiny()
    save_model(model, str(tmp_path / "model.safetensors"))
    other = tiny()
    load_model(other, str(tmp_path / "model.safetensors"))
    ids = torch.randint(0, 256, (2, 30))
    assert torch.equal(model(ids).logits, other(ids).logits)


def test_state_save_load_reproduces_logits(tmp_path):
    model = tiny()
    ids = torch.randint(0, 256, (2, 30))
    st = model(ids[:, :19]).state
    st.save(tmp_path / "s.safetensors", config=model.config.to_dict())
    loaded = MMRecState.load(tmp_path / "s.safetensors", config=model.config.to_dict())
    assert loaded.position == 19
    assert torch.equal(model(ids[:, 19:], state=loaded).logits, model(ids[:, 19:], state=st).logits)


def test_state_file_from_another_config_is_refused(tmp_path):
    model, other = tiny(), tiny(d_model=64)
    model.init_state(1).save(tmp_path / "s.safetensors", config=model.config.to_dict())
    with pytest.raises(StateError, match="another config.*d_model"):
        MMRecState.load(tmp_path / "s.safetensors", config=other.config.to_dict())
    (tmp_path / "bad.safetensors").write_bytes(b"not a state")
    with pytest.raises(StateError, match="bad.safetensors is damaged"):
        MMRecState.load(tmp_path / "bad.safetensors")
    with pytest.raises(StateError, match="no state file"):
        MMRecState.load(tmp_path / "missing.safetensors")


def test_bad_inputs_raise_clear_errors():
    model = tiny()
    with pytest.raises(ValueError, match="token id 256 is out of range"):
        model(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"shape \[batch, time\]"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([[1, 2, 3]])
    with pytest.raises(StateError, match="another config"):
        model(torch.zeros(1, 3, dtype=torch.long), state=tiny(d_model=64).init_state(1))
    with pytest.raises(StateError, match="batch size 2"):
        model(torch.zeros(2, 3, dtype=torch.long), state=model.init_state(1))
    with pytest.raises(StateError, match="MMRecState"):
        model(torch.zeros(1, 3, dtype=torch.long), state={"short": None})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(d_model=30, n_heads=4), "d_model"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(n_layers=-1), "n_layers"),
        (dict(mem_slots=0), "mem_slots"),
        (dict(d_mem=30, mem_heads=4), "d_mem"),
        (dict(decay_min=0.999, decay_max=0.9), "decay_min"),
        (dict(conv_size=-1), "conv_size"),
        (dict(vocab_size=2.5), "vocab_size"),
    ],
)
def test_invalid_configs_name_the_field(kwargs, field):
    with pytest.raises(mmrec.ConfigError, match=field):
        MMRecConfig(**kwargs)


def test_config_round_trips_through_json(tmp_path):
    cfg = MMRecConfig(d_model=64, n_heads=2)
    cfg.save(tmp_path / "c.json")
    assert MMRecConfig.load(tmp_path / "c.json") == cfg
    with pytest.raises(mmrec.ConfigError, match="unknown field"):
        MMRecConfig.from_dict({"d_model": 64, "colour": "red"})


def test_default_model_is_about_five_million_parameters():
    n = MMRecLM(MMRecConfig()).num_parameters()
    assert 4.5e6 < n < 5.5e6


def test_initial_decays_span_the_configured_range():
    model = MMRecLM(MMRecConfig(n_heads=4, decay_min=0.9, decay_max=0.999))
    mixer = model.blocks[0].short_term
    gamma = torch.exp(torch.nn.functional.logsigmoid(mixer.decay.bias) / mixer.tau)
    assert math.isclose(gamma.min().item(), 0.9, rel_tol=1e-5)
    assert math.isclose(gamma.max().item(), 0.999, rel_tol=1e-5)
