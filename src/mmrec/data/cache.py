"""Prepared data sets, cached by fingerprint and shared by training and evaluation runs."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmrec.data.prepare import dataset_fingerprint, prepare_dataset
from mmrec.data.shards import PreparedDataset, load_dataset
from mmrec.data.sources import DataError, SourceSpec, parse_source, resolve_sources


def default_cache_root(data_cache: str | None = None) -> Path:
    return Path(data_cache or os.environ.get("MMREC_DATA_CACHE") or Path.home() / ".cache/mmrec/data")


def source_specs(data: list[str], text_field: str = "text") -> list[SourceSpec]:
    """Parsed and checked sources (missing paths fail here, before any work); default: the built-in corpus."""
    specs = [parse_source(s) for s in data] or [parse_source("builtin")]
    specs = [dataclasses.replace(s, text_field=text_field) if s.text_field == "text" else s for s in specs]
    return resolve_sources(specs)


def cached_dataset(
    specs: list[SourceSpec],
    tokenizer: Any,
    val_fraction: float,
    data_cache: str | None = None,
    log: Callable[[str], None] = print,
    prepare: bool = True,
    wait: Callable[[], None] = lambda: None,
    progress: bool = True,
    verify: bool = True,
) -> PreparedDataset:
    """Token shards for ``specs``: reused when already prepared, else prepared once.

    In multi-process runs only the process with ``prepare=True`` writes; all
    call ``wait`` (a barrier) before loading. ``progress`` shows a bar while
    preparing; ``verify`` checks every shard's sha256 on loading (sizes and
    the manifest's own checksum are always checked). A damaged cache is
    prepared again; one that a killed run left half-written was never put
    in place (``prepare_dataset`` renames only a complete one).
    """
    data_dir = default_cache_root(data_cache) / dataset_fingerprint(specs, tokenizer, val_fraction)
    dataset = None
    if prepare:
        if (data_dir / "manifest.json").is_file():
            try:
                dataset = load_dataset(data_dir, tokenizer, verify=verify)
                log(f"data: reusing prepared shards in {data_dir}")
            except DataError as e:
                # A cache: prepared again (and replaced whole) rather than used or left to block the run.
                log(f"data: the prepared shards in {data_dir} are damaged ({e}); preparing them again")
        if dataset is None:
            log(f"data: preparing {len(specs)} source(s) into {data_dir}")
            manifest = prepare_dataset(specs, tokenizer, data_dir, val_fraction, progress=progress)
            mb = sum(s["train"]["n_bytes"] + s["val"]["n_bytes"] for s in manifest["sources"].values()) / 1e6
            seconds = max(manifest["prepare_seconds"], 1e-9)
            log(f"data: prepared {mb:,.1f} MB in {seconds:.1f}s ({mb / seconds:,.1f} MB/s)")
    wait()
    return dataset if dataset is not None else load_dataset(data_dir, tokenizer, verify=verify)
