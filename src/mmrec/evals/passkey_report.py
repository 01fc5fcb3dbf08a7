"""The passkey grid for people: the markdown tables and the depth x length heatmap of ``evaluate_passkey``'s results."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def _fmt(v: float | None, spec: str) -> str:
    # A cell that did not run is "not evaluated" (its reason is in the notes below the tables), never 0.
    return "not evaluated" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def passkey_table(results: dict[str, Any]) -> str:
    """Markdown: exact match and digit log-likelihood, depth by length, and the notes."""
    lengths, depths = results["lengths"], results["depths"]
    cell = {(c["length"], c["depth"]): c for c in results["cells"]}
    head = "| depth | " + " | ".join(f"{n:,}" for n in lengths) + " |"
    rule = "|---|" + "---:|" * len(lengths)
    lines = [f"# Passkey retrieval ({results['arch']}, {results['trials']} trials per cell)", ""]
    for title, key, spec in (
        ("Exact match (greedy answer == key)", "exact_match", ".2f"),
        ("Digit log-likelihood (nats per digit token, teacher-forced; 0 is certain)", "digit_logprob", ".3f"),
    ):
        lines += [f"## {title}", "", head, rule]
        for d in depths:
            lines.append(f"| {d:g} | " + " | ".join(_fmt(cell[(n, d)][key], spec) for n in lengths) + " |")
        lines.append("")
    lines += ["## How each length was read", ""]
    for n in lengths:
        c = cell[(n, depths[0])]
        per_stream = c["memory_bytes_per_stream"]
        memory = f" ({per_stream:,} bytes of state or KV cache per stream)" if per_stream else ""
        lines.append(f"- {n:,} tokens: {c['note']}{memory}")
    return "\n".join(lines) + "\n"


def plot_passkey_heatmap(results: dict[str, Any], path: str | Path) -> Path | None:
    """Depth x length heatmap of exact match; skipped cells hatched grey. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    lengths, depths = results["lengths"], results["depths"]
    cell = {(c["length"], c["depth"]): c for c in results["cells"]}
    grid = np.array(
        [
            [np.nan if cell[(n, d)]["exact_match"] is None else cell[(n, d)]["exact_match"] for n in lengths]
            for d in depths
        ]
    )
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.6 * len(depths) + 2))
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="#cccccc")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for r, d in enumerate(depths):
        for k, n in enumerate(lengths):
            v = cell[(n, d)]["exact_match"]
            ax.text(k, r, "skip" if v is None else f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [f"{n:,}" for n in lengths], rotation=30)
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("depth of the pass key")
    ax.set_title(f"Passkey retrieval, exact match ({results['arch']})")
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
