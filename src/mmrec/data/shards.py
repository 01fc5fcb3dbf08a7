"""The on-disk format of a prepared dataset: token shards and their manifest, written and memory-mapped back.

Training reads token ids at random positions many times over, so text is
tokenised up front (``mmrec.data.prepare``) into flat binary files that
``numpy.memmap`` reads with no parsing and no copy. Layout of a prepared
dataset directory::

    manifest.json              what was prepared, from what, with which tokenizer; sizes and sha256 of every
                               file; sealed: it holds the sha256 of its own bytes (``mmrec.utils.files``)
    tokenizer.json             the tokenizer used (``mmrec.tokenizer.load_tokenizer`` reads it)
    <source>/train.tokens.bin  token ids of the training documents, concatenated (little-endian uint16 or uint32)
    <source>/train.offsets.bin int64, n_docs + 1 entries: document i is tokens[off[i]:off[i + 1]]
    <source>/val.tokens.bin    the same for validation documents
    <source>/val.offsets.bin

Documents are stored without end-of-text tokens; the loader adds them where
it joins documents. Mixture weights are not baked in (they are applied when
sampling), so one prepared dataset serves any mixture of its sources.
"""

from __future__ import annotations

import json
import os
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmrec.data.sources import DataError
from mmrec.tokenizer import tokenizer_id
from mmrec.utils.files import SEAL_KEY, file_record, seal_problem, sha256_file

FORMAT_VERSION = 1
SPLITS = ("train", "val")
MANIFEST = "manifest.json"
_COPY_CHUNK = 1 << 24


def tokenizer_id_of(tokenizer: Any) -> str:
    """The id a dataset records for ``tokenizer``: its own ``id`` when it has one."""
    tid = getattr(tokenizer, "id", None)
    return tid if isinstance(tid, str) else tokenizer_id(tokenizer)


class Manifest(dict[str, Any]):
    """Contents of ``manifest.json``: a dict (exactly what is written) with typed shortcuts.

    Keys: ``format_version``, ``mmrec_version``, ``created`` (UTC, ISO 8601),
    ``fingerprint``, ``tokenizer`` (``id``, ``name``, ``vocab_size``),
    ``val_fraction``, ``min_val_docs``, ``n_bytes``, ``n_tokens``,
    ``prepare_seconds``, ``bytes_per_second`` and ``sources``: name ->
    ``name``, ``path``, ``text_field``, ``weight`` (as given when preparing;
    informational), ``skipped`` (``SkipStats`` counts), ``moved_to_val``,
    ``split_document``, and ``train`` / ``val``: ``n_docs``, ``n_tokens``,
    ``n_bytes`` (UTF-8 bytes of the text), ``dtype`` and ``files``
    (``tokens`` / ``offsets``: ``name``, ``size``, ``sha256``).
    """

    path: Path | None = None

    @property
    def sources(self) -> dict[str, dict[str, Any]]:
        return dict(self["sources"])

    @property
    def tokenizer_id(self) -> str:
        return str(self["tokenizer"]["id"])

    @property
    def vocab_size(self) -> int:
        return int(self["tokenizer"]["vocab_size"])

    @property
    def n_bytes(self) -> int:
        """UTF-8 bytes of text prepared, all sources and splits."""
        return int(self["n_bytes"])

    @property
    def n_tokens(self) -> int:
        return int(self["n_tokens"])

    @property
    def prepare_seconds(self) -> float:
        return float(self["prepare_seconds"])

    @property
    def bytes_per_second(self) -> float:
        """Preparation throughput: ``n_bytes / prepare_seconds``."""
        return float(self["bytes_per_second"])


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


_DTYPE_NAMES: dict[str, np.dtype[Any]] = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def _dtype_name(dtype: np.dtype) -> str:
    return "uint16" if dtype.itemsize == 2 else "uint32"


def _write_array(f: Any, array: np.ndarray) -> None:
    """Raw bytes of ``array`` through a Python file: a full disk is then an OSError(ENOSPC), where
    ``ndarray.tofile`` reports only how many bytes it wrote."""
    f.write(np.ascontiguousarray(array).data.cast("B"))


