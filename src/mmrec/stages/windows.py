"""The stage tracker's fixed windows and their statistics: where a window's early and late positions lie,
how its second half is cut for the context gain, which unrelated text warms a carried state, and the
strict JSON that stages.json is written as."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from mmrec.models.state import KVCache, TensorState


def buckets(L: int) -> tuple[slice, slice, list[int]]:
    """Early positions [0, L/16), late [L/2, L), and log2 bucket edges 0, 1, 2, 4, ..., L for the position curve."""
    early = slice(0, max(1, L // 16))
    late = slice(L // 2, L)
    edges = [0, 1]
    while edges[-1] * 2 < L:
        edges.append(edges[-1] * 2)
    edges.append(L)
    return early, late, edges


def cut_plan(L: int) -> tuple[int, int, int]:
    """History cut E = L/16 (the early bucket's length) and the targets [a, b) of the second half it covers."""
    cut = max(1, L // 16)
    a = L // 2
    return cut, a, a + (L - a) // cut * cut


def cut_windows(windows: np.ndarray) -> np.ndarray:
    """The second half of every window as pieces of E + 1 tokens: its targets with the history cut every E tokens."""
    L = windows.shape[1] - 1
    cut, a, b = cut_plan(L)
    pieces = [windows[:, s : s + cut + 1] for s in range(a, b, cut)]
    return np.stack(pieces, axis=1).reshape(-1, cut + 1)


def cut_means(cut_losses: np.ndarray, n_windows: int) -> np.ndarray:
    """Mean loss per window [n] of the pieces of ``cut_windows`` (losses [n * pieces, E])."""
    return cut_losses.reshape(n_windows, -1).mean(axis=1)


def window_stats(losses: np.ndarray) -> dict[str, list[float]]:
    """Per-window means over all, early, late and gain positions, and the mean position curve in log2 buckets."""
    L = losses.shape[1]
    early, late, edges = buckets(L)
    _, a, b = cut_plan(L)
    return {
        "mean": losses.mean(axis=1).tolist(),
        "early": losses[:, early].mean(axis=1).tolist(),
        "late": losses[:, late].mean(axis=1).tolist(),
        "gain_full": losses[:, a:b].mean(axis=1).tolist(),
        "curve": [float(losses[:, lo:hi].mean()) for lo, hi in zip(edges[:-1], edges[1:], strict=True)],
    }


def doc_ids(stream: np.ndarray, eot_id: int) -> np.ndarray:
    """The document of every token of a stream (each document starts with its end-of-text id)."""
    return np.cumsum(stream == eot_id)


def warmup_slots(
    stream: np.ndarray, L: int, chosen: np.ndarray, eot_id: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """For each window slot in ``chosen``, the slot of the stream whose first L tokens warm a carried state.

    Slot ``c`` holds ``stream[c * (L + 1) : (c + 1) * (L + 1)]``. A window's
    warm-up slot is drawn (seeded) from the slots that share no document with
    it; failing that (validation text of one or two documents), from the
    slots other than the window's own and the one just before it (its
    history); failing that, -1. Returns the slots and, per window, the kind:
    0 other documents, 1 same document, 2 none.
    """
    slots = len(stream) // (L + 1)
    docs = doc_ids(stream, eot_id)
    starts = np.arange(slots) * (L + 1)
    first, last = docs[starts], docs[starts + L]
    picked = np.full(len(chosen), -1, dtype=np.int64)
    kind = np.full(len(chosen), 2, dtype=np.int64)
    every = np.arange(slots)
    for i, s in enumerate(chosen):
        allowed = (every != s) & (every != s - 1)
        other_docs = allowed & ((last < first[s]) | (first > last[s]))
        for k, pool in enumerate((other_docs, allowed)):
            if pool.any():
                picked[i], kind[i] = int(rng.choice(every[pool])), k
                break
    return picked, kind


def carries_state(state: Any) -> bool:
    """A state carried between training windows (MM-Rec's), not a KV cache of the text itself (or nothing)."""
    return isinstance(state, TensorState) and not isinstance(state, KVCache)


def mean_se(x: np.ndarray) -> tuple[float, float]:
    if x.size == 0:
        return math.nan, math.nan
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
    return float(x.mean()), se


def digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        h.update(str(a.shape).encode())
    return h.hexdigest()[:16]


def json_safe(x: Any) -> Any:
    """NaN and infinities as null: stages.json is strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist())
    if isinstance(x, np.generic):
        return json_safe(x.item())
    return x


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(json_safe(data), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
