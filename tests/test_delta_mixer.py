"""short_term="delta": the gated delta rule in MM-Rec's short-term memory, held to the model's contracts."""

import csv

import pytest
import torch
import torch.nn.functional as F

import mmrec
from conftest import rel_err, tiny_train_config, write_corpus
from mmrec import MMRecConfig, MMRecLM
from mmrec.cli import main
from mmrec.config import ConfigError
from mmrec.models.checkpoint import save_checkpoint
from mmrec.tokenizer import ByteTokenizer

WRITES = {
    "plain": {},
    "selective": {"selective_write": True},
    "sparse": {"selective_write": True, "sparse_write": True},
}


def tiny_delta(kind: str, **kw) -> MMRecLM:
    """A tiny delta-rule model in float64 with input-dependent decays and write steps; with sparse writes
    about half the gates are off."""
    base = dict(vocab_size=256, d_model=32, n_layers=2, n_heads=4, chunk_size=8, mem_slots=4, summary_window=3)
    model = MMRecLM(MMRecConfig(**{**base, **WRITES[kind], **kw}, short_term="delta")).double().eval()
    with torch.no_grad():
        for block in model.layers:
            mixer = block.short_term
            mixer.beta.weight.normal_(0, 0.5)
            mixer.decay.weight.normal_(0, 0.5)
            if kind == "sparse":
                mixer.decay.bias[mixer.n_heads :].zero_()
    return model


# The decays, gates and write steps are rounded to float32 whatever the model's dtype (as for gla), and
# float64 pre-activations computed for a whole sequence or one token may round to neighbouring float32
# values: a float64 model therefore agrees to ~1e-9, not to float64's 1e-15.
TOL = 1e-7


def assert_states_close(a, b, tol: float) -> None:
    for name, t in b.tensors().items():
        assert rel_err(a.tensors()[name], t) <= tol or t.abs().max() == 0, name


@pytest.mark.parametrize("kind", list(WRITES))
def test_mixer_equals_a_loop_over_the_gated_delta_rule(kind):
    """The layer's chunked pass is S_t = g_t (I - b_t k_t^T k_t) S_{t-1} + b_t k_t^T v_t, o_t = q_t S_t, with unit
    q and k, q scaled by dh^-1/2 and b = sigmoid(W_b xc) (times min(gate, 1) with sparse writes): checked
    against a loop written out here."""
    model = tiny_delta(kind, n_layers=1, scan_chunk=5)
    mixer = model.layers[0].short_term
    H, dh, T = 4, 8, 19
    x = torch.randn(2, T, 32, dtype=torch.float64)
    S0 = torch.randn(2, H, dh, dh, dtype=torch.float64) * 0.1
    tail = torch.zeros(2, 3, 32, dtype=torch.float64)
    y, S, _ = mixer(x, S0, tail)
    xc = F.silu(mixer.conv(x, tail)[0])
    q, k, v = mixer.qkv(xc).view(2, T, 3, H, dh).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, dh]
    q, k = F.normalize(q, dim=-1) * dh**-0.5, F.normalize(k, dim=-1)
    z = mixer.decay(xc if kind != "plain" else x)
    beta = torch.sigmoid(mixer.beta(xc))
    if kind == "sparse":
        z, gate = z.split(H, dim=-1)
        assert 0.2 < (gate <= 0).double().mean() < 0.8  # both kinds of token are present
        log_g, beta = F.logsigmoid(z) * F.relu(gate), beta * F.relu(gate).clamp(max=1)
    else:
        log_g = F.logsigmoid(z)
    g, beta = log_g.exp().transpose(1, 2), beta.transpose(1, 2)  # [B, H, T]
    state, outs = S0.clone(), []
    eye = torch.eye(dh, dtype=torch.float64)
    for t in range(T):
        kt, bt = k[:, :, t, :, None], beta[:, :, t, None, None]
        state = g[:, :, t, None, None] * (eye - bt * kt @ kt.transpose(-1, -2)) @ state + bt * kt * v[:, :, t, None]
        outs.append(q[:, :, t, None] @ state)
    assert rel_err(S, state) <= 1e-6  # the decays are computed in float32 whatever the model's dtype
    o = torch.cat(outs, dim=2).transpose(1, 2)  # [B, T, H, dh]
    o = F.rms_norm(o, (dh,), eps=mixer.norm_eps).reshape(2, T, 32) * mixer.head_norm
    assert rel_err(y, mixer.out(o * torch.sigmoid(mixer.out_gate(x)))) <= 1e-6


