"""The five learning stages of the founding document, measured by what they mean, and the seed's loss bands.

The seed claims every LLM learns in five stages, its training loss falling
through fixed bands (nats per token, for 32K-100K-entry tokenizers). Those
bands depend on the tokenizer, so a stage counts as reached when a criterion
that means the stage holds, and the bands are only shown (converted to bits
per byte and to the run's tokenizer, the assumption stated).

Criteria (defaults in ``StageThresholds``), on validation text the model
never trained on, except stage 4, which tests recall of training text:

1. Tokens: on fixed validation windows, the model's loss is below the
   cross-entropy of the training unigram distribution on the same tokens.
2. Grammar / local structure: the same against an interpolated Kneser-Ney
   n-gram model of the training data (order 3 for multi-byte tokenizers,
   5 for byte-level ones, whose 2-byte contexts are far less than a word).
3. Semantics / context use: the model's context gain exceeds the n-gram
   model's by 0.05 nats. The gain is measured on identical tokens (the
   second half of each window): their loss with the history cut every L/16
   tokens minus their loss with the whole window before them. In
   expectation that is the loss on the first 1/16 of positions minus the
   loss on the second half, at a tenth of the noise; the n-gram model only
   gains on the first order - 1 tokens after each cut.
4. Knowledge: on spans that recur verbatim in the training split, greedy
   accuracy on the continuation is at least 0.5, closes at least half of the
   gap between the n-gram model's accuracy and 1, and beats the same kind of
   spans from validation text absent from training by 0.1.
5. Reasoning / in-context: the same floor and gap rule for induction
   (copying a random span seen earlier in the row) and for key-value lookup
   (the first token of each looked-up value, the one the lookup decides).

Why these numbers. Stages 1-3 compare the model with a reference on the very
same tokens (the references are scored with the same window-start
truncation the model has), so the comparison is paired: the criterion asks
for a margin (0.01 nats for 1-2, 0.05 for 3) and for the difference to
exceed 2 standard errors of its mean over windows, so noise in the window
set cannot declare a stage (on 64 windows of 512 bytes of the built-in
corpus the standard error of the excess gain is about 0.008 nats). 0.05 nats
is a 5% perplexity gain from context that the n-gram model cannot use.
Stages 4-5 use accuracies on about 1000 scored tokens (standard error <=
0.016): requiring 0.5, and half the distance from the n-gram model's
accuracy to 1, means doing better than local statistics by a wide margin and
being right more often than not; the chance levels (in ``stages.json``:
about 0.06 for induction, 1/8 for lookup) are far below. The knowledge
control margin of 0.1 is about 2.5 standard errors of the difference of two
64-span accuracies. A stage counts as reached at the first evaluation where
its criterion holds; the stage records also say whether it still held at
the last evaluation and at what fraction of the evaluations since (a stage
is not un-reached by later noise, but the record shows it).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmrec.stages.entropy import LN2, KneserNey, TokenSample, build_references, sample_split
from mmrec.stages.probes import (
    Probe,
    _autocast_context,
    _model_device,
    build_induction,
    build_knowledge_probes,
    build_kv,
    model_predictions,
    score_predictions,
)

CACHE_FORMAT = 1
STAGES_FILE = "stages.json"
STAGES_PLOT = "stages.png"
REFS_FILE = "stage_refs.json"
# Logits held at once while scoring windows: rows * L * V <= this many floats.
_LOGIT_BUDGET = 1 << 26


# The seed's bands.
@dataclass(frozen=True)
class SeedStage:
    """One stage as the seed states it: loss falls from ``start`` to ``end`` (nats/token, 32K-100K tokenizers)."""

    id: int
    key: str
    name: str
    start: tuple[float, float]
    end: tuple[float, float]


SEED_BANDS: tuple[SeedStage, ...] = (
    SeedStage(1, "tokens", "Tokens / characters", (8.0, 10.0), (4.0, 6.0)),
    SeedStage(2, "grammar", "Grammar / syntax", (4.0, 6.0), (2.0, 3.0)),
    SeedStage(3, "semantics", "Semantics", (2.0, 3.0), (1.5, 2.0)),
    SeedStage(4, "knowledge", "World knowledge", (1.5, 2.0), (1.0, 1.5)),
    SeedStage(5, "reasoning", "Logic / reasoning", (1.0, 1.5), (0.8, 1.2)),
)
# Bytes per token the seed's bands are taken to assume: GPT-2 / LLaMA-style BPE (32K-100K entries) on English prose.
SEED_BYTES_PER_TOKEN = 4.0


def convert_band(
    nats_per_token: float | tuple[float, float],
    bytes_per_token: float,
    seed_bytes_per_token: float = SEED_BYTES_PER_TOKEN,
) -> dict[str, Any]:
    """A seed loss (or band) in bits per byte and in nats per token of a tokenizer with ``bytes_per_token``.

    bits/byte = seed nats / (ln 2 * seed bytes/token); our nats/token =
    bits/byte * ln 2 * our bytes/token. Bits per byte are the honest common
    unit: a loss per token only compares between tokenizers that cut text
    into pieces of the same size.
    """
    if bytes_per_token <= 0 or seed_bytes_per_token <= 0:
        raise ValueError("bytes per token must be > 0")
    pair = (nats_per_token, nats_per_token) if isinstance(nats_per_token, int | float) else tuple(nats_per_token)
    lo, hi = float(pair[0]), float(pair[1])
    bpb = (lo / (LN2 * seed_bytes_per_token), hi / (LN2 * seed_bytes_per_token))
    ours = (bpb[0] * LN2 * bytes_per_token, bpb[1] * LN2 * bytes_per_token)
    text = (
        f"{lo:g}-{hi:g} nats/token at an assumed {seed_bytes_per_token:g} bytes/token (typical of 32K-100K-entry "
        f"BPE such as GPT-2's or LLaMA's on English prose; code and other languages differ) = "
        f"{bpb[0]:.3f}-{bpb[1]:.3f} bits/byte = {ours[0]:.3f}-{ours[1]:.3f} nats/token of this tokenizer "
        f"({bytes_per_token:.3f} bytes/token measured on the validation text)"
    )
    return {
        "seed_nats_per_token": [lo, hi],
        "seed_bytes_per_token": seed_bytes_per_token,
        "bits_per_byte": [bpb[0], bpb[1]],
        "bytes_per_token": bytes_per_token,
        "nats_per_token": [ours[0], ours[1]],
        "conversion": text,
    }


def seed_band_table(bytes_per_token: float, seed_bytes_per_token: float = SEED_BYTES_PER_TOKEN) -> dict[str, Any]:
    """Every seed stage's start and end band converted, and a sentence stating the conversion."""
    rows = []
    for s in SEED_BANDS:
        rows.append(
            {
                "id": s.id,
                "key": s.key,
                "name": s.name,
                "start": convert_band(s.start, bytes_per_token, seed_bytes_per_token),
                "end": convert_band(s.end, bytes_per_token, seed_bytes_per_token),
            }
        )
    f = 1.0 / (LN2 * seed_bytes_per_token)
    return {
        "seed_bytes_per_token": seed_bytes_per_token,
        "bytes_per_token": bytes_per_token,
        "conversion": (
            f"The seed's bands are nats/token of 32K-100K-entry tokenizers; assuming {seed_bytes_per_token:g} "
            f"bytes/token for those (GPT-2/LLaMA-style BPE on English prose), 1 nat/token = {f:.3f} bits/byte; "
            f"this run's tokenizer averages {bytes_per_token:.3f} bytes/token on its validation text, so 1 seed "
            f"nat/token = {bytes_per_token / seed_bytes_per_token:.3f} nats/token here. The bands are a claim of the "
            "seed, shown for comparison; stages are decided by the criteria, not by the bands."
        ),
        "stages": rows,
    }


