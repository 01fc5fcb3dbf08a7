"""mmrec's tokenizers as Hugging Face tokenizers: files that ``AutoTokenizer.from_pretrained(dir)`` reads.

Both become a ``tokenizers`` byte-level BPE behind ``PreTrainedTokenizerFast``:

* the byte tokenizer is a BPE with no merges whose 256 tokens are the bytes (spelled in GPT-2's byte-level
  alphabet, token id = byte value), plus ``<|endoftext|>`` as id 256;
* a trained BPE is its own ``tokenizer.json``.

mmrec encodes a literal ``<|endoftext|>`` inside a text as ordinary text, never as the end-of-text id; the
HF tokenizer does the same (``split_special_tokens``), so the two give the same ids for every text. Writing
the files needs only ``tokenizers``; reading them back needs transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmrec.tokenizer import EOT_TOKEN, BPETokenizer, ByteTokenizer, _byte_decoder

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def byte_tokenizer_json() -> str:
    """The byte tokenizer as a ``tokenizers`` JSON: 256 byte tokens (id = byte value) and ``<|endoftext|>``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab=dict(_byte_decoder()), merges=[]))
    # The regex split only cuts the text into words; with no merges every byte stays its own token either way.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOT_TOKEN, special=True, normalized=False)])
    assert tok.token_to_id(EOT_TOKEN) == ByteTokenizer.eot_id
    return str(tok.to_str())


def save_hf_tokenizer(tokenizer: Any, out: str | Path, model_max_length: int | None = None) -> list[Path]:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``out``."""
    if isinstance(tokenizer, ByteTokenizer):
        data = byte_tokenizer_json()
    elif isinstance(tokenizer, BPETokenizer):
        data = tokenizer.hf_tokenizer.to_str()
    else:
        raise TypeError(f"expected a ByteTokenizer or BPETokenizer, got {type(tokenizer).__name__}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    special = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "pad_token": EOT_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "split_special_tokens": True,  # "<|endoftext|>" typed in a text is text, as in mmrec
        "clean_up_tokenization_spaces": False,  # decode(encode(text)) == text
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": int(model_max_length) if model_max_length else 1_000_000_000,
    }
    paths = [out / name for name in TOKENIZER_FILES]
    paths[0].write_text(data, encoding="utf-8")
    paths[1].write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    paths[2].write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return paths
