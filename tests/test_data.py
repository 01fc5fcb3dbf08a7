"""Data sources, preparation into token shards, and loading them back (all inputs generated under tmp_path)."""

from __future__ import annotations

import json
import os
import random
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmrec.data import sources as sources_mod
from mmrec.data.prepare import dataset_fingerprint, prepare_dataset, split_of
from mmrec.data.shards import load_dataset
from mmrec.data.sources import (
    DataError,
    SkipStats,
    SourceSpec,
    iter_documents,
    parse_source,
    resolve_sources,
)
from mmrec.tokenizer import ByteTokenizer, train_bpe

byte_tok = ByteTokenizer()


def _write_docs(root: Path, n: int, seed: int = 0) -> dict[str, str]:
    """``n`` text files (some in subfolders, some non-ASCII) under ``root``; returns relative path -> text."""
    rng = random.Random(seed)
    words = ["memory", "recurrence", "token", "naïve", "日本", "🙂", "state", "chunk"]
    docs = {}
    for i in range(n):
        rel = f"sub{i % 3}/doc{i:03d}.txt" if i % 2 else f"doc{i:03d}.txt"
        text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) + f" #{i}\n"
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
        docs[rel] = text
    return docs


@pytest.fixture(scope="module")
def bpe():
    rng = random.Random(1)
    words = ["memory", "recurrence", "token", "naïve", "日本", "state", "chunk"]
    return train_bpe([" ".join(rng.choice(words) for _ in range(50)) for _ in range(100)], vocab_size=300)


def _all_texts(dataset, tokenizer) -> list[str]:
    out = []
    for src in dataset.sources.values():
        for shard in (src.train, src.val):
            out += [tokenizer.decode(shard.doc(i)) for i in range(shard.n_docs)]
    return out


# --- parse_source / SourceSpec -----------------------------------------------------------------------------------


def test_parse_source_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_source("data/x.txt") == SourceSpec("data/x.txt")
    assert parse_source("data/x.txt:2.5") == SourceSpec("data/x.txt", weight=2.5)
    assert parse_source("web=data/x:0.5") == SourceSpec("data/x", weight=0.5, name="web")
    assert parse_source("code=data/y") == SourceSpec("data/y", name="code")
    assert parse_source("builtin") == SourceSpec("builtin")
    assert parse_source("builtin:3") == SourceSpec("builtin", weight=3.0)
    # The colon of hf: never separates a weight; a split is not a number.
    assert parse_source("hf:3") == SourceSpec("hf:3")
    assert parse_source("hf:wikitext/wikitext-2-raw-v1:train") == SourceSpec("hf:wikitext/wikitext-2-raw-v1:train")
    assert parse_source("hf:owner/name:validation:0.25") == SourceSpec("hf:owner/name:validation", weight=0.25)
    assert parse_source("hf:c4:train[:1000]") == SourceSpec("hf:c4:train[:1000]")
    # A colon inside a path that is not followed by a number stays part of the path.
    assert parse_source("dir/a:b.txt") == SourceSpec("dir/a:b.txt")


def test_parse_source_existing_path_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("notes:2").write_text("a file whose name looks like a weight")
    Path("k=v.txt").write_text("a file whose name looks like NAME=PATH")
    assert parse_source("notes:2") == SourceSpec("notes:2", weight=1.0)
    assert parse_source("notes:2:3") == SourceSpec("notes:2", weight=3.0)
    assert parse_source("k=v.txt") == SourceSpec("k=v.txt")


@pytest.mark.parametrize("spec", ["x:0", "x:-1", "x:nan", "x:inf", "", "   "])
def test_parse_source_rejects_bad_weights(spec):
    with pytest.raises(DataError, match="weight|empty"):
        parse_source(spec)


def test_source_spec_validation():
    with pytest.raises(DataError, match="name"):
        SourceSpec("x", name="a/b")
    with pytest.raises(DataError, match="name"):
        SourceSpec("x", name="manifest.json")
    with pytest.raises(DataError, match="text_field"):
        SourceSpec("x", text_field="")
    with pytest.raises(DataError, match="hf:NAME"):
        SourceSpec("hf:")
    assert isinstance(DataError("x"), ValueError)