class SplitWriter:
    """Appends the documents of one split of one source to its tokens file; keeps offsets in memory."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype) -> None:
        self.split = split
        self.dtype = dtype
        self.tokens_path = directory / f"{split}.tokens.bin"
        self.offsets_path = directory / f"{split}.offsets.bin"
        self.offsets = array("q", [0])
        self.hashes = array("Q")
        self.doc_bytes = array("q")
        self._file = self.tokens_path.open("wb")

    @property
    def n_docs(self) -> int:
        return len(self.hashes)

    def add(self, docs: list[np.ndarray], hashes: list[int], n_bytes: list[int]) -> None:
        if not docs:
            return
        end = self.offsets[-1]
        for d in docs:
            end += len(d)
            self.offsets.append(end)
        self.hashes.extend(hashes)
        self.doc_bytes.extend(n_bytes)
        _write_array(self._file, np.concatenate(docs).astype(self.dtype, copy=False))

    def close(self) -> None:
        self._file.close()

    def reopen(self) -> None:
        self._file = self.tokens_path.open("ab")

    def read_tokens(self) -> np.ndarray:
        if self.offsets[-1] == 0:
            return np.zeros(0, self.dtype)
        return np.memmap(self.tokens_path, dtype=self.dtype, mode="r")

    def remove(self, indices: list[int]) -> list[tuple[np.ndarray, int, int]]:
        """Take documents out (the file is rewritten without them); returns their (tokens, hash, bytes)."""
        gone = sorted(set(indices))
        tokens = self.read_tokens()
        off = np.frombuffer(self.offsets, dtype=np.int64)
        taken = [(np.array(tokens[off[i] : off[i + 1]]), self.hashes[i], self.doc_bytes[i]) for i in gone]
        keep = np.ones(self.n_docs, dtype=bool)
        keep[gone] = False
        tmp = self.tokens_path.with_suffix(".rewrite")
        with tmp.open("wb") as f:
            start = 0
            for i in [*gone, self.n_docs]:
                a, b = int(off[start]), int(off[i])
                for c in range(a, b, _COPY_CHUNK):
                    _write_array(f, tokens[c : min(b, c + _COPY_CHUNK)])
                start = i + 1
        del tokens
        os.replace(tmp, self.tokens_path)
        lengths = np.diff(off)[keep]
        self.offsets = array("q", [0, *np.cumsum(lengths).tolist()])
        self.hashes = array("Q", [h for h, k in zip(self.hashes, keep, strict=True) if k])
        self.doc_bytes = array("q", [n for n, k in zip(self.doc_bytes, keep, strict=True) if k])
        return taken

    def finish(self) -> dict[str, Any]:
        self.close()
        with self.offsets_path.open("wb") as f:
            _write_array(f, np.asarray(self.offsets, dtype="<i8"))
        return {
            "n_docs": self.n_docs,
            "n_tokens": int(self.offsets[-1]),
            "n_bytes": int(sum(self.doc_bytes)),
            "dtype": _dtype_name(self.dtype),
            "files": {
                kind: {"name": p.name, **file_record(p, sync=True)}
                for kind, p in (("tokens", self.tokens_path), ("offsets", self.offsets_path))
            },
        }


@dataclass
class TokenShard:
    """The documents of one split of one source: ``tokens[offsets[i]:offsets[i + 1]]`` is document i."""

    tokens: np.ndarray
    offsets: np.ndarray
    n_bytes: int = 0

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def doc(self, i: int) -> np.ndarray:
        """Token ids of document ``i`` (a view of the memory map, no copy)."""
        if not -self.n_docs <= i < self.n_docs:
            raise IndexError(f"document {i} is out of range: this shard has {self.n_docs} documents")
        i %= self.n_docs
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


@dataclass
class PreparedSource:
    name: str
    weight: float
    train: TokenShard
    val: TokenShard
    path: str = ""
    text_field: str = "text"

    def split(self, name: str) -> TokenShard:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return self.train if name == "train" else self.val


@dataclass
class PreparedDataset:
    manifest: dict[str, Any]
    sources: dict[str, PreparedSource]
    path: Path

    @property
    def tokenizer_id(self) -> str:
        return str(self.manifest["tokenizer"]["id"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    def load_tokenizer(self) -> Any:
        """The tokenizer the data was prepared with (from the dataset's tokenizer.json)."""
        from mmrec.tokenizer import load_tokenizer

        return load_tokenizer(self.path / "tokenizer.json")


_RERUN = "re-run `mmrec data prepare` to rebuild it"


def _check_file(path: Path, info: dict[str, Any], verify: bool) -> None:
    """``path`` against its manifest record: size always, sha256 with ``verify``; DataError names it."""
    if not path.is_file():
        raise DataError(f"{path} is missing; {_RERUN}")
    size = path.stat().st_size
    if size != info["size"]:
        raise DataError(f"{path} has {size} bytes but the manifest says {info['size']} (truncated?); {_RERUN}")
    if verify and sha256_file(path) != info["sha256"]:
        raise DataError(f"{path} does not match its checksum in the manifest (corrupted); {_RERUN}")


def _load_shard(directory: Path, split: str, info: dict[str, Any], verify: bool) -> TokenShard:
    files = info["files"]
    tokens_path = directory / files["tokens"]["name"]
    offsets_path = directory / files["offsets"]["name"]
    _check_file(tokens_path, files["tokens"], verify)
    _check_file(offsets_path, files["offsets"], verify)
    dtype_name = info["dtype"]
    if dtype_name not in _DTYPE_NAMES:
        raise DataError(f"{directory}: unknown token dtype {dtype_name!r} in the manifest; {_RERUN}")
    dtype = _DTYPE_NAMES[dtype_name]
    # An empty file cannot be memory-mapped.
    empty = files["tokens"]["size"] == 0
    tokens = np.zeros(0, dtype=dtype) if empty else np.memmap(tokens_path, dtype=dtype, mode="r")
    offsets = np.fromfile(offsets_path, dtype="<i8").astype(np.int64, copy=False)
    ok = (
        len(offsets) == info["n_docs"] + 1
        and len(tokens) == info["n_tokens"]
        and offsets[0] == 0
        and offsets[-1] == len(tokens)
        and bool(np.all(np.diff(offsets) >= 0))
    )
    if not ok:
        raise DataError(f"{offsets_path} does not describe {tokens_path}; {_RERUN}")
    return TokenShard(tokens=tokens, offsets=offsets, n_bytes=int(info["n_bytes"]))


def load_dataset(out_dir: str | Path, tokenizer: Any = None, verify: bool = True) -> PreparedDataset:
    """Memory-map a dataset written by ``prepare_dataset``.

    File sizes are always checked against the manifest (a truncated file
    fails here, not mid-training); ``verify`` also checks every file's
    sha256. With ``tokenizer``, its id must be the one the data was prepared
    with.
    """
    root = Path(out_dir)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise DataError(f"{root} is not a prepared dataset (no {MANIFEST}); run `mmrec data prepare` first")
    try:
        text = manifest_path.read_bytes()
        raw = json.loads(text.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {manifest_path}: {e}; {_RERUN}") from e
    # Manifests from before the seal have none of its marks (two keys, and the key's text: one flipped
    # byte cannot remove all three).
    if isinstance(raw, dict) and (SEAL_KEY in raw or "tokenizer_file" in raw or SEAL_KEY.encode() in text):
        problem = seal_problem(text)
        if problem is not None:
            raise DataError(f"{manifest_path} {problem}; {_RERUN}")
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION:
        raise DataError(
            f"{manifest_path} has format version {version!r}; this mmrec reads version {FORMAT_VERSION}: {_RERUN}"
        )
    manifest = Manifest(raw)
    manifest.path = root
    try:
        want = manifest["tokenizer"]["id"]
        if tokenizer is not None and (given := tokenizer_id_of(tokenizer)) != want:
            raise DataError(
                f"{root} was prepared with tokenizer {want!r}, but the tokenizer given is {given!r}; "
                f"use the tokenizer in {root / 'tokenizer.json'} or prepare the data again with this one"
            )
        tok_record = manifest.get("tokenizer_file")
        if tok_record is not None:
            _check_file(root / tok_record["name"], tok_record, verify)
        sources = {}
        for entry in manifest["sources"].values():
            directory = root / entry["name"]
            shards = {s: _load_shard(directory, s, entry[s], verify) for s in SPLITS}
            sources[entry["name"]] = PreparedSource(
                name=entry["name"],
                weight=float(entry["weight"]),
                train=shards["train"],
                val=shards["val"],
                path=entry.get("path", ""),
                text_field=entry.get("text_field", "text"),
            )
    except (KeyError, TypeError) as e:
        raise DataError(f"{manifest_path} is malformed (missing {e}); {_RERUN}") from e
    return PreparedDataset(manifest=manifest, sources=sources, path=root)
