"""Bits per byte by position: does a model use long context?

Every token of every document is scored twice:

* **full context** - MM-Rec streams the document through its state in
  windows (constant memory, every earlier token is context); a Transformer
  sees the whole document when it fits its trained length, otherwise a
  sliding window of its trained length (stride half of it), as stated in the
  results;
* **cut context** - every model sees only a sliding window of ``cut`` tokens
  (stride ``cut // 2``): each token is scored with between cut/2 and cut
  tokens of context.

Losses are summed by the token's position in its document (buckets 0-1K,
1K-4K, 4K-16K, 16K-32K, 32K+) and turned into bits per byte:
sum(nats) / (sum(UTF-8 bytes of the scored tokens) * ln 2). The difference
between cut and full in the late buckets is the long-context gain.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmrec.models import MMRecLM, TransformerLM

BUCKETS = ((0, 1024), (1024, 4096), (4096, 16384), (16384, 32768), (32768, None))
LN2 = math.log(2.0)


def bucket_name(lo: int, hi: int | None) -> str:
    k = lambda n: f"{n // 1024}K" if n else "0"  # noqa: E731
    return f"{k(lo)}-{k(hi)}" if hi is not None else f"{k(lo)}+"


@dataclass
class BucketSums:
    """Summed nats, tokens and bytes per position bucket."""

    nats: np.ndarray = field(default_factory=lambda: np.zeros(len(BUCKETS)))
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(len(BUCKETS)))
    bytes: np.ndarray = field(default_factory=lambda: np.zeros(len(BUCKETS)))

    def add(self, positions: np.ndarray, nats: np.ndarray, nbytes: np.ndarray) -> None:
        edges = np.array([lo for lo, _ in BUCKETS[1:]])
        idx = np.searchsorted(edges, positions, side="right")
        np.add.at(self.nats, idx, nats)
        np.add.at(self.tokens, idx, 1)
        np.add.at(self.bytes, idx, nbytes)

    def bpb(self) -> list[float | None]:
        return [float(n / (b * LN2)) if b > 0 else None for n, b in zip(self.nats, self.bytes, strict=True)]

    def overall(self) -> float | None:
        b = self.bytes.sum()
        return float(self.nats.sum() / (b * LN2)) if b > 0 else None


def _token_nats(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, state: Any, autocast: Any
) -> tuple[np.ndarray, Any]:
    with torch.no_grad(), autocast:
        out = model(inputs.unsqueeze(0), state=state)
    nats = F.cross_entropy(out.logits[0].float(), targets, reduction="none")
    return nats.double().cpu().numpy(), out.state


def stream_nats(model: MMRecLM, ids: torch.Tensor, window: int, autocast: Any) -> np.ndarray:
    """nats[t-1] = -log p(ids[t] | ids[:t]) with all earlier tokens as context (state carried)."""
    out, state = [], None
    for s in range(0, ids.numel() - 1, window):
        inputs = ids[s : min(s + window, ids.numel() - 1)]
        nats, state = _token_nats(model, inputs, ids[s + 1 : s + 1 + inputs.numel()], state, autocast)
        out.append(nats)
    return np.concatenate(out) if out else np.zeros(0)


def sliding_nats(model: nn.Module, ids: torch.Tensor, context: int, autocast: Any) -> np.ndarray:
    """nats[t-1] with at most ``context`` tokens of context: windows of ``context`` inputs, stride context // 2."""
    n = ids.numel()
    stride = max(1, context // 2)
    out = np.zeros(max(n - 1, 0))
    t0 = 1
    while t0 < n:
        t1 = min(n, t0 + stride if t0 > 1 else context + 1)
        start = max(0, t1 - 1 - context)
        nats, _ = _token_nats(model, ids[start : t1 - 1], ids[start + 1 : t1], None, autocast)
        out[t0 - 1 : t1 - 1] = nats[t0 - 1 - start :]
        t0 = t1
    return out


def full_context_nats(
    model: nn.Module, ids: torch.Tensor, trained_len: int, window: int, autocast: Any, streams: bool
) -> tuple[np.ndarray, bool]:
    """nats[t-1] with all the context the model can use, and whether a Transformer needed a sliding window.

    ``streams``: the document goes through the model's state in windows of ``window`` tokens (MM-Rec);
    otherwise one pass when it fits ``trained_len``, else a sliding window of ``trained_len`` tokens."""
    if streams:
        return stream_nats(model, ids, window, autocast), False  # type: ignore[arg-type]
    if ids.numel() - 1 <= trained_len:
        return _token_nats(model, ids[:-1], ids[1:], None, autocast)[0], False
    return sliding_nats(model, ids, trained_len, autocast), True


def full_context_description(streams: bool, window: int, transformer_window: int | None) -> str:
    if streams:
        return f"MM-Rec streams each document through its state in windows of {window} tokens (all context)"
    if transformer_window:
        return (
            f"Transformer: documents longer than its trained length use a sliding window of {transformer_window} "
            f"tokens (stride {transformer_window // 2})"
        )
    return "Transformer: every document fits its trained length; whole-document context"


def cut_context_description(cut: int) -> str:
    return (
        f"sliding window of {cut} tokens, stride {max(1, cut // 2)} (each token sees {max(1, cut // 2)}-{cut} tokens)"
    )


def evaluate_bpb(
    model: nn.Module,
    documents: Iterable[list[int]],
    token_bytes: list[int],
    trained_len: int,
    cut: int = 2048,
    window: int = 4096,
    device: torch.device | str = "cpu",
    autocast: Any = None,
) -> dict[str, Any]:
    """Bits per byte per position bucket, with full and with cut context (see the module docstring)."""
    import contextlib

    autocast = autocast or contextlib.nullcontext()
    nbytes_of = np.asarray(token_bytes, dtype=np.float64)
    full, cutoff = BucketSums(), BucketSums()
    n_docs, longest = 0, 0
    is_mmrec = isinstance(model, MMRecLM)
    transformer_window = None
    for doc in documents:
        if len(doc) < 2:
            continue
        ids = torch.tensor(doc, dtype=torch.long, device=device)
        positions = np.arange(1, len(doc))  # position of each scored token in its document
        nbytes = nbytes_of[np.asarray(doc[1:])]
        nats_full, slid = full_context_nats(model, ids, trained_len, window, autocast, is_mmrec)
        if slid:
            transformer_window = trained_len
        full.add(positions, nats_full, nbytes)
        cutoff.add(positions, sliding_nats(model, ids, cut, autocast), nbytes)
        n_docs += 1
        longest = max(longest, len(doc))
    names = [bucket_name(lo, hi) for lo, hi in BUCKETS]
    full_bpb, cut_bpb = full.bpb(), cutoff.bpb()
    return {
        "buckets": names,
        "full_bpb": full_bpb,
        "cut_bpb": cut_bpb,
        "gain_bpb": [
            c - f if c is not None and f is not None else None for c, f in zip(cut_bpb, full_bpb, strict=True)
        ],
        "tokens": full.tokens.astype(int).tolist(),
        "overall_full_bpb": full.overall(),
        "overall_cut_bpb": cutoff.overall(),
        "documents": n_docs,
        "longest_document_tokens": longest,
        "cut": cut,
        "full_context": full_context_description(is_mmrec, window, transformer_window),
        "cut_context": cut_context_description(cut),
        "arch": model_name(model),
    }


def model_name(model: nn.Module) -> str:
    if isinstance(model, TransformerLM):
        return f"transformer-{model.config.preset}"
    return "mmrec" if isinstance(model, MMRecLM) else type(model).__name__


def markdown_table(results: dict[str, Any], title: str) -> str:
    fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
    lines = [
        f"## {title}",
        "",
        f"Full context: {results['full_context']}.  ",
        f"Cut context: {results['cut_context']}.",
        "",
        "| position bucket | tokens | bpb, full context | bpb, cut context | long-context gain |",
        "|---|---|---|---|---|",
    ]
    for name, n, f, c, g in zip(
        results["buckets"], results["tokens"], results["full_bpb"], results["cut_bpb"], results["gain_bpb"], strict=True
    ):
        lines.append(f"| {name} | {n:,} | {fmt(f)} | {fmt(c)} | {fmt(g)} |")
    lines.append(
        f"| all | {sum(results['tokens']):,} | {fmt(results['overall_full_bpb'])} | "
        f"{fmt(results['overall_cut_bpb'])} | |"
    )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Any, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keep = [i for i, n in enumerate(results["tokens"]) if n > 0]
    x = np.arange(len(keep))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(x - 0.2, [results["full_bpb"][i] for i in keep], 0.4, label="full context")
    ax.bar(x + 0.2, [results["cut_bpb"][i] for i in keep], 0.4, label=f"context cut to {results['cut']}")
    ax.set_xticks(x, [results["buckets"][i] for i in keep])
    ax.set_xlabel("position in document (tokens)")
    ax.set_ylabel("bits per byte")
    ax.set_title(title)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(
    checkpoint: str,
    data: list[str] | None,
    out: str,
    cut: int | None = None,
    window: int = 4096,
    max_docs: int | None = None,
    max_tokens: int | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """``mmrec eval bpb``: score documents (``data``, or the run's validation split) and write the results."""
    import contextlib

    from mmrec.evals.common import load_checkpoint, run_data_settings, write_results
    from mmrec.utils.device import autocast_for, resolve_device

    dev = resolve_device(device)
    lm = load_checkpoint(checkpoint, dev)
    if not data:
        run_data_settings(lm)  # fails now, before any scoring, for a checkpoint without a validation split
    tok = lm.tokenizer
    # A Transformer scored with more context than it was trained on measures extrapolation, not context use.
    cut = cut if cut is not None else min(2048, lm.trained_seq_len)
    if cut < 2:
        raise ValueError(f"--cut must be >= 2 tokens, got {cut}")

    autocast = autocast_for(dev)
    results = evaluate_bpb(
        lm.model,
        read_documents(lm, data, max_docs, max_tokens),
        tok.token_bytes(),
        lm.trained_seq_len,
        cut,
        window,
        dev,
        autocast,
    )
    results.update(
        checkpoint=str(lm.path),
        step=lm.step,
        trained_seq_len=lm.trained_seq_len,
        data=data or "validation split of the run's data",
    )
    title = f"{results['arch']} at step {lm.step}: bits per byte by position"
    table = markdown_table(results, title)
    path = write_results(out, results, table)
    with contextlib.suppress(ImportError):
        plot(results, path / "bpb_by_position.png", title)
    print(table)
    return results


def read_documents(
    lm: Any, data: list[str] | None, max_docs: int | None = None, max_tokens: int | None = None
) -> Iterator[list[int]]:
    """The token ids of each document of ``data`` (text files, folders, ...) or, without it, of the validation
    split of the run behind ``lm`` (a LoadedModel); at most ``max_docs``, each cut to ``max_tokens``."""
    from mmrec.data.cache import cached_dataset, source_specs
    from mmrec.data.sources import SkipStats, iter_documents
    from mmrec.evals.common import run_data_settings

    tok = lm.tokenizer
    count = 0
    if data:
        stats = SkipStats()
        for spec in source_specs(data):
            for _, text in iter_documents(spec, stats):
                yield tok.encode(text)[: max_tokens or None]
                count += 1
                if max_docs and count >= max_docs:
                    return
    else:
        sources, text_field, val_fraction, data_cache = run_data_settings(lm)
        dataset = cached_dataset(source_specs(sources, text_field), tok, val_fraction, data_cache)
        for src in dataset.sources.values():
            for i in range(src.val.n_docs):
                yield src.val.doc(i)[: max_tokens or None].tolist()
                count += 1
                if max_docs and count >= max_docs:
                    return
