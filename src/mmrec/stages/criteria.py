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
   gains on the first order - 1 tokens after each cut. Every model starts
   each window and each cut piece from the same condition, no history of
   its own, in the form it was trained to start a window: a Transformer
   with an empty KV cache, a carried-state model (MM-Rec) with its state
   after reading one window of unrelated text (validation text of other
   documents, a seeded choice), the n-gram model with its context cut (the
   windows of stages 1-2 start the same way).
   Measured from a cold (zero) state instead, a model trained with its
   state carried pays a start-up cost after every cut that the gain
   counted as use of context (issue 13: about 0.08 of MM-Rec's 0.105 nats
   of excess on the small Shakespeare comparison); stages.json histories
   written before then (no ``context_warmup_tokens``) were measured so.
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

import math
from dataclasses import asdict, dataclass
from typing import Any

from mmrec.stages.entropy import LN2


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
        "clearly below its loss on early ones (first 1/16), by more than the n-gram model's own gain. Every model "
        "starts a window without history of its own, as it was trained to: a Transformer with an empty cache, "
        "MM-Rec with its state warmed on unrelated text.",
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


def stage_checks(th: StageThresholds) -> dict[str, Any]:
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
        "model. Each window and cut piece starts without history of its own: a Transformer with an empty KV cache, "
        "a carried-state model (MM-Rec) with its state after one window of unrelated text (context_warmup_tokens; "
        "validation text of other documents, seeded), the n-gram model with its context cut",
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
    checks = stage_checks(th)
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


def none_to_nan(row: dict[str, Any]) -> dict[str, Any]:
    """A row of stages.json with its nulls (NaN written as strict JSON) back as NaN."""
    return {k: (math.nan if v is None else v) for k, v in row.items()}
