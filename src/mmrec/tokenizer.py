"""Tokenizers: a byte-level one (no files, nothing to download) and byte-level BPE.

Both round-trip any valid Unicode text, both report how many UTF-8 bytes each
token stands for (so losses convert to bits per byte, comparable across
tokenizers), and both save to and load from a ``tokenizer.json`` so prepared
data and checkpoints can name the exact tokenizer they were made with.

The Hugging Face ``tokenizers`` package is imported only when a BPE tokenizer
is built or loaded: ``import mmrec`` and the byte tokenizer work without it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer

EOT_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"


def _json_path(path: str | Path) -> Path:
    """``path`` itself, or ``path/tokenizer.json`` when ``path`` is a directory."""
    p = Path(path)
    return p / TOKENIZER_FILE if p.is_dir() else p


class ByteTokenizer:
    """Ids 0-255 are the bytes of the UTF-8 text; special tokens follow.

    ``decode(encode(text)) == text`` for any str, and ``decode_bytes(
    encode_bytes(data)) == data`` for any bytes. Text decoded with
    ``errors="surrogateescape"`` keeps invalid UTF-8 as lone surrogates and
    encodes back to the same bytes. Bits per byte of a byte-level model is its
    loss in nats / ln 2.
    """

    name = "byte"
    special_tokens: tuple[str, ...] = (EOT_TOKEN,)
    eot_id = 256

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.special_tokens)

    @property
    def id(self) -> str:
        """Stable identity recorded with prepared data and checkpoints."""
        return tokenizer_id(self)

    def encode_bytes(self, data: bytes) -> list[int]:
        return list(data)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of ``ids``; special tokens are dropped."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif not 256 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is out of range for the byte tokenizer (0..{self.vocab_size - 1})")
        return bytes(out)

    def encode(self, text: str, add_eot: bool = False) -> list[int]:
        try:
            data = text.encode("utf-8", errors="surrogateescape")
        except UnicodeEncodeError:
            # A lone surrogate that no decoder produced: keep it, as its 3-byte form.
            data = text.encode("utf-8", errors="surrogatepass")
        ids = list(data)
        return ids + [self.eot_id] if add_eot else ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """``encode`` of each text, for the same call shape as ``BPETokenizer.encode_batch``."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes each id stands for: 1 for the 256 bytes, 0 for special tokens."""
        return [1] * 256 + [0] * len(self.special_tokens)

    def save(self, path: str | Path) -> Path:
        """Write ``{"type": "byte"}`` to ``path`` (or ``path/tokenizer.json`` for a directory); returns the file."""
        out = _json_path(path)
        out.write_text(json.dumps({"type": "byte"}) + "\n", encoding="utf-8")
        return out

    @classmethod
    def load(cls, path: str | Path) -> ByteTokenizer:
        """Read a file written by ``save``; ``ValueError`` if it describes another tokenizer."""
        tok = load_tokenizer(path)
        if not isinstance(tok, ByteTokenizer):
            raise ValueError(f"{_json_path(path)} describes a {tok.name} tokenizer, not the byte tokenizer")
        return tok


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable stand-in character of each byte -> the byte.

    Byte-level BPE vocabularies spell tokens in these characters, so mapping
    them back gives each token's exact bytes without going through the
    ``tokenizers`` decoder (which would replace invalid UTF-8 mid-sequence).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


