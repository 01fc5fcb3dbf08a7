import pytest
from hypothesis import given
from hypothesis import strategies as st

from mmrec import ByteTokenizer

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
