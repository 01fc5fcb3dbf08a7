"""Tokenise text sources once into memory-mappable shards (the format: ``mmrec.data.shards``).

All sources are checked before any tokenising, and a dataset is written to a
temporary directory renamed into place only when complete: a run killed or
stopped part-way (SIGKILL, SIGTERM, Ctrl-C, a full disk) leaves nothing at
the output path, and the next run removes what a killed one left behind.

The train/validation split is per document and follows from a hash of the
document id alone (``split_of``): re-running on the same inputs, or adding
sources, never moves a document between splits. Every source gets
validation data: if no document of a source hashes into validation, its
``min_val_docs`` documents with the smallest hashes (those closest to the
cut) are moved there, keeping at least one training document; a source with
a single document has that document's tokens split instead, the last
``val_fraction`` of them (at least 64 tokens, or half the document if it is
shorter than 128 tokens) going to validation.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from mmrec.data.builtin import stdlib_root
from mmrec.data.shards import FORMAT_VERSION, MANIFEST, SPLITS, Manifest, SplitWriter, token_dtype, tokenizer_id_of
from mmrec.data.sources import DataError, SkipStats, SourceSpec, iter_documents, resolve_sources, source_files
from mmrec.tokenizer import ByteTokenizer
from mmrec.utils.files import (
    SEAL_KEY,
    DiskFullError,
    file_record,
    free_bytes,
    fsync_dir,
    human_bytes,
    is_disk_full,
    sealed_json,
    write_bytes_durably,
)

# Documents are tokenised in batches of up to this many documents or bytes (one call to encode_batch each).
BATCH_DOCS = 512
BATCH_BYTES = 4 << 20
# Tokens held out from a single-document source: this many at least, when the document has twice as many.
MIN_SPLIT_VAL_TOKENS = 64


def _doc_hash(doc_id: str) -> int:
    """First 8 bytes of sha256(doc_id), as an unsigned int: uniform, and the same on every machine."""
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8", "surrogatepass")).digest()[:8], "big")


def _is_val(h: int, val_fraction: float) -> bool:
    return h / 2**64 < val_fraction


def split_of(doc_id: str, val_fraction: float) -> str:
    """``"val"`` for about ``val_fraction`` of document ids, ``"train"`` for the rest; depends on the id only."""
    return "val" if _is_val(_doc_hash(doc_id), val_fraction) else "train"


def _check_settings(val_fraction: float, min_val_docs: int) -> None:
    if not (isinstance(val_fraction, int | float) and 0 <= val_fraction < 1):
        raise DataError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if not isinstance(min_val_docs, int) or min_val_docs < 0:
        raise DataError(f"min_val_docs must be an int >= 0, got {min_val_docs!r}")


def dataset_fingerprint(specs: list[SourceSpec], tokenizer: Any, val_fraction: float, *, min_val_docs: int = 1) -> str:
    """16 hex digits naming what ``prepare_dataset`` would produce, for caching prepared data.

    Covers the sources (absolute path, name, text field, and the relative
    path, size and modification time of every file, so edited data is
    prepared again; the Python version and library path for the built-in
    corpus), the tokenizer id, the split settings and the format
    version. Mixture weights are left out: they are applied at sampling
    time, so changing them reuses the same prepared data.
    """
    _check_settings(val_fraction, min_val_docs)
    items = []
    for spec in resolve_sources(specs):
        item: dict[str, Any] = {"name": spec.name, "text_field": spec.text_field}
        files: list[tuple[Path, str]] = []
        if spec.is_builtin:
            # The built-in corpus is fixed by the Python installation; listing it would take most of a second.
            item["path"] = "builtin"
            item["python"] = [sys.version, str(stdlib_root())]
        elif spec.is_hf:
            item["path"] = spec.path
        else:
            item["path"] = os.path.abspath(spec.path)
            files = source_files(spec)
        listing = []
        for p, rel in files:
            try:
                st = p.stat()
                listing.append([rel, st.st_size, st.st_mtime_ns])
            except OSError:
                listing.append([rel, -1, -1])
        item["files"] = listing
        items.append(item)
    payload = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer_id_of(tokenizer),
        "val_fraction": float(val_fraction),
        "min_val_docs": min_val_docs,
        "sources": items,
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def _encode(tokenizer: Any, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text as an array; the byte tokenizer skips Python int lists entirely."""
    if isinstance(tokenizer, ByteTokenizer):
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
    if hasattr(tokenizer, "encode_batch"):
        batch = tokenizer.encode_batch(texts)
    else:
        batch = [tokenizer.encode(t) for t in texts]
    return [np.asarray(ids, dtype=np.int64) for ids in batch]


