"""Reference entropies of a corpus: what a model must beat to have learned tokens and local structure.

Both references are fit on the training split and measured on the validation
split, with the conventions of the trainer's validation loss, so the numbers
compare directly with ``val_loss`` / ``val_bpb``:

* every document is followed by the end-of-text id, which is predicted like
  any other token (the trainer's stream puts one between documents), and it
  stands for 0 bytes;
* contexts never cross a document: the n-gram model sees the start of every
  document as ``order - 1`` beginning-of-document pads (an id just past the
  vocabulary, never predicted);
* nats per token are averaged over every prediction (document tokens and the
  end-of-text ids); bits per byte divide the same total by the UTF-8 bytes of
  the text and by ln 2.

The n-gram model is interpolated modified Kneser-Ney (Chen & Goodman, 1998)
in the form KenLM estimates: the highest order keeps raw counts, lower
orders use continuation counts (the number of distinct tokens seen before
an n-gram), except for n-grams that start with the document pad, which
nothing can precede and so keep their raw count. Lower orders back off down
to a uniform distribution over the whole vocabulary, so every token has a
non-zero probability and the distribution after any context sums to 1.

Counting is vectorised: an n-gram is one int64 in mixed radix
``vocab_size + 1`` (the pad is the extra digit), counted with ``np.unique``
and looked up with ``np.searchsorted``; there is no Python loop per token.
Fitting 20M tokens at order 3 takes seconds and about 1 GB at the peak.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LN2 = math.log(2.0)
# Queries are scored in chunks of this many predictions, to bound temporary memory.
_QUERY_CHUNK = 1 << 20
# The largest key a mixed-radix n-gram may need.
_INT64_MAX = np.iinfo(np.int64).max


# Corpus samples.
@dataclass
class TokenSample:
    """Whole documents (the last one possibly cut) taken from the splits of a prepared dataset.

    ``tokens[offsets[i]:offsets[i + 1]]`` is document i; documents carry no
    end-of-text ids. ``per_source`` records how many tokens each source gave.
    """

    tokens: np.ndarray
    offsets: np.ndarray
    per_source: dict[str, int] = field(default_factory=dict)
    available: int = 0

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def stream(self, eot_id: int) -> np.ndarray:
        """The documents joined as the trainer's stream joins them: each preceded by the end-of-text id."""
        lens = np.diff(self.offsets)
        out = np.full(self.n_tokens + self.n_docs, eot_id, dtype=np.int64)
        pos = np.arange(self.n_tokens, dtype=np.int64) + np.repeat(np.arange(1, self.n_docs + 1), lens)
        out[pos] = self.tokens
        return out


