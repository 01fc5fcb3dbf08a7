"""MMRecConfig.long_term: the associative memory wired into MM-Rec (assoc: instead of the slots; both: beside
them), held to the model's contracts; slots, the default, leaves the model as it was."""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil

import pytest
import torch

import mmrec
from conftest import write_corpus
from mmrec import MMRecConfig, MMRecLM
from mmrec.cli import main
from mmrec.config import ConfigError, TransformerConfig
from mmrec.models.state import MMRecState, StateError, config_differences

ASSOC = ["assoc", "both"]
BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, chunk_size=8, mem_slots=4, summary_window=2)
ASSOC_FIELDS = ["assoc_memory", "assoc_keys", "assoc_values", "assoc_log_g", "assoc_beta"]
SLOT_FIELDS = ["memory", "summaries", "sequence", "pending"]
# float64: the associative memory's reads, decays and write steps are all computed in float64, and the
# short-term decays (float32 by design) do not depend on the input at init, so every path agrees to ~1e-15.
ATOL = 1e-10


def tiny(long_term: str, **kw) -> MMRecLM:
    """A tiny float64 model whose associative memory is away from its init: a non-zero output projection,
    decays and write steps that depend on the token."""
    model = MMRecLM(MMRecConfig(**{**BASE, **kw}, long_term=long_term)).double().eval()
    with torch.no_grad():
        for block in model.layers:
            if block.assoc is not None:
                block.assoc.out.weight.normal_(0, 0.3)
                block.assoc.beta.weight.normal_(0, 0.5)
                block.assoc.decay.weight.normal_(0, 0.5)
    return model


def assert_states_close(a: MMRecState, b: MMRecState, atol: float = ATOL) -> None:
    assert a.position == b.position
    assert set(a.tensors()) == set(b.tensors())
    for name, t in a.tensors().items():
        torch.testing.assert_close(t, b.tensors()[name], atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("long_term", ASSOC)
@torch.no_grad()
def test_full_pass_equals_pieces_and_token_by_token(long_term):
    model = tiny(long_term)
    ids = torch.randint(0, 64, (2, 45))  # 5 chunks and 5 tokens
    full = model(ids)
    assert set(full.state.tensors()) == {"short", "conv"} | set(ASSOC_FIELDS) | (
        set(SLOT_FIELDS) if long_term == "both" else set()
    )
    # Pieces of 1, 6, 9, 1, 13 and 15 tokens: starting and ending inside chunks, on their edges, across several.
    state, logits = None, []
    for a, b in [(0, 1), (1, 7), (7, 16), (16, 17), (17, 30), (30, 45)]:
        out = model(ids[:, a:b], state=state)
        state = out.state
        logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, 1), full.logits, atol=ATOL, rtol=0)
    assert_states_close(state, full.state)
    # One token at a time from a fresh start: 5 chunk writes happen in the decoding step.
    state, logits = None, []
    for t in range(ids.size(1)):
        out = model(ids[:, t : t + 1], state=state)
        state = out.state
        logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, 1), full.logits, atol=ATOL, rtol=0)
    assert_states_close(state, full.state)
    # The memory is in use: it changed, and a perturbed memory changes the next logits.
    assert full.state.assoc_memory.abs().max() > 0
    poked = dataclasses.replace(full.state, assoc_memory=full.state.assoc_memory + 0.1)
    assert not torch.allclose(model(ids[:, :3], state=poked).logits, model(ids[:, :3], state=full.state).logits)


@pytest.mark.parametrize("long_term", ASSOC)
@torch.no_grad()
def test_streams_at_different_positions_decode_together_as_each_alone(long_term):
    model = tiny(long_term)
    # Position 15: the next token completes its chunk; 8: a chunk just written; 5: inside the first chunk.
    lengths = (5, 8, 15)
    prompts = [torch.randint(0, 64, (1, n)) for n in lengths]
    states = [model(p).state for p in prompts]
    steps = torch.randint(0, 64, (3, 12))  # every stream completes a chunk, at a different step
    batch = MMRecState.cat(states)
    assert batch.position == lengths
    alone = list(states)
    for t in range(steps.size(1)):
        out = model(steps[:, t : t + 1], state=batch)
        batch = out.state
        for b in range(3):
            one = model(steps[b : b + 1, t : t + 1], state=alone[b])
            alone[b] = one.state
            torch.testing.assert_close(out.logits[b : b + 1], one.logits, atol=ATOL, rtol=0)
    for b, part in enumerate(batch.split()):
        assert_states_close(part, alone[b])


