"""Learning stages: reference entropies against known answers, stage detection, probes, and the tracker end to end."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest
import torch

from mmrec import MMRecConfig, MMRecLM
from mmrec.config import TransformerConfig
from mmrec.data.prepare import prepare_dataset
from mmrec.data.shards import load_dataset
from mmrec.data.sources import parse_source
from mmrec.models import TransformerLM
from mmrec.models.state import TensorState
from mmrec.stages import (
    KneserNey,
    StageThresholds,
    StageTracker,
    build_induction,
    build_kv,
    convert_band,
    detect_stages,
    run_probe,
    track_run,
    unigram_entropy,
)
from mmrec.stages import tracker as tracker_mod
from mmrec.stages.probes import build_knowledge_probes, window_hashes
from mmrec.stages.windows import warmup_slots
from mmrec.tokenizer import ByteTokenizer

WORD_TEXT = (
    "the king shall speak of love and war while queen keeps her counsel in hall for every word that falls from "
    "noble lips is weighed by those who listen river stone quiet bright winter summer garden letter window "
    "silver copper morning evening journey harbor"
)
WORDS = WORD_TEXT.split()
REFRAINS = (
    "Long live the King of the North, the One True Ruler!",
    "Quartermaster Jex: 42 barrels, 7 crates (QA-9) @ Dock Z.",
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and much faster than on two when other jobs share the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Entropy estimators ------------------------------------------------------------------------------------------------
def test_unigram_entropy_of_an_iid_source_is_its_entropy():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(50))
    entropy = float(-(p * np.log(p)).sum())
    train, held_out = rng.choice(50, size=200_000, p=p), rng.choice(50, size=200_000, p=p)
    # The mean of -log p over 200K held-out draws has a standard error of std(-log p) / sqrt(n) ~ 0.002 nats, and
    # add-one smoothing over 50 ids costs about 49 / (2 * 200K) ~ 1e-4: 0.02 nats is ten standard errors.
    assert unigram_entropy(train, held_out, 50) == pytest.approx(entropy, abs=0.02)
    # The same sample for both approaches it from below (overfitting), still within the tolerance.
    assert unigram_entropy(train, train, 50) == pytest.approx(entropy, abs=0.02)


def _markov_docs(rng: np.random.Generator, table: np.ndarray, n_docs: int, length: int) -> np.ndarray:
    V = table.shape[0]
    docs = np.zeros((n_docs, length), dtype=np.int64)
    docs[:, :2] = rng.integers(0, V, size=(n_docs, 2))
    for i in range(2, length):
        docs[:, i] = table[docs[:, i - 2], docs[:, i - 1]]
    return docs.reshape(-1)


def test_kneser_ney_learns_a_deterministic_second_order_source():
    rng = np.random.default_rng(1)
    V, length = 16, 500
    table = rng.integers(0, V, size=(V, V))  # next token = table[previous two]
    train, test = _markov_docs(rng, table, 400, length), _markov_docs(rng, table, 50, length)
    starts_train, starts_test = np.arange(400) * length, np.arange(50) * length
    trigram = KneserNey(V, order=3).fit(train, starts_train)
    # Only the two random tokens opening each document cost anything: about 2 * ln 16 / 500 = 0.011 nats/token.
    assert trigram.cross_entropy(test, starts_test) < 0.05
    assert unigram_entropy(train, test, V) > 1.5
    bigram = KneserNey(V, order=2).fit(train, starts_train)
    assert bigram.cross_entropy(test, starts_test) > 0.3


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_kneser_ney_probabilities_sum_to_one(order):
    rng = np.random.default_rng(order)
    V = 7
    kn = KneserNey(V, order=order, eot_id=6).fit(rng.integers(0, 6, size=3000), np.array([0, 10, 1000, 2500]))
    contexts = [[], [1], [6], [2, 3], [0, 0, 0], [5, 6, 1], [4] * order]
    for ctx in contexts:
        dist = kn.distribution(ctx)
        assert dist.shape == (V,)
        assert dist.sum() == pytest.approx(1.0, abs=1e-12)
        assert (dist > 0).all(), "back-off to the uniform floor keeps every token possible"
    # A context made of document-start pads is the start of a document.
    pads = np.full((V, order - 1), V)
    assert kn.prob(pads, np.arange(V)).sum() == pytest.approx(1.0, abs=1e-12)


def _reference_kn(docs: list[list[int]], V: int, N: int, eot: int):
    """Interpolated modified Kneser-Ney written out with dicts, one n-gram at a time: the spec the fast one meets."""
    from collections import Counter, defaultdict

    pad = V
    grams: dict[int, Counter] = {n: Counter() for n in range(1, N + 1)}
    for doc in docs:
        seq = [pad] * (N - 1) + doc + [eot]
        for i in range(N - 1, len(seq)):
            grams[N][tuple(seq[i - N + 1 : i + 1])] += 1
    for n in range(N - 1, 0, -1):
        # Continuation counts: distinct left neighbours; a pad on the left passes its count on.
        for g, c in grams[n + 1].items():
            grams[n][g[1:]] += c if g[0] == pad else 1

    def discounts(counts):
        n1, n2, n3, n4 = (sum(1 for c in counts if c == k) for k in (1, 2, 3, 4))
        y = n1 / (n1 + 2 * n2) if n1 and n2 else 0.5
        d1 = 1 - 2 * y * n2 / n1 if n1 else 0.5
        d2 = 2 - 3 * y * n3 / n2 if n2 else 1.0
        d3 = 3 - 4 * y * n4 / n3 if n3 else 1.5
        raw = (d1, d2, d3)
        return [0.0] + [min(max(d, 0.01), k) for k, d in zip((1, 2, 3), raw, strict=True)]

    disc = {n: discounts(list(grams[n].values())) for n in grams}
    ctx_total: dict[int, dict] = {n: defaultdict(int) for n in grams}
    ctx_disc: dict[int, dict] = {n: defaultdict(float) for n in grams}
    for n, table in grams.items():
        for g, c in table.items():
            ctx_total[n][g[:-1]] += c
            ctx_disc[n][g[:-1]] += disc[n][min(c, 3)]

    def prob(context: tuple, w: int) -> float:
        p = 1.0 / V
        for n in range(1, len(context) + 2):
            h = context[len(context) - n + 1 :] if n > 1 else ()
            total = ctx_total[n].get(h, 0)
            if total:
                c = grams[n].get(h + (w,), 0)
                p = (c - disc[n][min(c, 3)]) / total + ctx_disc[n][h] / total * p
        return p

    return prob


def test_kneser_ney_matches_a_reference_implementation():
    rng = np.random.default_rng(7)
    V, N, eot = 6, 3, 5
    lengths = [30, 1, 0, 200, 57]
    docs = [(rng.integers(0, 5, size=k) ** 2 % 5).tolist() for k in lengths]
    kn = KneserNey(V, order=N, eot_id=eot).fit(np.concatenate(docs), np.cumsum([0] + lengths[:-1]))
    reference = _reference_kn(docs, V, N, eot)
    contexts = [(V, V), (V, 0), (1, 4), (4, 4), (2, 2), (0, 1)]
    for ctx in contexts:
        got = kn.prob(np.array([ctx] * V), np.arange(V))
        want = [reference(ctx, w) for w in range(V)]
        assert got == pytest.approx(want, rel=1e-12)


def test_kneser_ney_argmax_is_exact():
    rng = np.random.default_rng(3)
    V = 9
    kn = KneserNey(V, order=3, eot_id=8).fit(rng.integers(0, 8, size=4000) ** 2 % 8)
    ctx = rng.integers(0, V + 1, size=(40, 2))
    max_order = rng.integers(1, 4, size=40)
    best = kn.argmax(ctx, max_order)
    for i in range(40):
        p = kn.prob(np.repeat(ctx[i : i + 1], V, axis=0), np.arange(V), np.full(V, max_order[i]))
        assert p[best[i]] == p.max()


def test_kneser_ney_contexts_stay_inside_documents():
    rng = np.random.default_rng(4)
    V = 6
    kn = KneserNey(V, order=3, eot_id=5).fit(rng.integers(0, 5, size=2000))
    a, b = rng.integers(0, 5, size=40), rng.integers(0, 5, size=30)
    joined = kn.losses(np.concatenate([a, b]), np.array([0, 40]))
    assert np.allclose(joined, np.concatenate([kn.losses(a), kn.losses(b)]))
    # Each document's predictions are its tokens then its end-of-text id.
    assert joined.size == a.size + b.size + 2


def test_window_losses_cut_history_at_the_window_start_and_after_end_of_text():
    rng = np.random.default_rng(5)
    V, eot = 6, 5
    kn = KneserNey(V, order=3, eot_id=eot).fit(rng.integers(0, 5, size=3000), np.array([0, 700, 1900]))
    window = np.array([[1, 2, 3, eot, 4, 0, 2]])
    got = kn.window_losses(window)[0]
    pad = V
    # The first targets see only 1 and 2 ids of history; after the end-of-text id a new document starts (pads).
    expected = [
        kn.distribution([1])[2],
        kn.distribution([1, 2])[3],
        kn.distribution([2, 3])[eot],
        kn.prob(np.array([[pad, pad]]), np.array([4]))[0],
        kn.prob(np.array([[pad, 4]]), np.array([0]))[0],
        kn.distribution([4, 0])[2],
    ]
    assert got == pytest.approx(-np.log(expected))
    assert kn.position_losses(np.repeat(window, 3, axis=0)) == pytest.approx(got)


def test_kneser_ney_rejects_bad_input():
    with pytest.raises(ValueError, match="beyond 64 bits"):
        KneserNey(100_000, order=4)
    kn = KneserNey(4, order=3)
    with pytest.raises(RuntimeError, match="not fitted"):
        kn.cross_entropy(np.array([1, 2]))
    with pytest.raises(ValueError, match="outside"):
        kn.fit(np.array([0, 4]))


def test_convert_band_states_the_conversion():
    out = convert_band((4.0, 6.0), bytes_per_token=1.0, seed_bytes_per_token=4.0)
    assert out["bits_per_byte"] == pytest.approx([4 / (4 * math.log(2)), 6 / (4 * math.log(2))])
    # A byte tokenizer's nats per token are bits per byte times ln 2.
    assert out["nats_per_token"] == pytest.approx([1.0, 1.5])
    assert "4 bytes/token" in out["conversion"] and "bits/byte" in out["conversion"]


# Stage detection ---------------------------------------------------------------------------------------------------
def _entry(step: int, **metrics: float) -> dict:
    return {"step": step, "tokens": step * 1000, **metrics}


def _full(step: int, *, uni=0.0, ng=0.0, excess=0.0, know=0.0, ind=0.0, kv=0.0) -> dict:
    """An evaluation whose criteria hold exactly where the arguments are large enough."""
    return _entry(
        step,
        unigram_gap=uni,
        unigram_gap_se=0.01,
        ngram_gap=ng,
        ngram_gap_se=0.01,
        context_excess=excess,
        context_excess_se=0.01,
        knowledge_acc=know,
        knowledge_acc_ngram=0.2,
        knowledge_control_acc=0.1,
        induction_acc=ind,
        induction_acc_ngram=0.05,
        kv_first_acc=kv,
        kv_first_acc_ngram=0.1,
    )


def test_detect_stages_in_order_with_first_step_and_tokens():
    history = [
        _full(10),
        _full(20, uni=0.5),
        _full(30, uni=1.0, ng=0.2),
        _full(40, uni=1.0, ng=0.3, excess=0.2, ind=0.9, kv=0.8),
        _full(50, uni=1.0, ng=0.3, excess=0.2, ind=0.9, kv=0.8, know=0.9),
    ]
    out = detect_stages(history)
    by_id = {s["id"]: s for s in out["stages"]}
    assert [by_id[i]["step"] for i in range(1, 6)] == [20, 30, 40, 50, 40]
    assert by_id[1]["tokens"] == 20_000 and by_id[2]["tokens"] == 30_000
    assert out["order"] == [1, 2, 3, 5, 4]
    assert out["out_of_order"] == [5] and not out["in_order"]
    assert by_id[5]["evidence"]["induction_acc"] == 0.9
    assert by_id[1]["held_at_last"] and by_id[1]["held_fraction_since"] == 1.0
    assert all(s["definition"] and s["criterion"] for s in out["stages"])


def test_detect_stages_not_reached_and_unmeasurable():
    # Gaps below 2 standard errors, accuracies below the floor: nothing is reached.
    history = [_full(s, uni=0.015, ng=-1.0, excess=0.04, know=0.45, ind=0.4, kv=0.9) for s in (1, 2, 3)]
    history[1]["unigram_gap_se"] = 0.001  # now 0.015 > max(0.01, 2 * 0.001): reached at step 2, then lost again
    out = detect_stages(history)
    by_id = {s["id"]: s for s in out["stages"]}
    assert out["order"] == [1] and out["in_order"]
    assert by_id[1]["step"] == 2 and by_id[1]["held_at_last"] is False
    assert by_id[1]["held_fraction_since"] == pytest.approx(0.5)
    assert not any(by_id[i]["reached"] for i in (2, 3, 4, 5))
    # Without metrics a stage is unmeasurable, never reached.
    empty = detect_stages([_entry(1), _entry(2)])
    assert empty["order"] == [] and not any(s["measurable"] for s in empty["stages"])


def test_detect_stages_out_of_order_and_val_bpb_fallback():
    # Stages 1-2 from val_bpb against the references when the paired window metrics are missing.
    history = [
        _entry(1, val_bpb=5.0, unigram_bpb=4.5, ngram_bpb=2.0, induction_acc=0.95, kv_first_acc=0.9),
        _entry(2, val_bpb=4.0, unigram_bpb=4.5, ngram_bpb=2.0, induction_acc=0.95, kv_first_acc=0.9),
        _entry(3, val_bpb=1.9, unigram_bpb=4.5, ngram_bpb=2.0, induction_acc=0.95, kv_first_acc=0.9),
    ]
    out = detect_stages(history)
    assert out["order"] == [5, 1, 2]
    assert out["out_of_order"] == [5]
    by_id = {s["id"]: s for s in out["stages"]}
    assert (by_id[5]["step"], by_id[1]["step"], by_id[2]["step"]) == (1, 2, 3)
    assert by_id[5]["rank"] == 1 and by_id[2]["rank"] == 3
    # Knowledge also needs the held-out control to be clearly beaten.
    know = [_full(1, know=0.9) | {"knowledge_control_acc": 0.85}]
    assert detect_stages(know)["order"] == []
    assert detect_stages(know, StageThresholds(control_margin=0.0))["order"] == [4]


# Probes --------------------------------------------------------------------------------------------------------------
class _Oracle(torch.nn.Module):
    """A fake model: logits put all mass on ``predict(ids)`` [B, T]."""

    def __init__(self, vocab_size: int, kind: str) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size)
        self.kind = kind
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> SimpleNamespace:
        B, T = ids.shape
        V = self.config.vocab_size
        if self.kind == "uniform":
            # Equal probabilities; tiny noise makes the argmax a uniformly random token, as ties should be.
            return SimpleNamespace(logits=torch.randn(B, T, V) * 1e-6)
        pred = self._induction(ids) if self.kind == "induction" else self._longest_match(ids)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(pred, V).float() * 50.0)

    @staticmethod
    def _induction(ids: torch.Tensor) -> torch.Tensor:
        """The token that followed the previous occurrence of the current token in the same row (else 0)."""
        B, T = ids.shape
        same = ids[:, :, None] == ids[:, None, :]  # [B, t, j]
        earlier = torch.arange(T)[None, :] < torch.arange(T)[:, None]
        j = torch.where(same & earlier, torch.arange(T), -1).max(dim=-1).values  # last earlier occurrence
        nxt = torch.gather(ids, 1, (j + 1).clamp(0, T - 1))
        return torch.where((j >= 0) & (j + 1 < T), nxt, torch.zeros_like(nxt))

    @staticmethod
    def _longest_match(ids: torch.Tensor) -> torch.Tensor:
        """The token after the latest earlier position whose preceding tokens match the longest suffix."""
        B, T = ids.shape
        run = torch.zeros(B, T, T, dtype=torch.long)  # run[b, t, j]: tokens matching backwards from t and j
        for t in range(T):
            eq = (ids[:, t : t + 1] == ids).long()
            prev = torch.zeros_like(eq)
            if t:
                prev[:, 1:] = run[:, t - 1, :-1]
            run[:, t] = eq * (prev + 1)
        earlier = torch.arange(T)[None, :] < torch.arange(T)[:, None]
        # Longest first, latest among equals; a match at j predicts ids[j + 1].
        score = torch.where(earlier & (torch.arange(T) + 1 < T), run * T + torch.arange(T), -1)
        j = score.argmax(dim=-1)
        return torch.gather(ids, 1, (j + 1).clamp(0, T - 1))


def _write_corpus(root: Path, n_docs: int = 80) -> None:
    rng = random.Random(0)
    root.mkdir(parents=True)
    for i in range(n_docs):
        lines = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + rng.choice(".!?;")
            for _ in range(rng.randint(4, 14))
        ]
        if i % 3 == 0:
            lines.insert(rng.randint(0, len(lines)), REFRAINS[i % 2])
        (root / f"doc{i:03d}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stages")
    _write_corpus(tmp / "corpus")
    prepare_dataset(
        [parse_source(str(tmp / "corpus"))], ByteTokenizer(), tmp / "data", val_fraction=0.1, progress=False
    )
    return load_dataset(tmp / "data")


def test_induction_oracle_scores_one_and_uniform_scores_chance(dataset):
    tok = ByteTokenizer()
    probe = build_induction(dataset, tok, n=64, seq_len=64, seed=0)
    assert probe.ids.shape == (64, 64) and probe.mask.sum() == 64 * 15
    for row in probe.ids:
        # The scored span is a copy of one within the first eighth of the row.
        assert any(np.array_equal(row[a : a + 16], row[-16:]) for a in range(0, 64 // 8 + 1))
    oracle = run_probe(_Oracle(tok.vocab_size, "induction"), probe)
    assert oracle["acc"] == 1.0 and oracle["exact"] == 1.0
    uniform = run_probe(_Oracle(tok.vocab_size, "uniform"), probe)
    # 960 scored tokens at 1/257: about 3.7 right by chance; 0.02 is 19 of them.
    assert uniform["acc"] < 0.02 and uniform["exact"] == 0.0
    again = build_induction(dataset, tok, n=64, seq_len=64, seed=0)
    assert np.array_equal(again.ids, probe.ids), "probes are deterministic"


def test_kv_lookup_by_longest_match_scores_one(dataset):
    tok = ByteTokenizer()
    probe = build_kv(dataset, tok, n=16, seq_len=192, seed=0)
    assert probe.info["mode"] == "words" and probe.info["pairs"] == 8
    text = tok.decode(probe.ids[0].tolist())
    assert text.count(": ") >= 12
    # Scored tokens are the values of the query lines: no spaces, no newlines.
    assert not np.isin(probe.ids[probe.mask], [ord(" "), ord("\n")]).any()
    assert run_probe(_Oracle(tok.vocab_size, "match"), probe)["acc"] == 1.0
    assert run_probe(_Oracle(tok.vocab_size, "uniform"), probe)["acc"] < 0.05


def test_knowledge_spans_recur_in_training_and_the_control_does_not(dataset):
    tok = ByteTokenizer()
    probe, control = build_knowledge_probes(dataset, tok, n=8, seq_len=48, seed=0)
    assert probe.n >= 2 and probe.seq_len == 48
    train = dataset.sources["corpus"].train
    docs = [bytes(train.doc(i).astype(np.uint8)) for i in range(train.n_docs)]
    for row in probe.ids:
        span = bytes(row.astype(np.uint8))
        assert sum(d.count(span) for d in docs) >= 2, span
    for row in control.ids:
        assert not any(bytes(row.astype(np.uint8)) in d for d in docs)
    assert (probe.mask.sum(axis=1) == 16).all()


def test_window_hashes_match_direct_hashes():
    tokens = np.random.default_rng(0).integers(0, 300, size=200)
    for k in (1, 5, 16, 48):
        h = window_hashes(tokens, k)
        assert h.size == tokens.size - k + 1
        assert h[7] == window_hashes(tokens[7 : 7 + k], k)[0]
        if k >= 5:
            assert len(set(h.tolist())) == h.size  # no collisions among these random windows


# The tracker --------------------------------------------------------------------------------------------------------
def _tiny_model() -> MMRecLM:
    cfg = MMRecConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, chunk_size=8, mem_slots=4, summary_window=2)
    return MMRecLM(cfg).eval()


def test_tracker_end_to_end(dataset, tmp_path, monkeypatch):
    tok = ByteTokenizer()
    cache = tmp_path / "refs.json"
    kwargs = dict(n_probe=8, window_tokens=1024, cache_path=cache)
    tracker = StageTracker(dataset, tok, eval_seq_len=32, **kwargs)
    assert tracker.order == 5, "byte-level text gets a longer n-gram context"
    model = _tiny_model()
    for step in (1, 2):
        metrics = tracker.measure(model, step, step * 128, val_loss=5.5, val_bpb=7.9)
        for key in ("unigram_bpb", "ngram_bpb", "context_gain", "ngram_context_gain", "knowledge_acc", "induction_acc"):
            assert key in metrics
        # Known answers: each probe accuracy is that of the probe scored on its own, and an untrained
        # model (near-uniform logits) loses about ln 257 nats per token.
        for name in ("kv", "induction"):
            assert metrics[f"{name}_acc"] == run_probe(model, tracker.probes[name])["acc"], name
        assert abs(metrics["window_loss"] - math.log(257)) < 0.05, metrics["window_loss"]
        # MM-Rec carries its state: every window and cut piece starts from it, warmed on one window of other text.
        assert metrics["context_warmup_tokens"] == tracker.L == 32
    assert model.training is False
    tracker.save(tmp_path / "run")
    data = json.loads((tmp_path / "run" / "stages.json").read_text())
    assert [s["id"] for s in data["stages"]] == [1, 2, 3, 4, 5]
    # An untrained model reaches nothing: its loss is about ln 257, above the unigram's.
    assert data["order"] == [] and not data["stages"][0]["reached"]
    assert data["references"]["unigram_bpb"] > data["references"]["ngram_bpb"] > 0
    assert "bits/byte" in data["bands"]["conversion"] and len(data["bands"]["stages"]) == 5
    assert (tmp_path / "run" / "stages.png").stat().st_size > 0
    assert len(data["history"]) == 2 and len(data["curve"]) == 2

    # A second tracker on the same data reads the references from the cache instead of fitting them again.
    def refit(*args, **kw):
        raise AssertionError("the references should come from the cache")

    monkeypatch.setattr(tracker_mod, "build_references", refit)
    again = StageTracker(dataset, tok, eval_seq_len=32, **kwargs)
    assert again.references == tracker.references
    assert again.restore(tmp_path / "run", up_to_step=1) == 1
    # A model that answers the key-value probe by lookup scores 1 through the tracker, and one that guesses, ~0.
    assert again.measure(_Oracle(tok.vocab_size, "match"), 3, 384)["kv_acc"] == 1.0
    assert again.measure(_Oracle(tok.vocab_size, "uniform"), 4, 512)["kv_acc"] < 0.05
    # One that copies the token after the previous occurrence solves the induction probe, not the lookup:
    # each score is its own probe's.
    copier = _Oracle(tok.vocab_size, "induction")
    metrics = again.measure(copier, 5, 640)
    assert metrics["induction_acc"] == 1.0
    assert metrics["kv_acc"] == run_probe(copier, again.probes["kv"])["acc"] < 0.9


def _fake_run(root: Path, corpus: Path) -> Path:
    """A run directory as ``mmrec train`` leaves it: checkpoints (weights, meta.json, tokenizer) and eval.csv."""
    from conftest import tiny_train_config
    from mmrec.models import build_model
    from mmrec.models.checkpoint import save_checkpoint

    cfg = tiny_train_config(corpus, root)
    run = root / "run"
    for step in (2, 4):
        torch.manual_seed(step)
        model = build_model(cfg.model)
        save_checkpoint(
            run, model, ByteTokenizer(), kind="train", step=step, trained_seq_len=32, keep=2,
            tokens=step * 128, config=cfg.to_dict(),
        )  # fmt: skip
    rows = ["step,tokens,val_bpb,val_loss", "1,128,8.1,5.6", "2,256,8.0,5.55", "3,384,7.9,5.5", "4,512,7.8,5.4"]
    (run / "eval.csv").write_text("\n".join(rows) + "\n")
    return run


def test_track_run_over_a_finished_training_run(tmp_path):
    _write_corpus(tmp_path / "corpus", n_docs=40)
    run = _fake_run(tmp_path, tmp_path / "corpus")
    out = track_run(run, n_probe=4, window_tokens=256)
    # Checkpoints are measured; every evaluation of eval.csv is on the curve.
    assert [h["step"] for h in out["history"]] == [2, 4]
    assert [h["tokens"] for h in out["history"]] == [256, 512]
    assert [c["step"] for c in out["curve"]] == [1, 2, 3, 4]
    assert json.loads((run / "stages.json").read_text())["history"][-1]["val_bpb"] == 7.8
    assert (run / "stages.png").is_file() and (run / "stage_refs.json").is_file()
    # The data were prepared where the trainer keeps them, so a later run or call reuses them.
    assert any((tmp_path / "cache").iterdir())


# Stage 3 from the same start for every model ---------------------------------------------------------------------
@dataclasses.dataclass
class _CountState(TensorState):
    """A toy carried state: decayed counts of the tokens read, per stream."""

    kind: ClassVar[str] = "toy_counts"
    counts: torch.Tensor  # [1, B, V]

    @property
    def batch_key(self) -> str:
        return self.kind


class _Carried(torch.nn.Module):
    """A toy model that carries its state from call to call, as MM-Rec does.

    ``warm_only``: it ignores the text and predicts a fixed distribution once it has read ``settle`` tokens in
    all (uniform before): only the start of its state matters. ``context``: it predicts from decayed counts of
    the tokens it read, so it gains from a window's own text.
    """

    def __init__(self, kind: str, settle: int = 8, decay: float = 0.8) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=257)
        self.kind, self.settle, self.decay = kind, settle, decay
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        bias = torch.zeros(257)
        bias[[ord(c) for c in "abcdefghijklmnopqrstuvwxyz \n"]] = 4.0
        self.register_buffer("bias", bias)

    def forward(self, ids: torch.Tensor, state: _CountState | None = None) -> SimpleNamespace:
        B, T = ids.shape
        position = 0 if state is None else state.position
        counts = torch.zeros(B, 257) if state is None else state.counts[0].clone()
        logits = torch.zeros(B, T, 257)
        for t in range(T):
            counts = self.decay * counts + torch.nn.functional.one_hot(ids[:, t], 257).float()
            if self.kind == "warm_only":
                logits[:, t] = self.bias if position + t + 1 >= self.settle else 0.0
            else:
                logits[:, t] = torch.log(counts + 0.01)
        return SimpleNamespace(logits=logits, state=_CountState(position=position + T, counts=counts[None]))


@pytest.fixture(scope="module")
def alphabet_dataset(tmp_path_factory):
    """Documents each written in its own three letters: a window's own text tells which."""
    tmp = tmp_path_factory.mktemp("alphabets")
    rng = random.Random(1)
    letters = "abcdefghijklmnopqrstuvwxyz"
    (tmp / "corpus").mkdir()
    for i in range(60):
        own = rng.sample(letters, 3)
        words = ["".join(rng.choice(own) for _ in range(rng.randint(2, 6))) for _ in range(120)]
        (tmp / "corpus" / f"doc{i:03d}.txt").write_text(" ".join(words) + "\n")
    prepare_dataset(
        [parse_source(str(tmp / "corpus"))], ByteTokenizer(), tmp / "data", val_fraction=0.15, progress=False
    )
    return load_dataset(tmp / "data")


