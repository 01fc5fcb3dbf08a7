"""Recall by distance: how many bits of a repeated span does context save, by how far back it occurred?

In each document a token is a **repeat at distance d** when it lies in a span
of at least ``min_span`` bytes (and two tokens) that occurred ``d`` tokens
earlier in the same document, and is not the span's first token (nothing
announces that a copy begins); ``d`` is the smallest such distance (the most
recent previous occurrence: a span seen three times counts from the second).
Source and copy may overlap (``abcabcabc...`` repeats at distance 3). Tokens
that lie in no repeated span are the **control**; the first tokens of spans
are counted apart.

Every token is scored with full context and with context cut to ``cut``
tokens (default: the model's trained window), exactly as ``mmrec eval bpb``
does (:func:`mmrec.evals.bpb.full_context_nats`, :func:`mmrec.evals.bpb.sliding_nats`):
MM-Rec streams whole documents through its state; a Transformer uses its KV
cache to its trained length and a sliding window beyond. The headline per
distance bucket is the fraction of repeat bits that context saves,
``1 - full / cut``; a bucket without tokens is ``None`` ("not evaluated"),
never 0. Distances under cut/2 are inside every cut window too, so little is
saved there by construction; beyond ``cut`` only memory can help.

**How spans are found** (:func:`find_repeats`). A window is a minimal stretch
of at least ``min_span`` bytes and two tokens, anchored at a token's start
(extending right) or at its end (extending left). Whether a token ``t`` is a
repeat at distance ``d`` depends only on these windows: ``d`` is the smallest
distance back to the most recent previous occurrence of any window that holds
``t`` after its first token (the window anchored at ``t - 1`` or the one ending
at the span's end always qualifies; both anchors are needed for tokenizers
whose tokens differ in length). Windows are hashed with two polynomial hashes
(Horner's rule, vectorised over all windows; a window's cost is its length in
tokens, 16 for the byte tokenizer), one stable sort by (hash, start) puts each
window right after its most recent previous occurrence, and each pair is
checked token by token, so a hash collision cannot create a repeat. Cost:
O(n log n + n * window tokens) numpy work, no Python loop over tokens; a
suffix automaton would give the same answer in O(n) but with a Python loop
over every token, far slower here. The repeated spans need no extension
step: every token of a maximal repeat lies inside one of its windows.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmrec.evals.bpb import (
    cut_context_description,
    full_context_description,
    full_context_nats,
    model_name,
    read_documents,
    sliding_nats,
)
from mmrec.models import MMRecLM

DISTANCE_EDGES = (1024, 4096, 16384, 65536)  # bucket i holds distances in [edge[i-1], edge[i])
LN2 = math.log(2.0)
NOT_EVALUATED = "not evaluated"
# Two moduli below 2**31 with bases below them: h * base + token stays below 2**63.
_HASHES = ((2_147_483_647, 1_000_003), (1_000_000_007, 911_382_323))


def bucket_names() -> list[str]:
    k = lambda n: f"{n // 1024}K"  # noqa: E731
    edges = DISTANCE_EDGES
    return (
        [f"<{k(edges[0])}"] + [f"{k(a)}-{k(b)}" for a, b in zip(edges, edges[1:], strict=False)] + [f"{k(edges[-1])}+"]
    )


@dataclass
class Repeats:
    """Per token of a document: ``distance`` back to the most recent previous occurrence of a repeated span
    holding it after its first token (0: not a repeat), and ``in_span`` (it lies in a repeated span at all)."""

    distance: np.ndarray  # [n] int64
    in_span: np.ndarray  # [n] bool

    @property
    def span_start(self) -> np.ndarray:
        """Tokens that only begin repeated spans: in a span, never after its first token."""
        return self.in_span & (self.distance == 0)


def _windows(size: np.ndarray, min_span: int) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of every minimal window of >= ``min_span`` bytes and >= 2 tokens, anchored at either end."""
    n = size.size
    cum = np.concatenate([[0], np.cumsum(size)])  # cum[i]: bytes of tokens [0, i)
    first = np.arange(n)
    # Anchored at a start s: the first end e with cum[e] - cum[s] >= min_span, at least s + 2.
    hi = np.maximum(np.searchsorted(cum, cum[:-1] + min_span, side="left"), first + 2)
    last = np.arange(1, n + 1)
    # Anchored at an end e: the last start s with cum[e] - cum[s] >= min_span, at most e - 2.
    lo = np.minimum(np.searchsorted(cum, cum[1:] - min_span, side="right") - 1, last - 2)
    los = np.concatenate([first[hi <= n], lo[lo >= 0]])
    his = np.concatenate([hi[hi <= n], last[lo >= 0]])
    # The byte tokenizer's two anchorings give the same windows: keep one of each (np.unique is slower).
    key = np.sort(los * (n + 1) + his)
    first_of_kind = np.ones(key.size, dtype=bool)
    first_of_kind[1:] = key[1:] != key[:-1]
    key = key[first_of_kind]
    return key // (n + 1), key % (n + 1)


