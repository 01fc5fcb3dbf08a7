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
    lines += protocol_lines(results)
    for title, key, spec in (
        ("Exact match (greedy answer == key)", "exact_match", ".2f"),
        ("Digit log-likelihood (nats per digit token, teacher-forced; 0 is certain)", "digit_logprob", ".3f"),
    ):
        lines += [f"## {title}", "", head, rule]
        for d in depths:
            lines.append(f"| {d:g} | " + " | ".join(_fmt(cell[(n, d)][key], spec) for n in lengths) + " |")
        lines.append("")
    lines += template_table(results)
    lines += ["## How each length was read", ""]
    for n in lengths:
        c = cell[(n, depths[0])]
        per_stream = c["memory_bytes_per_stream"]
        memory = f" ({per_stream:,} bytes of state or KV cache per stream)" if per_stream else ""
        lines.append(f"- {n:,} tokens: {c['note']}{memory}")
    return "\n".join(lines) + "\n"


def _files(paths: Any) -> str:
    return (
        "the five sentences"
        if not paths
        else ", ".join(f"`{p}`" for p in ([paths] if isinstance(paths, str) else paths))
    )


def protocol_lines(results: dict[str, Any]) -> list[str]:
    """What the test held out from training (filler text, templates) and its distractors, as a few lines."""
    if "eval_templates" not in results and "templates" not in results:
        return []  # a grid of an earlier version: the classic template, no distractors
    lines = []
    held = results.get("filler_held_out")
    test_filler = results.get("eval_filler", results.get("filler"))
    if held is True:
        lines.append(
            f"- Filler: {_files(test_filler)}; training read other text ({_files(results.get('train_filler'))})."
        )
    elif held is False:
        lines.append(f"- Filler: {_files(test_filler)}, the text training read too: **not a held-out text**.")
    else:
        lines.append(f"- Filler: {_files(test_filler)}; what training read is not known here.")
    templates = results.get("eval_templates") or results.get("templates") or []
    held_out = results.get("held_out_templates")
    text = f"- Key templates: {', '.join(templates)}"
    if held_out is None:
        text += " (training's not known here)."
    elif held_out:
        text += f"; never seen in training: **{', '.join(held_out)}**."
    else:
        text += "; all of them seen in training."
    lines.append(text)
    density = results.get("distractors") or 0
    lines.append(
        f"- Distractors: {density:g} numbers of the key's format per 1,000 filler tokens, never the key."
        if density
        else "- Distractors: none inserted (the filler's own digits are kept)."
    )
    return [*lines, ""]


def template_table(results: dict[str, Any]) -> list[str]:
    """Exact match by key template over the cells that ran, when the grid used more than one."""
    right: dict[str, list[int]] = {}  # template -> [right, trials]
    for c in results["cells"]:
        if c.get("exact_match") is None or len(c.get("templates") or []) != len(c.get("right") or []):
            continue
        for template, ok in zip(c["templates"], c["right"], strict=True):
            counts = right.setdefault(template, [0, 0])
            counts[0] += int(ok)
            counts[1] += 1
    if len(right) < 2:
        return []
    held_out = set(results.get("held_out_templates") or [])
    lines = ["## Exact match by key template (all cells)", "", "| template | right | trials | exact match |"]
    lines.append("|---|---:|---:|---:|")
    order = [t for t in results.get("eval_templates") or results.get("templates") or [] if t in right]
    for template in order + [t for t in right if t not in order]:
        ok, n = right[template]
        name = f"{template} (held out)" if template in held_out else template
        lines.append(f"| {name} | {ok} | {n} | {ok / n:.2f} |")
    return [*lines, ""]


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
