"""stages.png: when each stage was reached, and the validation curve against the seed's loss bands."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mmrec.stages.criteria import STAGES, StageThresholds, none_to_nan, stage_checks


def plot_stages(data: dict[str, Any], path: str | Path) -> Path:
    """stages.png: a timeline of the stages over tokens, and validation bits per byte against the seed's bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    # A point measured without a validation loss (NaN, or null once written) is not drawn.
    curve = [c for c in data.get("curve", []) if c.get("val_bpb") is not None and math.isfinite(c["val_bpb"])]
    history = data.get("history", [])
    xs = [c["tokens"] for c in curve] + [h["tokens"] for h in history]
    positive = [x for x in xs if x and x > 0]
    log_x = bool(positive) and max(positive) / max(min(positive), 1) > 20
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 8), sharex=True, gridspec_kw={"height_ratios": [1, 1.6]})
    colors = [f"C{i}" for i in range(10)]
    checks = stage_checks(StageThresholds(**data.get("thresholds", {})))
    for st in data.get("stages", []):
        y = st["id"]
        c = colors[(y - 1) % len(colors)]
        measured = [h["tokens"] for h in history if h.get("tokens", 0) > 0 or not log_x]
        ax1.plot(measured, [y] * len(measured), "|", color="0.75", markersize=8)
        held = [h["tokens"] for h in history if checks[st["key"]](none_to_nan(h))[0] and (h["tokens"] > 0 or not log_x)]
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
