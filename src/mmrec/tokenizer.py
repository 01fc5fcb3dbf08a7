"""Byte-level tokenizer: no files, nothing to download, every input round-trips."""

from __future__ import annotations

from collections.abc import Iterable


class ByteTokenizer:
    """Ids 0-255 are the bytes of the UTF-8 text; special tokens follow.

    ``decode(encode(text)) == text`` for any str, and ``decode_bytes(
    encode_bytes(data)) == data`` for any bytes. Text decoded with
    ``errors="surrogateescape"`` keeps invalid UTF-8 as lone surrogates and
    encodes back to the same bytes. Bits per byte of a byte-level model is its
    loss in nats / ln 2.
    """

    name = "byte"
    special_tokens: tuple[str, ...] = ("<|endoftext|>",)
    eot_id = 256

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.special_tokens)

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

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        return self.decode_bytes(ids).decode("utf-8", errors=errors)