def test_warmup_text_is_never_the_window_or_its_history_and_prefers_other_documents():
    eot, L = 0, 9
    # Five documents of 40 tokens (ids 1..), each preceded by eot: slots of 10 tokens.
    stream = np.concatenate([np.concatenate([[eot], np.full(39, d + 1)]) for d in range(5)])
    chosen = np.array([0, 3, 7, 12, 19])
    picked, kind = warmup_slots(stream, L, chosen, eot, np.random.default_rng(0))
    again, _ = warmup_slots(stream, L, chosen, eot, np.random.default_rng(0))
    assert np.array_equal(picked, again), "the choice is seeded"
    docs = np.cumsum(stream == eot)
    for s, c, k in zip(chosen, picked, kind, strict=True):
        assert c not in (s, s - 1) and k == 0
        window_docs = set(docs[s * (L + 1) : (s + 1) * (L + 1)].tolist())
        assert not window_docs & set(docs[c * (L + 1) : (c + 1) * (L + 1)].tolist())
    # One document only: any slot but the window's own and the one before it; with two slots, none for the second.
    one = np.concatenate([[eot], np.ones(59, dtype=np.int64)])
    picked, kind = warmup_slots(one, L, np.array([2]), eot, np.random.default_rng(0))
    assert picked[0] not in (1, 2) and kind[0] == 1
    picked, kind = warmup_slots(one[:20], L, np.array([0, 1]), eot, np.random.default_rng(0))
    assert picked.tolist() == [1, -1] and kind.tolist() == [1, 2]


