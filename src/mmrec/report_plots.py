"""The figures of ``mmrec compare``'s report (matplotlib, imported when a figure is drawn), and the
reading of a run's CSV logs they share with the report's text (:mod:`mmrec.report`)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

LABELS = {"mmrec": "MM-Rec", "gpt": "GPT-style", "llama": "LLaMA-style", "mistral": "Mistral-style"}
COLORS = {"mmrec": "#d62728", "gpt": "#1f77b4", "llama": "#2ca02c", "mistral": "#9467bd"}
STAGE_COLORS = ["#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "not evaluated"
    return f"{v:.{digits}f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)


def read_csv(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = []
        for r in csv.DictReader(f):
            row = {}
            for k, v in r.items():
                try:
                    row[k] = float(v)
                except (TypeError, ValueError):
                    continue
            rows.append(row)
        return rows


def _or_nan(v: float | None) -> float:
    return float("nan") if v is None else v


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(models: dict[str, Any], runs: dict[str, Path], stages: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 5))
    for key in models:
        train = read_csv(runs[key] / "metrics.csv")
        evals = read_csv(runs[key] / "eval.csv")
        if train:
            ax.plot([r["tokens"] for r in train], [r["bpb"] for r in train], color=COLORS[key], alpha=0.25, lw=0.7)
        if evals:
            ax.plot(
                [r["tokens"] for r in evals],
                [r["val_bpb"] for r in evals],
                "o-",
                color=COLORS[key],
                ms=3,
                label=f"{LABELS[key]} (validation)",
            )
    bands = next((s.get("bands") for s in stages.values() if s and s.get("bands")), None)
    if bands:
        for i, stage in enumerate(bands["stages"]):
            lo, hi = sorted(stage["end"]["bits_per_byte"])
            ax.axhspan(lo, hi, color=STAGE_COLORS[i], alpha=0.12)
            ax.text(
                1.0,
                (lo + hi) / 2,
                f" seed stage {stage['id']} end",
                transform=ax.get_yaxis_transform(),
                fontsize=7,
                va="center",
                color=STAGE_COLORS[i],
            )
    refs = next((s.get("references") for s in stages.values() if s and s.get("references")), None)
    if refs:
        for name, style in (("unigram", ":"), ("ngram", "--")):
            value = _ref_bpb(refs, name)
            if value is not None:
                ax.axhline(value, color="black", ls=style, lw=1, label=f"{name} reference ({value:.2f} bpb)")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("bits per byte (faint: training; points: validation)")
    ax.set_title("Loss against tokens, with the seed's bands converted to bits per byte")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ref_bpb(refs: dict[str, Any], name: str) -> float | None:
    """The reference's bits/byte, whatever nesting the tracker used."""
    for key in (f"{name}_bpb", name):
        v = refs.get(key)
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, dict):
            for inner in ("bpb", "bits_per_byte"):
                if isinstance(v.get(inner), (int, float)):
                    return float(v[inner])
    return None


def plot_stage_timeline(stages: dict[str, Any], path: Path) -> None:
    plt = _plt()
    keys = [k for k in stages if stages[k]]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.7 * len(keys)))
    for row, key in enumerate(keys):
        for rec in stages[key]["stages"]:
            if rec["reached"]:
                ax.scatter(
                    rec["tokens"],
                    row,
                    s=120,
                    color=STAGE_COLORS[rec["id"] - 1],
                    zorder=3,
                    marker="o" if not rec.get("out_of_order") else "X",
                )
                ax.annotate(
                    str(rec["id"]), (rec["tokens"], row), ha="center", va="center", fontsize=7, color="white", zorder=4
                )
    ax.set_yticks(range(len(keys)), [LABELS[k] for k in keys])
    ax.set_xlabel("tokens seen when the stage was first reached (X: out of order)")
    ax.set_title("Learning stages: 1 tokens, 2 grammar, 3 context use, 4 knowledge, 5 in-context reasoning")
    ax.grid(axis="x", alpha=0.3)
    ax.set_ylim(-0.7, len(keys) - 0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bpb_by_position(models: dict[str, Any], path: Path) -> None:
    plt = _plt()
    import numpy as np

    first = next(iter(models.values()))["bpb_by_position"]
    keep = [i for i, n in enumerate(first["tokens"]) if n > 0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(models)
    for j, (key, m) in enumerate(models.items()):
        r = m["bpb_by_position"]
        x = np.arange(len(keep)) + j * width
        # A bucket not evaluated is left empty (nan), not drawn as 0.
        axes[0].bar(x, [_or_nan(r["full_bpb"][i]) for i in keep], width, color=COLORS[key], label=LABELS[key])
        axes[1].bar(x, [_or_nan(r["gain_bpb"][i]) for i in keep], width, color=COLORS[key], label=LABELS[key])
    for ax, title in (
        (axes[0], "bits per byte, full context"),
        (axes[1], "long-context gain: cut-context bpb minus full-context bpb"),
    ):
        ax.set_xticks(np.arange(len(keep)) + 0.4 - width / 2, [first["buckets"][i] for i in keep])
        ax.set_xlabel("position in document (tokens)")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_speed(models: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for key, m in models.items():
        s = m["speed"]
        ok = [r for r in s["train"] if "tokens_per_s" in r]
        axes[0].plot(
            [r["seq_len"] for r in ok],
            [r["tokens_per_s"] for r in ok],
            "o-",
            color=COLORS[key],
            label=f"{LABELS[key]} (exponent {fmt(s['exponent'], 2)})",
        )
        dec = [d for d in s["decode"] if "ms_per_token" in d]
        axes[1].plot(
            [d["context"] for d in dec], [d["ms_per_token"] for d in dec], "o-", color=COLORS[key], label=LABELS[key]
        )
        axes[2].plot(
            [d["context"] for d in dec],
            [d["state_bytes"] / 2**20 for d in dec],
            "o-",
            color=COLORS[key],
            label=LABELS[key],
        )
    for ax, (title, ylabel) in zip(
        axes,
        (
            ("training throughput", "tokens/s"),
            ("decoding latency", "ms per token"),
            ("state / KV cache while decoding", "MiB"),
        ),
        strict=True,
    ):
        ax.set_xscale("log", base=2)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_xlabel("training window (tokens)")
    axes[1].set_xlabel("context (tokens)")
    axes[2].set_xlabel("context (tokens)")
    axes[2].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