class BPETokenizer:
    """Byte-level BPE on top of a Hugging Face ``tokenizers.Tokenizer``.

    Text is split into UTF-8 bytes before merging (ByteLevel pre-tokenizer, no
    normalizer), so ``decode(encode(text)) == text`` for every str that is
    valid Unicode; a str holding lone surrogates (which is not) is refused
    with ``ValueError``, as it has no UTF-8 form.

    ``<|endoftext|>`` is always in the vocabulary, but the literal string in a
    text is encoded as ordinary text: documents that mention it (code about
    tokenizers, for instance) must not gain a document boundary. The only way
    to get ``eot_id`` is ``add_eot=True``. Like the byte tokenizer, ``decode``
    drops special tokens.
    """

    name = "bpe"

    def __init__(self, tokenizer: Tokenizer) -> None:
        config = json.loads(tokenizer.to_str())
        _check_byte_level(config)
        if tokenizer.token_to_id(EOT_TOKEN) is None:
            from tokenizers import AddedToken

            tokenizer.add_special_tokens([AddedToken(EOT_TOKEN, special=True, normalized=False)])
            config = json.loads(tokenizer.to_str())
        # Match special-token strings as plain text (the flag is not saved in tokenizer.json, so set it here).
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer
        self._canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        eot = tokenizer.token_to_id(EOT_TOKEN)
        assert eot is not None
        self.eot_id: int = eot
        self._bytes = _token_byte_table(tokenizer, config)
        self.special_tokens: tuple[str, ...] = tuple(
            t["content"] for t in config.get("added_tokens") or [] if t.get("special")
        )

    @property
    def vocab_size(self) -> int:
        return len(self._bytes)

    @property
    def id(self) -> str:
        """``bpe-`` + a hash of the tokenizer's canonical JSON: equal ids encode identically."""
        return tokenizer_id(self)

    @property
    def hf_tokenizer(self) -> Tokenizer:
        """The wrapped ``tokenizers.Tokenizer`` (do not change it: ``id`` would no longer describe it)."""
        return self._tok

    def canonical_json(self) -> str:
        """The tokenizer's JSON with sorted keys and no whitespace: the input of ``id``."""
        return self._canonical

    def encode(self, text: str, add_eot: bool = False) -> list[int]:
        try:
            ids: list[int] = self._tok.encode(text, add_special_tokens=False).ids
        except TypeError as e:
            raise ValueError(f"BPETokenizer.encode needs valid Unicode text ({_bad_text_reason(text)})") from e
        return ids + [self.eot_id] if add_eot else ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """``encode`` of each text, in parallel in the Rust encoder (much faster than a loop over ``encode``)."""
        batch = list(texts)
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        try:
            return [e.ids for e in encode(batch, add_special_tokens=False)]
        except TypeError as e:
            bad = next((t for t in batch if not isinstance(t, str) or _has_surrogate(t)), None)
            raise ValueError(f"BPETokenizer.encode_batch needs valid Unicode texts ({_bad_text_reason(bad)})") from e

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of ``ids``; special tokens are dropped."""
        table = self._bytes
        n = len(table)
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is out of range for this BPE tokenizer (0..{n - 1})")
            out.append(table[i])
        return b"".join(out)

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes each id stands for (0 for special tokens): sum over a text's ids = its UTF-8 length."""
        return [len(b) for b in self._bytes]

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` to ``path`` (or into it, for a directory); returns the file."""
        out = _json_path(path)
        self._tok.save(str(out))
        return out

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        """Read a byte-level BPE ``tokenizer.json``; ``ValueError`` naming the file if it is not one."""
        tok = load_tokenizer(path)
        if not isinstance(tok, BPETokenizer):
            raise ValueError(f"{_json_path(path)} describes the byte tokenizer, not a BPE tokenizer")
        return tok

    @classmethod
    def from_str(cls, data: str) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(data))


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _bad_text_reason(text: object) -> str:
    if not isinstance(text, str):
        return f"got {type(text).__name__}, expected str"
    return (
        "it holds a lone surrogate, which has no UTF-8 form; "
        "decode bytes with errors='replace', or use the byte tokenizer"
    )


def _check_byte_level(config: dict[str, Any]) -> None:
    """Refuse tokenizer.json files for which ``decode(encode(text)) == text`` cannot hold."""
    model = (config.get("model") or {}).get("type")
    if model != "BPE":
        raise ValueError(f"only byte-level BPE tokenizers are supported, this one's model is {model!r}")
    if config.get("normalizer") is not None:
        raise ValueError("the tokenizer has a normalizer, which changes text: decode(encode(text)) would differ")
    decoder = (config.get("decoder") or {}).get("type")
    if decoder != "ByteLevel":
        raise ValueError(f"only byte-level BPE tokenizers are supported, this one's decoder is {decoder!r}")
    pre = config.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if not byte_level:
        raise ValueError("only byte-level BPE tokenizers are supported: the pre-tokenizer has no ByteLevel step")
    if any(p.get("add_prefix_space") for p in byte_level):
        raise ValueError("the ByteLevel pre-tokenizer adds a prefix space, so decode(encode(text)) would differ")


def _token_byte_table(tokenizer: Tokenizer, config: dict[str, Any]) -> list[bytes]:
    """The bytes each id stands for: byte-level spelling mapped back, added tokens as UTF-8, specials empty."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    added = {t["id"]: t for t in config.get("added_tokens") or []}
    size = max(vocab.values()) + 1
    table: list[bytes | None] = [None] * size
    decoder = _byte_decoder()
    for token, i in vocab.items():
        if i in added:
            table[i] = b"" if added[i].get("special") else added[i]["content"].encode("utf-8")
            continue
        try:
            table[i] = bytes(decoder[c] for c in token)
        except KeyError:
            raise ValueError(f"token {token!r} (id {i}) is not spelled in the byte-level alphabet") from None
    missing = [i for i, b in enumerate(table) if b is None]
    if missing:
        raise ValueError(f"the vocabulary has gaps: no token for ids {missing[:5]}")
    return [b for b in table if b is not None]


def tokenizer_id(tok: object) -> str:
    """``"byte"`` for the byte tokenizer; ``"bpe-"`` + 16 hex digits of sha256(canonical JSON) for BPE.

    Prepared data and checkpoints record this, so a mismatch between the data
    and the tokenizer is caught instead of training on wrong ids.
    """
    if isinstance(tok, ByteTokenizer):
        return "byte"
    if isinstance(tok, BPETokenizer):
        return "bpe-" + hashlib.sha256(tok.canonical_json().encode("utf-8")).hexdigest()[:16]
    raise TypeError(f"tokenizer_id needs a ByteTokenizer or BPETokenizer, got {type(tok).__name__}")


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> BPETokenizer:
    """Train a byte-level BPE tokenizer with ``vocab_size`` ids (fewer if the texts have too few merges).

    Every byte starts in the vocabulary (so any text encodes), then
    ``<|endoftext|>``, then merges of pairs seen at least ``min_frequency``
    times.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    smallest = 256 + 1 + 1
    if not isinstance(vocab_size, int) or vocab_size < smallest:
        raise ValueError(
            f"vocab_size must be an int >= {smallest} (256 bytes + {EOT_TOKEN} + at least one merge), "
            f"got {vocab_size!r}"
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return BPETokenizer(tok)


def load_tokenizer(spec: str | Path) -> ByteTokenizer | BPETokenizer:
    """``"byte"``, or a ``tokenizer.json`` (or a directory holding one) written by either tokenizer's ``save``."""
    if isinstance(spec, str) and spec == "byte":
        return ByteTokenizer()
    path = _json_path(spec)
    if not path.is_file():
        raise ValueError(f"no tokenizer file at {path}: pass 'byte' or the path of a tokenizer.json (or its directory)")
    try:
        text = path.read_text(encoding="utf-8")
        config = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read tokenizer file {path}: {e}; re-create it or pass 'byte'") from e
    if not isinstance(config, dict):
        raise ValueError(f"tokenizer file {path} does not hold a JSON object; re-create it or pass 'byte'")
    if config.get("type") == "byte":
        return ByteTokenizer()
    if "model" not in config:
        raise ValueError(f"tokenizer file {path} is neither a byte tokenizer nor a Hugging Face tokenizer.json")
    try:
        return BPETokenizer.from_str(text)
    except Exception as e:
        raise ValueError(f"cannot load tokenizer file {path}: {e}") from e
