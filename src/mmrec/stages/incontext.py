"""In-context probes: induction (copy a span seen earlier in the row) and key-value lookup (pairs listed in it).

* Induction (``build_induction``): a span of random corpus tokens, repeated
  at the end of the row after unrelated corpus text; the second copy (less
  its first token) is scored.
* Key-value lookup (``build_kv``): lines ``key: value`` of corpus words, then
  some of the keys again; the values after them are scored.

Rows are ``Probe``s (``mmrec.stages.probes``), a pure function of the
dataset, the tokenizer and the seed.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from mmrec.stages.entropy import TokenSample, sample_split
from mmrec.stages.probes import Probe, build_knowledge


# Pieces of both builders.
def _special_ids(tokenizer: Any, vocab_size: int) -> np.ndarray:
    """Ids that stand for no text (end-of-text and other specials): never drawn as probe content."""
    tb = np.zeros(vocab_size, dtype=np.int64)
    table = np.asarray(tokenizer.token_bytes(), dtype=np.int64)[:vocab_size]
    tb[: len(table)] = table
    special = tb == 0
    special[int(tokenizer.eot_id)] = True
    return special


def _filler_stream(dataset: Any, tokenizer: Any, need: int, seed: int) -> np.ndarray:
    """Validation text joined like the trainer's stream (end-of-text before each document); training text if short."""
    val = sample_split(dataset, "val", 4_000_000, seed=seed, shuffle=False, by_weight=False)
    stream = val.stream(int(tokenizer.eot_id)) if val.n_tokens else np.zeros(0, np.int64)
    if len(stream) < need:
        train = sample_split(dataset, "train", max(need * 4, 1 << 16), seed=seed)
        stream = np.concatenate((stream, train.stream(int(tokenizer.eot_id))))
    if len(stream) < need:
        raise ValueError(
            f"the corpus holds {len(stream)} tokens, fewer than the {need} a probe row needs; "
            "use a shorter probe or more data"
        )
    return stream


def _corpus_distribution(sample: TokenSample, special: np.ndarray, power: float) -> np.ndarray:
    """Token distribution [V] proportional to count ** power over the ids seen in the sample (no specials)."""
    counts = np.bincount(np.asarray(sample.tokens, dtype=np.int64), minlength=len(special)).astype(np.float64)
    counts[special] = 0.0
    if counts.sum() == 0:
        raise ValueError("the training sample holds no text tokens to build a probe from")
    q = np.where(counts > 0, counts**power, 0.0)
    return q / q.sum()