def _by_length(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An order with the longest windows first, and how many windows are longer than j, for each j."""
    order = np.argsort(-lengths, kind="stable")
    longer = np.searchsorted(-lengths[order], -np.arange(int(lengths.max())), side="left")
    return order, longer


def find_repeats(ids: Sequence[int] | np.ndarray, token_bytes: Sequence[int], min_span: int = 16) -> Repeats:
    """The repeats of one document (see the module docstring); ``token_bytes[i]`` is the UTF-8 length of id i."""
    if min_span < 1:
        raise ValueError(f"min_span must be >= 1 byte, got {min_span}")
    x = np.asarray(ids, dtype=np.int64)
    n = x.size
    distance, in_span = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
    if n < 2:
        return Repeats(distance, in_span)
    lo, hi = _windows(np.asarray(token_bytes, dtype=np.int64)[x], min_span)
    if lo.size == 0:
        return Repeats(distance, in_span)
    length = hi - lo
    order, longer = _by_length(length)
    lo, length = lo[order], length[order]
    (m1, b1), (m2, b2) = _HASHES
    h1, h2 = length % m1, length % m2
    for j, live in enumerate(longer):  # windows [:live] have a token at offset j (Horner's rule)
        token = x[lo[:live] + j] + 1
        h1[:live] = (h1[:live] * b1 + token) % m1
        h2[:live] = (h2[:live] * b2 + token) % m2
    keys = h1 * m2 + h2  # < 2**62
    # Sorted by (hash, start): each window right after its most recent previous occurrence.
    sort = np.lexsort((lo, keys))
    same = keys[sort[1:]] == keys[sort[:-1]]
    cur, prev = sort[1:][same], sort[:-1][same]
    equal = length[cur] == length[prev]
    for j in range(longer.size):  # token-by-token check: a hash collision is not a repeat
        check = equal & (j < length[cur])
        equal[check] = x[lo[cur[check]] + j] == x[lo[prev[check]] + j]
    cur, lag = cur[equal], (lo[cur] - lo[prev])[equal]
    if cur.size == 0:
        return Repeats(distance, in_span)
    order, longer = _by_length(length[cur])
    start, lag = lo[cur][order], lag[order]
    best = np.full(n, np.iinfo(np.int64).max)
    for j, live in enumerate(longer):
        idx = start[:live] + j
        in_span[idx] = True
        if j > 0:  # a window's first token is not predictable from the copy
            np.minimum.at(best, idx, lag[:live])
    distance = np.where(best < np.iinfo(np.int64).max, best, 0)
    return Repeats(distance, in_span)


class RecallSums:
    """Summed nats (full and cut context), tokens and bytes per distance bucket, control and span starts."""

    CONTROL = len(DISTANCE_EDGES) + 1
    SPAN_START = len(DISTANCE_EDGES) + 2

    def __init__(self) -> None:
        rows = len(DISTANCE_EDGES) + 3
        self.full, self.cut = np.zeros(rows), np.zeros(rows)
        self.tokens, self.bytes = np.zeros(rows, dtype=np.int64), np.zeros(rows)

    def add(self, repeats: Repeats, nats_full: np.ndarray, nats_cut: np.ndarray, nbytes: np.ndarray) -> None:
        """Scores of tokens 1..n-1 of a document (``nats[t-1]`` is token t's)."""
        dist, in_span = repeats.distance[1:], repeats.in_span[1:]
        row = np.where(
            dist > 0,
            np.searchsorted(np.asarray(DISTANCE_EDGES), dist, side="right"),
            np.where(in_span, self.SPAN_START, self.CONTROL),
        )
        rows = self.full.size
        self.full += np.bincount(row, nats_full, rows)
        self.cut += np.bincount(row, nats_cut, rows)
        self.tokens += np.bincount(row, minlength=rows)
        self.bytes += np.bincount(row, nbytes, rows)

    def summary(self, rows: slice | int) -> dict[str, Any]:
        """tokens, bytes, bpb with full and cut context and the saved fraction of the rows together."""
        tokens, nbytes = int(np.sum(self.tokens[rows])), float(np.sum(self.bytes[rows]))
        full, cut = float(np.sum(self.full[rows])), float(np.sum(self.cut[rows]))
        return {
            "tokens": tokens,
            "bytes": int(nbytes),
            "full_bpb": full / (nbytes * LN2) if tokens and nbytes > 0 else None,
            "cut_bpb": cut / (nbytes * LN2) if tokens and nbytes > 0 else None,
            # Bytes cancel: the fraction of the cut condition's bits that full context removes.
            "saved_fraction": 1.0 - full / cut if tokens and cut > 0 else None,
        }


def evaluate_recall(
    model: nn.Module,
    documents: Iterable[Sequence[int]],
    token_bytes: Sequence[int],
    trained_len: int,
    cut: int | None = None,
    window: int = 4096,
    min_span: int = 16,
    device: torch.device | str = "cpu",
    autocast: Any = None,
    streams: bool | None = None,
    log: Callable[[str], None] | None = None,
    source: str = "the documents",
) -> dict[str, Any]:
    """Bits per byte of repeats by distance and of the control, full vs cut context (module docstring).

    ``streams``: score full context by carrying the model's state through the document (default: for MM-Rec);
    ``cut`` defaults to ``trained_len``. ValueError naming ``source`` when no document has two tokens to score."""
    cut = trained_len if cut is None else cut
    if cut < 2:
        raise ValueError(f"--cut must be >= 2 tokens, got {cut}")
    if window < 1:
        raise ValueError(f"--stream-window must be >= 1 token, got {window}")
    autocast = autocast or contextlib.nullcontext()
    streams = isinstance(model, MMRecLM) if streams is None else streams
    nbytes_of = np.asarray(token_bytes, dtype=np.float64)
    sums = RecallSums()
    n_docs, longest, span_seconds, score_seconds, transformer_window = 0, 0, 0.0, 0.0, None
    for doc in documents:
        if len(doc) < 2:
            continue
        t0 = time.perf_counter()
        repeats = find_repeats(doc, token_bytes, min_span)
        t1 = time.perf_counter()
        ids = torch.as_tensor(np.asarray(doc, dtype=np.int64), device=device)
        nats_full, slid = full_context_nats(model, ids, trained_len, window, autocast, streams)
        transformer_window = trained_len if slid else transformer_window
        # A Transformer cut to its trained window runs the very windows of its full context: score them once.
        nats_cut = nats_full if not streams and cut == trained_len else sliding_nats(model, ids, cut, autocast)
        sums.add(repeats, nats_full, nats_cut, nbytes_of[np.asarray(doc[1:], dtype=np.int64)])
        n_docs += 1
        longest = max(longest, len(doc))
        span_seconds, score_seconds = span_seconds + t1 - t0, score_seconds + time.perf_counter() - t1
        if log is not None:
            log(
                f"document {n_docs}: {len(doc):,} tokens, {int((repeats.distance > 0).sum()):,} in repeats "
                f"(spans found in {t1 - t0:.2f}s, scored in {time.perf_counter() - t1:.1f}s)"
            )
    if n_docs == 0:
        raise ValueError(f"{source}: no document with at least 2 tokens to score (empty files are skipped)")
    buckets = [sums.summary(i) for i in range(len(DISTANCE_EDGES) + 1)]
    return {
        "arch": model_name(model),
        "buckets": bucket_names(),
        "repeat_tokens": [b["tokens"] for b in buckets],
        "repeat_bytes": [b["bytes"] for b in buckets],
        "full_bpb": [b["full_bpb"] for b in buckets],
        "cut_bpb": [b["cut_bpb"] for b in buckets],
        "saved_fraction": [b["saved_fraction"] for b in buckets],
        "repeats": sums.summary(slice(0, len(DISTANCE_EDGES) + 1)),
        "control": sums.summary(RecallSums.CONTROL),
        "span_starts": sums.summary(RecallSums.SPAN_START),
        "documents": n_docs,
        "longest_document_tokens": longest,
        "scored_tokens": int(sums.tokens.sum()),
        "min_span_bytes": min_span,
        "trained_seq_len": trained_len,
        "cut": cut,
        "full_context": full_context_description(streams, window, transformer_window),
        "cut_context": cut_context_description(cut),
        "span_seconds": round(span_seconds, 3),
        "score_seconds": round(score_seconds, 3),
    }


def _fmt(v: float | None, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if v is not None else NOT_EVALUATED


def markdown(models: list[dict[str, Any]]) -> str:
    """The side-by-side headline and one table per model."""
    names = models[0]["buckets"]
    lines = [
        "# Recall by distance",
        "",
        f"Repeats: tokens of spans of at least {models[0]['min_span_bytes']} bytes that occurred earlier in the "
        "same document, from the span's second token on, by distance in tokens back to the most recent previous "
        "occurrence. Saved: the fraction of repeat bits that full context saves over context cut to --cut tokens, "
        f"1 - full/cut; '{NOT_EVALUATED}': no such tokens. Distances under cut/2 are inside every cut window, so "
        "little is saved there by construction.",
        "",
        "| model | cut | " + " | ".join(names) + " | control |",
        "|---|---|" + "---|" * len(names) + "---|",
    ]
    for m in models:
        saved = " | ".join(_fmt(v) for v in m["saved_fraction"])
        lines.append(f"| {m['name']} | {m['cut']:,} | {saved} | {_fmt(m['control']['saved_fraction'])} |")
    if len({m["cut"] for m in models}) > 1:
        lines += [
            "",
            "The cuts differ, so each model's saved fraction is measured against a different baseline (a "
            "Transformer cut to its own trained window saves nothing by construction); for a like-for-like "
            "comparison give one --cut to all.",
        ]
    for m in models:
        lines += [
            "",
            f"## {m['name']}",
            "",
            f"Checkpoint {m['checkpoint']} (step {m['step']}, trained on {m['trained_seq_len']:,}-token windows); "
            f"{m['documents']} documents, {m['scored_tokens']:,} tokens scored, longest "
            f"{m['longest_document_tokens']:,}; data: {m['data']}.  ",
            f"Full context: {m['full_context']}.  ",
            f"Cut context: {m['cut_context']}.",
            "",
            "| tokens | count | bytes | bpb, full context | bpb, cut context | saved |",
            "|---|---|---|---|---|---|",
        ]
        rows = [
            (f"repeats at distance {name}", m["repeat_tokens"][i], m["repeat_bytes"][i], m["full_bpb"][i])
            for i, name in enumerate(names)
        ]
        for i, (label, count, nbytes, full) in enumerate(rows):
            lines.append(
                f"| {label} | {count:,} | {nbytes:,} | {_fmt(full)} | {_fmt(m['cut_bpb'][i])} | "
                f"{_fmt(m['saved_fraction'][i])} |"
            )
        for label, key in (
            ("all repeats", "repeats"),
            ("first tokens of spans", "span_starts"),
            ("control", "control"),
        ):
            s = m[key]
            lines.append(
                f"| {label} | {s['tokens']:,} | {s['bytes']:,} | {_fmt(s['full_bpb'])} | {_fmt(s['cut_bpb'])} | "
                f"{_fmt(s['saved_fraction'])} |"
            )
    return "\n".join(lines)


def plot(models: list[dict[str, Any]], path: Path) -> None:
    """Saved fraction against distance, one line per model (buckets without tokens left out of the line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = models[0]["buckets"]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 4))
    for m in models:
        y = np.array([v if v is not None else np.nan for v in m["saved_fraction"]], dtype=float)
        control = m["control"]["saved_fraction"]
        label = f"{m['name']} (cut {m['cut']:,}; control {_fmt(control, 2)})"
        ax.plot(x, y, marker="o", label=label)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xticks(x, names)
    ax.set_xlabel("distance back to the previous occurrence (tokens)")
    ax.set_ylabel("fraction of repeat bits saved by full context")
    ax.set_title("Recall by distance: 1 - bits(full context) / bits(cut context)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stderr(prefix: str) -> Callable[[str], None]:
    def log(line: str) -> None:
        print(f"{prefix}: {line}", file=sys.stderr)

    return log


def run(
    checkpoints: list[str],
    data: list[str] | None,
    out: str,
    cut: int | None = None,
    min_span: int = 16,
    window: int = 4096,
    max_docs: int | None = None,
    max_tokens: int | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """``mmrec eval recall``: every checkpoint on the same documents (``data``, or each run's validation split);
    results.json, results.md and recall_by_distance.png in ``out``. Every input is checked before any scoring
    and nothing is written until every model is scored."""
    from mmrec.data.cache import source_specs
    from mmrec.evals.common import (
        CheckpointError,
        load_checkpoint,
        resolve_checkpoint,
        run_data_settings,
        write_results,
    )
    from mmrec.utils.device import autocast_for, resolve_device

    if not checkpoints:
        raise ValueError("--checkpoint: name at least one run or step directory")
    if cut is not None and cut < 2:
        raise ValueError(f"--cut must be >= 2 tokens, got {cut}")
    if min_span < 1:
        raise ValueError(f"--min-span must be >= 1 byte, got {min_span}")
    dev = resolve_device(device)
    for checkpoint in checkpoints:
        resolve_checkpoint(checkpoint)
    if data:
        source_specs(data)  # a missing path fails here, before any model is scored
    loaded = [load_checkpoint(c, dev) for c in checkpoints]
    for lm in loaded:
        if lm.tokenizer is None:
            raise CheckpointError(
                f"--checkpoint: {lm.path} is a model of raw token ids (a synthetic task); bits per byte of text "
                "need a checkpoint with a tokenizer"
            )
        if not data:
            run_data_settings(lm)
    autocast = autocast_for(dev)
    models = []
    for given, lm in zip(checkpoints, loaded, strict=True):
        name = f"{lm.arch} ({given})"
        print(f"{name}: scoring", file=sys.stderr)
        result = evaluate_recall(
            lm.model,
            read_documents(lm, data, max_docs, max_tokens),
            lm.tokenizer.token_bytes(),
            lm.trained_seq_len,
            cut,
            window,
            min_span,
            dev,
            autocast,
            log=_stderr(name),
            source=f"--data {' '.join(data)}" if data else f"the validation split of {lm.path}",
        )
        result.update(
            name=name,
            checkpoint=str(lm.path),
            step=lm.step,
            data=", ".join(data) if data else "validation split of the run's data",
        )
        models.append(result)
    results = {
        "models": models,
        "buckets": bucket_names(),
        "distance_edges": list(DISTANCE_EDGES),
        "min_span_bytes": min_span,
        "null": f"{NOT_EVALUATED}: no tokens in that group",
        "saved_fraction": "1 - full/cut bits of the group's tokens",
    }
    table = markdown(models)
    path = write_results(out, results, table)
    with contextlib.suppress(ImportError):
        plot(models, path / "recall_by_distance.png")
    print(table)
    return results