@pytest.mark.parametrize("long_term", ASSOC)
@torch.no_grad()
def test_state_save_load_is_exact(long_term, tmp_path):
    model = tiny(long_term)
    ids = torch.randint(0, 64, (2, 30))
    state = model(ids[:, :19]).state
    state.save(tmp_path / "s.safetensors", config=model.config.to_dict())
    loaded = MMRecState.load(tmp_path / "s.safetensors", config=model.config.to_dict())
    assert loaded.position == 19 and loaded.long_term == long_term
    assert set(loaded.tensors()) == set(state.tensors())
    for name, t in state.tensors().items():
        assert torch.equal(loaded.tensors()[name], t), name
    assert torch.equal(model(ids[:, 19:], state=loaded).logits, model(ids[:, 19:], state=state).logits)
    # Streams at different positions keep them.
    mixed = MMRecState.cat([model(ids[:1, :3]).state, model(ids[1:, :11]).state])
    mixed.save(tmp_path / "m.safetensors", config=model.config.to_dict())
    back = MMRecState.load(tmp_path / "m.safetensors", config=model.config.to_dict())
    assert back.position == (3, 11)
    assert all(torch.equal(back.tensors()[n], t) for n, t in mixed.tensors().items())


@pytest.mark.parametrize(
    ("made_by", "used_by"), [("slots", "assoc"), ("assoc", "slots"), ("assoc", "both"), ("both", "assoc")]
)
@torch.no_grad()
def test_a_state_of_another_long_term_memory_is_refused(made_by, used_by, tmp_path):
    maker, user = tiny(made_by), tiny(used_by)
    state = maker(torch.randint(0, 64, (1, 10))).state
    with pytest.raises(StateError, match=f"'{made_by}' long-term memory.*long_term='{used_by}'"):
        user(torch.randint(0, 64, (1, 3)), state=state)
    state.save(tmp_path / "s.safetensors", config=maker.config.to_dict())
    with pytest.raises(StateError, match="differs in: long_term"):
        MMRecState.load(tmp_path / "s.safetensors", config=user.config.to_dict())
    with pytest.raises(StateError, match="different long-term memories"):
        MMRecState.cat([state, user.init_state(1)])


def test_a_state_needs_whole_memories():
    model = tiny("both")
    tensors = model.init_state(1).tensors()
    with pytest.raises(StateError, match="needs assoc_beta"):
        MMRecState(position=0, **{n: t for n, t in tensors.items() if n != "assoc_beta"})
    with pytest.raises(StateError, match="needs the tensors of a long-term memory"):
        MMRecState(position=0, short=tensors["short"], conv=tensors["conv"])


@pytest.mark.parametrize("long_term", ASSOC)
def test_fresh_state_and_init(long_term):
    model = tiny(long_term)
    ids = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids, state=model.init_state(2)).logits)
        assert torch.equal(model(ids[:, :1]).logits, model(ids[:, :1], state=model.init_state(2)).logits)
    state = model.init_state(3)
    assert all(state.tensors()[n].abs().max() == 0 for n in ASSOC_FIELDS)
    assert state.assoc_memory.dtype == torch.float64
    fresh = MMRecLM(MMRecConfig(**BASE, long_term=long_term))
    for block in fresh.layers:  # the residual term starts at zero, with decays spread over heads
        assert block.assoc is not None and block.assoc.out.weight.abs().max() == 0
        assert block.assoc.decay.bias[0] < block.assoc.decay.bias[-1]


@torch.no_grad()
def test_both_at_init_is_the_slot_model_with_the_same_weights():
    """The associative memory's output projection starts at zero: a new model with both memories computes
    what the slot model with its other weights computes."""
    both = MMRecLM(MMRecConfig(**BASE, long_term="both")).double().eval()
    slots = MMRecLM(MMRecConfig(**BASE)).double().eval()
    missing, unexpected = both.load_state_dict(slots.state_dict(), strict=False)
    assert not unexpected and missing and all(".assoc." in k or ".norm_assoc." in k for k in missing)
    ids = torch.randint(0, 64, (2, 21))
    assert torch.equal(both(ids).logits, slots(ids).logits)


def test_gradients_reach_the_associative_memory():
    model = MMRecLM(MMRecConfig(**BASE, long_term="assoc"))
    ids = torch.randint(0, 64, (2, 33))
    out = model(ids[:, :-1], targets=ids[:, 1:])
    out.loss.backward()
    for block in model.layers:
        assert block.memory is None and block.norm2 is None
        assert block.assoc is not None and block.assoc.out.weight.grad.abs().max() > 0  # the zero init learns
    # with the output projection away from zero, every parameter of the memory gets a gradient
    with torch.no_grad():
        for block in model.layers:
            block.assoc.out.weight.normal_(0, 0.1)
    model.zero_grad()
    model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