def _take_docs(tokens: np.ndarray, offsets: np.ndarray, docs: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents ``docs`` (in that order) until ``budget`` tokens, the last cut to fit; read in file order."""
    lens = (offsets[docs + 1] - offsets[docs]).astype(np.int64)
    cum = np.cumsum(lens)
    n = int(np.searchsorted(cum, budget, side="left")) + 1
    n = min(n, len(docs))
    chosen, lens = docs[:n], lens[:n].copy()
    if n and cum[n - 1] > budget:
        lens[-1] -= int(cum[n - 1] - budget)
    keep = lens > 0
    chosen, lens = chosen[keep], lens[keep]
    # Reading in file order turns the gather into a near-sequential scan of the memory map.
    order = np.argsort(chosen, kind="stable")
    chosen, lens = chosen[order], lens[order]
    out_off = np.zeros(len(chosen) + 1, dtype=np.int64)
    np.cumsum(lens, out=out_off[1:])
    total = int(out_off[-1])
    starts = offsets[chosen].astype(np.int64)
    idx = np.arange(total, dtype=np.int64) + np.repeat(starts - out_off[:-1], lens)
    return np.asarray(tokens[idx]), out_off


def sample_split(
    dataset: Any, split: str, max_tokens: int, seed: int = 0, shuffle: bool = True, by_weight: bool = True
) -> TokenSample:
    """Up to ``max_tokens`` tokens of whole documents from ``split`` of every source of a prepared dataset.

    With ``shuffle`` the documents are a seeded random choice (a corpus stored
    in file order, like the standard library, would otherwise be sampled from
    its first packages only); without it they are taken in stored order, as the
    trainer's validation windows are. The budget is shared between sources in
    proportion to their mixture weights (``by_weight``) or equally.
    """
    names = sorted(dataset.sources)
    if not names:
        raise ValueError("the dataset has no sources")
    weights = np.array([max(float(dataset.sources[n].weight), 0.0) if by_weight else 1.0 for n in names])
    if weights.sum() <= 0:
        weights = np.ones(len(names))
    shares = weights / weights.sum()
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    per_source: dict[str, int] = {}
    available = 0
    rng = np.random.default_rng(seed)
    for name, share in zip(names, shares, strict=True):
        shard = dataset.sources[name].split(split)
        available += shard.n_tokens
        budget = int(max_tokens * share)
        if shard.n_docs == 0 or budget <= 0:
            per_source[name] = 0
            continue
        docs = rng.permutation(shard.n_docs) if shuffle else np.arange(shard.n_docs)
        toks, off = _take_docs(shard.tokens, shard.offsets, docs, budget)
        parts.append((toks, off))
        per_source[name] = int(off[-1])
    if not parts:
        return TokenSample(np.zeros(0, np.int64), np.zeros(1, np.int64), per_source, available)
    tokens = np.concatenate([p[0] for p in parts])
    shifts = np.cumsum([0] + [int(p[1][-1]) for p in parts[:-1]])
    offsets = np.concatenate([parts[0][1][:1]] + [p[1][1:] + s for p, s in zip(parts, shifts, strict=True)])
    return TokenSample(tokens, offsets.astype(np.int64), per_source, available)


# Unigram.
def unigram_log_probs(counts: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """Log probabilities [V] of the add-``alpha`` smoothed unigram distribution of token ``counts`` [V]."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum() + alpha * len(counts)
    if total <= 0:
        raise ValueError("unigram counts are all zero and alpha is 0: there is nothing to estimate from")
    with np.errstate(divide="ignore"):
        return np.log((counts + alpha) / total)


def unigram_entropy(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int, alpha: float = 1.0) -> float:
    """Cross-entropy (nats/token) on ``eval_tokens`` of the add-``alpha`` unigram distribution of ``train_tokens``.

    With training and evaluation tokens drawn from the same i.i.d. source this
    approaches the source's entropy as the sample grows (add-one smoothing
    costs about (V - 1) / (2 N) nats at N training tokens). ``alpha = 0`` is
    the maximum-likelihood estimate, infinite when an evaluation token never
    occurs in training.
    """
    train = np.asarray(train_tokens, dtype=np.int64)
    ev = np.asarray(eval_tokens, dtype=np.int64)
    if ev.size == 0:
        raise ValueError("eval_tokens is empty: there is nothing to measure the entropy on")
    for name, arr in (("train_tokens", train), ("eval_tokens", ev)):
        if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
            raise ValueError(f"{name} holds ids outside 0..{vocab_size - 1}")
    logp = unigram_log_probs(np.bincount(train, minlength=vocab_size), alpha)
    return float(-logp[ev].mean())


# Kneser-Ney.
@dataclass
class _Order:
    """Tables of one order n >= 2: n-gram keys with their discounted probability, and context statistics."""

    keys: np.ndarray  # sorted int64 keys of the n-grams seen
    alpha: np.ndarray  # max(c - D(c), 0) / C(context) for each key
    ctx_keys: np.ndarray  # sorted int64 keys of the (n-1)-gram contexts seen
    gamma: np.ndarray  # back-off weight of each context: (D1 N1 + D2 N2 + D3 N3+) / C(context)
    discounts: tuple[float, float, float]


def _discounts(counts: np.ndarray) -> tuple[float, float, float]:
    """Modified Kneser-Ney discounts D1, D2, D3+ from the count-of-counts (Chen & Goodman's estimates).

    Tiny or degenerate data (no n-grams seen exactly once, say) leaves some
    estimates undefined; those fall back to k / 2. Each D_k is kept in
    [0.01, k]: at most k so no probability goes negative (and the
    distribution still sums to 1), above 0 so every seen context keeps some
    mass for unseen tokens.
    """
    n1, n2, n3, n4 = (int(np.count_nonzero(counts == k)) for k in (1, 2, 3, 4))
    y = n1 / (n1 + 2 * n2) if n1 > 0 and n2 > 0 else 0.5
    raw = (
        1 - 2 * y * n2 / n1 if n1 > 0 else 0.5,
        2 - 3 * y * n3 / n2 if n2 > 0 else 1.0,
        3 - 4 * y * n4 / n3 if n3 > 0 else 1.5,
    )
    d1, d2, d3 = (float(min(max(d, 0.01), k)) for k, d in zip((1, 2, 3), raw, strict=True))
    return d1, d2, d3


def _discount_of(counts: np.ndarray, d: tuple[float, float, float]) -> np.ndarray:
    table = np.array([0.0, d[0], d[1], d[2]])
    return table[np.minimum(counts, 3)]


def _group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    if sorted_keys.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1])))