# Stage criteria.
@dataclass(frozen=True)
class StageThresholds:
    """The numbers of the stage criteria (module docstring: why these)."""

    margin_nats: float = 0.01  # stages 1-2: the model below the reference by at least this (nats/token)
    z: float = 2.0  # stages 1-3: ... and by this many standard errors of the paired difference
    margin_bpb: float = 0.01  # stages 1-2 from val_bpb, for histories without the paired window measurement
    context_excess_nats: float = 0.05  # stage 3: context gain beyond the n-gram model's
    recall_floor: float = 0.5  # stages 4-5: accuracy at least this...
    recall_gap_fraction: float = 0.5  # ... and at least this fraction of the way from the n-gram accuracy to 1
    control_margin: float = 0.1  # stage 4: knowledge accuracy above the held-out control's by at least this


@dataclass(frozen=True)
class StageSpec:
    id: int
    key: str
    name: str
    definition: str


STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        1,
        "tokens",
        "Tokens / characters",
        "The model knows how often each token occurs: its validation loss is below the cross-entropy of the "
        "training data's unigram distribution on the same validation tokens.",
    ),
    StageSpec(
        2,
        "grammar",
        "Grammar / local structure",
        "The model predicts from the local context at least as well as a smoothed n-gram model "
        "(interpolated modified Kneser-Ney) estimated on the training data, on the same validation tokens.",
    ),
    StageSpec(
        3,
        "semantics",
        "Semantics / context use",
        "The model uses context beyond the last few tokens: its loss on late window positions (second half) is "
        "clearly below its loss on early ones (first 1/16), by more than the n-gram model's own gain.",
    ),
    StageSpec(
        4,
        "knowledge",
        "Knowledge",
        "The model recalls what it read: it completes spans that recur verbatim in the training data "
        "(greedy, teacher-forced) far better than local statistics do.",
    ),
    StageSpec(
        5,
        "reasoning",
        "Reasoning / in-context",
        "The model uses what it sees in the context: induction (continuing a random span seen earlier in the "
        "same context) and key-value lookup among pairs listed in the context.",
    ),
)


def _num(m: dict[str, Any], key: str) -> float:
    v = m.get(key)
    try:
        return float(v) if v is not None and v != "" else math.nan
    except (TypeError, ValueError):
        return math.nan


def _se(m: dict[str, Any], key: str) -> float:
    """A standard error, 0 when missing (one window has none: only the margin applies then)."""
    v = _num(m, key)
    return 0.0 if math.isnan(v) else v


def _beats(m: dict[str, Any], ref: str, th: StageThresholds) -> tuple[bool | None, dict[str, float]]:
    """Stages 1-2: the paired window gap when measured, else val_bpb against the reference's bits per byte."""
    gap = _num(m, f"{ref}_gap")
    if not math.isnan(gap):
        se = _se(m, f"{ref}_gap_se")
        need = max(th.margin_nats, th.z * se)
        ev = {
            "window_loss": _num(m, "window_loss"),
            f"window_{ref}_loss": _num(m, f"window_{ref}_loss"),
            f"{ref}_gap": gap,
            f"{ref}_gap_se": se,
            "required_gap": need,
        }
        return gap >= need, ev
    bpb, ref_bpb = _num(m, "val_bpb"), _num(m, f"{ref}_bpb")
    if math.isnan(bpb) or math.isnan(ref_bpb):
        return None, {}
    return bpb <= ref_bpb - th.margin_bpb, {"val_bpb": bpb, f"{ref}_bpb": ref_bpb, "required_gap_bpb": th.margin_bpb}