def test_a_warm_start_alone_shows_no_context_gain(alphabet_dataset):
    """A model whose early losses differ only because its state starts cold gains nothing from context when every
    window and piece starts warm; started cold (the measurement before issue 13) it seemed to gain > 1 nat."""
    tok = ByteTokenizer()
    kwargs = dict(n_probe=4, window_tokens=1024)
    model = _Carried("warm_only", settle=8)
    fair = StageTracker(alphabet_dataset, tok, eval_seq_len=32, **kwargs)
    assert fair.L == 32 and fair.window_info["warmup"]["other_documents"] == len(fair.windows)
    m = fair.measure(model, 1, 128)
    assert m["context_warmup_tokens"] == 32
    assert abs(m["context_gain"]) < 1e-9
    assert m["context_excess"] == pytest.approx(-m["ngram_context_gain"], abs=1e-9)
    old = StageTracker(alphabet_dataset, tok, eval_seq_len=32, warm_start=False, **kwargs)
    m_old = old.measure(model, 1, 128)
    assert m_old["context_warmup_tokens"] == 0 and m_old["context_gain"] > 1.0
    # The n-gram reference is measured as before, and the choice of warm-up text is reproducible.
    assert m["ngram_context_gain"] == m_old["ngram_context_gain"]
    again = StageTracker(alphabet_dataset, tok, eval_seq_len=32, **kwargs)
    assert np.array_equal(again.warmup, fair.warmup)
    assert again.measure(model, 1, 128)["context_gain"] == m["context_gain"]


