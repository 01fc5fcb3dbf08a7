"""Recall by distance (`mmrec eval recall`): span finding, a copying oracle, a context-blind model, the command."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mmrec.cli import main
from mmrec.config import MMRecConfig, TransformerConfig
from mmrec.evals.bpb import evaluate_bpb
from mmrec.evals.recall import DISTANCE_EDGES, NOT_EVALUATED, evaluate_recall, find_repeats, run
from mmrec.models import CheckpointError, LMOutput, build_model
from mmrec.models.checkpoint import save_checkpoint
from mmrec.tokenizer import ByteTokenizer

ONE_BYTE = [1] * 100_000  # a vocabulary of one-byte tokens: unused ids make fillers that never repeat
TINY = dict(vocab_size=257, d_model=32, n_layers=2, n_heads=2, chunk_size=8, mem_slots=4, summary_window=2)


_UNUSED_IDS = itertools.count(50_000)


def fresh(count: int) -> list[int]:
    """Token ids used nowhere else: filler that cannot repeat or extend a neighbouring repeat."""
    return [next(_UNUSED_IDS) for _ in range(count)]


# Span finding ------------------------------------------------------------------------------------------------


def test_a_span_seen_three_times_counts_from_its_most_recent_occurrence():
    span = list(range(20))
    doc = span + fresh(30) + span + fresh(50) + span
    rep = find_repeats(doc, ONE_BYTE)
    first, second, third = 0, 50, 120
    assert doc[third : third + 20] == span
    assert not rep.in_span[:50].any() and (rep.distance[:50] == 0).all()  # the first occurrence is new text
    for start, distance in ((second, 50), (third, third - second)):
        assert rep.in_span[start] and rep.distance[start] == 0  # a span's first token is not a repeat
        assert (rep.distance[start + 1 : start + 20] == distance).all()
        assert rep.in_span[start : start + 20].all()
    assert not rep.in_span[70:120].any() and not rep.in_span[first + 20 : second].any()
    assert int((rep.distance > 0).sum()) == 2 * 19


def test_overlapping_repeats():
    # A copy that overlaps its source: every token from the third on repeats the one two back.
    doc = [7, 8] * 20
    rep = find_repeats(doc, ONE_BYTE)
    assert (rep.distance[3:] == 2).all() and (rep.distance[:3] == 0).all()
    assert rep.in_span[2:].all() and not rep.in_span[:2].any()
    # Two repeated spans that overlap in the copy: A B seen long ago, B C recently, then A B C.
    a, b, c = list(range(100, 112)), list(range(200, 212)), list(range(300, 312))  # 12 bytes each
    doc = a + b + fresh(10) + b + c + fresh(10) + a + b + c
    rep = find_repeats(doc, ONE_BYTE)
    copy = 68
    assert doc[copy : copy + 36] == a + b + c
    assert rep.distance[copy] == 0 and rep.in_span[copy]
    assert (rep.distance[copy + 1 : copy + 13] == copy).all()  # A, and B's first token, only in the old "A B"
    assert (rep.distance[copy + 13 : copy + 36] == (copy + 12) - 34).all()  # the rest of B, and C: the recent "B C"
    # B alone (12 bytes, at 34) repeats too briefly to count: a span needs 16 bytes.
    assert not rep.in_span[34:58].any()


def test_tokens_of_different_lengths_need_windows_anchored_at_both_ends():
    # P Q T was seen first, P Q (not followed by T) more recently. In the copy, T is found only through the
    # window that ends at it (T Q P, 17 bytes); the windows starting at P and Q do not reach it as a repeat.
    sizes = {1: 10, 2: 6, 3: 1}
    token_bytes = [sizes.get(i, 1) for i in range(60_000)]
    doc = [1, 2, 3] + fresh(20) + [1, 2] + fresh(20) + [1, 2, 3] + fresh(20)
    rep = find_repeats(doc, token_bytes)
    copy = 45
    assert doc[copy : copy + 3] == [1, 2, 3]
    assert rep.distance[copy + 1] == copy - 23  # Q: the recent P Q (16 bytes)
    assert rep.distance[copy + 2] == copy  # T: only the first P Q T
    assert rep.distance[24] == 23 and rep.distance[23] == 0


def brute_force(doc: list[int], token_bytes: list[int], min_span: int) -> tuple[np.ndarray, np.ndarray]:
    """For each token and each distance d, the maximal run of tokens equal to those d back around it."""
    n = len(doc)
    distance, in_span = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
    for t in range(n):
        for d in range(1, t + 1):
            if doc[t] != doc[t - d]:
                continue
            lo, hi = t, t + 1
            while lo - d > 0 and doc[lo - 1] == doc[lo - 1 - d]:
                lo -= 1
            while hi < n and doc[hi] == doc[hi - d]:
                hi += 1
            if hi - lo >= 2 and sum(token_bytes[i] for i in doc[lo:hi]) >= min_span:
                in_span[t] = True
                if lo < t and distance[t] == 0:
                    distance[t] = d
    return distance, in_span


@pytest.mark.parametrize("varied_lengths", [False, True])
def test_find_repeats_equals_a_brute_force_search(varied_lengths):
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(150):
        alphabet = int(rng.integers(2, 5))
        token_bytes = rng.integers(0, 5, alphabet).tolist() if varied_lengths else [1] * alphabet
        doc = rng.integers(0, alphabet, int(rng.integers(0, 90))).tolist()
        min_span = int(rng.integers(1, 12))
        rep = find_repeats(doc, token_bytes, min_span)
        distance, in_span = brute_force(doc, token_bytes, min_span)
        assert rep.distance.tolist() == distance.tolist(), (doc, token_bytes, min_span)
        assert rep.in_span.tolist() == in_span.tolist(), (doc, token_bytes, min_span)
        checked += int(distance.astype(bool).sum())
    assert checked > 1000  # the random documents hold many repeats


def test_find_repeats_refuses_a_span_under_one_byte():
    with pytest.raises(ValueError, match="min_span"):
        find_repeats([1, 2, 3], ONE_BYTE, min_span=0)


# Stub models with the models' call signature ------------------------------------------------------------------


class CopyOracle(nn.Module):
    """Predicts the token that followed the most recent earlier occurrence of its last ``k`` tokens (p = 0.99),
    otherwise all tokens alike. It sees its input and, when streamed, the tokens of its state."""

    def __init__(self, vocab: int = 256, k: int = 3) -> None:
        super().__init__()
        self.vocab, self.k = vocab, k
        self.sure = math.log(0.99 * (vocab - 1) / 0.01)

    def forward(self, inputs: torch.Tensor, state: list[int] | None = None) -> LMOutput:
        history = list(state or []) + inputs[0].tolist()
        start = len(history) - inputs.shape[1]
        seen: dict[tuple[int, ...], int] = {}
        logits = torch.zeros(1, inputs.shape[1], self.vocab)
        for i in range(len(history)):
            key = tuple(history[i - self.k + 1 : i + 1]) if i + 1 >= self.k else None
            if key is not None and i >= start and key in seen:
                logits[0, i - start, history[seen[key] + 1]] = self.sure
            if key is not None:
                seen[key] = i
        return LMOutput(logits=logits, state=history)


class Unigram(nn.Module):
    """The same distribution at every position: blind to context."""

    def __init__(self, vocab: int = 256) -> None:
        super().__init__()
        self.logits = torch.linspace(-2.0, 2.0, vocab)

    def forward(self, inputs: torch.Tensor, state: object = None) -> LMOutput:
        return LMOutput(logits=self.logits.expand(*inputs.shape, -1).clone(), state=None)


def copy_document(seed: int = 0) -> tuple[list[int], dict[str, int]]:
    """Random bytes with 48-byte spans copied from about 300 and about 2,000 tokens back."""
    rng = np.random.default_rng(seed)
    doc = rng.integers(0, 256, 500).tolist()
    copies = {"<1K": 0, "1K-4K": 0}
    for _ in range(6):
        for back, bucket in ((300, "<1K"), (2000, "1K-4K")):
            if len(doc) > back + 48:
                doc += doc[len(doc) - back : len(doc) - back + 48]
                copies[bucket] += 1
            doc += rng.integers(0, 256, 200).tolist()
    return doc, copies


def test_a_copying_oracle_saves_nearly_all_repeat_bits():
    doc, copies = copy_document()
    assert copies["<1K"] >= 3 and copies["1K-4K"] >= 3
    rep = find_repeats(doc, ONE_BYTE)
    assert rep.distance.max() < 4096
    for streams in (False, True):  # one pass over the document, or carried through a state in windows
        res = evaluate_recall(CopyOracle(), [doc], ONE_BYTE, trained_len=10**6, cut=64, window=500, streams=streams)
        saved = dict(zip(res["buckets"], res["saved_fraction"], strict=True))
        assert saved["<1K"] > 0.9 and saved["1K-4K"] > 0.9, saved
        assert saved["4K-16K"] is None and saved["16K-64K"] is None and saved["64K+"] is None
        assert res["repeat_tokens"][:2] == [int(((rep.distance > 0) & (rep.distance < 1024)).sum()),
                                             int((rep.distance >= 1024).sum())]  # fmt: skip
        # Each 48-byte copy: 47 repeat tokens, the first two unpredictable (8 bits), then copied at p = 0.99.
        per_span = (2 * 8 + 45 * -math.log2(0.99)) / 47
        assert res["full_bpb"][:2] == pytest.approx([per_span, per_span], rel=1e-4)
        assert res["cut_bpb"][:2] == pytest.approx([8.0, 8.0], rel=1e-4)  # the copies are out of reach
        assert abs(res["control"]["saved_fraction"]) < 0.01  # random text: nothing to copy in either condition
        assert res["scored_tokens"] == len(doc) - 1
    assert "streams" in res["full_context"] and "64 tokens" in res["cut_context"]


def test_a_context_blind_model_saves_nothing():
    doc, _ = copy_document(seed=1)
    res = evaluate_recall(Unigram(), [doc, doc[:900]], ONE_BYTE, trained_len=10**6, cut=64)
    for name, saved in zip(res["buckets"][:2], res["saved_fraction"][:2], strict=True):
        assert saved is not None and abs(saved) < 0.01, name
    assert abs(res["control"]["saved_fraction"]) < 0.01
    assert res["documents"] == 2 and res["full_bpb"][0] > 7.0  # it is scored, and scores badly


def test_a_bucket_without_tokens_is_not_evaluated_never_zero():
    rng = np.random.default_rng(2)
    doc = rng.integers(0, 256, 400).tolist()  # random bytes: no 16-byte repeat
    res = evaluate_recall(Unigram(), [doc], ONE_BYTE, trained_len=128)
    assert res["repeat_tokens"] == [0] * (len(DISTANCE_EDGES) + 1)
    assert res["saved_fraction"] == [None] * 5 and res["full_bpb"] == [None] * 5
    assert res["repeats"]["saved_fraction"] is None and res["control"]["tokens"] == len(doc) - 1
    from mmrec.evals.recall import markdown

    table = markdown([{**res, "name": "unigram", "checkpoint": "-", "step": 0, "data": "-"}])
    assert f"| {NOT_EVALUATED} |" in table and "| 0.000 |" in table.split("## unigram")[1]  # the control's 0


def test_mmrec_scores_add_up_to_eval_bpb():
    torch.manual_seed(0)
    model = build_model(MMRecConfig(**TINY)).eval()
    tok = ByteTokenizer()
    ids = tok.encode("the cat sat on the mat; " * 8 + "then the dog came along. " * 3)
    res = evaluate_recall(model, [ids], tok.token_bytes(), trained_len=64, cut=64, window=100)
    ref = evaluate_bpb(model, [ids], tok.token_bytes(), trained_len=64, cut=64, window=100)
    parts = [res["repeats"], res["span_starts"], res["control"]]
    assert sum(p["tokens"] for p in parts) == len(ids) - 1 and res["repeats"]["tokens"] > 200
    for key, overall in (("full_bpb", "overall_full_bpb"), ("cut_bpb", "overall_cut_bpb")):
        total = sum(p[key] * p["bytes"] for p in parts if p[key] is not None) / (len(ids) - 1)
        assert total == pytest.approx(ref[overall], rel=1e-6)


# The command ---------------------------------------------------------------------------------------------------


def _tiny_runs(root: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    tok = ByteTokenizer()
    mm = save_checkpoint(root / "mm", build_model(MMRecConfig(**TINY)), tok, kind="train", step=3, trained_seq_len=96)
    tf_config = TransformerConfig(preset="llama", vocab_size=257, d_model=32, n_layers=2, n_heads=2)
    tf = save_checkpoint(root / "tf", build_model(tf_config), tok, kind="train", step=5, trained_seq_len=128)
    return mm.parent, tf.parent


def test_eval_recall_command_side_by_side(tmp_path, capsys):
    mm, tf = _tiny_runs(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    text = "To be, or not to be, that is the question. " + "Whether 'tis nobler in the mind to suffer. " * 3
    (data / "a.txt").write_text(text * 3)
    out = tmp_path / "out"
    argv = ["eval", "recall", "--checkpoint", str(mm), str(tf), "--data", str(data), "--out", str(out)]
    assert main([*argv, "--device", "cpu"]) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    first, second = results["models"]
    assert first["name"] == f"mmrec ({mm})" and second["name"] == f"transformer-llama ({tf})"
    assert (first["cut"], second["cut"], second["step"]) == (96, 128, 5)  # each model's trained window
    rep = find_repeats(ByteTokenizer().encode(text * 3), ByteTokenizer().token_bytes())
    for m in (first, second):
        assert m["repeat_tokens"][0] == int((rep.distance > 0).sum()) > 100
        assert m["repeat_tokens"][1:] == [0, 0, 0, 0] and m["saved_fraction"][1:] == [None] * 4  # null in JSON
        assert m["documents"] == 1 and m["scored_tokens"] == len(text) * 3 - 1
    # A Transformer cut to its trained window scores the same windows twice: it saves exactly nothing.
    assert second["saved_fraction"][0] == 0.0 and second["full_bpb"] == second["cut_bpb"]
    assert first["full_bpb"][0] != first["cut_bpb"][0]  # MM-Rec's cut condition is a different computation
    md = (out / "results.md").read_text()
    assert "| model | cut | <1K | 1K-4K | 4K-16K | 16K-64K | 64K+ | control |" in md
    assert NOT_EVALUATED in md and "The cuts differ" in md
    assert (out / "recall_by_distance.png").stat().st_size > 1000
    # One --cut for all: a like-for-like comparison, and the note goes away.
    assert main([*argv[:-1], str(tmp_path / "out2"), "--cut", "64", "--device", "cpu"]) == 0
    again = json.loads((tmp_path / "out2" / "results.json").read_text())
    assert [m["cut"] for m in again["models"]] == [64, 64] and again["models"][1]["saved_fraction"][0] != 0.0
    assert "The cuts differ" not in (tmp_path / "out2" / "results.md").read_text()


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path, capsys):
    mm, _ = _tiny_runs(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("some text that repeats, some text that repeats")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.txt").write_text("")
    out = tmp_path / "out"
    cases = {
        "missing checkpoint": (["--checkpoint", str(mm), str(tmp_path / "nope"), "--data", str(data)], 1, "nope"),
        "not a checkpoint": (["--checkpoint", str(data), "--data", str(data)], 1, "not a checkpoint"),
        "empty data": (["--checkpoint", str(mm), "--data", str(tmp_path / "empty")], 1, "no document"),
        "missing data": (["--checkpoint", str(mm), "--data", str(tmp_path / "gone")], 1, "gone"),
        "cut under 2": (["--checkpoint", str(mm), "--data", str(data), "--cut", "1"], 2, "cut: must be >= 2"),
        "min span 0": (["--checkpoint", str(mm), "--data", str(data), "--min-span", "0"], 2, "min_span"),
    }
    for name, (args, code, words) in cases.items():
        assert main(["eval", "recall", *args, "--out", str(out), "--device", "cpu"]) == code, name
        err = capsys.readouterr().err
        assert "mmrec eval recall: error: " in err and words in err and "Traceback" not in err, (name, err)
        assert not out.exists(), name
    with pytest.raises(CheckpointError, match="does not exist"):
        run([str(tmp_path / "nope")], [str(data)], str(out))
    with pytest.raises(ValueError, match="--cut must be >= 2"):
        run([str(mm)], [str(data)], str(out), cut=1)
    with pytest.raises(ValueError, match="no document with at least 2 tokens"):
        run([str(mm)], [str(tmp_path / "empty")], str(out))
    assert not out.exists()
