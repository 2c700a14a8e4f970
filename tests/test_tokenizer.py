import pytest

import tokenizer
from tokenizer import EOT_ID, VOCAB_SIZE, decode, encode, get_tokenizer


def test_known_ids():
    assert encode("Hello world") == [15496, 995]
    assert encode(" I was telling her that") == [314, 373, 5149, 607, 326]
    assert get_tokenizer().n_vocab == VOCAB_SIZE == 50257


def test_lossless_round_trip_on_hard_text():
    text = "Café naïve — Ünïcödé 🙂🚀 東京は晴れ。\t\n\n   spaces   and\r\nnewlines  ' s 's 1234567 ½"
    ids = encode(text)
    assert max(ids) < EOT_ID
    assert decode(ids) == text


def test_endoftext_handling():
    enc = get_tokenizer()
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT_ID]
    assert EOT_ID not in encode("a <|endoftext|> b")  # in ordinary text it is just text
    assert decode([EOT_ID]) == "<|endoftext|>"


def test_partial_utf8_decodes_without_error():
    ids = encode("🙂")
    assert len(ids) > 1  # an emoji spans several byte-level tokens
    assert decode(ids[:1]) == "\ufffd"


def test_damaged_ranks_file_is_refused(tmp_path, monkeypatch):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(tokenizer.RANKS_PATH.read_bytes()[:-10])
    monkeypatch.setattr(tokenizer, "RANKS_PATH", bad)
    tokenizer.get_tokenizer.cache_clear()
    try:
        with pytest.raises(ValueError, match="damaged"):
            get_tokenizer()
    finally:
        tokenizer.get_tokenizer.cache_clear()