def test_a_model_that_uses_the_window_still_gains_from_a_warm_start(alphabet_dataset):
    tok = ByteTokenizer()
    tracker = StageTracker(alphabet_dataset, tok, eval_seq_len=32, n_probe=4, window_tokens=1024)
    m = tracker.measure(_Carried("context"), 1, 128)
    # Warmed on another document's letters, a cut piece starts out predicting the wrong ones.
    assert m["context_warmup_tokens"] == 32 and m["context_gain"] > 0.5, m["context_gain"]
    assert m["context_excess"] > 0.1, m


def test_models_without_a_carried_state_are_measured_as_before(alphabet_dataset):
    """A Transformer starts every window with an empty cache either way: the numbers do not change."""
    tok = ByteTokenizer()
    cfg = TransformerConfig(vocab_size=257, d_model=32, n_layers=1, n_heads=2, preset="llama")
    torch.manual_seed(0)
    model = TransformerLM(cfg).eval()
    kwargs = dict(n_probe=4, window_tokens=512)
    new = StageTracker(alphabet_dataset, tok, eval_seq_len=32, **kwargs).measure(model, 1, 128)
    old = StageTracker(alphabet_dataset, tok, eval_seq_len=32, warm_start=False, **kwargs).measure(model, 1, 128)
    assert new["context_warmup_tokens"] == 0
    for key in ("context_gain", "context_excess", "window_loss", "loss_early"):
        assert new[key] == old[key], key