# --- resolve_sources ---------------------------------------------------------------------------------------------


def test_resolve_names_are_unique_and_safe(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.txt").write_text("hello")
    specs = [
        SourceSpec(str(tmp_path / "a" / "x.txt")),
        SourceSpec(str(tmp_path / "b" / "x.txt")),
        SourceSpec(str(tmp_path / "a")),
        SourceSpec(str(tmp_path / "*" / "*.txt")),
        SourceSpec("builtin"),
        SourceSpec(str(tmp_path / "b" / "*.txt")),
    ]
    names = [s.name for s in resolve_sources(specs)]
    # A glob is named after the folder it searches.
    assert names == ["x", "x-2", "a", tmp_path.name, "builtin", "b"]
    assert all(n is not None and "/" not in n and "*" not in n for n in names)
    assert len({n.lower() for n in names if n}) == len(names)
    with pytest.raises(DataError, match="two sources are named 'x'"):
        resolve_sources([SourceSpec(str(tmp_path / "a"), name="x"), SourceSpec(str(tmp_path / "b"), name="x")])


def test_missing_path_fails_before_any_work(tmp_path, monkeypatch):
    good = tmp_path / "good.txt"
    good.write_text("fine")
    missing = tmp_path / "missing_dir"
    with pytest.raises(DataError, match="missing_dir"):
        resolve_sources([SourceSpec(str(good)), SourceSpec(str(missing))])

    def no_reading(*args, **kwargs):
        raise AssertionError("documents were read before the sources were checked")

    monkeypatch.setattr("mmrec.data.prepare.iter_documents", no_reading)
    out = tmp_path / "out"
    with pytest.raises(DataError, match="missing_dir"):
        prepare_dataset([SourceSpec(str(good)), SourceSpec(str(missing))], byte_tok, out, progress=False)
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(DataError, match=r"\*\.nothing.*matches no files"):
        resolve_sources([SourceSpec(str(tmp_path / "*.nothing"))])


def test_hf_sources_without_datasets_or_network(monkeypatch):
    real_find_spec = sources_mod.importlib.util.find_spec
    monkeypatch.setattr(
        sources_mod.importlib.util, "find_spec", lambda name: None if name == "datasets" else real_find_spec(name)
    )
    with pytest.raises(DataError, match="pip install datasets"):
        resolve_sources([SourceSpec("hf:some/dataset")])

    calls = []

    def offline(name, config=None, split=None):
        calls.append((name, config, split))
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(DataError, match=r"(?s)cannot load Hugging Face dataset 'hf:owner/data:test'.*no network"):
        list(iter_documents(SourceSpec("hf:owner/data:test"), SkipStats()))
    # One slash: tried as a repository, then as NAME/CONFIG.
    assert calls == [("owner/data", None, "test"), ("owner", "data", "test")]


def test_hf_source_reads_rows(monkeypatch):
    class FakeDataset:
        column_names = ["content", "id"]

        def select_columns(self, cols):
            assert cols == ["content"]
            return [{"content": "first"}, {"content": "  "}, {"content": "third"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: FakeDataset()))
    stats = SkipStats()
    spec = resolve_sources([SourceSpec("hf:tiny", text_field="content")])[0]
    assert list(iter_documents(spec, stats)) == [("hf-tiny#0", "first"), ("hf-tiny#2", "third")]
    assert stats.empty == 1 and stats.documents == 2
    with pytest.raises(DataError, match=r"no column 'text'.*content"):
        list(iter_documents(SourceSpec("hf:tiny"), SkipStats()))


# --- reading documents -------------------------------------------------------------------------------------------


def test_bad_files_are_skipped_and_counted(tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    (root / "good.txt").write_text("good text\n")
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.md").write_text("  \n\t \n")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (root / "latin1.txt").write_bytes("café".encode("latin-1"))
    (root / "dangling").symlink_to(root / "does-not-exist")
    (root / ".hidden.txt").write_text("hidden files are not documents")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("neither are hidden folders")
    stats = SkipStats()
    docs = list(iter_documents(resolve_sources([SourceSpec(str(root))])[0], stats))
    assert docs == [("mixed/good.txt", "good text\n")]
    assert (stats.empty, stats.binary, stats.invalid_utf8, stats.unreadable) == (2, 1, 1, 1)
    assert stats.documents == 1 and stats.bytes == len("good text\n")
    assert "1 binary" in stats.summary() and "2 empty" in stats.summary()


def test_source_with_nothing_left_is_an_error(tmp_path):
    root = tmp_path / "hollow"
    root.mkdir()
    (root / "a.txt").write_text("   ")
    (root / "b.bin").write_bytes(b"\x00\x01")
    with pytest.raises(DataError, match=r"'hollow'.*no documents left.*1 empty, 1 binary"):
        prepare_dataset([SourceSpec(str(root))], byte_tok, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def test_jsonl_records(tmp_path):
    path = tmp_path / "records.jsonl"
    lines = [
        json.dumps({"body": "first"}),
        "{not json",
        json.dumps({"other": "missing field"}),
        "",
        json.dumps(["not", "an", "object"]),
        json.dumps({"body": None}),
        json.dumps({"body": "sixth é"}),
        json.dumps({"body": "\ud800 lone surrogate"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    stats = SkipStats()
    spec = resolve_sources([SourceSpec(str(path), text_field="body")])[0]
    assert list(iter_documents(spec, stats)) == [
        ("records/records.jsonl#1", "first"),
        ("records/records.jsonl#7", "sixth é"),
    ]
    assert stats.bad_records == 3 and stats.empty == 1 and stats.invalid_utf8 == 1 and stats.documents == 2


def test_parquet_custom_field_and_missing_column(tmp_path):
    path = tmp_path / "table.parquet"
    pq.write_table(pa.table({"content": ["alpha", None, "gamma", ""], "n": [1, 2, 3, 4]}), path)
    stats = SkipStats()
    spec = resolve_sources([SourceSpec(str(path), text_field="content")])[0]
    assert list(iter_documents(spec, stats)) == [("table/table.parquet#0", "alpha"), ("table/table.parquet#2", "gamma")]
    assert stats.empty == 2
    with pytest.raises(DataError, match=r"no column 'text'.*'content', 'n'"):
        list(iter_documents(SourceSpec(str(path)), SkipStats()))
    with pytest.raises(DataError, match="not text"):
        list(iter_documents(SourceSpec(str(path), text_field="n"), SkipStats()))


def test_folder_order_and_ids_are_deterministic_and_relative(tmp_path):
    for base in ("one", "two"):
        # Create files in a scrambled order: reading order must not depend on it.
        root = tmp_path / base / "corpus"
        rels = ["z.txt", "a/b.txt", "a.txt", "m/n/o.txt", "B.txt"]
        for rel in rels if base == "one" else rels[::-1]:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(rel)
    ids = [
        [d for d, _ in iter_documents(resolve_sources([SourceSpec(str(tmp_path / b / "corpus"))])[0], SkipStats())]
        for b in ("one", "two")
    ]
    assert ids[0] == ids[1] == sorted(ids[0])
    assert ids[0] == ["corpus/B.txt", "corpus/a.txt", "corpus/a/b.txt", "corpus/m/n/o.txt", "corpus/z.txt"]
    globbed = resolve_sources([SourceSpec(str(tmp_path / "one" / "corpus" / "*.txt"))])[0]
    assert [d for d, _ in iter_documents(globbed, SkipStats())] == [
        f"{globbed.name}/{r}" for r in ("B.txt", "a.txt", "z.txt")
    ]


def test_builtin_source_reads_the_stdlib():
    stats = SkipStats()
    docs = []
    for doc in iter_documents(SourceSpec("builtin"), stats):
        docs.append(doc)
        if len(docs) == 3:
            break
    assert all(d.startswith("python-stdlib/") and d.endswith(".py") and t.strip() for d, t in docs)
    assert stats.documents == 3 and stats.bytes == sum(len(t.encode()) for _, t in docs)


# --- prepare / load ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["byte", "bpe"])
def test_prepare_load_round_trip(tmp_path, which, bpe):
    tok = byte_tok if which == "byte" else bpe
    docs = _write_docs(tmp_path / "corpus", 40)
    (tmp_path / "notes.jsonl").write_text("\n".join(json.dumps({"text": f"note {i} é"}) for i in range(10)))
    specs = [SourceSpec(str(tmp_path / "corpus"), weight=3.0), SourceSpec(str(tmp_path / "notes.jsonl"))]
    manifest = prepare_dataset(specs, tok, tmp_path / "out", val_fraction=0.2, progress=False)
    ds = load_dataset(tmp_path / "out", tok)
    want = list(docs.values()) + [f"note {i} é" for i in range(10)]
    assert sorted(_all_texts(ds, tok)) == sorted(want)

    assert list(ds.sources) == ["corpus", "notes"] and ds.sources["corpus"].weight == 3.0
    corpus = manifest["sources"]["corpus"]
    assert corpus["train"]["n_docs"] + corpus["val"]["n_docs"] == 40
    assert corpus["train"]["n_bytes"] + corpus["val"]["n_bytes"] == sum(len(t.encode()) for t in docs.values())
    assert corpus["train"]["dtype"] == "uint16" and corpus["val"]["n_docs"] >= 1
    assert manifest.n_bytes == sum(len(t.encode()) for t in want)
    assert manifest.tokenizer_id == tok.id and manifest["tokenizer"]["vocab_size"] == tok.vocab_size
    assert manifest.prepare_seconds > 0 and manifest.bytes_per_second > 0
    for name, src in ds.sources.items():
        for split, shard in (("train", src.train), ("val", src.val)):
            info = manifest["sources"][name][split]
            assert (shard.n_docs, shard.n_tokens, shard.n_bytes) == (info["n_docs"], info["n_tokens"], info["n_bytes"])
            assert shard.tokens.dtype == np.dtype("<u2") and shard.offsets.dtype == np.int64
            assert tok.eot_id not in np.asarray(shard.tokens)  # documents are stored without end-of-text
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["sources"]["notes"]["train"]["files"]["tokens"]["sha256"] == corpus_sha(tmp_path, "notes")
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    with pytest.raises(IndexError, match="out of range"):
        ds.sources["notes"].train.doc(ds.sources["notes"].train.n_docs)


def corpus_sha(tmp_path: Path, name: str) -> str:
    import hashlib

    return hashlib.sha256((tmp_path / "out" / name / "train.tokens.bin").read_bytes()).hexdigest()


def test_split_is_deterministic_and_about_val_fraction(tmp_path):
    ids = [f"src/file{i}.txt" for i in range(5000)]
    first = [split_of(i, 0.1) for i in ids]
    assert first == [split_of(i, 0.1) for i in ids]
    assert 400 < first.count("val") < 600
    assert all(split_of(i, 0.0) == "train" for i in ids[:100])

    _write_docs(tmp_path / "corpus", 60)
    a = prepare_dataset([SourceSpec(str(tmp_path / "corpus"))], byte_tok, tmp_path / "a", 0.25, progress=False)
    b = prepare_dataset([SourceSpec(str(tmp_path / "corpus"))], byte_tok, tmp_path / "b", 0.25, progress=False)
    for split in ("train", "val"):
        assert a["sources"]["corpus"][split]["files"] == b["sources"]["corpus"][split]["files"]
    n_val = a["sources"]["corpus"]["val"]["n_docs"]
    assert 0 < n_val < 60
    # Each file's split is the one split_of gives its id.
    want_val = sum(
        split_of(f"corpus/{p.relative_to(tmp_path / 'corpus').as_posix()}", 0.25) == "val"
        for p in (tmp_path / "corpus").rglob("*.txt")
    )
    assert n_val == want_val


def _prepared(tmp_path: Path) -> Path:
    _write_docs(tmp_path / "corpus", 20)
    out = tmp_path / "out"
    prepare_dataset([SourceSpec(str(tmp_path / "corpus"))], byte_tok, out, val_fraction=0.2, progress=False)
    return out


def test_truncated_shard_is_detected(tmp_path):
    out = _prepared(tmp_path)
    shard = out / "corpus" / "train.tokens.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(DataError, match=r"train\.tokens\.bin.*truncated.*mmrec data prepare"):
        load_dataset(out, verify=False)


def test_corrupted_byte_is_detected(tmp_path):
    out = _prepared(tmp_path)
    shard = out / "corpus" / "val.tokens.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"val\.tokens\.bin.*checksum"):
        load_dataset(out)
    assert load_dataset(out, verify=False).sources["corpus"].val.n_docs >= 1  # sizes still match


def test_missing_or_broken_manifest(tmp_path):
    with pytest.raises(DataError, match="no manifest.json.*mmrec data prepare"):
        load_dataset(tmp_path)
    out = _prepared(tmp_path)
    (out / "manifest.json").write_text("{")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(out)


def test_tokenizer_mismatch_is_detected(tmp_path, bpe):
    out = _prepared(tmp_path)
    with pytest.raises(DataError, match=rf"'byte'.*'{bpe.id}'"):
        load_dataset(out, bpe)
    assert load_dataset(out, byte_tok).tokenizer_id == "byte"


def test_single_document_source_gets_val_data(tmp_path):
    text = "".join(f"line {i} of the only document\n" for i in range(40))
    path = tmp_path / "only.txt"
    path.write_text(text)
    manifest = prepare_dataset([SourceSpec(str(path))], byte_tok, tmp_path / "out", val_fraction=0.02, progress=False)
    src = load_dataset(tmp_path / "out").sources["only"]
    assert src.train.n_docs == 1 and src.val.n_docs == 1
    assert src.val.n_tokens == 64  # max(2% of the tokens, 64)
    joined = np.concatenate([src.train.doc(0), src.val.doc(0)])
    assert byte_tok.decode(joined) == text
    entry = manifest["sources"]["only"]
    assert entry["split_document"] and entry["train"]["n_bytes"] + entry["val"]["n_bytes"] == len(text)
    # One token is too short to split.
    (tmp_path / "tiny.txt").write_text("x")
    with pytest.raises(DataError, match="single document"):
        prepare_dataset([SourceSpec(str(tmp_path / "tiny.txt"))], byte_tok, tmp_path / "tiny", progress=False)


def test_small_sources_get_both_splits(tmp_path):
    _write_docs(tmp_path / "few", 3)
    for fraction in (0.0, 0.001, 0.99):
        out = tmp_path / f"out{fraction}"
        m = prepare_dataset([SourceSpec(str(tmp_path / "few"))], byte_tok, out, val_fraction=fraction, progress=False)
        entry = m["sources"]["few"]
        assert entry["train"]["n_docs"] >= 1 and entry["val"]["n_docs"] >= 1
        assert entry["train"]["n_docs"] + entry["val"]["n_docs"] == 3
        assert sorted(_all_texts(load_dataset(out), byte_tok)) == sorted(
            p.read_text() for p in (tmp_path / "few").rglob("*.txt")
        )


def test_fingerprint(tmp_path, bpe):
    _write_docs(tmp_path / "a", 3)
    _write_docs(tmp_path / "b", 3, seed=1)
    base = dataset_fingerprint([SourceSpec(str(tmp_path / "a"))], byte_tok, 0.02)
    assert base == dataset_fingerprint([SourceSpec(str(tmp_path / "a"))], byte_tok, 0.02)
    assert base == dataset_fingerprint([SourceSpec(str(tmp_path / "a"), weight=7.0)], byte_tok, 0.02)
    assert base != dataset_fingerprint([SourceSpec(str(tmp_path / "a"))], bpe, 0.02)
    assert base != dataset_fingerprint([SourceSpec(str(tmp_path / "b"), name="a")], byte_tok, 0.02)
    assert base != dataset_fingerprint([SourceSpec(str(tmp_path / "a"))], byte_tok, 0.05)
    assert base != dataset_fingerprint([SourceSpec(str(tmp_path / "a"), text_field="body")], byte_tok, 0.02)
    # Editing a file means the cached shards are stale.
    (tmp_path / "a" / "doc000.txt").write_text("changed, and longer than before " * 10)
    assert base != dataset_fingerprint([SourceSpec(str(tmp_path / "a"))], byte_tok, 0.02)
    assert len(base) == 16


def test_overwrite_is_atomic_and_refuses_foreign_directories(tmp_path):
    out = _prepared(tmp_path)
    (tmp_path / "corpus" / "extra.txt").write_text("one more document")
    m = prepare_dataset([SourceSpec(str(tmp_path / "corpus"))], byte_tok, out, val_fraction=0.2, progress=False)
    entry = m["sources"]["corpus"]
    assert entry["train"]["n_docs"] + entry["val"]["n_docs"] == 21
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    # A failing run leaves the previous dataset as it was.
    with pytest.raises(DataError):
        prepare_dataset([SourceSpec(str(tmp_path / "corpus")), SourceSpec("nope")], byte_tok, out, progress=False)
    assert load_dataset(out).sources["corpus"].train.n_docs == entry["train"]["n_docs"]
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a prepared dataset"):
        prepare_dataset([SourceSpec(str(tmp_path / "corpus"))], byte_tok, foreign, progress=False)
    assert (foreign / "precious.txt").read_text() == "keep me"


class WideTokenizer:
    """A stand-in with more than 65536 ids, to exercise uint32 shards."""

    name = "wide"
    id = "wide-test"
    vocab_size = 70_000
    eot_id = 69_999

    def encode_batch(self, texts):
        return [[65_536 + b for b in t.encode()] for t in texts]


def test_large_vocab_uses_uint32(tmp_path):
    _write_docs(tmp_path / "c", 5)
    m = prepare_dataset([SourceSpec(str(tmp_path / "c"))], WideTokenizer(), tmp_path / "out", progress=False)
    assert m["sources"]["c"]["train"]["dtype"] == "uint32"
    src = load_dataset(tmp_path / "out", WideTokenizer()).sources["c"]
    doc = np.asarray(src.train.doc(0))
    assert src.train.tokens.dtype == np.dtype("<u4") and doc.min() >= 65_536
    assert os.path.getsize(tmp_path / "out" / "c" / "train.tokens.bin") == 4 * src.train.n_tokens


def test_progress_bar_reports_throughput(tmp_path, capsys):
    _write_docs(tmp_path / "c", 5)
    prepare_dataset([SourceSpec(str(tmp_path / "c"))], byte_tok, tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    assert "MB/s" in err and "5 documents" in err
    prepare_dataset([SourceSpec(str(tmp_path / "c"))], byte_tok, tmp_path / "out", progress=False)
    assert capsys.readouterr().err == ""


def test_min_val_docs_zero_allows_an_empty_val_split(tmp_path):
    _write_docs(tmp_path / "c", 4)
    m = prepare_dataset(
        [SourceSpec(str(tmp_path / "c"))], byte_tok, tmp_path / "out", val_fraction=0.0, min_val_docs=0, progress=False
    )
    assert m["sources"]["c"]["val"]["n_docs"] == 0 and m["sources"]["c"]["val"]["files"]["tokens"]["size"] == 0
    src = load_dataset(tmp_path / "out").sources["c"]  # an empty shard loads (an empty file cannot be memory-mapped)
    assert (src.train.n_docs, src.val.n_docs, src.val.n_tokens, len(src.val.tokens)) == (4, 0, 0, 0)
    with pytest.raises(DataError, match="val_fraction"):
        prepare_dataset([SourceSpec(str(tmp_path / "c"))], byte_tok, tmp_path / "x", val_fraction=1.0, progress=False)
