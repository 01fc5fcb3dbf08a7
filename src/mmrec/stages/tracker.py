"""``StageTracker``: the stage metrics of a model at every evaluation of a run, on fixed windows and probes.

The stages, their criteria and why their numbers are what they are:
``mmrec.stages.criteria``. Here the metrics those criteria read are measured:
the model's loss on fixed validation windows paired with the unigram and
n-gram references on the same tokens (stages 1-3), and its greedy accuracy
on the probes (stages 4-5), then written to ``stages.json`` and
``stages.png``.

Every window, and every piece of a window cut for the context gain, starts
from the same condition for every model: no history of its own. What that
means depends on how a model was trained to start a window:

* a Transformer (its state is a KV cache of the text it attends to) starts
  with an empty cache: every window it trained on began that way;
* a carried-state model (MM-Rec: its ``MMRecState`` is carried from one
  training window to the next) starts from its state after reading one
  window of unrelated text - validation text of other documents, chosen per
  window by a seeded draw, never the text before the window - because every
  training window but a stream's first began with a warm state. From a cold
  (zero) state such a model is off its training distribution on the first
  tokens, and its context gain would count that start-up cost as use of
  context (issue 13: about 0.08 of MM-Rec's 0.105 nats of excess gain on
  the small Shakespeare comparison);
* the n-gram references have no state: their context is cut at the window
  or piece start, as before.

``StageTracker(warm_start=False)`` gives the earlier measurement (every
model from nothing), to compare with numbers measured before.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmrec.stages.criteria import (
    SEED_BYTES_PER_TOKEN,
    StageThresholds,
    detect_stages,
    none_to_nan,
    seed_band_table,
)
from mmrec.stages.entropy import LN2, KneserNey, TokenSample, build_references, sample_split
from mmrec.stages.incontext import build_induction, build_kv
from mmrec.stages.plot import plot_stages
from mmrec.stages.probes import (
    LOGIT_BUDGET,
    Probe,
    autocast_context,
    build_knowledge_probes,
    model_predictions,
    score_predictions,
)
from mmrec.stages.windows import (
    buckets,
    carries_state,
    cut_means,
    cut_plan,
    cut_windows,
    digest,
    json_safe,
    mean_se,
    warmup_slots,
    window_stats,
    write_json,
)
from mmrec.utils.device import model_device

CACHE_FORMAT = 1
STAGES_FILE = "stages.json"
STAGES_PLOT = "stages.png"
REFS_FILE = "stage_refs.json"


# The tracker.
class StageTracker:
    """Measures the five stages at every evaluation of a run; writes ``stages.json`` and ``stages.png``.

    Construction does the one-off work: samples the corpus, builds the
    probes and the validation windows, fits the references (or reads them
    from ``cache_path`` when it was written for the same data and settings)
    and scores the references on the windows and the probes. ``measure`` then
    costs forward passes over about 1.5 * ``window_tokens`` tokens (the
    windows, and their second halves cut into short pieces), for a
    carried-state model another ``window_tokens`` of warm-up text (module
    docstring: every window and piece starts without history of its own, a
    carried state warmed on unrelated text), and the probes (``2 * n_probe``
    rows of 48 tokens and ``2 * n_probe`` of ``min(eval_seq_len,
    probe_seq_len)``). Call it on one process only. ``warm_start=False``
    starts every model from nothing (the measurement before issue 13).
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
        warm_start: bool = True,
    ) -> None:
        t0 = time.perf_counter()
        if int(eval_seq_len) < 2:
            raise ValueError(f"eval_seq_len must be >= 2, got {eval_seq_len}")
        self.dataset, self.tokenizer = dataset, tokenizer
        self.device = torch.device(device)
        self.thresholds = thresholds or StageThresholds()
        self.seed, self.batch_size = seed, batch_size
        self.warm_start = bool(warm_start)
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
        self.cut_windows = cut_windows(self.windows)
        self.warmup = self._make_warmup(val, seed)

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
            "windows": digest(self.windows),
            "probes": digest(*(p.ids for p in self.probes.values()), *(p.mask for p in self.probes.values())),
        }
        cache = Path(cache_path) if cache_path is not None else None
        cached = self._read_cache(cache)
        if cached is None:
            cached = self._compute_references(max_ref_tokens, max_eval_tokens)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                write_json(cache, {"key": self.cache_key, **cached})
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
        self._window_slots = chosen
        windows = np.stack([stream[s * (L + 1) : (s + 1) * (L + 1)] for s in chosen])
        early, late, edges = buckets(L)
        cut, a, b = cut_plan(L)
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

    def _make_warmup(self, val: TokenSample, seed: int) -> np.ndarray:
        """The unrelated text [n, L] a carried-state model reads before each window (and its cut pieces).

        One window's length, as a carried state had read at the start of a
        stream's second training window: validation text of other documents
        (``warmup_slots``), or for a window with no such text, a seeded
        stretch of training text (which never holds a validation document).
        """
        L = self.L
        stream = val.stream(self.eot_id)
        rng = np.random.default_rng([seed, 5])
        slots, kind = warmup_slots(stream, L, self._window_slots, self.eot_id, rng)
        warm = np.zeros((len(slots), L), dtype=np.int64)
        for i, c in enumerate(slots):
            if c >= 0:
                warm[i] = stream[c * (L + 1) : c * (L + 1) + L]
        missing = np.flatnonzero(slots < 0)
        if missing.size:
            train = sample_split(self.dataset, "train", 4 * L * missing.size, seed=seed).stream(self.eot_id)
            if train.size == 0:
                raise ValueError("the dataset has no training tokens: stages need them for references and warm-up")
            train = np.resize(train, max(train.size, L + 1))  # a tiny split repeated to one window
            for row in missing:
                a = int(rng.integers(0, train.size - L + 1))
                warm[row] = train[a : a + L]
        self.window_info["warmup"] = {
            "tokens": L,
            "other_documents": int((kind == 0).sum()),
            "same_document_not_preceding": int((kind == 1).sum()),
            "training_text": int(missing.size),
            "digest": digest(warm),
            "used": self.warm_start,
        }
        self.window_info["start"] = self.start_condition(None)
        return warm

    def start_condition(self, warmed: bool | None) -> str:
        """In words, how a window (and every cut piece) starts: for a model that was warmed (True), one that
        starts from nothing (False), or any model (None: before one was measured)."""
        cold = "an empty context (a Transformer's empty KV cache, the n-gram's context cut)"
        warm = (
            f"a carried-state model (MM-Rec) from its state after reading {self.L} tokens of unrelated text "
            "(validation text of other documents, a seeded choice per window, never the window's history)"
        )
        if not self.warm_start:
            return "every model from nothing: an empty context or a fresh (zero) state (as before issue 13)"
        if warmed is None:
            return f"no history of its own: {cold}; {warm}"
        return warm if warmed else cold

    def _read_cache(self, path: Path | None) -> dict[str, Any] | None:
        if path is None or not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(data, dict) or data.get("key") != json_safe(self.cache_key):
            return None
        return data

    def _compute_references(self, max_ref_tokens: int, max_eval_tokens: int) -> dict[str, Any]:
        refs = build_references(
            self.dataset, self.tokenizer, max_ref_tokens, max_eval_tokens, order=self.order, seed=self.seed
        )
        kn = refs.kneser_ney
        windows = {
            "ngram": window_stats(kn.window_losses(self.windows)),
            "unigram": window_stats(-refs.unigram_logp[self.windows[:, 1:]]),
            "ngram_cut": cut_means(kn.window_losses(self.cut_windows), len(self.windows)).tolist(),
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
    def _start_states(self, model: torch.nn.Module, autocast: Any) -> Any:
        """Each window's start state [n streams]: a carried-state model's state after its warm-up text.

        None - start from nothing - for a model whose state is a KV cache or
        that has none, and with ``warm_start=False``.
        """
        if not self.warm_start:
            return None
        dev = model_device(model, self.device)
        with autocast_context(autocast):
            probe = model(torch.as_tensor(self.warmup[:1, :1], dtype=torch.long, device=dev))
        if not carries_state(getattr(probe, "state", None)):
            return None
        # Through forward (not a head-less method): FSDP gathers the root's parameters in forward's hooks.
        rows = max(1, min(self.batch_size, LOGIT_BUDGET // max(self.L * self.vocab_size, 1)))
        parts = []
        for start in range(0, len(self.warmup), rows):
            batch = torch.as_tensor(self.warmup[start : start + rows], dtype=torch.long, device=dev)
            with autocast_context(autocast):
                parts.append(model(batch).state)
        return type(parts[0]).cat(parts)

    def _model_window_losses(
        self, model: torch.nn.Module, windows: np.ndarray, autocast: Any, states: Any = None, per_state: int = 1
    ) -> np.ndarray:
        """Per-token losses [n, L] of ``windows`` [n, L + 1]; row r starts from stream r // per_state of ``states``
        (None: from nothing)."""
        n, L1 = windows.shape
        dev = model_device(model, self.device)
        rows = max(1, min(self.batch_size, LOGIT_BUDGET // max((L1 - 1) * self.vocab_size, 1)))
        out = np.empty((n, L1 - 1), dtype=np.float64)
        for start in range(0, n, rows):
            batch = torch.as_tensor(windows[start : start + rows], dtype=torch.long, device=dev)
            with autocast_context(autocast):
                if states is None:
                    logits = model(batch[:, :-1]).logits
                else:
                    picked = [r // per_state for r in range(start, start + batch.size(0))]
                    logits = model(batch[:, :-1], state=states.select(picked)).logits
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
                states = self._start_states(model, autocast)
                losses = self._model_window_losses(model, self.windows, autocast, states)
                per = len(self.cut_windows) // len(self.windows)
                cut_losses = self._model_window_losses(model, self.cut_windows, autocast, states, per)
                preds = {
                    name: model_predictions(model, p.ids, self.device, autocast, self.batch_size)
                    for name, p in self.probes.items()
                }
        finally:
            model.train(was_training)
        m: dict[str, float] = {"val_loss": float(val_loss), "val_bpb": float(val_bpb)}
        m |= self._window_metrics(losses, cut_losses)
        warmed = states is not None
        m["context_warmup_tokens"] = float(self.L if warmed else 0)
        self.window_info["start"] = self.start_condition(warmed)
        self._settle_restored(warmed)
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
        Each window and each cut piece starts as the module docstring says: a
        Transformer from an empty cache, a carried-state model from its state
        after unrelated text, so a model gains only from the window's own text.
        """
        early, late, edges = buckets(losses.shape[1])
        _, a, b = cut_plan(losses.shape[1])
        ng, uni = self.ref_windows["ngram"], self.ref_windows["unigram"]
        model_mean = losses.mean(axis=1)
        model_early, model_late = losses[:, early].mean(axis=1), losses[:, late].mean(axis=1)
        model_gain = cut_means(cut_losses, len(losses)) - losses[:, a:b].mean(axis=1)
        ng_mean, ng_early, ng_late = (np.asarray(ng[k]) for k in ("mean", "early", "late"))
        ng_gain = np.asarray(self.ref_windows["ngram_cut"]) - np.asarray(ng["gain_full"])
        uni_mean = np.asarray(uni["mean"])
        uni_gap, uni_se = mean_se(uni_mean - model_mean)
        ng_gap, ng_se = mean_se(ng_mean - model_mean)
        excess, excess_se = mean_se(model_gain - ng_gain)
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

    def _settle_restored(self, warmed: bool) -> None:
        """History restored from a stages.json written before windows started warm (no
        ``context_warmup_tokens``): for a model that starts from nothing the measurement was the same; for a
        warmed one its context gain was not comparable, so stage 3 is unmeasurable at those evaluations."""
        for row in self.history:
            if "context_warmup_tokens" in row:
                continue
            row["context_warmup_tokens"] = math.nan if warmed else 0.0
            if warmed:
                for key in ("context_gain", "context_excess", "context_excess_se"):
                    row[key] = math.nan

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
        write_json(path, data)
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

        self.history = [none_to_nan(h) for h in data.get("history", []) if keep(h)]
        self.curve = {int(c["step"]): none_to_nan(c) for c in data.get("curve", []) if keep(c)}
        return len(self.history)