def _context(m: dict[str, Any], th: StageThresholds) -> tuple[bool | None, dict[str, float]]:
    excess = _num(m, "context_excess")
    if math.isnan(excess):
        gain, ngram_gain = _num(m, "context_gain"), _num(m, "ngram_context_gain")
        excess = gain - ngram_gain
    if math.isnan(excess):
        return None, {}
    se = _se(m, "context_excess_se")
    need = max(th.context_excess_nats, th.z * se)
    ev = {
        "context_gain": _num(m, "context_gain"),
        "ngram_context_gain": _num(m, "ngram_context_gain"),
        "context_excess": excess,
        "context_excess_se": se,
        "required_excess": need,
    }
    return excess >= need, ev


def recall_required(baseline: float, th: StageThresholds) -> float:
    """Accuracy a recall probe needs: the floor, and a fraction of the way from the n-gram baseline to 1."""
    base = 0.0 if math.isnan(baseline) else baseline
    return max(th.recall_floor, base + th.recall_gap_fraction * (1.0 - base))


def _recall(m: dict[str, Any], metrics: tuple[str, ...], th: StageThresholds) -> tuple[bool | None, dict[str, float]]:
    """Stages 4-5: each metric (``knowledge_acc``...) against its n-gram baseline (``knowledge_acc_ngram``)."""
    ev: dict[str, float] = {}
    ok = True
    for key in metrics:
        acc = _num(m, key)
        if math.isnan(acc):
            return None, {}
        base = _num(m, f"{key}_ngram")
        need = recall_required(base, th)
        ev |= {key: acc, f"{key}_ngram": base, f"{key}_required": need}
        ok = ok and acc >= need
    return ok, ev


def _knowledge(m: dict[str, Any], th: StageThresholds) -> tuple[bool | None, dict[str, float]]:
    ok, ev = _recall(m, ("knowledge_acc",), th)
    if ok is None:
        return None, {}
    for extra in ("knowledge_exact", "knowledge_control_acc", "knowledge_control_exact"):
        if not math.isnan(v := _num(m, extra)):
            ev[extra] = v
    control = _num(m, "knowledge_control_acc")
    # Without a control (a corpus too small for one), the n-gram baseline alone decides.
    if not math.isnan(control):
        ev["required_over_control"] = th.control_margin
        ok = ok and ev["knowledge_acc"] - control >= th.control_margin
    return ok, ev


def _reasoning(m: dict[str, Any], th: StageThresholds) -> tuple[bool | None, dict[str, float]]:
    ok, ev = _recall(m, ("induction_acc", "kv_first_acc"), th)
    if ok is not None:
        for extra in ("induction_exact", "kv_acc", "kv_exact"):
            if not math.isnan(v := _num(m, extra)):
                ev[extra] = v
    return ok, ev


def _checks(th: StageThresholds) -> dict[str, Any]:
    """Criterion of each stage: metrics -> (holds, or None when unmeasurable; evidence)."""
    return {
        "tokens": lambda m: _beats(m, "unigram", th),
        "grammar": lambda m: _beats(m, "ngram", th),
        "semantics": lambda m: _context(m, th),
        "knowledge": lambda m: _knowledge(m, th),
        "reasoning": lambda m: _reasoning(m, th),
    }


def _criterion_text(spec: StageSpec, th: StageThresholds, order: int | None) -> str:
    ng = f"order-{order} Kneser-Ney" if order else "Kneser-Ney n-gram"
    recall = (
        f">= max({th.recall_floor:g}, a + {th.recall_gap_fraction:g} * (1 - a)) where a is the {ng} "
        "model's greedy accuracy on the same tokens"
    )
    paired = f"by >= max({th.margin_nats:g} nats/token, {th.z:g} standard errors of the per-window difference)"
    return {
        "tokens": f"window_loss below window_unigram_loss (add-1 unigram of the training data) {paired}; without "
        f"window measurements: val_bpb <= unigram_bpb - {th.margin_bpb:g}",
        "grammar": f"window_loss below window_ngram_loss ({ng}) {paired}; without window measurements: "
        f"val_bpb <= ngram_bpb - {th.margin_bpb:g}",
        "semantics": f"context_excess = context_gain - ngram_context_gain >= max({th.context_excess_nats:g} nats, "
        f"{th.z:g} standard errors over windows); context_gain = loss of the tokens of each window's second half "
        "with their history cut every L/16 tokens minus their loss with the whole window before them (in "
        f"expectation: loss on positions [0, L/16) minus loss on [L/2, L)); ngram_context_gain: the same for the {ng} "
        "model",
        "knowledge": f"knowledge_acc (continuations of spans recurring in the training data) {recall}, and "
        f">= knowledge_control_acc (the same kind of spans from validation text, absent from training) + "
        f"{th.control_margin:g}",
        "reasoning": f"induction_acc (second copy of a random span) {recall}, and kv_first_acc (first token of "
        f"each looked-up value) {recall}",
    }[spec.key]


