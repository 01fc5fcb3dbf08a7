"""Probes of knowledge and in-context reasoning, built deterministically from a corpus and scored by argmax.

A ``Probe`` is a batch of token rows ``ids`` [n, T] and a mask of the tokens
to score: ``mask[i, t]`` means ``ids[i, t]`` is predicted from ``ids[i, :t]``
(teacher forcing). Scored tokens belong to answers (``answer`` [n, T]: the
index of the answer, -1 elsewhere), so a probe reports three numbers: the
token accuracy (``acc``), the share of answers entirely right (``exact``) and
the accuracy on the first token of each answer (``first_acc``), which for
recall is the token that needs the lookup.

* Knowledge (``build_knowledge``, here): spans that occur at least twice,
  verbatim, in the training split: a prefix, then the continuation to recall.
* Induction and key-value lookup (``build_induction``, ``build_kv``): in
  ``mmrec.stages.incontext``.

Everything is a pure function of the dataset, the tokenizer and the seed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mmrec.stages.entropy import TokenSample, sample_split
from mmrec.utils.device import model_device

# Polynomial hashing of token windows, mod 2**64 (an odd multiplier; numpy's uint64 arithmetic wraps around).
_HASH_BASE = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1
# Logits held at once while scoring: rows * T * V <= this many floats.
LOGIT_BUDGET = 1 << 26


@dataclass
class Probe:
    """Rows of token ids, which tokens are scored, and which answer each scored token belongs to."""

    name: str
    ids: np.ndarray  # [n, T] int64
    mask: np.ndarray  # [n, T] bool: ids[i, t] is scored, predicted from ids[i, :t]
    answer: np.ndarray  # [n, T] int64: index of the answer a scored token belongs to, -1 elsewhere
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.ids.shape[1])


def _empty_probe(name: str, T: int, info: dict[str, Any]) -> Probe:
    z = np.zeros((0, T), dtype=np.int64)
    return Probe(name, z, z.astype(bool), z - 1, info)


def score_predictions(probe: Probe, pred: np.ndarray) -> dict[str, float]:
    """``acc``, ``exact`` and ``first_acc`` of predictions [n, T] (``pred[i, t]`` guesses ``ids[i, t]``)."""
    nan = float("nan")
    if probe.n == 0 or not probe.mask.any():
        return {"acc": nan, "exact": nan, "first_acc": nan, "n_targets": 0.0, "n_answers": 0.0}
    rows, cols = np.nonzero(probe.mask)
    right = np.asarray(pred)[rows, cols] == probe.ids[rows, cols]
    # Answers are numbered within a row; (row, answer) names one answer, in scoring order.
    key = rows.astype(np.int64) * (int(probe.answer.max()) + 2) + probe.answer[rows, cols]
    uniq, first, inv = np.unique(key, return_index=True, return_inverse=True)
    wrong_per_answer = np.bincount(inv, weights=~right, minlength=len(uniq))
    return {
        "acc": float(right.mean()),
        "exact": float(np.mean(wrong_per_answer == 0)),
        "first_acc": float(right[first].mean()),
        "n_targets": float(right.size),
        "n_answers": float(len(uniq)),
    }


def autocast_context(autocast: Any) -> Any:
    """A context manager from ``autocast``: None, a context manager, or a callable returning one."""
    if autocast is None:
        return contextlib.nullcontext()
    if hasattr(autocast, "__enter__"):
        return autocast
    if callable(autocast):
        return autocast()
    raise TypeError(f"autocast must be None, a context manager or a callable returning one, got {autocast!r}")


def model_predictions(
    model: torch.nn.Module,
    ids: np.ndarray,
    device: str | torch.device | None = None,
    autocast: Any = None,
    batch_size: int = 32,
) -> np.ndarray:
    """Greedy next-token predictions [n, T] of rows ``ids`` [n, T]: ``pred[:, t]`` from ``ids[:, :t]``, -1 first."""
    n, T = ids.shape
    out = np.full((n, T), -1, dtype=np.int64)
    if n == 0 or T < 2:
        return out
    dev = model_device(model, device)
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 65536)
    rows = max(1, min(batch_size, LOGIT_BUDGET // max((T - 1) * vocab, 1)))
    with torch.no_grad():
        for start in range(0, n, rows):
            x = torch.as_tensor(ids[start : start + rows, :-1], dtype=torch.long, device=dev)
            with autocast_context(autocast):
                logits = model(x).logits
            out[start : start + rows, 1:] = logits.argmax(dim=-1).cpu().numpy()
    return out


def run_probe(
    model: torch.nn.Module,
    probe: Probe,
    device: str | torch.device | None = None,
    autocast: Any = None,
    batch_size: int = 32,
) -> dict[str, float]:
    """Score ``model`` (called as ``model(ids).logits``, a fresh state per call) on a probe, greedily.

    ``autocast`` is None, a context manager (``torch.autocast(...)``) or a
    callable returning one (the trainer's ``_autocast``). The model is put in
    eval mode for the call and back in its mode afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        pred = model_predictions(model, probe.ids, device, autocast, batch_size)
    finally:
        model.train(was_training)
    return score_predictions(probe, pred)


# Knowledge.
def window_hashes(tokens: np.ndarray, k: int) -> np.ndarray:
    """Polynomial hashes (uint64) of every window of ``k`` tokens: entry i hashes ``tokens[i:i + k]``.

    Built by doubling (hashes of length 1, 2, 4, ... combined by the bits of
    ``k``), so it costs O(n log k) vectorised operations and holds three
    arrays at a time.
    """
    n = len(tokens)
    if k < 1 or n < k:
        return np.zeros(0, dtype=np.uint64)
    power = np.asarray(tokens, dtype=np.uint64) + np.uint64(1)  # hashes of length 2**j
    plen = 1
    res: np.ndarray | None = None
    rlen = 0
    bits = k
    with np.errstate(over="ignore"):
        while True:
            if bits & 1:
                if res is None:
                    res, rlen = power.copy(), plen
                else:
                    # The new block goes in front of what is built: h = h_block * B**rlen + h_res[i + plen].
                    m = n - (plen + rlen) + 1
                    res = power[:m] * np.uint64(pow(_HASH_BASE, rlen, 1 << 64)) + res[plen : plen + m]
                    rlen += plen
            bits >>= 1
            if not bits:
                break
            m = n - 2 * plen + 1
            power = power[:m] * np.uint64(pow(_HASH_BASE, plen, 1 << 64)) + power[plen : plen + m]
            plen *= 2
    assert res is not None
    return res[: n - k + 1]


@dataclass
class _Windows:
    """Hashes of the windows of a sample that stay inside one document, sorted, grouped by equal hash."""

    tokens: np.ndarray  # the sample's tokens, int64
    starts: np.ndarray  # start of each window kept, in sample order
    order: np.ndarray  # argsort of the kept windows' hashes
    sorted_hash: np.ndarray  # their hashes, sorted
    group: np.ndarray  # first index (into sorted_hash) of each run of equal hashes
    sizes: np.ndarray  # length of each run: how often the span occurs


def _hash_windows(sample: TokenSample, T: int) -> _Windows:
    toks = np.asarray(sample.tokens, dtype=np.int64)
    hashes = window_hashes(toks, T)
    lens = np.diff(sample.offsets)
    doc_end = np.repeat(sample.offsets[1:], lens)[: hashes.size]
    starts = np.flatnonzero(np.arange(hashes.size) + T <= doc_end)
    del doc_end
    hv = hashes[starts]
    del hashes
    order = np.argsort(hv, kind="stable")
    sorted_h = hv[order]
    group = np.flatnonzero(np.concatenate(([True], sorted_h[1:] != sorted_h[:-1]))) if sorted_h.size else starts[:0]
    sizes = np.diff(np.append(group, len(sorted_h)))
    return _Windows(toks, starts, order, sorted_h, group, sizes)


def _pick_spans(
    w: _Windows, groups: np.ndarray, n: int, T: int, cont: int, rng: np.random.Generator, verify: bool
) -> tuple[list[int], list[int]]:
    """Up to ``n`` spans from hash groups (in random order): start positions and occurrence counts.

    With ``verify`` a second, verbatim occurrence is checked (hashes can
    collide). Near-empty spans (fewer than a quarter distinct tokens, like
    indentation; continuations of fewer than 3 distinct tokens) and spans
    overlapping one already chosen are skipped.
    """
    groups = groups.copy()
    rng.shuffle(groups)
    min_distinct = max(4, T // 4)
    chosen: list[int] = []
    counts: list[int] = []
    for g in groups[: 200 * max(n, 1)]:
        pos = np.sort(w.starts[w.order[w.group[g] : w.group[g] + w.sizes[g]]])
        p = int(pos[0])
        span = w.tokens[p : p + T]
        if verify and not any(np.array_equal(span, w.tokens[int(q) : int(q) + T]) for q in pos[1:4]):
            continue
        if len(np.unique(span)) < min_distinct or len(np.unique(span[T - cont :])) < min(3, cont):
            continue
        if any(abs(p - c) < T for c in chosen):
            continue
        chosen.append(p)
        counts.append(int(w.sizes[g]))
        if len(chosen) >= n:
            break
    return chosen, counts


def _span_probe(name: str, w: _Windows, chosen: list[int], T: int, cont: int, info: dict[str, Any]) -> Probe:
    if not chosen:
        return _empty_probe(name, T, info)
    ids = np.stack([w.tokens[p : p + T] for p in chosen])
    mask = np.zeros_like(ids, dtype=bool)
    mask[:, T - cont :] = True
    return Probe(name, ids, mask, np.where(mask, 0, -1), info)


def _in_split(dataset: Any, split: str, spans: np.ndarray, max_scan_tokens: int) -> tuple[np.ndarray, int]:
    """Which rows of ``spans`` [m, T] occur in ``split`` (up to ``max_scan_tokens`` scanned), and how many were scanned.

    The shards are hashed in chunks that overlap by T - 1 tokens, ignoring
    document boundaries: a span across two documents can only make a row
    look present, which keeps a held-out control on the safe side.
    """
    m, T = spans.shape
    found = np.zeros(m, dtype=bool)
    if m == 0:
        return found, 0
    want = np.array([window_hashes(r, T)[0] for r in spans], dtype=np.uint64)
    order = np.argsort(want)
    sorted_want = want[order]
    scanned = 0
    chunk = 1 << 24
    for name in sorted(dataset.sources):
        tokens = dataset.sources[name].split(split).tokens
        for a in range(0, len(tokens), chunk):
            if scanned >= max_scan_tokens:
                return found, scanned
            piece = np.asarray(tokens[a : min(len(tokens), a + chunk + T - 1)], dtype=np.int64)
            h = window_hashes(piece, T)
            idx = np.minimum(np.searchsorted(sorted_want, h), m - 1)
            hit = np.unique(idx[sorted_want[idx] == h])
            found[order[hit]] = True
            scanned += min(chunk, len(tokens) - a)
    return found, scanned


def _knowledge_setup(continuation: int | None, seq_len: int) -> tuple[int, int]:
    T = min(int(seq_len), 48)
    cont = continuation if continuation is not None else max(1, T // 3)
    if not 1 <= cont < T:
        raise ValueError(f"continuation must be in 1..{T - 1} for rows of {T} tokens, got {cont}")
    return T, cont


def _train_spans(dataset: Any, n: int, T: int, cont: int, seed: int, max_tokens: int) -> tuple[Probe, _Windows]:
    train = _hash_windows(sample_split(dataset, "train", max_tokens, seed=seed), T)
    repeated = np.flatnonzero(train.sizes >= 2)
    chosen, counts = _pick_spans(train, repeated, n, T, cont, np.random.default_rng([seed, 1]), verify=True)
    info = {
        "prefix_len": T - cont,
        "continuation_len": cont,
        "split": "train",
        "sample_tokens": int(train.tokens.size),
        "candidates": int(repeated.size),
        "recurrence": counts,
        "recurrence_median": float(np.median(counts)) if counts else float("nan"),
    }
    return _span_probe("knowledge", train, chosen, T, cont, info), train


def build_knowledge(
    dataset: Any,
    tokenizer: Any,
    n: int = 64,
    seq_len: int = 48,
    seed: int = 0,
    continuation: int | None = None,
    max_tokens: int = 8_000_000,
) -> Probe:
    """Rows of spans that recur verbatim in the training split: a prefix, then ``continuation`` tokens to recall.

    Rows are ``min(seq_len, 48)`` tokens (a 32-token prefix and a 16-token
    continuation by default). Every window of that length in a seeded sample
    of ``max_tokens`` training tokens is hashed; windows whose hash occurs at
    least twice are candidates, drawn uniformly over distinct spans (so most
    recur only a few times: a hard probe, not one of boilerplate), each
    checked for an exact second occurrence (``info["recurrence"]``: how often
    each occurs in the sample).
    """
    T, cont = _knowledge_setup(continuation, seq_len)
    return _train_spans(dataset, n, T, cont, seed, max_tokens)[0]


def build_knowledge_probes(
    dataset: Any,
    tokenizer: Any,
    n: int = 64,
    seq_len: int = 48,
    seed: int = 0,
    continuation: int | None = None,
    max_tokens: int = 8_000_000,
    max_scan_tokens: int = 200_000_000,
) -> tuple[Probe, Probe]:
    """The knowledge probe (``build_knowledge``) and its held-out control: spans of the same kind never read.

    The control is drawn the same way from the validation split: spans that
    recur within it (the same kind of repeated text) and occur nowhere in the
    training split (all of it, up to ``max_scan_tokens``); when too few
    recur, other validation spans absent from training fill it
    (``info["recurring"]`` says how many recur). A model that recalls what
    it read does clearly better on the probe than on the control; one that
    only predicts well in general does about as well on both.
    """
    T, cont = _knowledge_setup(continuation, seq_len)
    probe, train = _train_spans(dataset, n, T, cont, seed, max_tokens)
    val = _hash_windows(sample_split(dataset, "val", max_tokens, seed=seed), T)
    # Candidates: validation spans the training sample lacks, recurring ones first.
    heads = val.sorted_hash[val.group]
    if train.sorted_hash.size:
        idx = np.minimum(np.searchsorted(train.sorted_hash, heads), len(train.sorted_hash) - 1)
        unseen = train.sorted_hash[idx] != heads
    else:
        unseen = np.ones(len(heads), dtype=bool)
    rng = np.random.default_rng([seed, 5])
    cands: list[tuple[int, bool]] = []
    for recurring in (True, False):
        pool = np.flatnonzero(unseen & ((val.sizes >= 2) if recurring else (val.sizes < 2)))
        got, _ = _pick_spans(val, pool, 3 * n, T, cont, rng, verify=recurring)
        cands += [(p, recurring) for p in got if all(abs(p - c) >= T for c, _ in cands)]
    # The training sample is a part of the split: check the candidates against all of it.
    spans = np.stack([val.tokens[p : p + T] for p, _ in cands]) if cands else np.zeros((0, T), np.int64)
    present, scanned = _in_split(dataset, "train", spans, max_scan_tokens)
    kept = [(p, r) for (p, r), seen in zip(cands, present, strict=True) if not seen][:n]
    info = {
        "prefix_len": T - cont,
        "continuation_len": cont,
        "split": "val",
        "sample_tokens": int(val.tokens.size),
        "recurring": sum(1 for _, r in kept if r),
        "train_tokens_scanned": scanned,
        "rejected_seen_in_train": int(present.sum()),
    }
    control = _span_probe("knowledge_control", val, [p for p, _ in kept], T, cont, info)
    return probe, control