# What the committed code computed before long_term existed (tiny model below, seed 1234, float64).
BEFORE = {
    "logits_sum": 6.708422195034508,
    "logits_abs_sum": 260.8061380666198,
    "last": [-0.034148621260022716, 0.46153723525623475, 0.026156305694268602, 0.19635080828899795],
    "parameters": 50668,
    "state_dict_entries": 48,
    "state_sums": {
        "short": -0.3624688384638216,
        "conv": 4.592331767181925,
        "memory": -0.05381933534692751,
        "summaries": -0.2975136553650485,
        "sequence": -0.021888200033197285,
        "pending": 9.038517985461304,
    },
}


@torch.no_grad()
def test_slots_default_leaves_the_model_as_it_was():
    def build(**kw) -> MMRecLM:
        torch.manual_seed(1234)
        return MMRecLM(MMRecConfig(**BASE, **kw)).double()

    model = build()
    assert model.config.long_term == "slots"
    ids = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(5))
    out = model(ids)
    assert out.logits.sum().item() == pytest.approx(BEFORE["logits_sum"], rel=1e-10)
    assert out.logits.abs().sum().item() == pytest.approx(BEFORE["logits_abs_sum"], rel=1e-10)
    assert out.logits[1, -1, :4].tolist() == pytest.approx(BEFORE["last"], rel=1e-9, abs=1e-12)
    assert model.num_parameters() == BEFORE["parameters"]
    assert len(model.state_dict()) == BEFORE["state_dict_entries"]
    assert not any("assoc" in k for k in model.state_dict())
    sums = {k: v.sum().item() for k, v in out.state.tensors().items()}
    assert list(sums) == list(BEFORE["state_sums"])
    for name, value in BEFORE["state_sums"].items():
        assert sums[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    explicit = build(long_term="slots")
    assert list(explicit.state_dict()) == list(model.state_dict())
    assert all(
        torch.equal(a, b) for a, b in zip(explicit.state_dict().values(), model.state_dict().values(), strict=True)
    )
    assert torch.equal(explicit(ids).logits, out.logits)
    assert out.state.long_term == "slots" and out.state.batch_key == "mmrec"


def test_a_state_saved_before_a_config_field_existed_loads(tmp_path):
    """A state whose stored config lacks a field (written by an mmrec before the field was added) counts it
    at its default."""
    model = MMRecLM(MMRecConfig(**BASE))
    state = model.init_state(1)
    old = model.config.to_dict()
    del old["short_term"], old["long_term"]  # as an mmrec before both fields wrote it
    state.save(tmp_path / "old.safetensors", config=old)
    loaded = MMRecState.load(tmp_path / "old.safetensors", config=model.config.to_dict())
    assert loaded.position == 0 and set(loaded.tensors()) == {"short", "conv", *SLOT_FIELDS}
    # A field the model sets away from its default still differs.
    delta = MMRecLM(MMRecConfig(**BASE, short_term="delta"))
    with pytest.raises(StateError, match=r"differs in: short_term\)"):
        MMRecState.load(tmp_path / "old.safetensors", config=delta.config.to_dict())
    assoc = MMRecLM(MMRecConfig(**BASE, long_term="assoc"))
    with pytest.raises(StateError, match=r"differs in: long_term\)"):
        MMRecState.load(tmp_path / "old.safetensors", config=assoc.config.to_dict())
    # Derived defaults resolve as the config resolves them (d_mem from d_model).
    no_dmem = {k: v for k, v in old.items() if k != "d_mem"}
    assert config_differences(no_dmem, model.config.to_dict()) == []
    assert config_differences(no_dmem, MMRecLM(MMRecConfig(**BASE, d_mem=64)).config.to_dict()) == ["d_mem"]
    # A stored field the model does not know, or a changed value, still differs.
    assert config_differences({**old, "newer": 1}, model.config.to_dict()) == ["newer"]
    assert config_differences({**old, "d_model": 64}, model.config.to_dict()) == ["d_model"]
    tf = TransformerConfig(d_model=32, n_heads=2).to_dict()
    assert config_differences({k: v for k, v in tf.items() if k != "rope_theta"}, tf) == []


def test_config_field_and_flag(capsys):
    with pytest.raises(ConfigError, match="long_term"):
        MMRecConfig(long_term="titans")
    data = MMRecConfig(d_model=32, n_heads=2, long_term="both").to_dict()
    assert MMRecConfig.from_dict(data).long_term == "both"
    del data["long_term"]
    assert MMRecConfig.from_dict(data).long_term == "slots"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--long-term" in text and "{slots,assoc,both}" in text
    with pytest.raises(SystemExit) as done:
        main(["train", "--long-term", "titans"])
    assert done.value.code == 2


# Bytes per stream and layer at the default size (d 256, 4 heads of 64, chunk 64, 32 slots of 256, FIFO 8),
# float32: short 4 x 64 x 64 and conv 3 x 256; slots 32 x 256 + 8 x 256 + 256 + 64 x 256; assoc (its
# layer's documented size) 4 x (64 x 64 + 64 x (64 + 64 + 2)).
SHORT, SLOTS, ASSOC_BYTES = 4 * (4 * 64 * 64 + 3 * 256), 4 * (32 * 256 + 8 * 256 + 256 + 64 * 256), 198_656


@pytest.mark.parametrize(
    ("long_term", "per_layer"),
    [("slots", SHORT + SLOTS), ("assoc", SHORT + ASSOC_BYTES), ("both", SHORT + SLOTS + ASSOC_BYTES)],
)
def test_state_size_per_stream(long_term, per_layer):
    model = MMRecLM(MMRecConfig(long_term=long_term))  # 4 layers
    assert model.init_state(1).nbytes() == 4 * per_layer
    assert model.init_state(3).nbytes() == 3 * 4 * per_layer
    if long_term != "slots":
        assert model.layers[0].assoc.state_bytes() == ASSOC_BYTES


def test_training_through_the_command_line(tmp_path):
    words = "the king shall speak of love and war while the queen keeps her counsel in the hall".split()  # noqa: SIM905
    corpus = write_corpus(tmp_path / "corpus", 40, words, min_words=24, max_words=120, lines=True)
    run = tmp_path / "run"
    argv = ["train", "--data", str(corpus), "--data-cache", str(tmp_path / "cache"), "--out", str(run)]
    argv += ["--long-term", "assoc", "--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--chunk-size", "8"]
    argv += ["--seq-len", "32", "--batch-size", "4", "--eval-tokens", "512", "--sample-tokens", "0"]
    argv += ["--no-track-stages", "--log-every", "1", "--max-steps", "8", "--eval-every", "8"]
    argv += ["--checkpoint-every", "8", "--lr", "3e-3", "--warmup-steps", "2", "--device", "cpu"]
    assert main(argv) == 0
    with open(run / "metrics.csv", newline="") as f:
        loss = [float(r["loss"]) for r in csv.DictReader(f)]
    assert len(loss) == 8 and all(torch.isfinite(torch.tensor(loss)))
    assert sum(loss[-2:]) / 2 < loss[0] - 0.3
    saved = mmrec.load(run)
    assert saved.model_config.long_term == "assoc"
    assert all(b.assoc is not None and b.assoc.out.weight.abs().max() > 0 for b in saved.model.layers)


CXX = os.environ.get("CXX", "g++")


@pytest.mark.skipif(
    shutil.which(CXX) is None and shutil.which("c++") is None,
    reason=f"torch.compile's CPU backend needs a C++ compiler ({CXX} or c++ on PATH)",
)
@torch.no_grad()
def test_compiled_decoding_with_both_memories_equals_eager():
    """The associative reads and pending rows are in the compiled graph (no branch on positions); the
    short-term decay gate is float32 by design and the compiler's float32 ops may differ in the last bits."""
    eager = tiny("both", chunk_size=4)
    compiled = tiny("both", chunk_size=4)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_decoding(warm_up=())  # one graph, compiled at the first step: each costs tens of seconds
    tol = {"atol": 1e-7, "rtol": 1e-5}
    ids = torch.randint(0, 64, (2, 14))
    se = sc = MMRecState.cat([eager(ids[:1, :3]).state, eager(ids[1:, :6]).state])
    counters = torch._dynamo.utils.counters
    for t in range(6, 14):  # two streams at different positions, each completing a chunk at its own step
        oe, oc = eager(ids[:, t : t + 1], state=se), compiled(ids[:, t : t + 1], state=sc)
        se, sc = oe.state, oc.state
        torch.testing.assert_close(oc.logits, oe.logits, **tol)
        if t == 6:
            graphs = counters["stats"].get("unique_graphs", 0)
    assert graphs >= 1 and counters["stats"].get("unique_graphs", 0) == graphs  # no recompile as positions move
    for name, t in se.tensors().items():
        torch.testing.assert_close(sc.tensors()[name], t, **tol, msg=name)
