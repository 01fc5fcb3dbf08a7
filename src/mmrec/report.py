"""report.md and figures for ``mmrec compare``: what the measurements show, in words and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mmrec.report_plots import (
    LABELS,
    fmt,
    plot_bpb_by_position,
    plot_loss_curves,
    plot_speed,
    plot_stage_timeline,
    read_csv,
)
from mmrec.utils.fmt import human_bytes

# Two final losses closer than this (bits/byte) are reported as a tie when no standard error is known: a
# single training seed evaluated once on one validation sample cannot order them (a stated threshold, not
# a measured noise level). With standard errors (``val_bpb_se`` in a summary) the rule is two of them.
TIE_BPB = 0.01


def _stages(run: Path) -> dict[str, Any] | None:
    path = run / "stages.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _loss_progression(run: Path) -> tuple[float | None, float | None, float | None, float | None]:
    evals = read_csv(run / "eval.csv")
    train = read_csv(run / "metrics.csv")
    start = train[0]["bpb"] if train else None
    start_loss = train[0]["loss"] if train else None
    end = evals[-1]["val_bpb"] if evals else None
    end_loss = evals[-1]["val_loss"] if evals else None
    return start, end, start_loss, end_loss


def write_report(out: Path, results: dict[str, Any]) -> Path:
    """Figures and report.md from the results of ``run_compare``."""
    models: dict[str, Any] = results["models"]
    runs = {k: Path(m["run"]) for k, m in models.items()}
    stages = {k: _stages(runs[k]) for k in models}
    figures = {}
    for name, fn in (
        ("loss_curves.png", lambda p: plot_loss_curves(models, runs, stages, p)),
        ("stage_timeline.png", lambda p: plot_stage_timeline(stages, p)),
        ("bpb_by_position.png", lambda p: plot_bpb_by_position(models, p)),
        ("speed_memory.png", lambda p: plot_speed(models, p)),
    ):
        try:
            fn(out / name)
            figures[name] = True
        except ImportError:
            figures[name] = False
    lines = _report_lines(results, models, runs, stages, figures)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _params(run: Path) -> int | None:
    """Parameters of the run's final checkpoint, read from the safetensors header."""
    from safetensors import safe_open

    from mmrec.train.checkpoint import list_checkpoints

    found = list_checkpoints(run)
    if not found:
        return None
    with safe_open(str(found[-1] / "model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118


def _report_lines(
    results: dict[str, Any],
    models: dict[str, Any],
    runs: dict[str, Path],
    stages: dict[str, Any],
    figures: dict[str, bool],
) -> list[str]:
    keys = list(models)
    head = ["| | " + " | ".join(LABELS[k] for k in keys) + " |", "|---|" + "---|" * len(keys)]
    cfg0 = next(iter(models.values()))["config"]
    lines = [
        "# MM-Rec against the Transformers: the founding document's table, measured",
        "",
        f"Preset `{results['preset']}` ({results['preset_description']}); data: {', '.join(results['data'])}; "
        f"seed {results['seed']}; device {results['device']}. All models trained on the same token stream "
        f"(same data, curriculum `{cfg0['seq_len_schedule'] or cfg0['seq_len']}`, {cfg0['max_steps']} steps, seed), "
        "the Transformers sized to MM-Rec's parameter count.",
        "",
        "## The comparison table",
        "",
        *head,
    ]
    row = lambda name, vals: lines.append(f"| {name} | " + " | ".join(vals) + " |")  # noqa: E731
    row("parameters", [fmt(_params(runs[k])) for k in keys])
    row("learning order (stages reached)", [_order_text(stages.get(k)) for k in keys])
    prog = {k: _loss_progression(runs[k]) for k in keys}
    row(
        "loss progression, bits/byte (first step -> final validation)",
        [f"{fmt(prog[k][0])} -> {fmt(prog[k][1])}" for k in keys],
    )
    row("loss progression, nats/token", [f"{fmt(prog[k][2])} -> {fmt(prog[k][3])}" for k in keys])
    tokens = {k: models[k]["summary"].get("tokens") for k in keys}
    row("data amount (tokens trained)", [fmt(None if tokens[k] is None else int(tokens[k])) for k in keys])
    row(
        "context trained / evaluated (tokens)",
        [
            f"trained on windows of {_trained_len(models[k]['config']):,}; evaluated on documents of up to "
            f"{models[k]['bpb_by_position']['longest_document_tokens']:,}"
            for k in keys
        ],
    )
    row(
        "memory system",
        [
            "state: S, M, FIFO, z (fixed size)"
            if k == "mmrec"
            else ("KV cache (sliding window)" if k == "mistral" else "KV cache (grows)")
            for k in keys
        ],
    )
    row("bytes carried at 32K context", [human_bytes(models[k]["speed"]["state_bytes_32k"]["bytes"]) for k in keys])
    row("attention cost: fitted exponent of time vs length", [fmt(models[k]["speed"]["exponent"], 2) for k in keys])
    row("final validation bits/byte", [fmt(models[k]["summary"].get("val_bpb")) for k in keys])
    lines += [
        "",
        "Exponent: the slope of log(time per sequence) against log(length) for forward + backward "
        f"(1 = linear, 2 = quadratic), {exponent_lengths_text(models)}. Bytes at 32K: "
        + "; ".join(f"{LABELS[k]}: {models[k]['speed']['state_bytes_32k']['how']}" for k in keys)
        + ".",
    ]

    lines += ["", "## Findings", ""] + [f"- {f}" for f in _findings(results, models, stages, prog)]

    lines += ["", "## Learning stages", ""]
    bands = next((s.get("bands") for s in stages.values() if s and s.get("bands")), None)
    if bands:
        lines += [bands["conversion"], ""]
    lines += ["| stage | criterion | " + " | ".join(LABELS[k] for k in keys) + " |", "|---|---|" + "---|" * len(keys)]
    first = next((s for s in stages.values() if s), None)
    if first:
        for rec in first["stages"]:
            cells = []
            for k in keys:
                st = stages.get(k)
                r = next((x for x in st["stages"] if x["id"] == rec["id"]), None) if st else None
                cells.append(f"step {r['step']} ({r['tokens']:,} tokens)" if r and r["reached"] else "not reached")
            lines.append(f"| {rec['id']}. {rec['name']} | {rec['criterion']} | " + " | ".join(cells) + " |")
        lines += ["", *context_gain_lines(stages, keys)]
    if figures.get("stage_timeline.png"):
        lines += ["", "![stage timeline](stage_timeline.png)"]
    if figures.get("loss_curves.png"):
        lines += ["", "![loss curves](loss_curves.png)"]

    lines += ["", "## Bits per byte by position (does longer context help?)", ""]
    b0 = next(iter(models.values()))["bpb_by_position"]
    lines += [
        f"Full context: MM-Rec streams each document; Transformers see the document up to their trained "
        f"length, then a sliding window of it. Cut: every model sees {b0['cut']} tokens at most.",
        "",
        "| model | " + " | ".join(b0["buckets"]) + " | all |",
        "|---|" + "---|" * (len(b0["buckets"]) + 1),
    ]
    for k in keys:
        r = models[k]["bpb_by_position"]
        lines.append(
            f"| {LABELS[k]} (full) | "
            + " | ".join(fmt(v) for v in r["full_bpb"])
            + f" | {fmt(r['overall_full_bpb'])} |"
        )
        lines.append(
            f"| {LABELS[k]} (cut) | " + " | ".join(fmt(v) for v in r["cut_bpb"]) + f" | {fmt(r['overall_cut_bpb'])} |"
        )
    if figures.get("bpb_by_position.png"):
        lines += ["", "![bits per byte by position](bpb_by_position.png)"]

    lines += [
        "",
        "## Speed and memory against length",
        "",
        "| model | "
        + " | ".join(f"train T={r['seq_len']:,}" for r in models[keys[0]]["speed"]["train"])
        + " | "
        + " | ".join(f"decode @{d['context']:,}" for d in models[keys[0]]["speed"]["decode"])
        + " |",
        "|---|" + "---|" * (len(models[keys[0]]["speed"]["train"]) + len(models[keys[0]]["speed"]["decode"])),
    ]
    for k in keys:
        s = models[k]["speed"]
        train = [
            f"{r['tokens_per_s']:,.0f} tok/s"
            + (f", {r['peak_rss_gib']:.2f} GiB" if math.isfinite(r.get("peak_rss_gib", float("nan"))) else "")
            if "tokens_per_s" in r
            else "error"
            for r in s["train"]
        ]
        dec = [
            f"{d['ms_per_token']:.2f} ms, {human_bytes(d['state_bytes'])}"
            if "ms_per_token" in d
            else d.get("skipped", "-")
            for d in s["decode"]
        ]
        lines.append(f"| {LABELS[k]} | " + " | ".join(train + dec) + " |")
    lines += [
        "",
        "Training: forward + backward + AdamW on random ids (GiB: peak resident memory of a process that "
        "ran only that measurement, where measured). Decoding: one token after the given context, with the "
        "bytes of state or KV cache at that point.",
    ]
    if figures.get("speed_memory.png"):
        lines += ["", "![speed and memory](speed_memory.png)"]
    lines += [
        "",
        "Raw numbers: `results.json`; each model's run (metrics.csv, eval.csv, stages.json, checkpoints): "
        + ", ".join(f"`{runs[k]}`" for k in keys)
        + ".",
    ]
    return lines


def context_start_text(row: dict[str, Any]) -> str:
    """How a stage-3 measurement started each window and cut piece, from its ``context_warmup_tokens``."""
    if "context_warmup_tokens" not in row:
        return "from a fresh state (measured before issue 13: not comparable for MM-Rec)"
    warm = row["context_warmup_tokens"]
    if warm is None or not math.isfinite(warm):
        return "not measured"
    return f"state warmed on {int(warm):,} tokens of unrelated text" if warm > 0 else "empty context"


def context_gain_lines(stages: dict[str, Any], keys: list[str]) -> list[str]:
    """Stage 3's numbers at each model's last evaluation, with how each window started."""
    lines = [
        "Stage 3 at the last evaluation (nats/token, mean over windows; excess +- its standard error). Every model "
        "starts each window and each cut piece without history of its own, as it was trained to start a window: "
        "a Transformer with an empty KV cache, MM-Rec with its state after one window of unrelated text "
        "(validation text of other documents); the n-gram model with its context cut.",
        "",
        "| model | window start | context gain | n-gram's gain | excess |",
        "|---|---|---|---|---|",
    ]
    for k in keys:
        st = stages.get(k)
        history = (st or {}).get("history") or []
        if not history:
            lines.append(f"| {LABELS[k]} | not tracked | - | - | - |")
            continue
        row = history[-1]
        excess = f"{fmt(row.get('context_excess'))} +- {fmt(row.get('context_excess_se'))}"
        lines.append(
            f"| {LABELS[k]} | {context_start_text(row)} | {fmt(row.get('context_gain'))} | "
            f"{fmt(row.get('ngram_context_gain'))} | {excess} |"
        )
    return lines


def _trained_len(cfg: dict[str, Any]) -> int:
    from mmrec.train.schedule import Curriculum

    return Curriculum(cfg["seq_len"], cfg["batch_size"], cfg["seq_len_schedule"], "", {"x": 1.0}).max_seq_len


def _order_text(st: dict[str, Any] | None) -> str:
    if not st:
        return "not tracked"
    reached = [str(s) for s in st["order"]]
    missing = [str(r["id"]) for r in st["stages"] if not r["reached"]]
    text = " -> ".join(reached) if reached else "none"
    if missing:
        text += f" (not reached: {', '.join(missing)})"
    if not st["in_order"]:
        text += " (out of order)"
    return text


def _findings(
    results: dict[str, Any], models: dict[str, Any], stages: dict[str, Any], prog: dict[str, tuple]
) -> list[str]:
    """Plain statements read off the numbers, MM-Rec's losses included."""
    keys = list(models)
    out = []
    final = {k: models[k]["summary"].get("val_bpb") for k in keys}
    ranked = sorted((v, k) for k, v in final.items() if v is not None)
    if ranked:
        best_v, best = ranked[0]
        tied, rule = best_with_ties(final, {k: models[k]["summary"].get("val_bpb_se") for k in keys})
        rest = ", ".join(f"{LABELS[k]} {v:.3f}" for v, k in ranked if k not in tied)
        if len(tied) == 1:
            text = f"Lowest final validation bits/byte: {LABELS[best]} ({best_v:.3f})"
        else:
            text = "Lowest final validation bits/byte: a tie between " + ", ".join(
                f"{LABELS[k]} ({final[k]:.3f})" for k in tied
            )
        out.append(f"{text}{'; then ' + rest if rest else ''}. A difference {rule} is called a tie.")
        if "mmrec" in final and final["mmrec"] is not None and "mmrec" not in tied:
            out.append(
                f"MM-Rec loses on final loss to {LABELS[best]} by {final['mmrec'] - best_v:.3f} bits/byte "
                "at this budget."
            )
    orders = {k: tuple(st["order"]) for k, st in stages.items() if st}
    if orders:
        distinct = set(orders.values())
        if len(distinct) == 1:
            order = " -> ".join(map(str, next(iter(distinct))))
            out.append(
                f"All tracked models reached the stages in the same order ({order}): "
                "consistent with the seed's claim of one learning path, at this scale."
            )
        else:
            out.append(
                "The stage order differs between models: "
                + "; ".join(f"{LABELS[k]} {' -> '.join(map(str, o)) or 'none'}" for k, o in orders.items())
                + ". The seed's 'same path for all' is not supported as stated."
            )
        unreached = {k: [r["id"] for r in st["stages"] if not r["reached"]] for k, st in stages.items() if st}
        if any(unreached.values()):
            out.append(
                "Not reached within the budget: "
                + "; ".join(f"{LABELS[k]} stage(s) {', '.join(map(str, v))}" for k, v in unreached.items() if v)
                + "."
            )
    gains = {}
    for k in keys:
        r = models[k]["bpb_by_position"]
        late = [
            g
            for g, n, b in zip(r["gain_bpb"], r["tokens"], r["buckets"], strict=True)
            if g is not None and n > 0 and not b.startswith("0-")
        ]
        gains[k] = sum(late) / len(late) if late else None
    if any(v is not None for v in gains.values()):
        out.append(
            "Long-context gain beyond the first 1K positions (cut minus full, bits/byte; > 0 means the "
            "model uses context beyond the cut): " + ", ".join(f"{LABELS[k]} {fmt(v)}" for k, v in gains.items()) + "."
        )
    exps = {k: models[k]["speed"]["exponent"] for k in keys}
    out.append(
        "Time against length (fitted exponent, training, "
        + exponent_lengths_text(models)
        + "): "
        + ", ".join(f"{LABELS[k]} {fmt(v, 2)}" for k, v in exps.items())
        + "."
    )
    st32 = {k: models[k]["speed"]["state_bytes_32k"]["bytes"] for k in keys}
    if "mmrec" in st32:
        others = ", ".join(f"{LABELS[k]} {human_bytes(v)}" for k, v in st32.items() if k != "mmrec")
        out.append(
            f"Memory carried at 32K tokens of context: MM-Rec {human_bytes(st32['mmrec'])} (constant) against {others}."
        )
    bands = next((s.get("bands") for s in stages.values() if s and s.get("bands")), None)
    if bands and ranked:
        stage5 = bands["stages"][-1]["end"]["bits_per_byte"]
        out.append(
            f"The seed's final band (stage 5 end, {stage5[0]:.2f}-{stage5[1]:.2f} bits/byte after "
            f"conversion) against the best model here ({ranked[0][0]:.3f}): "
            + (
                "reached."
                if ranked[0][0] <= max(stage5)
                else "not reached at this budget; the bands describe far larger models and data."
            )
        )
    return out


def best_with_ties(
    values: dict[str, float | None], se: dict[str, float | None], threshold: float = TIE_BPB
) -> tuple[list[str], str]:
    """The models tied for the lowest value, lowest first, and the rule that decided it, in words.

    Two values tie when their difference is within two standard errors of it (every model's
    standard error known), else when it is at most ``threshold``. Models without a value are left out.
    """
    ranked = sorted((v, k) for k, v in values.items() if v is not None)
    if not ranked:
        return [], ""
    best_v, best = ranked[0]
    errors = {k: e for k, e in se.items() if e is not None}
    if all(k in errors for _, k in ranked):
        tied = [k for v, k in ranked if v - best_v <= 2 * math.hypot(errors[best], errors[k])]
        return tied, "within two standard errors of the difference"
    tied = [k for v, k in ranked if v - best_v <= threshold]
    return tied, (
        f"of at most {threshold:g} bits/byte (no standard error was measured: one training seed, one validation sample)"
    )


def exponent_lengths_text(models: dict[str, Any]) -> str:
    """Which lengths the exponents were fitted over: the same for all models, or each model's own."""
    used = {}
    for key, m in models.items():
        speed = m["speed"]
        lengths = speed.get("exponent_lengths")
        if lengths is None:  # results of an older version: each model fitted over the lengths it ran
            lengths = [r["seq_len"] for r in speed["train"] if "seconds_per_step" in r]
        used[key] = list(lengths)
    distinct = {tuple(v) for v in used.values()}
    if len(distinct) == 1:
        lengths = next(iter(distinct))
        return "fitted over the same lengths for every model: T = " + ", ".join(f"{n:,}" for n in lengths)
    return "fitted over different lengths (those each model ran): " + "; ".join(
        f"{LABELS[k]} T = {', '.join(f'{n:,}' for n in v) or 'none'}" for k, v in used.items()
    )