class _Progress:
    """tqdm over documents (stderr) with MB/s; does nothing when disabled or tqdm is missing."""

    def __init__(self, enabled: bool) -> None:
        self.bar: Any = None
        self.start = time.perf_counter()
        self.bytes = 0
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(unit="doc", file=sys.stderr, dynamic_ncols=True, desc="prepare")

    def update(self, name: str, docs: int, n_bytes: int) -> None:
        self.bytes += n_bytes
        if self.bar is not None:
            rate = self.bytes / max(time.perf_counter() - self.start, 1e-9) / 1e6
            self.bar.set_postfix_str(f"{name}, {self.bytes / 1e6:.1f} MB, {rate:.1f} MB/s", refresh=False)
            self.bar.update(docs)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _prepare_source(
    spec: SourceSpec,
    tokenizer: Any,
    directory: Path,
    dtype: np.dtype,
    vocab_size: int,
    val_fraction: float,
    min_val_docs: int,
    progress: _Progress,
) -> dict[str, Any]:
    assert spec.name is not None
    directory.mkdir()
    stats = SkipStats()
    writers = {s: SplitWriter(directory, s, dtype) for s in SPLITS}
    ids: list[str] = []
    texts: list[str] = []
    pending = 0

    def flush() -> None:
        arrays = _encode(tokenizer, texts)
        parts: dict[str, tuple[list[np.ndarray], list[int], list[int]]] = {s: ([], [], []) for s in SPLITS}
        total = 0
        for doc_id, text, arr in zip(ids, texts, arrays, strict=True):
            if arr.size and int(arr.max()) >= vocab_size:
                raise DataError(f"the tokenizer produced id {int(arr.max())} >= its vocab_size {vocab_size}")
            h = _doc_hash(doc_id)
            n = len(text.encode("utf-8"))
            total += n
            docs, hashes, sizes = parts["val" if _is_val(h, val_fraction) else "train"]
            docs.append(arr)
            hashes.append(h)
            sizes.append(n)
        for s in SPLITS:
            writers[s].add(*parts[s])
        progress.update(spec.name or "", len(texts), total)
        ids.clear()
        texts.clear()

    for doc_id, text in iter_documents(spec, stats):
        ids.append(doc_id)
        texts.append(text)
        pending += len(text)
        if len(texts) >= BATCH_DOCS or pending >= BATCH_BYTES:
            flush()
            pending = 0
    if texts:
        flush()
    for w in writers.values():
        w.close()

    train, val = writers["train"], writers["val"]
    total_docs = train.n_docs + val.n_docs
    if total_docs == 0:
        raise DataError(
            f"source {spec.name!r} ({spec.path}) has no documents left after skipping bad inputs: {stats.summary()}. "
            "Check the path and the text field, or drop this source."
        )
    moved_to_val = 0
    split_document = False
    if total_docs == 1:
        split_document = min_val_docs > 0
        _split_single_document(train, val, tokenizer, val_fraction, spec, keep_whole=not split_document)
    else:
        if train.n_docs == 0:
            # Everything hashed into validation (tiny source, large val_fraction): train on the largest hash.
            last = max(range(val.n_docs), key=lambda i: val.hashes[i])
            _move(val, train, [last])
        short = min(min_val_docs - val.n_docs, train.n_docs - 1)
        if short > 0:
            nearest = heapq.nsmallest(short, range(train.n_docs), key=lambda i: train.hashes[i])
            _move(train, val, nearest)
            moved_to_val = short
    progress.write(f"{spec.name}: {stats.summary()}")
    return {
        "name": spec.name,
        "path": spec.path,
        "text_field": spec.text_field,
        "weight": spec.weight,
        "skipped": stats.to_dict(),
        "moved_to_val": moved_to_val,
        "split_document": split_document,
        **{s: writers[s].finish() for s in SPLITS},
    }


