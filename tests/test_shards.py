"""shards.py: a damaged meta.json or shard is one line naming the file (and key) when the data is opened,
before any training step."""

import hashlib
import json
from collections.abc import Callable

import numpy as np
import pytest
from conftest import replace_shard

import shards
from common import UserError
from shards import TokenWindows
from tokenizer import EOT_ID, RANKS_SHA256, VOCAB_SIZE


def test_token_ids_beyond_the_vocabulary_are_refused_when_the_shards_are_opened(make_token_data):
    data = make_token_data(train_tokens=4000, vocab_size=64, shards=2)
    replace_shard(data, "train_000001.bin", np.arange(2000) % 65)  # ids up to 64
    with pytest.raises(UserError, match=r"train_000001\.bin: token id 64 is outside .*vocab_size 64.*--force"):
        TokenWindows(data, "train", block_size=16)
    assert len(TokenWindows(data, "val", block_size=16)) > 0  # the intact split still opens


def test_a_shard_whose_bytes_changed_is_refused_naming_it(make_token_data):
    data = make_token_data(train_tokens=4000, vocab_size=64, shards=2)
    path = data / "train_000001.bin"
    raw = bytearray(path.read_bytes())
    raw[-2] ^= 1  # the last token's low byte: another id in the vocabulary, the size and header as they were
    path.write_bytes(raw)
    with pytest.raises(UserError, match=r"train_000001\.bin: its sha256 differs from the one meta.json records"):
        TokenWindows(data, "train", block_size=16)


def test_a_splits_fingerprint_is_the_sha256_of_its_shards_sha256s_in_order(make_token_data):
    data = make_token_data(train_tokens=4000, vocab_size=64, shards=2)
    shards = json.loads((data / "meta.json").read_text())["splits"]["train"]["shards"]
    expected = hashlib.sha256("".join(shard["sha256"] for shard in shards).encode()).hexdigest()
    assert TokenWindows(data, "train", block_size=16).fingerprint == expected
    assert [shard["sha256"] for shard in shards] == [
        hashlib.sha256(p.read_bytes()).hexdigest() for p in (data / "train_000000.bin", data / "train_000001.bin")
    ]  # as `sha256sum` gives them
    replace_shard(data, "train_000001.bin", np.arange(2000) % 48)
    assert TokenWindows(data, "train", block_size=16).fingerprint != expected


def test_tokens_present_are_those_of_every_shard_in_every_chunk(make_token_data, monkeypatch):
    data = make_token_data(train_tokens=4000, vocab_size=64, shards=2, unused_tokens=16)  # ids 0-47
    replace_shard(data, "train_000001.bin", np.r_[np.arange(1999) % 40, 60])  # 60 only at the very end
    monkeypatch.setattr(shards, "COUNT_CHUNK_TOKENS", 7)
    present = TokenWindows(data, "train", block_size=16).tokens_present()
    assert present.tolist() == [True] * 48 + [False] * 12 + [True] + [False] * 3


GPT2 = {"tokenizer": "gpt2", "tokenizer_sha256": RANKS_SHA256, "eot_id": EOT_ID, "vocab_size": VOCAB_SIZE}


def val_shards(*entries) -> Callable[[dict], dict]:
    return lambda meta: {**meta, "splits": {**meta["splits"], "val": {"shards": list(entries)}}}


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda meta: "{", "meta.json is not valid JSON"),
        (lambda meta: [meta], "not a JSON object"),
        (lambda meta: {**meta, "format_version": 1}, "'format_version' is 1, prepared by an older prepare.py; rerun"),
        (lambda meta: {**meta, "format_version": 2.0}, "'format_version' is 2.0, not this code's 2"),
        (lambda meta: {**meta, "tokenizer": ""}, "'tokenizer' is missing or not a name"),
        (lambda meta: {**meta, **GPT2, "tokenizer_sha256": "0" * 64}, "'tokenizer_sha256' is '0+', but this proj"),
        (lambda meta: {**meta, **GPT2, "eot_id": 0}, "'eot_id' is 0, but this project's GPT-2 tokenizer has 50256"),
        (lambda meta: {**meta, **GPT2, "vocab_size": 50304}, "'vocab_size' is 50304, but this project's GPT-2 "),
        (lambda meta: {**meta, "vocab_size": "64"}, "'vocab_size' is missing or not an integer from 1 to 65536"),
        (lambda meta: {**meta, "vocab_size": 70_000}, "'vocab_size' is missing or not an integer from 1 to 65536"),
        (lambda meta: {**meta, "eot_id": 64}, "'eot_id' is missing or not an id below vocab_size"),
        (lambda meta: {key: value for key, value in meta.items() if key != "splits"}, "'splits' is missing"),
        (
            lambda meta: {**meta, "splits": {"train": {"shards": {}}}},
            r"'splits\.train\.shards' is missing or not a list",
        ),
        (
            val_shards({"file": "val_000000.bin", "sha256": "0" * 64}),
            r"'splits\.val\.shards\[0\]' needs keys 'file' \(a file name\), 'tokens' \(a count\) and 'sha256'",
        ),
        (val_shards({"file": "../x.bin", "tokens": 1, "sha256": "0" * 64}), r"'splits\.val\.shards\[0\]' needs keys"),
        (val_shards({"file": "val_000000.bin", "tokens": 600, "sha256": "0" * 63}), r"'sha256' \(64 hex digits\)"),
    ],
    ids=[
        "invalid-json",
        "not-an-object",
        "older-format",
        "other-format",
        "tokenizer",
        "gpt2-sha256",
        "gpt2-eot-id",
        "gpt2-vocab-size",
        "vocab-size-type",
        "vocab-size-range",
        "eot-id",
        "splits",
        "shards",
        "shard-tokens",
        "shard-path",
        "shard-sha256",
    ],  # fmt: skip
)
def test_a_damaged_meta_json_is_one_line_naming_the_key(make_token_data, damage, message):
    data = make_token_data()
    damaged = damage(json.loads((data / "meta.json").read_text()))
    (data / "meta.json").write_text(damaged if isinstance(damaged, str) else json.dumps(damaged))
    with pytest.raises(UserError, match=message) as error:
        TokenWindows(data, "val", block_size=16)
    assert str(data / "meta.json") in str(error.value) and "--force" in str(error.value)


def test_missing_data_names_the_commands_that_prepare_it_and_data_dir(tmp_path):
    with pytest.raises(UserError) as error:
        TokenWindows(tmp_path, "val", block_size=16)
    assert str(error.value) == (
        f"{tmp_path / 'meta.json'} not found; prepare the data first (`python prepare.py --dataset=austen`, or "
        "`python prepare.py` for BookCorpus), or pass --data_dir=DIR of data prepare.py wrote"
    )


def test_a_split_whose_shards_are_each_shorter_than_a_window_says_so(make_token_data):
    data = make_token_data(train_tokens=300, shards=5)  # 5 shards of 60 tokens
    with pytest.raises(UserError, match=r"'train' has 300 tokens, but none of its 5 shards holds block_size \+ 1 = 65"):
        TokenWindows(data, "train", block_size=64)
    with pytest.raises(UserError, match=r"'val' has fewer than block_size \+ 1 = 601 tokens"):
        TokenWindows(data, "val", block_size=600)