# Induction.
def build_induction(
    dataset: Any,
    tokenizer: Any,
    n: int = 64,
    seq_len: int = 256,
    seed: int = 0,
    span_len: int = 16,
    freq_power: float = 0.5,
) -> Probe:
    """Rows ``[text][S][unrelated text][S]``: S is ``span_len`` random corpus tokens; its second copy is scored.

    S's tokens are distinct, drawn with probability proportional to their
    corpus count ** ``freq_power`` (1 = corpus frequencies; the default 0.5
    flattens them, so a model that always guesses the commonest token gains
    little) and chosen among tokens absent from the text between the copies,
    so the token after the previous occurrence of each token of the second
    copy is always the right answer. The first copy starts within the first
    eighth of the row, so the copy is recalled from about ``seq_len`` tokens
    back. The first token of the second copy is not scored (nothing
    announces the repeat). ``info["chance"]`` is the accuracy of always
    guessing the likeliest token of the drawing distribution.
    """
    T = int(seq_len)
    k = max(2, min(int(span_len), T // 4))
    if T < 8:
        raise ValueError(f"an induction row needs at least 8 tokens, got seq_len={T}")
    V = int(tokenizer.vocab_size)
    special = _special_ids(tokenizer, V)
    q = _corpus_distribution(sample_split(dataset, "train", 2_000_000, seed=seed), special, freq_power)
    stream = _filler_stream(dataset, tokenizer, T + 1, seed)
    rng = np.random.default_rng([seed, 2])
    ids = np.zeros((n, T), dtype=np.int64)
    lengths: list[int] = []
    chance: list[float] = []
    for i in range(n):
        # A text whose gap leaves k allowed tokens; after 20 tries, the longest span the last text allows.
        for attempt in range(20):
            o = int(rng.integers(0, len(stream) - T + 1))
            row = stream[o : o + T].copy()
            a = int(rng.integers(0, T // 8 + 1))
            for kk in range(k, 1, -1) if attempt == 19 else (k,):
                allowed = q.copy()
                allowed[np.unique(row[a + kk : T - kk])] = 0.0
                if np.count_nonzero(allowed) >= kk:
                    break
            if np.count_nonzero(allowed) >= kk:
                break
        if np.count_nonzero(allowed) < kk:
            raise ValueError(
                "the corpus has too few distinct tokens to draw an induction span absent from the text between "
                "the copies; use a shorter seq_len"
            )
        allowed /= allowed.sum()
        span = rng.choice(V, size=kk, replace=False, p=allowed)
        row[a : a + kk] = span
        row[T - kk :] = span
        ids[i] = row
        lengths.append(kk)
        chance.append(float(allowed.max()))
    mask = np.zeros((n, T), dtype=bool)
    for i, kk in enumerate(lengths):
        mask[i, T - kk + 1 :] = True
    answer = np.where(mask, 0, -1)
    info = {"span_len": k, "freq_power": freq_power, "chance": float(np.mean(chance)) if chance else float("nan")}
    return Probe("induction", ids, mask, answer, info)


# Key-value lookup.
_WORD = re.compile(r"\b[^\W\d_]{3,12}\b")


def corpus_words(dataset: Any, tokenizer: Any, seed: int = 0, max_tokens: int = 400_000, top: int = 4096) -> list[str]:
    """The commonest words (3-12 letters, seen at least twice) of a training sample, commonest first."""
    sample = sample_split(dataset, "train", max_tokens, seed=seed)
    counts: Counter[str] = Counter()
    for d in range(sample.n_docs):
        text = tokenizer.decode(sample.tokens[sample.offsets[d] : sample.offsets[d + 1]].tolist())
        counts.update(_WORD.findall(text))
    words = [w for w, c in counts.items() if c >= 2]
    words.sort(key=lambda w: (-counts[w], w))
    return words[:top]


def build_kv(
    dataset: Any,
    tokenizer: Any,
    n: int = 64,
    seq_len: int = 256,
    seed: int = 0,
    n_pairs: int = 8,
    n_queries: int = 4,
) -> Probe:
    """Rows of corpus text, then lines ``key: value`` (distinct corpus words), then ``n_queries`` keys again.

    The values after the repeated keys are scored, except tokens that are
    only whitespace (the space before a value is no lookup). A row holds
    fewer pairs when ``seq_len`` is too short for ``n_pairs``; the number used
    is in ``info["pairs"]``. When the corpus has too few words (not a
    language with letters), keys and values are pairs of random corpus
    tokens instead. ``info["chance"]`` is 1 / pairs: guessing among the
    listed values.
    """
    T = int(seq_len)
    V = int(tokenizer.vocab_size)
    rng = np.random.default_rng([seed, 3])
    words = corpus_words(dataset, tokenizer, seed)
    use_words = len(words) >= 4 * n_pairs
    special = _special_ids(tokenizer, V)
    q = None if use_words else _corpus_distribution(sample_split(dataset, "train", 2_000_000, seed=seed), special, 0.5)

    def enc(s: str) -> list[int]:
        return list(tokenizer.encode(s))

    sep, nl = enc(":"), enc("\n")
    space_only: dict[int, bool] = {}

    def is_space(t: int) -> bool:
        if t not in space_only:
            space_only[t] = tokenizer.decode([t]).strip() == ""
        return space_only[t]

    pool = words

    def item() -> tuple[list[int], list[int]]:
        """A key and a value: token lists (the value with its leading space)."""
        if use_words:
            k, v = rng.choice(len(pool), size=2, replace=False)
            return enc(pool[int(k)]), enc(" " + pool[int(v)])
        assert q is not None
        drawn = rng.choice(V, size=4, replace=False, p=q)
        return [int(t) for t in drawn[:2]], enc(" ") + [int(t) for t in drawn[2:]]

    stream = _filler_stream(dataset, tokenizer, T + 1, seed)
    ids = np.zeros((n, T), dtype=np.int64)
    mask = np.zeros((n, T), dtype=bool)
    answer = np.full((n, T), -1, dtype=np.int64)
    pairs_used: list[int] = []
    for i in range(n):
        for _attempt in range(2):
            keys: list[list[int]] = []
            values: list[list[int]] = []
            while len(keys) < n_pairs:
                k, v = item()
                if k in keys or v in values or k in values or v in keys:
                    continue
                keys.append(k)
                values.append(v)
            for p in range(n_pairs, 0, -1):
                nq = min(n_queries, p)
                qs = [int(j) for j in rng.choice(p, size=nq, replace=False)]
                lines = [(keys[j], values[j]) for j in range(p)] + [(keys[j], values[j]) for j in qs]
                body = nl + [t for key, val in lines for t in key + sep + val + nl]
                if len(body) <= T:
                    break
            if len(body) <= T or not use_words:
                break
            # Not even one pair and its query fit: from now on, only words short enough for that.
            budget = (T - len(nl)) // 2 - len(sep) - len(nl)
            short = [w for w in words if len(enc(w)) + len(enc(" " + w)) <= budget]
            if len(short) < 2 * n_pairs + 2:
                break
            pool = short
        if len(body) > T:
            raise ValueError(f"seq_len={T} is too short for one key-value pair and its query")
        o = int(rng.integers(0, len(stream) - T + 1))
        row = np.concatenate((stream[o : o + T - len(body)], np.array(body, dtype=np.int64)))
        # Mark the values of the query lines (the last nq lines), skipping whitespace-only tokens.
        pos = T - len(body) + len(nl)
        for line, (key, val) in enumerate(lines):
            pos += len(key) + len(sep)
            if line >= p:
                for j, t in enumerate(val):
                    if not is_space(t):
                        mask[i, pos + j] = True
                        answer[i, pos + j] = line - p
            pos += len(val) + len(nl)
        ids[i] = row
        pairs_used.append(p)
    info = {
        "pairs": int(np.median(pairs_used)) if pairs_used else 0,
        "queries": n_queries,
        "mode": "words" if use_words else "tokens",
        "n_words": len(words),
        "chance": float(np.mean([1.0 / p for p in pairs_used])) if pairs_used else float("nan"),
    }
    return Probe("kv", ids, mask, answer, info)


ProbeBuilder = Callable[..., Probe]
BUILDERS: dict[str, ProbeBuilder] = {"knowledge": build_knowledge, "induction": build_induction, "kv": build_kv}