def _move(src: SplitWriter, dst: SplitWriter, indices: list[int]) -> None:
    taken = src.remove(indices)
    dst.reopen()
    dst.add([t for t, _, _ in taken], [h for _, h, _ in taken], [n for _, _, n in taken])
    dst.close()


def _split_single_document(
    train: SplitWriter,
    val: SplitWriter,
    tokenizer: Any,
    val_fraction: float,
    spec: SourceSpec,
    keep_whole: bool,
) -> None:
    """Give a one-document source both splits: its first tokens train, its last ones validate."""
    holder = train if train.n_docs else val
    ((tokens, h, n_bytes),) = holder.remove([0])
    n = len(tokens)
    if keep_whole:
        train.reopen()
        train.add([tokens], [h], [n_bytes])
        train.close()
        return
    if n < 2:
        raise DataError(
            f"source {spec.name!r} ({spec.path}) is a single document of {n} token, too short to hold out "
            "validation data: add more text, or prepare with min_val_docs=0"
        )
    n_val = min(n - 1, max(math.ceil(n * val_fraction), min(MIN_SPLIT_VAL_TOKENS, n // 2), 1))
    head, tail = tokens[: n - n_val], tokens[n - n_val :]
    token_bytes = getattr(tokenizer, "token_bytes", None)
    if token_bytes is not None:
        table = np.asarray(token_bytes(), dtype=np.int64)
        tail_bytes = int(table[tail].sum())
    else:
        tail_bytes = round(n_bytes * n_val / n)
    for w, part, nb in ((train, head, n_bytes - tail_bytes), (val, tail, tail_bytes)):
        w.reopen()
        w.add([part], [h], [nb])
        w.close()


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove_leftovers(out: Path) -> None:
    """Remove the temporary and set-aside directories of earlier runs on this machine that were killed
    (their process is gone); another machine's are left alone."""
    pattern = re.compile(rf"^{re.escape(out.name)}\.(tmp|old)-{re.escape(_host())}-(\d+)$")
    if not out.parent.is_dir():
        return
    for p in out.parent.iterdir():
        match = pattern.match(p.name)
        if match and p.is_dir() and not _alive(int(match.group(2))):
            shutil.rmtree(p, ignore_errors=True)


def _replace_dir(new: Path, out: Path) -> None:
    """Put ``new`` at ``out``; an existing ``out`` stays whole until ``new`` is complete and renamed."""
    if out.exists():
        old = out.with_name(f"{out.name}.old-{_host()}-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, out)
    fsync_dir(out.parent)


class _Stopped(BaseException):
    """SIGTERM arrived while preparing (raised in the main thread, so the partial dataset is removed)."""


@contextmanager
def _sigterm_stops() -> Iterator[None]:
    """While preparing, SIGTERM raises (so cleanup runs) instead of ending the process on the spot; left as it
    is where the caller installed its own handler or this is not the main thread."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
        signal.SIG_DFL,
        None,
    ):
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise _Stopped

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _source_bytes(specs: list[SourceSpec]) -> int | None:
    """Bytes of the sources' files (None when one is not a local file: the built-in corpus, a hub data set)."""
    total = 0
    for spec in specs:
        if spec.is_builtin or spec.is_hf:
            return None
        for path, _ in source_files(spec):
            try:
                total += path.stat().st_size
            except OSError:
                return None
    return total


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _disk_full(out: Path, tmp: Path, specs: list[SourceSpec], itemsize: int, error: BaseException) -> DiskFullError:
    written = _dir_bytes(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    text = _source_bytes(specs)
    need = f"the shards take {itemsize} bytes per token"
    if text is not None:
        need = f"the sources hold {human_bytes(text)} of text, so the shards need up to {human_bytes(text * itemsize)}"
    return DiskFullError(
        f"data prepare: no space left on device in {out.parent} while writing the shards of {out} "
        f"({human_bytes(written)} written before the disk filled, then removed; {need}; "
        f"{human_bytes(free_bytes(out.parent))} free now). Nothing was left at the output path; free some space "
        "or prepare somewhere else (--out, or --data-cache / MMREC_DATA_CACHE for a training run's cache), then "
        "run again"
    )


def prepare_dataset(
    specs: list[SourceSpec],
    tokenizer: Any,
    out_dir: str | Path,
    val_fraction: float = 0.02,
    progress: bool = True,
    min_val_docs: int = 1,
) -> Manifest:
    """Tokenise every source into ``out_dir`` (layout in the module docstring) and return its manifest.

    All sources are checked before any tokenising. The dataset is built in
    ``<out_dir>.tmp-<host>-<pid>`` and renamed into place only when complete,
    so an interrupted run never leaves a half-written dataset at ``out_dir``
    and an existing one is replaced only by a complete one; SIGTERM removes
    the partial dataset and exits with 143, a full disk raises DiskFullError
    (what, where, how much), and what a killed run left is removed by the
    next one. A directory at
    ``out_dir`` that is neither empty nor a prepared dataset is refused
    rather than replaced.
    """
    start = time.perf_counter()
    _check_settings(val_fraction, min_val_docs)
    resolved = resolve_sources(list(specs))
    # Absolute, so that "." or "data/" still have a name for the temporary sibling directory.
    out = Path(os.path.abspath(out_dir))
    if out.exists() and not (out / MANIFEST).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(
            f"{out} exists and is not a prepared dataset (no {MANIFEST}); it will not be replaced. "
            "Choose a new or empty directory."
        )
    vocab_size = int(tokenizer.vocab_size)
    dtype = token_dtype(vocab_size)
    fingerprint = dataset_fingerprint(resolved, tokenizer, val_fraction, min_val_docs=min_val_docs)
    _remove_leftovers(out)
    tmp = out.with_name(f"{out.name}.tmp-{_host()}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    bar = _Progress(progress)
    try:
        with _sigterm_stops():
            manifest = _prepare_into(tmp, resolved, tokenizer, dtype, vocab_size, val_fraction, min_val_docs, bar)
            manifest["fingerprint"] = fingerprint
            manifest["prepare_seconds"] = seconds = time.perf_counter() - start
            manifest["bytes_per_second"] = manifest.n_bytes / max(seconds, 1e-9)
            data, digest = sealed_json(manifest, indent=2)
            write_bytes_durably(tmp / MANIFEST, data)
            manifest[SEAL_KEY] = digest
            _replace_dir(tmp, out)
    except BaseException as e:
        bar.close()
        if isinstance(e, Exception) and is_disk_full(e):
            raise _disk_full(out, tmp, resolved, dtype.itemsize, e) from e
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, _Stopped):
            print(f"data prepare: stopped by SIGTERM; removed the partial data {tmp}", file=sys.stderr, flush=True)
            raise SystemExit(128 + signal.SIGTERM) from None
        raise
    manifest.path = out
    return manifest


def _prepare_into(
    tmp: Path,
    resolved: list[SourceSpec],
    tokenizer: Any,
    dtype: np.dtype,
    vocab_size: int,
    val_fraction: float,
    min_val_docs: int,
    bar: _Progress,
) -> Manifest:
    """Every source's shards and the tokenizer into ``tmp``; the manifest (without timing and seal)."""
    entries = [
        _prepare_source(spec, tokenizer, tmp / str(spec.name), dtype, vocab_size, val_fraction, min_val_docs, bar)
        for spec in resolved
    ]
    bar.close()
    tokenizer_file = None
    if hasattr(tokenizer, "save"):
        tokenizer.save(tmp / "tokenizer.json")
        tokenizer_file = {"name": "tokenizer.json", **file_record(tmp / "tokenizer.json", sync=True)}
    from mmrec.version import __version__

    n_bytes = sum(e[s]["n_bytes"] for e in entries for s in SPLITS)
    return Manifest(
        format_version=FORMAT_VERSION,
        mmrec_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        fingerprint="",
        tokenizer={
            "id": tokenizer_id_of(tokenizer),
            "name": getattr(tokenizer, "name", ""),
            "vocab_size": vocab_size,
        },
        tokenizer_file=tokenizer_file,
        val_fraction=float(val_fraction),
        min_val_docs=min_val_docs,
        n_bytes=n_bytes,
        n_tokens=sum(e[s]["n_tokens"] for e in entries for s in SPLITS),
        prepare_seconds=0.0,
        bytes_per_second=0.0,
        sources={e["name"]: e for e in entries},
    )
