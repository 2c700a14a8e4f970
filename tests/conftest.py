"""Shared fixtures: tiny token-shard directories in the layout prepare.py writes; a Hub that never answers;
write_shard, a whole shard in one call, and replace_shard, one in a prepared directory."""

import json
import socket
import threading

import numpy as np
import pytest

import train
from shards import FORMAT_VERSION, ShardWriter
from tokenizer import RANKS_SHA256


def write_shard(path, tokens) -> str:
    """A shard of these tokens at path, written as prepare.py writes one; returns its sha256."""
    with ShardWriter(path) as shard:
        shard.write(tokens)
    return shard.sha256


def replace_shard(data_dir, name, tokens) -> None:
    """Writes shard `name` of data_dir anew with these tokens, and its entry in meta.json as prepare.py would."""
    meta = json.loads((data_dir / "meta.json").read_text())
    for split in meta["splits"].values():
        for shard in split["shards"]:
            if shard["file"] == name:
                shard.update(tokens=len(tokens), sha256=write_shard(data_dir / name, tokens))
    (data_dir / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(autouse=True)
def dtype_is_pinned(request, monkeypatch):
    """A test that trains states its precision (--dtype=float32 for comparisons to rounding, bfloat16
    with a bf16 tolerance): left to train.native_dtype, it would compare bf16 runs on CPUs with native
    bf16 and fp32 runs elsewhere, and pass or fail by the machine. Tests of that choice itself are
    marked machine_dtype. (Subprocesses are not covered: tests/test_train.py's TINY pins it for them.)"""
    if request.node.get_closest_marker("machine_dtype"):
        return

    def unpinned(device):
        raise AssertionError("this test trains with dtype left to the machine; pass --dtype=float32 (or bfloat16)")

    monkeypatch.setattr(train, "native_dtype", unpinned)


@pytest.fixture(scope="session")
def make_token_data(tmp_path_factory):
    """make_token_data(train_tokens=..., val_tokens=..., vocab_size=..., shards=..., unused_tokens=..., gpt2=...)
    -> data dir.

    Random token ids (seeded) split into `shards` train shards and one val shard, with the
    meta.json fields that shards.TokenWindows reads: of a tokenizer "test" of vocab_size ids, or with
    gpt2=True of this project's GPT-2 tokenizer. The last `unused_tokens` ids of the vocabulary
    never occur, as most of GPT-2's never occur in a corpus: a new model trains with loss.CompactVocab.
    """

    def make(train_tokens=4000, val_tokens=600, vocab_size=64, shards=2, seed=0, unused_tokens=16, gpt2=False):
        directory = tmp_path_factory.mktemp("data")
        rng = np.random.default_rng(seed)
        splits = {}
        for split, total, count in [("train", train_tokens, shards), ("val", val_tokens, 1)]:
            infos = []
            for i, part in enumerate(np.array_split(rng.integers(0, vocab_size - unused_tokens, total), count)):
                name = f"{split}_{i:06d}.bin"
                infos.append({"file": name, "tokens": len(part), "sha256": write_shard(directory / name, part)})
            splits[split] = {"shards": infos}
        tokenizer = {"tokenizer": "gpt2", "tokenizer_sha256": RANKS_SHA256} if gpt2 else {"tokenizer": "test"}
        meta = {"format_version": FORMAT_VERSION, **tokenizer, "vocab_size": vocab_size, "eot_id": vocab_size - 1}
        meta["splits"] = splits
        (directory / "meta.json").write_text(json.dumps(meta))
        return directory

    return make


@pytest.fixture
def silent_hub():
    """A Hugging Face Hub endpoint on localhost that accepts each connection and closes it unanswered:
    (its URL, for HF_ENDPOINT; a function giving the connections made so far). A client that retries, as
    datasets does for ~25 s, makes more than one."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    connections, closing = [], threading.Event()

    def serve():
        while not closing.is_set():
            try:
                connection, _ = server.accept()
            except OSError:  # the accept timeout, or a client gone before it was accepted
                continue
            connections.append(1)  # counted before the client can see the close
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", lambda: len(connections)
    closing.set()
    thread.join()
    server.close()