class KneserNey:
    """Interpolated modified Kneser-Ney n-gram model over token ids.

    ``eot_id`` (usually the tokenizer's end-of-text id) is the end of a
    document: ``fit`` and ``losses`` append it to every document and predict
    it, and in windows (``position_losses``) a context is cut after it, as a
    new document starts there. Without it documents simply end.
    """

    def __init__(self, vocab_size: int, order: int = 3, eot_id: int | None = None) -> None:
        if not isinstance(order, int) or order < 1:
            raise ValueError(f"order must be an int >= 1, got {order!r}")
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
        if eot_id is not None and not 0 <= eot_id < vocab_size:
            raise ValueError(f"eot_id {eot_id} is outside the vocabulary 0..{vocab_size - 1}")
        self.radix = vocab_size + 1
        if self.radix**order > _INT64_MAX:
            raise ValueError(
                f"an order-{order} model over {vocab_size} ids needs n-gram keys beyond 64 bits; "
                f"use order <= {int(math.log(_INT64_MAX) / math.log(self.radix))}"
            )
        self.vocab_size, self.order, self.eot_id = vocab_size, order, eot_id
        self.pad = vocab_size  # beginning-of-document pad: an id past the vocabulary, never predicted
        self.p1: np.ndarray = np.full(vocab_size, 1.0 / vocab_size)
        self.tables: dict[int, _Order] = {}
        self.unigram_discounts: tuple[float, float, float] = (0.5, 1.0, 1.5)
        self.n_train_tokens = 0
        self.fitted = False

    # Fitting.
    def _padded(self, tokens: np.ndarray, doc_starts: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Documents laid out as [pad] * (order - 1) + doc (+ [eot]); returns the array and the target positions."""
        tokens = np.asarray(tokens)
        n = len(tokens)
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"tokens hold ids outside 0..{self.vocab_size - 1}")
        starts = np.zeros(1, dtype=np.int64) if doc_starts is None else np.asarray(doc_starts, dtype=np.int64)
        if starts.size == 0 or starts[0] != 0 or np.any(np.diff(starts) < 0) or starts[-1] > n:
            raise ValueError("doc_starts must be non-decreasing document start indices beginning with 0")
        offsets = np.concatenate((starts, [n]))
        lens = np.diff(offsets)
        n_docs = len(lens)
        head = self.order - 1
        extra = head + (1 if self.eot_id is not None else 0)
        seq = np.full(n + n_docs * extra, self.pad, dtype=np.int64)
        pos = np.arange(n, dtype=np.int64) + np.repeat(np.arange(n_docs, dtype=np.int64), lens) * extra + head
        seq[pos] = tokens
        if self.eot_id is not None:
            seq[offsets[1:] + np.arange(1, n_docs + 1) * extra - 1] = self.eot_id
        return seq, np.flatnonzero(seq != self.pad)

    def fit(self, tokens: np.ndarray, doc_starts: np.ndarray | None = None) -> KneserNey:
        """Count the n-grams of ``tokens`` (documents starting at ``doc_starts``; one document if None)."""
        seq, targets = self._padded(tokens, doc_starts)
        if targets.size == 0:
            raise ValueError("no tokens to fit the n-gram model on")
        N, R = self.order, self.radix
        # Keys of the highest order, one per prediction: the target and the N - 1 ids before it.
        key = np.zeros(len(targets), dtype=np.int64)
        for j in range(N):
            key *= R
            key += seq[targets - (N - 1) + j]
        del seq, targets
        keys, raw = np.unique(key, return_counts=True)
        del key
        counts = raw.astype(np.int64)
        grams: dict[int, tuple[np.ndarray, np.ndarray]] = {N: (keys, counts)}
        # Lower orders: continuation counts, i.e. distinct left extensions; a pad on the left keeps the raw count.
        for n in range(N - 1, 0, -1):
            keys_up, counts_up = grams[n + 1]
            scale = R**n
            first = keys_up // scale
            suffix = keys_up - first * scale
            weight = np.where(first == self.pad, counts_up, 1)
            k, inv = np.unique(suffix, return_inverse=True)
            grams[n] = (k, np.bincount(inv, weights=weight, minlength=len(k)).astype(np.int64))
        # Order 1 is dense over the vocabulary and interpolates with the uniform floor.
        k1, c1 = grams[1]
        dense = np.zeros(self.vocab_size, dtype=np.int64)
        dense[k1] = c1
        d = _discounts(dense[dense > 0])
        self.unigram_discounts = d
        total = float(dense.sum())
        disc = _discount_of(dense, d)
        gamma1 = float(disc.sum()) / total
        self.p1 = (dense - disc) / total + gamma1 / self.vocab_size
        self.tables = {}
        for n in range(2, N + 1):
            k, c = grams[n]
            d = _discounts(c)
            ctx = k // R
            starts = _group_starts(ctx)
            totals = np.add.reduceat(c, starts).astype(np.float64)
            disc = _discount_of(c, d)
            gamma = np.add.reduceat(disc, starts) / totals
            group = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(k))))
            alpha = (c - disc) / totals[group]
            self.tables[n] = _Order(keys=k, alpha=alpha, ctx_keys=ctx[starts], gamma=gamma, discounts=d)
        self.n_train_tokens = int(np.asarray(tokens).size)
        self.fitted = True
        return self

    # Scoring.
    def _check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("the n-gram model is not fitted yet: call fit(tokens) first")

    def prob(self, contexts: np.ndarray, targets: np.ndarray, max_order: np.ndarray | None = None) -> np.ndarray:
        """P(target | context) for each row: ``contexts`` [m, order - 1] (pad id ``vocab_size`` allowed).

        ``max_order`` [m] limits the order used per row (a history cut short
        by a window start holds fewer real ids: order = ids available + 1).
        """
        self._check_fitted()
        N, R = self.order, self.radix
        tgt = np.asarray(targets, dtype=np.int64)
        ctx = np.asarray(contexts, dtype=np.int64).reshape(len(tgt), N - 1)
        p = self.p1[tgt].copy()
        hkey = np.zeros(len(tgt), dtype=np.int64)
        for n in range(2, N + 1):
            # The context of order n is the last n - 1 ids; each order adds one older, more significant digit.
            hkey = hkey + ctx[:, N - n] * R ** (n - 2)
            tbl = self.tables[n]
            if tbl.ctx_keys.size == 0:
                continue
            ci = np.minimum(np.searchsorted(tbl.ctx_keys, hkey), len(tbl.ctx_keys) - 1)
            found = tbl.ctx_keys[ci] == hkey
            gkey = hkey * R + tgt
            gi = np.minimum(np.searchsorted(tbl.keys, gkey), len(tbl.keys) - 1)
            a = np.where(tbl.keys[gi] == gkey, tbl.alpha[gi], 0.0)
            use = found if max_order is None else found & (np.asarray(max_order) >= n)
            p = np.where(use, a + tbl.gamma[ci] * p, p)
        return p

    def distribution(self, context: list[int] | np.ndarray) -> np.ndarray:
        """The whole next-token distribution [V] after ``context`` (its last order - 1 ids; shorter = cut history)."""
        ctx = [int(t) for t in context][-(self.order - 1) :] if self.order > 1 else []
        have = len(ctx)
        row = [self.pad] * (self.order - 1 - have) + ctx
        V = self.vocab_size
        contexts = np.tile(np.array(row, dtype=np.int64), (V, 1))
        return self.prob(contexts, np.arange(V), np.full(V, have + 1))

    def _chunks(self, n: int) -> list[slice]:
        return [slice(i, min(n, i + _QUERY_CHUNK)) for i in range(0, n, _QUERY_CHUNK)]

    def losses(self, tokens: np.ndarray, doc_starts: np.ndarray | None = None) -> np.ndarray:
        """Loss (nats) of every prediction: each document's tokens, then its end-of-text id when ``eot_id`` is set."""
        self._check_fitted()
        seq, targets = self._padded(tokens, doc_starts)
        N = self.order
        out = np.empty(len(targets), dtype=np.float64)
        for sl in self._chunks(len(targets)):
            t = targets[sl]
            ctx = np.stack([seq[t - (N - 1) + j] for j in range(N - 1)], axis=1) if N > 1 else np.zeros((len(t), 0))
            out[sl] = -np.log(self.prob(ctx, seq[t]))
        return out

    def cross_entropy(self, tokens: np.ndarray, doc_starts: np.ndarray | None = None) -> float:
        """Mean loss in nats per prediction over documents starting at ``doc_starts`` (contexts stay inside them)."""
        loss = self.losses(tokens, doc_starts)
        if loss.size == 0:
            raise ValueError("no tokens to measure the cross-entropy on")
        return float(loss.mean())

    def window_contexts(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Contexts [n * L, order - 1], targets [n * L] and orders [n * L] of windows [n, L + 1], row-major.

        The history is cut at the window start (fewer ids, a lower order, as a
        neural model fed the same window sees), and restarts with pads after
        an end-of-text id inside the window (a new document, which the neural
        model sees too).
        """
        w = np.asarray(windows, dtype=np.int64)
        if w.ndim != 2 or w.shape[1] < 2:
            raise ValueError(f"windows must have shape [n, L + 1] with L >= 1, got {w.shape}")
        n, L1 = w.shape
        L, N = L1 - 1, self.order
        idx = np.arange(L1)
        if self.eot_id is not None:
            last_eot = np.maximum.accumulate(np.where(w == self.eot_id, idx, -1), axis=1)
        else:
            last_eot = np.full((n, L1), -1)
        s = idx[1:]  # positions of the targets
        cut = last_eot[:, :-1]  # the last end-of-text id before each target, -1 if none in the window
        ctx = np.full((n, L, max(N - 1, 0)), self.pad, dtype=np.int64)
        for j in range(N - 1):
            back = N - 1 - j  # how many positions before the target this context id is
            p = s - back
            ok = (p >= 0)[None, :] & (p[None, :] > cut)
            ctx[:, :, j] = np.where(ok, w[:, np.clip(p, 0, None)], self.pad)
        # Without an end-of-text id before it, a target at position s has s real ids of history.
        max_order = np.where(cut >= 0, N, np.minimum(N, s + 1)[None, :])
        return ctx.reshape(n * L, -1), w[:, 1:].reshape(-1), max_order.reshape(-1)

    def window_losses(self, windows: np.ndarray) -> np.ndarray:
        """Loss (nats) [n, L] of each target of windows [n, L + 1], histories cut at the window start."""
        self._check_fitted()
        w = np.asarray(windows)
        ctx, tgt, mo = self.window_contexts(w)
        out = np.empty(len(tgt), dtype=np.float64)
        for sl in self._chunks(len(tgt)):
            out[sl] = -np.log(self.prob(ctx[sl], tgt[sl], mo[sl]))
        return out.reshape(w.shape[0], w.shape[1] - 1)

    def position_losses(self, windows: np.ndarray) -> np.ndarray:
        """Mean loss (nats) per position [L] over windows [n, L + 1], comparable with a model fed the same windows."""
        return self.window_losses(windows).mean(axis=0)

    def argmax(self, contexts: np.ndarray, max_order: np.ndarray | None = None) -> np.ndarray:
        """The most probable next token after each context [m, order - 1] (exact, without scoring all V tokens).

        The best token is either one seen after some suffix of the context (it
        gets a discounted count there) or, among the rest, the best of the
        lowest order, whose probability is a common factor times p1; so the
        candidates are the seen continuations plus that many + 1 top p1 ids.
        """
        self._check_fitted()
        N, R = self.order, self.radix
        ctx = np.asarray(contexts, dtype=np.int64)
        ctx = ctx.reshape(ctx.shape[0] if ctx.ndim == 2 else -1, N - 1) if N > 1 else ctx.reshape(-1, 0)
        mo = np.full(len(ctx), N) if max_order is None else np.asarray(max_order)
        top = np.argsort(-self.p1, kind="stable")
        out = np.empty(len(ctx), dtype=np.int64)
        for i in range(len(ctx)):
            seen: list[np.ndarray] = []
            hkey = 0
            for n in range(2, int(mo[i]) + 1):
                hkey += int(ctx[i, N - n]) * R ** (n - 2)
                keys = self.tables[n].keys
                lo, hi = np.searchsorted(keys, [hkey * R, hkey * R + self.vocab_size])
                seen.append(keys[lo:hi] - hkey * R)
            cand_seen = np.unique(np.concatenate(seen)) if seen else np.zeros(0, np.int64)
            cand = np.unique(np.concatenate((cand_seen, top[: len(cand_seen) + 1])))
            rows = np.repeat(ctx[i : i + 1], len(cand), axis=0)
            p = self.prob(rows, cand, np.full(len(cand), mo[i]))
            out[i] = cand[int(np.argmax(p))]
        return out


# References of a dataset.
@dataclass
class References:
    """Fitted reference models of a dataset and the summary ``fit_references`` returns."""

    summary: dict[str, Any]
    kneser_ney: KneserNey
    unigram_logp: np.ndarray  # [V], training unigram with end-of-text ids, add-alpha smoothed
    train: TokenSample
    val: TokenSample


def _token_bytes(tokenizer: Any, vocab_size: int) -> np.ndarray:
    table = np.zeros(vocab_size, dtype=np.int64)
    tb = np.asarray(tokenizer.token_bytes(), dtype=np.int64)
    table[: min(len(tb), vocab_size)] = tb[:vocab_size]
    return table


def build_references(
    dataset: Any,
    tokenizer: Any,
    max_train_tokens: int = 20_000_000,
    max_eval_tokens: int = 4_000_000,
    order: int = 3,
    seed: int = 0,
    alpha: float = 1.0,
) -> References:
    """Fit the unigram and Kneser-Ney references on the training split; measure them on the validation split.

    Training documents are a seeded random sample of at most
    ``max_train_tokens`` (shared between sources by mixture weight);
    validation documents are taken in stored order, at most
    ``max_eval_tokens``, shared equally between sources as the trainer's
    validation is.
    """
    t0 = time.perf_counter()
    V, eot = int(tokenizer.vocab_size), int(tokenizer.eot_id)
    train = sample_split(dataset, "train", max_train_tokens, seed=seed, shuffle=True, by_weight=True)
    val = sample_split(dataset, "val", max_eval_tokens, seed=seed, shuffle=False, by_weight=False)
    if train.n_tokens == 0:
        raise ValueError("the training split is empty: no references can be fit")
    if val.n_tokens == 0:
        raise ValueError("the validation split is empty: no references can be measured")
    t_sample = time.perf_counter() - t0
    # The trainer predicts one end-of-text id per document; the unigram counts them too.
    counts = np.bincount(np.asarray(train.tokens, dtype=np.int64), minlength=V)
    counts[eot] += train.n_docs
    unigram_logp = unigram_log_probs(counts, alpha)
    t1 = time.perf_counter()
    kn = KneserNey(V, order=order, eot_id=eot).fit(train.tokens, train.offsets[:-1])
    t_fit = time.perf_counter() - t1
    tb = _token_bytes(tokenizer, V)
    summary: dict[str, Any] = {
        "order": order,
        "smoothing": f"unigram add-{alpha:g}; interpolated modified Kneser-Ney down to a uniform floor",
        "conventions": (
            "fit on a sample of the training split, measured on the validation split; one end-of-text id "
            "predicted after every document (0 bytes); contexts never cross documents"
        ),
        "train_tokens_used": train.n_tokens,
        "train_docs_used": train.n_docs,
        "train_tokens_available": train.available,
        "train_tokens_per_source": train.per_source,
        "discounts": {str(n): list(t.discounts) for n, t in kn.tables.items()} | {"1": list(kn.unigram_discounts)},
        "n_grams": {str(n): int(t.keys.size) for n, t in kn.tables.items()},
    }
    t2 = time.perf_counter()
    totals = {"unigram": 0.0, "ngram": 0.0, "predictions": 0, "tokens": 0, "bytes": 0}
    per_source: dict[str, dict[str, float]] = {}
    start = 0
    for name, n_tok in val.per_source.items():
        if n_tok == 0:
            continue
        # The documents of this source in the validation sample.
        lo = int(np.searchsorted(val.offsets, start))
        hi = int(np.searchsorted(val.offsets, start + n_tok))
        toks = np.asarray(val.tokens[start : start + n_tok], dtype=np.int64)
        starts = val.offsets[lo:hi] - start
        ng = kn.losses(toks, starts)
        with_eot = np.concatenate((toks, np.full(len(starts), eot)))
        uni = -unigram_logp[with_eot]
        n_bytes = int(tb[toks].sum())
        per_source[name] = {
            "tokens": n_tok,
            "docs": len(starts),
            "bytes": n_bytes,
            "unigram_nats": float(uni.mean()),
            "ngram_nats": float(ng.mean()),
            "unigram_bpb": float(uni.sum() / max(n_bytes, 1) / LN2),
            "ngram_bpb": float(ng.sum() / max(n_bytes, 1) / LN2),
        }
        totals["unigram"] += float(uni.sum())
        totals["ngram"] += float(ng.sum())
        totals["predictions"] += len(ng)
        totals["tokens"] += n_tok
        totals["bytes"] += n_bytes
        start += n_tok
    n_pred, n_bytes = max(int(totals["predictions"]), 1), max(int(totals["bytes"]), 1)
    summary.update(
        eval_tokens=int(totals["tokens"]),
        eval_predictions=int(totals["predictions"]),
        eval_bytes=int(totals["bytes"]),
        eval_docs=val.n_docs,
        eval_tokens_available=val.available,
        bytes_per_token=totals["bytes"] / max(int(totals["tokens"]), 1),
        unigram_nats=totals["unigram"] / n_pred,
        ngram_nats=totals["ngram"] / n_pred,
        unigram_bpb=totals["unigram"] / n_bytes / LN2,
        ngram_bpb=totals["ngram"] / n_bytes / LN2,
        per_source=per_source,
        seconds={
            "sample": round(t_sample, 3),
            "fit": round(t_fit, 3),
            "measure": round(time.perf_counter() - t2, 3),
            "total": round(time.perf_counter() - t0, 3),
        },
    )
    return References(summary=summary, kneser_ney=kn, unigram_logp=unigram_logp, train=train, val=val)


def fit_references(
    dataset: Any,
    tokenizer: Any,
    max_train_tokens: int = 20_000_000,
    max_eval_tokens: int = 4_000_000,
    order: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Unigram and n-gram cross-entropies of a dataset in nats/token and bits/byte, with what was used.

    Keys: ``unigram_nats``, ``ngram_nats``, ``unigram_bpb``, ``ngram_bpb``,
    ``bytes_per_token``, ``order``, ``train_tokens_used``,
    ``train_tokens_available``, ``eval_tokens``, ``eval_bytes``,
    ``per_source`` and ``seconds`` (see ``build_references``).
    """
    return build_references(dataset, tokenizer, max_train_tokens, max_eval_tokens, order, seed).summary