@pytest.mark.parametrize("kind", list(WRITES))
def test_token_by_token_decoding_equals_full_pass(kind):
    model = tiny_delta(kind)
    ids = torch.randint(0, 256, (2, 37))  # prefill 11, then 26 steps: writes and FIFO fills happen in step mode
    full = model(ids)
    out = model(ids[:, :11])
    state, pieces = out.state, [out.logits]
    for t in range(11, 37):
        out = model(ids[:, t : t + 1], state=state)
        state = out.state
        pieces.append(out.logits)
    assert rel_err(torch.cat(pieces, 1), full.logits) <= TOL
    assert_states_close(state, full.state, TOL)


@pytest.mark.parametrize("kind", list(WRITES))
def test_streaming_splits_at_awkward_points_equal_the_full_pass(kind):
    model = tiny_delta(kind, scan_chunk=5)
    ids = torch.randint(0, 256, (2, 61))
    full = model(ids)
    state, pieces = None, []
    for a, b in ((0, 3), (3, 17), (17, 18), (18, 61)):
        out = model(ids[:, a:b], state=state)
        state = out.state
        pieces.append(out.logits)
    assert rel_err(torch.cat(pieces, 1), full.logits) <= TOL
    assert_states_close(state, full.state, TOL)


def test_sparse_write_gate_off_leaves_the_short_state_exactly_unchanged():
    model = tiny_delta("sparse", n_layers=1)
    mixer = model.layers[0].short_term
    H = mixer.n_heads
    with torch.no_grad():
        mixer.decay.weight[H:].zero_()
        mixer.decay.bias[H:].fill_(-0.5)  # every gate off
    S0 = torch.randn(2, H, 8, 8, dtype=torch.float64)
    tail = torch.zeros(2, 3, 32, dtype=torch.float64)
    for T in (1, 19, 300):  # the step path, then the chunked path with a padded last chunk
        x = torch.randn(2, T, 32, dtype=torch.float64)
        assert torch.equal(mixer(x, S0, tail)[1], S0)


def test_gradients_reach_beta_and_the_sparse_gate():
    model = tiny_delta("sparse").train()
    model(torch.randint(0, 256, (2, 29))).logits.square().mean().backward()
    for block in model.layers:
        mixer = block.short_term
        assert mixer.beta.weight.grad is not None and mixer.beta.weight.grad.abs().max() > 0
        assert mixer.beta.bias.grad.abs().max() > 0
        assert mixer.decay.weight.grad[mixer.n_heads :].abs().max() > 0


def test_beta_starts_at_one_half_and_gla_models_have_no_beta():
    model = MMRecLM(MMRecConfig(d_model=32, n_layers=1, n_heads=2, short_term="delta"))
    assert torch.equal(model.layers[0].short_term.beta.bias, torch.zeros(2))
    assert model.layers[0].short_term.beta.weight.std() > 0  # initialised like the other projections
    gla = MMRecLM(MMRecConfig(d_model=32, n_layers=1, n_heads=2))
    assert gla.layers[0].short_term.beta is None
    assert not any("beta" in name for name in gla.state_dict())


def test_save_load_round_trip_keeps_the_rule(tmp_path):
    model = tiny_delta("sparse").float()
    save_checkpoint(tmp_path / "run", model, ByteTokenizer(), kind="train", step=2, trained_seq_len=32)
    loaded = mmrec.load(tmp_path / "run")
    assert loaded.model_config.short_term == "delta" and loaded.model_config == model.config
    ids = torch.randint(0, 256, (2, 23))
    assert torch.equal(loaded.model(ids).logits, model(ids).logits)


def test_a_config_without_the_field_is_gla():
    data = MMRecConfig(d_model=32, n_heads=2).to_dict()
    del data["short_term"]
    assert MMRecConfig.from_dict(data).short_term == "gla"


def test_bad_rule_is_refused_naming_the_field(capsys):
    with pytest.raises(ConfigError, match="short_term"):
        MMRecConfig(short_term="deltanet")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--short-term" in text and "{gla,delta}" in text
    with pytest.raises(SystemExit) as done:
        main(["train", "--short-term", "deltanet"])
    assert done.value.code == 2
    assert "--short-term" in capsys.readouterr().err


def test_a_few_training_steps_lower_the_loss(tmp_path):
    from mmrec.train.trainer import Trainer

    words = "the king shall speak of love and war while the queen keeps her counsel in the hall".split()  # noqa: SIM905
    corpus = write_corpus(tmp_path / "corpus", 40, words, min_words=24, max_words=120, lines=True)
    config = tiny_train_config(
        corpus, tmp_path, short_term="delta", max_steps=8, lr=3e-3, warmup_steps=2, eval_every=8, checkpoint_every=8
    )
    assert config.model.short_term == "delta"
    Trainer(config).fit()
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        loss = [float(r["loss"]) for r in csv.DictReader(f)]
    assert len(loss) == 8 and all(torch.isfinite(torch.tensor(loss)))
    assert sum(loss[-2:]) / 2 < loss[0] - 0.3
    saved = mmrec.load(tmp_path / "run")
    assert saved.model_config.short_term == "delta"