def detect_stages(history: list[dict[str, Any]], thresholds: StageThresholds | None = None) -> dict[str, Any]:
    """Which stages a run reached, when, on what evidence, and in which order; a pure function of the history.

    ``history`` holds one flat dict per evaluation, oldest first, with
    ``step``, ``tokens`` and the metrics of ``StageTracker.measure`` (missing
    or NaN metrics make a criterion unmeasurable at that evaluation). A stage
    is reached at the first evaluation where its criterion holds. A stage is
    out of order when it was reached while a lower-numbered stage was not
    (yet) reached; stages reached at the same evaluation are in order.
    """
    th = thresholds or StageThresholds()
    checks = _checks(th)
    order_hint = None
    for m in history:
        if not math.isnan(o := _num(m, "ngram_order")):
            order_hint = int(o)
    stages = []
    first_index: dict[int, int] = {}
    for spec in STAGES:
        record: dict[str, Any] = {
            "id": spec.id,
            "key": spec.key,
            "name": spec.name,
            "definition": spec.definition,
            "criterion": _criterion_text(spec, th, order_hint),
            "reached": False,
            "step": None,
            "tokens": None,
            "evidence": None,
        }
        # (evaluation index, criterion held) at every evaluation where the criterion could be measured.
        held: list[tuple[int, bool]] = []
        for i, m in enumerate(history):
            holds, ev = checks[spec.key](m)
            if holds is None:
                continue
            held.append((i, bool(holds)))
            if holds and not record["reached"]:
                first_index[spec.id] = i
                record |= {
                    "reached": True,
                    "step": int(_num(m, "step")),
                    "tokens": int(_num(m, "tokens")),
                    "evidence": {"val_loss": _num(m, "val_loss"), "val_bpb": _num(m, "val_bpb"), **ev},
                }
        since = [h for i, h in held if i >= first_index[spec.id]] if record["reached"] else []
        record |= {
            "measurable": bool(held),
            "held_at_last": held[-1][1] if held else None,
            "held_fraction_since": sum(since) / len(since) if since else None,
        }
        stages.append(record)
    reached = sorted(first_index, key=lambda s: (first_index[s], s))
    out_of_order = []
    for s in reached:
        for lower in range(1, s):
            if lower not in first_index or first_index[lower] > first_index[s]:
                out_of_order.append(s)
                break
    for rec in stages:
        rec["rank"] = reached.index(rec["id"]) + 1 if rec["id"] in first_index else None
        rec["out_of_order"] = rec["id"] in out_of_order
    return {
        "stages": stages,
        "order": reached,
        "in_order": not out_of_order,
        "out_of_order": out_of_order,
        "thresholds": asdict(th),
    }


