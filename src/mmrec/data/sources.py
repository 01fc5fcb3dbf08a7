"""Where training text comes from: files, folders, globs, the built-in corpus, Hugging Face datasets.

A source is named on the command line as a short string (``parse_source``),
checked up front (``resolve_sources``: a typo fails in a second, not after an
hour of tokenising the other sources), then read as ``(doc_id, text)`` pairs
(``iter_documents``). Reading never crashes on a bad file: empty, binary,
non-UTF-8 and unreadable files, and malformed JSON lines, are skipped and
counted in ``SkipStats`` so the user sees what was left out.

Document ids are built from the source name and paths relative to the
source's root, so the same inputs give the same ids (and hence the same
train/validation split) on every machine.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import itertools
import json
import math
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmrec.data.builtin import builtin_documents

BUILTIN = "builtin"
HF_PREFIX = "hf:"
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
PARQUET_SUFFIXES = frozenset({".parquet"})
# Bytes looked at for NUL when deciding that a file is binary (what git and grep do, roughly).
BINARY_SNIFF_BYTES = 8192

# A source name becomes a directory name in prepared data, so it must be safe on every filesystem.
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,99}$")
_UNSAFE_RE = re.compile(r"[^A-Za-z0-9._-]+")
# Files written next to the per-source directories of prepared data.
_RESERVED_NAMES = frozenset({"manifest.json", "tokenizer.json"})


class DataError(ValueError):
    """Bad data input; message says what was wrong and what to do."""


@dataclass
class SourceSpec:
    """One input of a training mixture.

    ``path`` is a file, a folder (read recursively), a glob, ``"builtin"``
    (the Python standard library's source) or ``"hf:NAME[/CONFIG][:SPLIT]"``.
    ``weight`` is the share of training samples drawn from this source
    relative to the others; it is applied at sampling time, so changing it
    does not require preparing the data again. ``name`` names the source's
    directory in prepared data and prefixes its document ids;
    ``resolve_sources`` fills it from the path when it is not given.
    """

    path: str
    weight: float = 1.0
    name: str | None = None
    text_field: str = "text"

    def __post_init__(self) -> None:
        if isinstance(self.path, os.PathLike):
            self.path = os.fspath(self.path)
        if not isinstance(self.path, str) or not self.path.strip():
            raise DataError(f"a source path must be a non-empty string, got {self.path!r}")
        try:
            self.weight = float(self.weight)
        except (TypeError, ValueError):
            raise DataError(f"source {self.path!r}: weight must be a number, got {self.weight!r}") from None
        if not math.isfinite(self.weight) or self.weight <= 0:
            raise DataError(f"source {self.path!r}: weight must be a finite number > 0, got {self.weight}")
        if self.name is not None and (not _NAME_RE.match(self.name) or self.name.lower() in _RESERVED_NAMES):
            raise DataError(
                f"source {self.path!r}: name {self.name!r} is not usable as a directory name; use 1-100 letters, "
                "digits, '.', '_' or '-', starting with a letter, digit or '_' (not manifest.json or tokenizer.json)"
            )
        if not isinstance(self.text_field, str) or not self.text_field:
            raise DataError(
                f"source {self.path!r}: text_field must be a non-empty column name, got {self.text_field!r}"
            )
        if self.is_hf:
            hf_candidates(self.path)

    @property
    def is_builtin(self) -> bool:
        return self.path == BUILTIN

    @property
    def is_hf(self) -> bool:
        return self.path.startswith(HF_PREFIX)

    @property
    def is_glob(self) -> bool:
        return not self.is_builtin and not self.is_hf and glob.has_magic(self.path)

    def default_name(self) -> str:
        """A filesystem-safe name derived from the path (file stem, folder name, glob or dataset name)."""
        if self.is_builtin:
            return BUILTIN
        if self.is_hf:
            base = "hf-" + self.path[len(HF_PREFIX) :]
        elif self.is_glob:
            # The folder the pattern searches ("data/shakespeare/*.txt" -> "shakespeare").
            fixed = list(itertools.takewhile(lambda part: not glob.has_magic(part), Path(self.path).parts))
            base = Path(*fixed).resolve().name if fixed else Path.cwd().name
        else:
            p = Path(self.path)
            # "." or "..": the folder's own name.
            base = (p.stem if p.is_file() else p.name) or p.resolve().name
        name = _UNSAFE_RE.sub("-", base).strip("-.")[:100].strip("-.")
        return name or "source"


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def parse_source(spec: str) -> SourceSpec:
    """Parse a command-line source: ``PATH``, ``PATH:WEIGHT``, ``NAME=PATH``, ``NAME=PATH:WEIGHT``.

    ``PATH`` may be ``builtin`` or ``hf:NAME[/CONFIG][:SPLIT]``. A string that
    is itself an existing path is always taken whole, so files whose names
    contain ``=`` or end in ``:2`` still work. Otherwise the part after the
    last ``:`` is a weight when it parses as a number (the colon of ``hf:``
    never is), and a leading ``NAME=`` names the source.
    """
    s = spec.strip()
    if not s:
        raise DataError("empty source: give a file, folder, glob, 'builtin' or 'hf:NAME[/CONFIG][:SPLIT]'")
    if os.path.exists(s):
        return SourceSpec(path=s)
    name: str | None = None
    m = re.match(r"^([A-Za-z0-9_][A-Za-z0-9._-]*)=(.+)$", s)
    if m:
        name, s = m.group(1), m.group(2)
    weight = 1.0
    start = len(HF_PREFIX) if s.startswith(HF_PREFIX) else 0
    head, sep, tail = s[start:].rpartition(":")
    if sep and head and not os.path.exists(s) and _is_float(tail):
        s, weight = s[:start] + head, float(tail)
    return SourceSpec(path=s, weight=weight, name=name)


def hf_candidates(path: str) -> tuple[list[tuple[str, str | None]], str]:
    """(name, config) pairs to try for ``hf:NAME[/CONFIG][:SPLIT]``, and the split.

    Hub datasets are usually ``owner/name``, which looks like ``NAME/CONFIG``:
    with one slash both readings are tried, the repository first. With two
    or more, the last part is the config (``owner/name/config``).
    """
    rest = path[len(HF_PREFIX) :]
    # Dataset names have no ':', but split slices may ("train[:1000]"): split at the first ':'.
    ref, _, split = rest.partition(":")
    split = split or "train"
    parts = ref.split("/")
    if not ref or any(not p for p in parts):
        raise DataError(
            f"bad Hugging Face source {path!r}: write hf:NAME, hf:NAME/CONFIG or hf:OWNER/NAME/CONFIG:SPLIT"
        )
    if len(parts) == 1:
        return [(ref, None)], split
    if len(parts) == 2:
        return [(ref, None), (parts[0], parts[1])], split
    return [("/".join(parts[:-1]), parts[-1])], split


def _glob_root(pattern: str) -> Path:
    """The directory part of ``pattern`` before its first wildcard: document ids are relative to it."""
    parts = Path(pattern).parts
    fixed: list[str] = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _have_datasets() -> bool:
    """Whether ``datasets`` can be imported, without importing it (it is slow to import)."""
    if "datasets" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("datasets") is not None
    except (ImportError, ValueError):
        return False


def resolve_sources(specs: list[SourceSpec]) -> list[SourceSpec]:
    """Check every source exists and give each a unique name, before any reading or tokenising.

    Returns new specs with ``name`` filled: explicit names are kept (two equal
    ones are an error), derived names get ``-2``, ``-3``... suffixes when they
    collide (compared ignoring case, for case-insensitive filesystems).
    """
    if not specs:
        raise DataError("no data sources given: pass files, folders, globs, 'builtin' or 'hf:NAME'")
    problems: list[str] = []
    for spec in specs:
        if spec.is_builtin:
            continue
        if spec.is_hf:
            if not _have_datasets():
                problems.append(f"{spec.path}: Hugging Face sources need the datasets package: pip install datasets")
        elif spec.is_glob:
            if not glob.glob(spec.path, recursive=True):
                problems.append(f"{spec.path}: the glob matches no files")
        elif not os.path.exists(spec.path):
            problems.append(f"{spec.path}: no such file or folder")
    if problems:
        raise DataError("cannot use these data sources:\n  " + "\n  ".join(problems))

    taken: set[str] = set()
    for spec in specs:
        if spec.name is not None:
            if spec.name.lower() in taken:
                raise DataError(f"two sources are named {spec.name!r}: give each source its own NAME=PATH")
            taken.add(spec.name.lower())
    out = []
    for spec in specs:
        name = spec.name
        if name is None:
            base = spec.default_name()
            name, n = base, 1
            while name.lower() in taken or name.lower() in _RESERVED_NAMES:
                n += 1
                name = f"{base}-{n}"
            taken.add(name.lower())
        out.append(dataclasses.replace(spec, name=name))
    return out


@dataclass
class SkipStats:
    """What reading a source kept and left out; skipped inputs are counted, never fatal."""

    empty: int = 0
    binary: int = 0
    invalid_utf8: int = 0
    unreadable: int = 0
    bad_records: int = 0
    documents: int = 0
    bytes: int = 0

    @property
    def skipped(self) -> int:
        return self.empty + self.binary + self.invalid_utf8 + self.unreadable + self.bad_records

    def summary(self) -> str:
        """One line, e.g. ``120 documents (1.2 MB); skipped 3: 2 empty, 1 binary``."""
        kept = f"{self.documents} documents ({self.bytes / 1e6:.1f} MB)"
        parts = [
            f"{n} {label}"
            for n, label in (
                (self.empty, "empty"),
                (self.binary, "binary"),
                (self.invalid_utf8, "invalid UTF-8"),
                (self.unreadable, "unreadable"),
                (self.bad_records, "bad records"),
            )
            if n
        ]
        return f"{kept}; skipped {self.skipped}: {', '.join(parts)}" if parts else f"{kept}; nothing skipped"

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def source_files(spec: SourceSpec) -> list[tuple[Path, str]]:
    """(file, id path) of each file of a file, folder or glob source, in a fixed order.

    The id path is ``NAME/<path relative to the source root>``: the folder for
    a folder source, the file's folder for a file, the part before the first
    wildcard for a glob. Hidden files and folders inside folders are skipped.
    """
    if spec.is_builtin or spec.is_hf:
        raise DataError(f"{spec.path!r} is not a file, folder or glob source")
    name = spec.name or spec.default_name()
    found: dict[Path, str] = {}

    def add_tree(root: Path, base: Path) -> None:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for f in filenames:
                if not f.startswith("."):
                    p = Path(dirpath) / f
                    found[p] = p.relative_to(base).as_posix()

    if spec.is_glob:
        root = _glob_root(spec.path)
        for match in sorted(glob.glob(spec.path, recursive=True)):
            p = Path(match)
            if p.is_dir():
                add_tree(p, root)
            else:
                found[p] = Path(os.path.relpath(p, root)).as_posix()
    else:
        p = Path(spec.path)
        if p.is_dir():
            add_tree(p, p)
        elif p.exists():
            found[p] = p.name
        else:
            raise DataError(f"{spec.path}: no such file or folder")
    return sorted(((p, f"{name}/{rel}") for p, rel in found.items()), key=lambda x: x[1])


def iter_documents(spec: SourceSpec, stats: SkipStats) -> Iterator[tuple[str, str]]:
    """(doc_id, text) for each usable document of ``spec``; skipped inputs are counted in ``stats``.

    A plain file is one document; each line of a ``.jsonl`` file and each row
    of a ``.parquet`` file is one (text in ``spec.text_field``). Ids are
    ``NAME/relative/path`` for files, ``#LINE`` (from 1) or ``#ROW`` (from 0)
    appended for records.
    """
    if spec.is_builtin:
        docs: Iterator[tuple[str, str]] = builtin_documents()
    elif spec.is_hf:
        docs = _iter_hf(spec, stats)
    else:
        docs = _iter_files(spec, stats)
    for doc_id, text in docs:
        stats.documents += 1
        stats.bytes += len(text.encode("utf-8"))
        yield doc_id, text


def _usable(text: object, stats: SkipStats) -> bool:
    """Whether a record's text can be a document; counts the reason when not."""
    if text is None:
        stats.empty += 1
        return False
    if not isinstance(text, str):
        stats.bad_records += 1
        return False
    if not text or text.isspace():
        stats.empty += 1
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (e.g. a JSON "\ud800" escape): no UTF-8 form.
        stats.invalid_utf8 += 1
        return False
    return True


def _iter_files(spec: SourceSpec, stats: SkipStats) -> Iterator[tuple[str, str]]:
    for path, doc_id in source_files(spec):
        suffix = path.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            yield from _iter_jsonl(path, doc_id, spec.text_field, stats)
        elif suffix in PARQUET_SUFFIXES:
            yield from _iter_parquet(path, doc_id, spec.text_field, stats)
        else:
            text = _read_text_file(path, stats)
            if text is not None:
                yield doc_id, text


def _read_text_file(path: Path, stats: SkipStats) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        stats.unreadable += 1
        return None
    if not data or data.isspace():
        stats.empty += 1
        return None
    if b"\0" in data[:BINARY_SNIFF_BYTES]:
        stats.binary += 1
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        stats.invalid_utf8 += 1
        return None
    if text.isspace():
        stats.empty += 1
        return None
    return text


def _iter_jsonl(path: Path, doc_id: str, field: str, stats: SkipStats) -> Iterator[tuple[str, str]]:
    try:
        f = path.open("rb")
    except OSError:
        stats.unreadable += 1
        return
    with f:
        try:
            if b"\0" in f.read(BINARY_SNIFF_BYTES):
                stats.binary += 1
                return
            f.seek(0)
            records = 0
            for line_no, line in enumerate(f, start=1):
                if line.isspace():
                    continue
                records += 1
                try:
                    obj: Any = json.loads(line)
                except UnicodeDecodeError:
                    stats.invalid_utf8 += 1
                    continue
                except ValueError:
                    stats.bad_records += 1
                    continue
                if not isinstance(obj, dict) or field not in obj:
                    stats.bad_records += 1
                    continue
                text = obj[field]
                if _usable(text, stats):
                    yield f"{doc_id}#{line_no}", text
            if records == 0:
                stats.empty += 1
        except OSError:
            stats.unreadable += 1


def _iter_parquet(path: Path, doc_id: str, field: str, stats: SkipStats) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException):
        stats.unreadable += 1
        return
    schema = pf.schema_arrow
    if field not in schema.names:
        raise DataError(
            f"{path} has no column {field!r}; its columns are {schema.names}. "
            "Set the source's text_field to the column that holds the text."
        )
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column {field!r} holds {kind}, not text; set text_field to a string column")
    row = 0
    try:
        for batch in pf.iter_batches(columns=[field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if _usable(text, stats):
                    yield f"{doc_id}#{row}", text
                row += 1
    except (OSError, pa.ArrowException):
        stats.unreadable += 1


def _iter_hf(spec: SourceSpec, stats: SkipStats) -> Iterator[tuple[str, str]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec.path}: Hugging Face sources need the datasets package: pip install datasets") from None
    candidates, split = hf_candidates(spec.path)
    errors = []
    ds: Any = None
    for name, config in candidates:
        try:
            ds = datasets.load_dataset(name, config, split=split)
            break
        except Exception as e:
            label = name if config is None else f"{name} (config {config})"
            errors.append(f"{label}: {type(e).__name__}: {e}")
    if ds is None:
        raise DataError(
            f"cannot load Hugging Face dataset {spec.path!r} (split {split!r}):\n  " + "\n  ".join(errors) + "\n"
            "Check the name, config and split, and that this machine can reach the Hub "
            "(or has the dataset in its Hugging Face cache)."
        )
    columns = list(getattr(ds, "column_names", None) or [])
    if spec.text_field not in columns:
        raise DataError(
            f"{spec.path} has no column {spec.text_field!r}; its columns are {columns}. "
            "Set the source's text_field to the column that holds the text."
        )
    if hasattr(ds, "select_columns"):
        ds = ds.select_columns([spec.text_field])
    name = spec.name or spec.default_name()
    for row, record in enumerate(ds):
        text = record.get(spec.text_field)
        if _usable(text, stats):
            yield f"{name}#{row}", text
