import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmrec import ByteTokenizer
from mmrec.tokenizer import BPETokenizer, load_tokenizer, tokenizer_id, train_bpe

tok = ByteTokenizer()


@given(st.text())
def test_text_round_trips(text):
    assert tok.decode(tok.encode(text)) == text


@given(st.binary())
def test_bytes_round_trip(data):
    assert tok.decode_bytes(tok.encode_bytes(data)) == data


@given(st.binary())
def test_invalid_utf8_survives_surrogateescape(data):
    text = tok.decode(tok.encode_bytes(data), errors="surrogateescape")
    assert bytes(tok.encode(text)) == data


def test_special_tokens():
    ids = tok.encode("hé", add_eot=True)
    assert ids == [104, 195, 169, 256] and tok.vocab_size == 257
    assert tok.decode(ids) == "hé"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([300])


# --- byte tokenizer: the methods shared with BPE -------------------------------------------------------------


def test_byte_tokenizer_shared_surface(tmp_path):
    assert tok.id == tokenizer_id(tok) == "byte"
    assert tok.encode_batch(["ab", "é"]) == [[97, 98], [195, 169]]
    sizes = tok.token_bytes()
    assert len(sizes) == tok.vocab_size and sizes[:256] == [1] * 256 and sizes[tok.eot_id] == 0
    saved = tok.save(tmp_path / "tokenizer.json")
    assert json.loads(saved.read_text()) == {"type": "byte"}
    assert isinstance(load_tokenizer(saved), ByteTokenizer)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)  # the directory holding tokenizer.json
    assert isinstance(ByteTokenizer.load(saved), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


# --- byte-level BPE -------------------------------------------------------------------------------------------


def _corpus(n_docs: int = 200, seed: int = 0) -> list[str]:
    """Generated text with repeated words (so there is something to merge), accents, CJK and emoji."""
    rng = random.Random(seed)
    words = ["the", "model", "memory", "token", "long", "context", "naïve", "café", "日本語", "数据", "🙂", "def"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(20, 80))) + "\n" for _ in range(n_docs)]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return train_bpe(_corpus(), vocab_size=400)


# Lone surrogates (category Cs) are excluded: they are not valid Unicode and have no UTF-8 form, so the BPE
# tokenizer refuses them (test_bpe_refuses_lone_surrogates); every other str must round-trip.
valid_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)))


@given(text=valid_text)
@settings(max_examples=300, deadline=None)
def test_bpe_round_trips_any_valid_text(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert all(0 <= i < bpe.vocab_size for i in ids)
    # Special tokens stand for no bytes, so the byte counts of a text's ids sum to its UTF-8 length.
    sizes = bpe.token_bytes()
    assert sum(sizes[i] for i in ids) == len(text.encode("utf-8"))


def test_bpe_training_learns_merges(bpe):
    assert 258 <= bpe.vocab_size <= 400 and bpe.name == "bpe"
    text = "the model memory token"
    assert len(bpe.encode(text)) < len(text.encode("utf-8"))  # merges make it shorter than bytes
    assert bpe.id.startswith("bpe-") and len(bpe.id) == 4 + 16 and bpe.id == tokenizer_id(bpe)
    assert bpe.token_bytes()[bpe.eot_id] == 0


def test_bpe_special_token_only_from_add_eot(bpe):
    text = "a <|endoftext|> b"
    ids = bpe.encode(text)
    assert bpe.eot_id not in ids and bpe.decode(ids) == text  # the literal string is ordinary text
    with_eot = bpe.encode("hello", add_eot=True)
    assert with_eot[-1] == bpe.eot_id and bpe.decode(with_eot) == "hello"  # decode drops specials
    with pytest.raises(ValueError, match="out of range"):
        bpe.decode([bpe.vocab_size])


def test_bpe_encode_batch_matches_encode(bpe):
    texts = _corpus(20, seed=1) + ["", "é", "<|endoftext|>"]
    assert bpe.encode_batch(texts) == [bpe.encode(t) for t in texts]


def test_bpe_refuses_lone_surrogates(bpe):
    with pytest.raises(ValueError, match="surrogate"):
        bpe.encode("a\ud800b")
    with pytest.raises(ValueError, match="surrogate"):
        bpe.encode_batch(["fine", "a\udfffb"])


def test_bpe_save_load_identical(bpe, tmp_path):
    path = bpe.save(tmp_path / "tokenizer.json")
    for loaded in (BPETokenizer.load(path), load_tokenizer(path), load_tokenizer(str(tmp_path))):
        assert isinstance(loaded, BPETokenizer)
        assert loaded.id == bpe.id and loaded.vocab_size == bpe.vocab_size and loaded.eot_id == bpe.eot_id
        texts = _corpus(30, seed=2) + ["x <|endoftext|> y"]
        assert loaded.encode_batch(texts) == bpe.encode_batch(texts)
        assert loaded.token_bytes() == bpe.token_bytes()
    with pytest.raises(ValueError, match="not the byte tokenizer"):
        ByteTokenizer.load(path)


def test_tokenizer_ids_tell_tokenizers_apart(bpe):
    other = train_bpe(_corpus(seed=5), vocab_size=300)
    assert other.id != bpe.id and other.id != "byte"


def test_train_bpe_validates_vocab_size():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["abc"], vocab_size=257)
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["abc"], vocab_size=100)


def test_loaded_tokenizer_without_eot_gets_one(bpe, tmp_path):
    config = json.loads(bpe.hf_tokenizer.to_str())
    config["added_tokens"] = []
    del config["model"]["vocab"]["<|endoftext|>"]
    # Renumber so the vocabulary has no gap where the special token was.
    vocab = sorted(config["model"]["vocab"].items(), key=lambda kv: kv[1])
    config["model"]["vocab"] = {t: i for i, (t, _) in enumerate(vocab)}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(config))
    loaded = load_tokenizer(path)
    assert isinstance(loaded, BPETokenizer)
    assert loaded.eot_id == bpe.vocab_size - 1 and loaded.decode(loaded.encode("hé", add_eot=True)) == "hé"


def test_load_tokenizer_errors_name_the_path(bpe, tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ValueError, match="nope.json"):
        load_tokenizer(missing)
    with pytest.raises(ValueError, match="no tokenizer file"):
        load_tokenizer(tmp_path)  # a directory without tokenizer.json
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"model": ')
    with pytest.raises(ValueError, match="corrupt.json"):
        load_tokenizer(corrupt)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="other.json"):
        load_tokenizer(other)
    # A word-level tokenizer.json is valid for Hugging Face but cannot round-trip arbitrary text.
    from tokenizers import Tokenizer, models

    word = tmp_path / "word.json"
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(word))
    with pytest.raises(ValueError, match=r"word\.json.*byte-level BPE"):
        load_tokenizer(word)
    # A byte-level BPE with a normalizer would change text.
    config = json.loads(bpe.hf_tokenizer.to_str())
    config["normalizer"] = {"type": "Lowercase"}
    normalized = tmp_path / "normalized.json"
    normalized.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="normalizer"):
        load_tokenizer(normalized)