# Windows.
def _buckets(L: int) -> tuple[slice, slice, list[int]]:
    """Early positions [0, L/16), late [L/2, L), and log2 bucket edges 0, 1, 2, 4, ..., L for the position curve."""
    early = slice(0, max(1, L // 16))
    late = slice(L // 2, L)
    edges = [0, 1]
    while edges[-1] * 2 < L:
        edges.append(edges[-1] * 2)
    edges.append(L)
    return early, late, edges


def _cut_plan(L: int) -> tuple[int, int, int]:
    """History cut E = L/16 (the early bucket's length) and the targets [a, b) of the second half it covers."""
    cut = max(1, L // 16)
    a = L // 2
    return cut, a, a + (L - a) // cut * cut


def _cut_windows(windows: np.ndarray) -> np.ndarray:
    """The second half of every window as pieces of E + 1 tokens: its targets with the history cut every E tokens."""
    L = windows.shape[1] - 1
    cut, a, b = _cut_plan(L)
    pieces = [windows[:, s : s + cut + 1] for s in range(a, b, cut)]
    return np.stack(pieces, axis=1).reshape(-1, cut + 1)


def _cut_means(cut_losses: np.ndarray, n_windows: int) -> np.ndarray:
    """Mean loss per window [n] of the pieces of ``_cut_windows`` (losses [n * pieces, E])."""
    return cut_losses.reshape(n_windows, -1).mean(axis=1)


def _window_stats(losses: np.ndarray) -> dict[str, list[float]]:
    """Per-window means over all, early, late and gain positions, and the mean position curve in log2 buckets."""
    L = losses.shape[1]
    early, late, edges = _buckets(L)
    _, a, b = _cut_plan(L)
    return {
        "mean": losses.mean(axis=1).tolist(),
        "early": losses[:, early].mean(axis=1).tolist(),
        "late": losses[:, late].mean(axis=1).tolist(),
        "gain_full": losses[:, a:b].mean(axis=1).tolist(),
        "curve": [float(losses[:, lo:hi].mean()) for lo, hi in zip(edges[:-1], edges[1:], strict=True)],
    }


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    if x.size == 0:
        return math.nan, math.nan
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
    return float(x.mean()), se


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        h.update(str(a.shape).encode())
    return h.hexdigest()[:16]


def _json_safe(x: Any) -> Any:
    """NaN and infinities as null: stages.json is strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return _json_safe(x.tolist())
    if isinstance(x, np.generic):
        return _json_safe(x.item())
    return x


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_json_safe(data), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# The tracker.
class StageTracker:
    """Measures the five stages at every evaluation of a run; writes ``stages.json`` and ``stages.png``.

    Construction does the one-off work: samples the corpus, builds the
    probes and the validation windows, fits the references (or reads them
    from ``cache_path`` when it was written for the same data and settings)
    and scores the references on the windows and the probes. ``measure`` then
    costs forward passes over about 1.5 * ``window_tokens`` tokens (the
    windows, and their second halves cut into short pieces) and the probes
    (``2 * n_probe`` rows of 48 tokens and ``2 * n_probe`` of
    ``min(eval_seq_len, probe_seq_len)``). Call it on one process only.
    """

    def __init__(
        self,
        dataset: Any,
        tokenizer: Any,
        eval_seq_len: int,
        seed: int = 0,
        max_ref_tokens: int = 20_000_000,
        n_probe: int = 64,
        device: str | torch.device = "cpu",
        cache_path: str | Path | None = None,
        thresholds: StageThresholds | None = None,
        order: int | None = None,
        window_tokens: int = 32768,
        probe_seq_len: int = 512,
        max_eval_tokens: int = 4_000_000,
        max_probe_tokens: int = 8_000_000,
        seed_bytes_per_token: float = SEED_BYTES_PER_TOKEN,
        batch_size: int = 32,
    ) -> None:
        t0 = time.perf_counter()
        if int(eval_seq_len) < 2:
            raise ValueError(f"eval_seq_len must be >= 2, got {eval_seq_len}")
        self.dataset, self.tokenizer = dataset, tokenizer
        self.device = torch.device(device)
        self.thresholds = thresholds or StageThresholds()
        self.seed, self.batch_size = seed, batch_size
        self.seed_bytes_per_token = seed_bytes_per_token
        self.vocab_size, self.eot_id = int(tokenizer.vocab_size), int(tokenizer.eot_id)
        tb = np.zeros(self.vocab_size, dtype=np.int64)
        raw = np.asarray(tokenizer.token_bytes(), dtype=np.int64)[: self.vocab_size]
        tb[: len(raw)] = raw
        self.token_bytes = tb
        self.history: list[dict[str, Any]] = []
        self.curve: dict[int, dict[str, Any]] = {}
        self.position_curve: dict[str, Any] = {}

        # Validation windows, from the same validation text the references are measured on.
        val = sample_split(dataset, "val", max_eval_tokens, seed=seed, shuffle=False, by_weight=False)
        if val.n_tokens == 0:
            raise ValueError("the dataset has no validation tokens: stages need held-out text")
        bpt = float(tb[np.asarray(val.tokens, dtype=np.int64)].sum()) / val.n_tokens
        self.order = order if order is not None else (3 if bpt >= 1.5 else 5)
        self.windows, self.window_info = self._make_windows(val, int(eval_seq_len), window_tokens, seed)
        self.L = self.windows.shape[1] - 1
        self.cut_windows = _cut_windows(self.windows)

        # Probes: knowledge rows are short spans; induction and lookup rows as long as the model's windows allow.
        probe_T = max(8, min(int(eval_seq_len), int(probe_seq_len)))
        knowledge, control = build_knowledge_probes(
            dataset, tokenizer, n_probe, probe_T, seed, max_tokens=max_probe_tokens
        )
        self.probes: dict[str, Probe] = {"knowledge": knowledge, "knowledge_control": control}
        for name, build in (("induction", build_induction), ("kv", build_kv)):
            try:
                self.probes[name] = build(dataset, tokenizer, n_probe, probe_T, seed)
            except ValueError as e:
                # A corpus or window too small for this probe: its stage is then unmeasurable, not an error.
                empty = np.zeros((0, probe_T), np.int64)
                self.probes[name] = Probe(name, empty, empty.astype(bool), empty - 1, {"error": str(e)})

        # References, from the cache when it matches exactly these windows, probes and settings.
        self.cache_key = {
            "format": CACHE_FORMAT,
            "dataset": dataset.manifest.get("fingerprint") if hasattr(dataset, "manifest") else None,
            "tokenizer": getattr(dataset, "tokenizer_id", None),
            "order": self.order,
            "max_ref_tokens": int(max_ref_tokens),
            "max_eval_tokens": int(max_eval_tokens),
            "seed": seed,
            "windows": _digest(self.windows),
            "probes": _digest(*(p.ids for p in self.probes.values()), *(p.mask for p in self.probes.values())),
        }
        cache = Path(cache_path) if cache_path is not None else None
        cached = self._read_cache(cache)
        if cached is None:
            cached = self._compute_references(max_ref_tokens, max_eval_tokens)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                _write_json(cache, {"key": self.cache_key, **cached})
        self.references: dict[str, Any] = cached["references"]
        self.ref_windows: dict[str, dict[str, list[float]]] = cached["windows"]
        self.ref_probes: dict[str, dict[str, float]] = cached["probes"]
        self.bands = seed_band_table(float(self.references["bytes_per_token"]), seed_bytes_per_token)
        self.setup_seconds = time.perf_counter() - t0

    # Setup.
    def _make_windows(
        self, val: TokenSample, L: int, window_tokens: int, seed: int
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Disjoint windows [n, L + 1] of the validation stream at seeded random places (shortened if it is short)."""
        stream = val.stream(self.eot_id)
        info: dict[str, Any] = {"requested_len": L}
        if len(stream) < 2 * (L + 1):
            # Too little validation text for two windows of this length: two windows of what there is.
            L = max(1, len(stream) // 2 - 1)
            info["shortened"] = True
        slots = len(stream) // (L + 1)
        n = int(min(slots, max(2, window_tokens // L)))
        rng = np.random.default_rng([seed, 4])
        chosen = np.sort(rng.choice(slots, size=n, replace=False))
        windows = np.stack([stream[s * (L + 1) : (s + 1) * (L + 1)] for s in chosen])
        early, late, edges = _buckets(L)
        cut, a, b = _cut_plan(L)
        info |= {
            "len": L,
            "n": n,
            "tokens": n * L,
            "gain_targets": [a, b],
            "gain_history_cut": cut,
            "early_positions": [early.start, early.stop],
            "late_positions": [late.start, late.stop],
            "curve_edges": edges,
            "stream_tokens": len(stream),
        }
        return windows, info

    def _read_cache(self, path: Path | None) -> dict[str, Any] | None:
        if path is None or not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(data, dict) or data.get("key") != _json_safe(self.cache_key):
            return None
        return data

    def _compute_references(self, max_ref_tokens: int, max_eval_tokens: int) -> dict[str, Any]:
        refs = build_references(
            self.dataset, self.tokenizer, max_ref_tokens, max_eval_tokens, order=self.order, seed=self.seed
        )
        kn = refs.kneser_ney
        windows = {
            "ngram": _window_stats(kn.window_losses(self.windows)),
            "unigram": _window_stats(-refs.unigram_logp[self.windows[:, 1:]]),
            "ngram_cut": _cut_means(kn.window_losses(self.cut_windows), len(self.windows)).tolist(),
        }
        probes = {name: self._ngram_probe(kn, p) for name, p in self.probes.items()}
        return {"references": refs.summary, "windows": windows, "probes": probes}

    @staticmethod
    def _ngram_probe(kn: KneserNey, probe: Probe) -> dict[str, float]:
        """The n-gram model's greedy scores on a probe: the local-statistics baseline of the recall stages."""
        if probe.n == 0:
            return score_predictions(probe, np.zeros_like(probe.ids))
        ctx, _, mo = kn.window_contexts(probe.ids)
        flat = probe.mask[:, 1:].reshape(-1)
        pred = np.full(probe.ids.shape, -1, dtype=np.int64)
        rows, cols = np.nonzero(probe.mask[:, 1:])
        pred[rows, cols + 1] = kn.argmax(ctx[flat], mo[flat])
        return score_predictions(probe, pred)

    # Measuring.
    def _model_window_losses(self, model: torch.nn.Module, windows: np.ndarray, autocast: Any) -> np.ndarray:
        n, L1 = windows.shape
        dev = _model_device(model, self.device)
        rows = max(1, min(self.batch_size, _LOGIT_BUDGET // max((L1 - 1) * self.vocab_size, 1)))
        out = np.empty((n, L1 - 1), dtype=np.float64)
        for start in range(0, n, rows):
            batch = torch.as_tensor(windows[start : start + rows], dtype=torch.long, device=dev)
            with _autocast_context(autocast):
                logits = model(batch[:, :-1]).logits
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="none"
            )
            out[start : start + rows] = loss.view(batch.size(0), -1).double().cpu().numpy()
        return out

    def measure(
        self,
        model: torch.nn.Module,
        step: int,
        tokens: int,
        val_loss: float = math.nan,
        val_bpb: float = math.nan,
        autocast: Any = None,
    ) -> dict[str, float]:
        """Measure the stage metrics of ``model`` (unwrapped: no DDP/compile wrapper) now; returns flat metrics.

        ``autocast`` is None, a context manager or a callable returning one.
        The model runs in eval mode without gradients and is put back in its
        mode afterwards. The metrics are appended to the history and the
        stages updated.
        """
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                losses = self._model_window_losses(model, self.windows, autocast)
                cut_losses = self._model_window_losses(model, self.cut_windows, autocast)
                preds = {
                    name: model_predictions(model, p.ids, self.device, autocast, self.batch_size)
                    for name, p in self.probes.items()
                }
        finally:
            model.train(was_training)
        m: dict[str, float] = {"val_loss": float(val_loss), "val_bpb": float(val_bpb)}
        m |= self._window_metrics(losses, cut_losses)
        for name, p in self.probes.items():
            s = score_predictions(p, preds[name])
            for key in ("acc", "exact", "first_acc"):
                m[f"{name}_{key}"] = s[key]
            for key in ("acc", "first_acc"):
                base = self.ref_probes[name].get(key)
                m[f"{name}_{key}_ngram"] = float(base) if base is not None else math.nan
        m |= {
            "unigram_nats": float(self.references["unigram_nats"]),
            "ngram_nats": float(self.references["ngram_nats"]),
            "unigram_bpb": float(self.references["unigram_bpb"]),
            "ngram_bpb": float(self.references["ngram_bpb"]),
            "ngram_order": float(self.order),
        }
        entry = {"step": int(step), "tokens": int(tokens), **m}
        # A re-measured step (a resumed run) replaces the earlier entry.
        self.history = [h for h in self.history if h["step"] != int(step)] + [entry]
        self.history.sort(key=lambda h: h["step"])
        self.record_eval(step, tokens, val_loss, val_bpb)
        detected = detect_stages(self.history, self.thresholds)
        m["stages_reached"] = float(len(detected["order"]))
        m["stage_seconds"] = time.perf_counter() - t0
        entry["stages_reached"] = m["stages_reached"]
        return m

    def _window_metrics(self, losses: np.ndarray, cut_losses: np.ndarray) -> dict[str, float]:
        """Stage 1-3 metrics, paired with the references on the same tokens; standard errors over windows.

        The context gain is measured on identical tokens: the targets of the
        second half of each window, scored once with the whole window before
        them and once with their history cut every L/16 tokens (so each has
        0 to L/16 - 1 tokens of history, as the first L/16 positions have).
        On text whose statistics do not depend on where a window starts, it
        equals loss(first L/16 positions) - loss(second half) in expectation,
        with much less noise (``loss_early``/``loss_late`` are reported too).
        """
        early, late, edges = _buckets(losses.shape[1])
        _, a, b = _cut_plan(losses.shape[1])
        ng, uni = self.ref_windows["ngram"], self.ref_windows["unigram"]
        model_mean = losses.mean(axis=1)
        model_early, model_late = losses[:, early].mean(axis=1), losses[:, late].mean(axis=1)
        model_gain = _cut_means(cut_losses, len(losses)) - losses[:, a:b].mean(axis=1)
        ng_mean, ng_early, ng_late = (np.asarray(ng[k]) for k in ("mean", "early", "late"))
        ng_gain = np.asarray(self.ref_windows["ngram_cut"]) - np.asarray(ng["gain_full"])
        uni_mean = np.asarray(uni["mean"])
        uni_gap, uni_se = _mean_se(uni_mean - model_mean)
        ng_gap, ng_se = _mean_se(ng_mean - model_mean)
        excess, excess_se = _mean_se(model_gain - ng_gain)
        n_bytes = float(self.token_bytes[self.windows[:, 1:]].sum())
        self.position_curve = {
            "edges": edges,
            "model": [float(losses[:, lo:hi].mean()) for lo, hi in zip(edges[:-1], edges[1:], strict=True)],
            "ngram": ng["curve"],
            "unigram": uni["curve"],
        }
        return {
            "window_loss": float(model_mean.mean()),
            "window_bpb": float(losses.sum() / max(n_bytes, 1.0) / LN2),
            "window_unigram_loss": float(uni_mean.mean()),
            "window_ngram_loss": float(ng_mean.mean()),
            "unigram_gap": uni_gap,
            "unigram_gap_se": uni_se,
            "ngram_gap": ng_gap,
            "ngram_gap_se": ng_se,
            "loss_early": float(model_early.mean()),
            "loss_late": float(model_late.mean()),
            "ngram_loss_early": float(ng_early.mean()),
            "ngram_loss_late": float(ng_late.mean()),
            "context_gain": float(model_gain.mean()),
            "ngram_context_gain": float(ng_gain.mean()),
            "context_excess": excess,
            "context_excess_se": excess_se,
        }

    def record_eval(self, step: int, tokens: int, val_loss: float, val_bpb: float) -> None:
        """Add a point of the validation curve (for the plot) without measuring the stages."""
        self.curve[int(step)] = {
            "step": int(step),
            "tokens": int(tokens),
            "val_loss": float(val_loss),
            "val_bpb": float(val_bpb),
        }

    # Results.
    def stages(self) -> dict[str, Any]:
        """The content of stages.json: the stages (when, evidence, order), references, bands, probes and history."""
        detected = detect_stages(self.history, self.thresholds)
        probes = {}
        for name, p in self.probes.items():
            info = {k: v for k, v in p.info.items() if k not in ("sample_positions", "recurrence")}
            probes[name] = {"n": p.n, "seq_len": p.seq_len, "scored_tokens": int(p.mask.sum()), **info}
            probes[name]["ngram"] = self.ref_probes[name]
        return {
            "format": 1,
            **detected,
            "ngram_order": self.order,
            "references": self.references,
            "bands": self.bands,
            "windows": self.window_info,
            "probes": probes,
            "position_curve": self.position_curve,
            "history": self.history,
            "curve": [self.curve[s] for s in sorted(self.curve)],
        }

    def save(self, run_dir: str | Path) -> Path:
        """Write ``stages.json`` and ``stages.png`` into ``run_dir``; returns the JSON's path."""
        out = Path(run_dir)
        out.mkdir(parents=True, exist_ok=True)
        data = self.stages()
        path = out / STAGES_FILE
        _write_json(path, data)
        plot_stages(data, out / STAGES_PLOT)
        return path

    def restore(self, path: str | Path, up_to_step: int | None = None) -> int:
        """Take the history and curve of an earlier ``stages.json`` (a resumed run); returns entries restored.

        Entries after ``up_to_step`` (measured after the checkpoint resumed
        from) are dropped, as the trainer drops its metrics rows.
        """
        p = Path(path)
        if p.is_dir():
            p = p / STAGES_FILE
        if not p.is_file():
            return 0
        data = json.loads(p.read_text(encoding="utf-8"))

        def keep(row: dict[str, Any]) -> bool:
            return up_to_step is None or int(row["step"]) <= up_to_step

        def nan_for_none(row: dict[str, Any]) -> dict[str, Any]:
            return {k: (math.nan if v is None else v) for k, v in row.items()}

        self.history = [nan_for_none(h) for h in data.get("history", []) if keep(h)]
        self.curve = {int(c["step"]): nan_for_none(c) for c in data.get("curve", []) if keep(c)}
        return len(self.history)


# The plot.
def plot_stages(data: dict[str, Any], path: str | Path) -> Path:
    """stages.png: a timeline of the stages over tokens, and validation bits per byte against the seed's bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    curve = [c for c in data.get("curve", []) if c.get("val_bpb") is not None]
    history = data.get("history", [])
    xs = [c["tokens"] for c in curve] + [h["tokens"] for h in history]
    positive = [x for x in xs if x and x > 0]
    log_x = bool(positive) and max(positive) / max(min(positive), 1) > 20
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 8), sharex=True, gridspec_kw={"height_ratios": [1, 1.6]})
    colors = [f"C{i}" for i in range(10)]
    checks = _checks(StageThresholds(**data.get("thresholds", {})))
    for st in data.get("stages", []):
        y = st["id"]
        c = colors[(y - 1) % len(colors)]
        measured = [h["tokens"] for h in history if h.get("tokens", 0) > 0 or not log_x]
        ax1.plot(measured, [y] * len(measured), "|", color="0.75", markersize=8)
        held = [
            h["tokens"] for h in history if checks[st["key"]](_none_to_nan(h))[0] and (h["tokens"] > 0 or not log_x)
        ]
        ax1.plot(held, [y] * len(held), "o", color=c, alpha=0.35, markersize=5)
        if st["reached"] and (st["tokens"] > 0 or not log_x):
            ax1.plot([st["tokens"]], [y], "*", color=c, markersize=16, markeredgecolor="k")
            ax1.annotate(f"step {st['step']}", (st["tokens"], y), textcoords="offset points", xytext=(8, 6), fontsize=8)
            ax2.axvline(st["tokens"], color=c, linestyle=":", linewidth=1)
    ax1.set_yticks([s.id for s in STAGES], [f"{s.id} {s.name}" for s in STAGES], fontsize=8)
    ax1.set_ylim(0.5, len(STAGES) + 0.5)
    ax1.invert_yaxis()
    order = " > ".join(str(s) for s in data.get("order", [])) or "none"
    ax1.set_title(f"Stages reached (order: {order}; star = first evaluation where the criterion holds)", fontsize=10)
    ax1.grid(axis="x", alpha=0.3)

    bands = data.get("bands", {})
    for row in bands.get("stages", []):
        lo, hi = row["end"]["bits_per_byte"]
        c = colors[(row["id"] - 1) % len(colors)]
        ax2.axhspan(lo, hi, color=c, alpha=0.12, label=f"seed: end of stage {row['id']} ({lo:.2f}-{hi:.2f} bpb)")
    refs = data.get("references", {})
    if refs.get("unigram_bpb") is not None:
        ax2.axhline(refs["unigram_bpb"], color="k", linestyle="--", linewidth=1, label="unigram (train) on val")
    if refs.get("ngram_bpb") is not None:
        ax2.axhline(
            refs["ngram_bpb"], color="k", linestyle="-.", linewidth=1, label=f"{data.get('ngram_order', '')}-gram KN"
        )
    pts = [(c["tokens"], c["val_bpb"]) for c in curve if c["tokens"] > 0 or not log_x]
    if pts:
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="C0", markersize=3, label="validation bpb")
    ax2.set_ylabel("bits per byte")
    ax2.set_xlabel("training tokens")
    ax2.legend(fontsize=7, loc="best", framealpha=0.8)
    conv = bands.get("seed_bytes_per_token")
    ax2.set_title(
        f"Validation loss and the seed's bands (assuming {conv} bytes/token for the seed's tokenizers)", fontsize=10
    )
    ax2.grid(alpha=0.3)
    top = max([p[1] for p in pts] + [refs.get("unigram_bpb") or 0.0, 1.0])
    ax2.set_ylim(0, top * 1.08)
    if log_x:
        ax1.set_xscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _none_to_nan(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (math.nan if v is None else v) for k, v in row.items()}


# A finished run.
def run_dataset(cfg: Any, tokenizer: Any) -> Any:
    """The prepared dataset of a run's config, where the trainer keeps it (prepared there when missing)."""
    import dataclasses

    from mmrec.data.prepare import dataset_fingerprint, load_dataset, prepare_dataset
    from mmrec.data.sources import parse_source, resolve_sources

    specs = [parse_source(s) for s in cfg.data] or [parse_source("builtin")]
    specs = [dataclasses.replace(s, text_field=cfg.text_field) if s.text_field == "text" else s for s in specs]
    specs = resolve_sources(specs)
    cache_root = Path(cfg.data_cache or os.environ.get("MMREC_DATA_CACHE") or Path.home() / ".cache/mmrec/data")
    data_dir = cache_root / dataset_fingerprint(specs, tokenizer, cfg.val_fraction)
    if not (data_dir / "manifest.json").is_file():
        prepare_dataset(specs, tokenizer, data_dir, cfg.val_fraction, progress=False)
    return load_dataset(data_dir, tokenizer, verify=False)


def _read_eval_csv(path: Path) -> dict[int, dict[str, float]]:
    if not path.is_file():
        return {}
    rows: dict[int, dict[str, float]] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            try:
                step = int(r["step"])
                rows[step] = {
                    "tokens": float(r.get("tokens") or "nan"),
                    "val_loss": float(r.get("val_loss") or "nan"),
                    "val_bpb": float(r.get("val_bpb") or "nan"),
                }
            except (KeyError, ValueError):
                continue
    return rows


def track_run(run_dir: str | Path, device: str = "cpu", **tracker_kwargs: Any) -> dict[str, Any]:
    """Measure the stages over the checkpoints of a finished ``mmrec train`` run; writes stages.json/png into it.

    Every complete checkpoint is loaded and measured; the validation curve
    comes from the run's ``eval.csv``. The references are cached in the run
    directory (``stage_refs.json``), so a second call, or the trainer's own
    tracker, reuses them.
    """
    from mmrec.evals.common import load_checkpoint
    from mmrec.train import checkpoint as ckpt

    run = Path(run_dir)
    found = ckpt.list_checkpoints(run)
    if not found:
        raise ValueError(f"{run} holds no complete checkpoint (step-NNNNNN directories) of `mmrec train`")
    evals = _read_eval_csv(run / "eval.csv")
    first = load_checkpoint(found[0], device)
    cfg, tokenizer = first.config, first.tokenizer
    dataset = run_dataset(cfg, tokenizer)
    kwargs = {"seed": cfg.seed, "cache_path": run / REFS_FILE, "device": device, **tracker_kwargs}
    tracker = StageTracker(dataset, tokenizer, cfg.eval_seq_len or first.trained_seq_len, **kwargs)
    for step, row in sorted(evals.items()):
        n_tokens = int(row["tokens"]) if math.isfinite(row["tokens"]) else 0
        tracker.record_eval(step, n_tokens, row["val_loss"], row["val_bpb"])
    for path in found:
        lm = first if path == found[0] else load_checkpoint(path, device)
        meta = ckpt.read_json(path / "meta.json")
        row = evals.get(lm.step, {})
        tracker.measure(
            lm.model,
            lm.step,
            int(meta.get("tokens", row.get("tokens", 0))),
            row.get("val_loss", math.nan),
            row.get("val_bpb", math.nan),
        )
    tracker.save(run)
    return tracker.stages()