def test_restored_history_measured_cold_does_not_decide_stage_3_for_a_warmed_model(dataset, tmp_path):
    tok = ByteTokenizer()
    kwargs = dict(n_probe=4, window_tokens=512)
    old = StageTracker(dataset, tok, eval_seq_len=32, warm_start=False, **kwargs)
    old.measure(_Carried("warm_only"), 1, 128)
    old.history[0].pop("context_warmup_tokens")  # as written before issue 13
    old.save(tmp_path)
    new = StageTracker(dataset, tok, eval_seq_len=32, **kwargs)
    assert new.restore(tmp_path) == 1
    new.measure(_Carried("warm_only"), 2, 256)
    first = new.history[0]
    assert math.isnan(first["context_gain"]) and math.isnan(first["context_excess"])
    assert not math.isnan(first["window_loss"])
    # For a model that starts from nothing either way, the restored numbers stand.
    cold = StageTracker(dataset, tok, eval_seq_len=32, **kwargs)
    cold.restore(tmp_path)
    cold.measure(_Oracle(tok.vocab_size, "uniform"), 2, 256)
    assert cold.history[0]["context_warmup_tokens"] == 0 and not math.isnan(cold.history[0]["context_gain"])


def test_windows_without_other_validation_text_warm_up_on_training_text(dataset, monkeypatch):
    """Validation text of one or two documents leaves some windows nothing unrelated to read: training text
    (which never holds a validation document) takes its place, a seeded choice."""
    tok = ByteTokenizer()

    def none_left(stream, L, chosen, eot_id, rng):
        return np.full(len(chosen), -1), np.full(len(chosen), 2)

    monkeypatch.setattr(tracker_mod, "warmup_slots", none_left)
    tracker = StageTracker(dataset, tok, eval_seq_len=32, n_probe=4, window_tokens=256)
    assert tracker.window_info["warmup"]["training_text"] == len(tracker.windows) == 8
    train = b"".join(
        bytes(src.train.doc(i).astype(np.uint8)) for src in dataset.sources.values() for i in range(src.train.n_docs)
    )
    for row in tracker.warmup:
        text = bytes(row[row != tok.eot_id].astype(np.uint8))
        assert text[:8] in train
    again = StageTracker(dataset, tok, eval_seq_len=32, n_probe=4, window_tokens=256)
    assert np.array_equal(again.warmup, tracker.warmup)
