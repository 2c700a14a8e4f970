"""prepare.py: lossless shards, leak-free deterministic splits, resumable after a kill, clear errors."""

import collections
import gzip
import hashlib
import itertools
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
from conftest import write_shard
from filelock import FileLock

import chunks
import prepare
import sources
from shards import TokenWindows
from tokenizer import EOT_ID, get_tokenizer

ROOT = Path(__file__).resolve().parent.parent
AUSTEN = [gzip.open(p).read().decode() for p in sorted(ROOT.glob("assets/austen/*.txt.gz"))]


def read_tokens(path: Path) -> np.ndarray:
    """An independent reader of llm.c's layout: 256 little-endian int32, then uint16 tokens."""
    raw = path.read_bytes()
    header = struct.unpack_from("<256i", raw)
    assert header[:2] == (20240520, 1) and not any(header[3:])
    assert len(raw) == 1024 + 2 * header[2]
    return np.frombuffer(raw, dtype="<u2", offset=1024)


def split_segments(out_dir: Path, split: str) -> list[np.ndarray]:
    """A split's tokens cut at each <|endoftext|>, checked against meta.json on the way."""
    meta = json.loads((out_dir / "meta.json").read_text())["splits"][split]
    parts = [read_tokens(out_dir / shard["file"]) for shard in meta["shards"]]
    for tokens, shard in zip(parts, meta["shards"], strict=True):
        assert len(tokens) == shard["tokens"] and np.count_nonzero(tokens == EOT_ID) == shard["documents"]
        assert hashlib.sha256((out_dir / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]  # sha256sum's
    tokens = np.concatenate(parts)
    assert len(tokens) == meta["tokens"] and tokens[0] == EOT_ID
    starts = np.flatnonzero(tokens == EOT_ID)
    return [tokens[a + 1 : b] for a, b in zip(starts, list(starts[1:]) + [len(tokens)], strict=True)]


def reassemble(documents: list[str], out_dir: Path) -> dict[str, list[int]]:
    """Puts the documents back together from the two splits' segments, in order, each segment used once.

    Returns which segment indices each split contributed per document; fails if any text is
    missing, extra, reordered or in both splits, or if a document's tokens differ from encoding it whole.
    """
    encoding = get_tokenizer()
    queues = {split: collections.deque(split_segments(out_dir, split)) for split in ("train", "val")}
    used = {"train": [], "val": []}
    for number, document in enumerate(documents):
        position, tokens = 0, []
        while position < len(document):
            for split, queue in queues.items():
                text = encoding.decode_bytes(queue[0].tolist()).decode() if queue else None
                if text and document.startswith(text, position):
                    tokens.extend(queue.popleft().tolist())
                    position += len(text)
                    used[split].append(number)
                    break
            else:
                pytest.fail(f"document {number}: no segment continues it at character {position}")
        assert tokens == encoding.encode_ordinary(document), "tokens differ from encoding the whole document"
    assert not queues["train"] and not queues["val"], "segments left over"
    return used


def run(*args: str) -> None:
    prepare.main(list(args))


def run_cli(*args: str, env=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "prepare.py"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
        **kwargs,
    )


def write_text_files(directory: Path, documents: list[str]) -> Path:
    directory.mkdir()
    for i, document in enumerate(documents):
        (directory / f"{i:04d}.txt").write_text(document, encoding="utf-8")  # not the locale's (Windows: cp1252)
    return directory


def shard_bytes(out_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir())}


SMALL_DOCS = [
    f"Document {i}: the {'quick ' * (i % 7)}brown fox {i * 7919} jumps. <|endoftext|> stays text." for i in range(120)
]


def test_austen_round_trip_is_lossless_and_tokenized_as_whole_documents(tmp_path):
    out = tmp_path / "austen"
    run("--dataset=austen", f"--out_dir={out}", "--block_chars=20000", "--val_fraction=0.2", "--shard_tokens=150000")
    meta = json.loads((out / "meta.json").read_text())
    assert len(meta["splits"]["train"]["shards"]) > 1 and meta["splits"]["val"]["tokens"] > 0
    assert meta["vocab_size"] == 50257 and meta["eot_id"] == EOT_ID and meta["replaced_undecodable"] == 0
    used = reassemble(AUSTEN, out)
    assert used["val"] and len(set(used["train"])) == len(AUSTEN)
    windows = TokenWindows(out, "val", block_size=64)  # train.py's reader accepts the output
    assert windows.batch([0, len(windows) - 1]).shape == (2, 65)


def test_split_is_deterministic_disjoint_and_independent_of_workers(tmp_path):
    corpus = write_text_files(tmp_path / "docs", SMALL_DOCS)
    outputs = {}
    for name, args in {
        "a": ["--workers=1"],
        "b": ["--workers=3"],
        "seed": ["--seed=7"],
        "none": ["--val_fraction=0"],
    }.items():
        run(
            f"--input={corpus}",
            f"--out_dir={tmp_path / name}",
            "--val_fraction=0.3",
            "--shard_tokens=1025",
            "--block_chars=256",
            *args,
        )
        outputs[name] = shard_bytes(tmp_path / name)
    assert outputs["a"] == outputs["b"]
    used = reassemble(SMALL_DOCS, tmp_path / "a")
    assert not set(used["train"]) & set(used["val"]) and 15 < len(used["val"]) < 60
    assert reassemble(SMALL_DOCS, tmp_path / "seed")["val"] != used["val"]
    # with nothing drawn, the last block is held out, and only it (256 characters: at most 4 of these documents)
    held_out = reassemble(SMALL_DOCS, tmp_path / "none")["val"]
    assert held_out == list(range(len(SMALL_DOCS) - len(held_out), len(SMALL_DOCS))) and len(held_out) <= 4


AUSTEN_TEXT = "".join(AUSTEN)


@pytest.mark.parametrize(
    "documents",
    [
        [AUSTEN_TEXT[i * 45_500 : (i + 1) * 45_500] for i in range(5)],  # 227,500 characters: one block, once refused
        [AUSTEN_TEXT[:1_000_000]],  # 4 blocks, of which the last (21% of the tokens) was held out
    ],
    ids=["five-files-57k-tokens", "one-file-1MB"],
)
def test_small_inputs_hold_out_a_share_that_suits_their_size(tmp_path, documents):
    corpus = write_text_files(tmp_path / "corpus", documents)
    run(f"--input={corpus}", f"--out_dir={tmp_path / 'out'}")  # the default --block_chars and --val_fraction
    splits = json.loads((tmp_path / "out" / "meta.json").read_text())["splits"]
    assert 0.03 < splits["val"]["tokens"] / (splits["train"]["tokens"] + splits["val"]["tokens"]) < 0.1
    used = reassemble(documents, tmp_path / "out")  # lossless, nothing in both splits, tokens as whole documents
    assert used["val"] == [len(documents) - 1]  # one contiguous piece: the end of the last document


@pytest.mark.parametrize("last_block, held_out", [(60, [20]), (10, [19, 20])])
def test_without_draws_at_least_half_a_block_is_held_out_at_the_end(last_block, held_out):
    blocks = [[(True, "x" * 100)]] * 20 + [[(True, "x" * last_block)]]
    assigned = chunks.held_out_chunks(iter(blocks), 100, val_fraction=0.0, seed=0)
    assert [i for i, (_, is_held_out) in enumerate(assigned) if is_held_out] == held_out


def test_large_inputs_are_split_by_the_seeded_draws_alone():
    """BookCorpus' ~18k blocks: each held out with probability val_fraction, seeded, as before the size rules."""
    blocks = [[(True, "x" * 10)]] * 20_000
    rng = random.Random(1337)
    drawn = [i for i in range(len(blocks)) if rng.random() < 0.0015 and i > 0]
    assigned = chunks.held_out_chunks(iter(blocks), 10, val_fraction=0.0015, seed=1337)
    assert [i for i, (_, is_held_out) in enumerate(assigned) if is_held_out] == drawn and len(drawn) > 10


def test_an_endless_stream_is_read_ahead_by_a_bounded_amount():
    endless = (["word " * 100] for _ in itertools.count())  # documents of 500 characters, forever
    blocks, block_chars = chunks.sized_chunks(endless, 1000)
    assert block_chars == 1000 and len(list(itertools.islice(blocks, 50))) == 50


def test_rerun_after_a_kill_reuses_shards_and_is_byte_identical(tmp_path):
    corpus = write_text_files(tmp_path / "corpus", AUSTEN)
    args = [f"--input={corpus}", "--block_chars=8192", "--shard_tokens=20000", "--workers=1"]
    run(*args, f"--out_dir={tmp_path / 'clean'}")
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(ROOT / "prepare.py"), *args, f"--out_dir={killed}"])
    progress = killed / "progress.json"
    while process.poll() is None and not (
        progress.exists() and len(json.loads(progress.read_text())["splits"]["train"]) >= 3
    ):
        time.sleep(0.005)
    process.kill()  # SIGKILL; TerminateProcess on Windows
    process.wait()
    assert not (killed / "meta.json").exists(), "the run finished before the kill; use a larger corpus"
    kept = {p.name: p.stat().st_mtime_ns for p in killed.glob("train_*.bin")}
    result = run_cli(*args, f"--out_dir={killed}")
    assert result.returncode == 0, result.stderr
    assert "resuming after" in result.stdout
    assert shard_bytes(killed) == shard_bytes(tmp_path / "clean")
    reused = [name for name, mtime in kept.items() if (killed / name).stat().st_mtime_ns == mtime]
    assert len(reused) >= 3


def test_exception_mid_shard_leaves_no_partial_file_and_resumes(tmp_path, monkeypatch):
    corpus = write_text_files(tmp_path / "docs", SMALL_DOCS)
    args = [f"--input={corpus}", "--val_fraction=0.3", "--shard_tokens=1025", "--block_chars=300"]
    run(*args, f"--out_dir={tmp_path / 'clean'}")
    writes = 0
    real_write = prepare.ShardWriter.write

    def failing_write(self, tokens):
        nonlocal writes
        writes += 1
        if writes == 40:
            raise KeyboardInterrupt  # like Ctrl-C halfway through a shard
        real_write(self, tokens)

    monkeypatch.setattr(prepare.ShardWriter, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        run(*args, f"--out_dir={tmp_path / 'crashed'}")
    names = {p.name for p in (tmp_path / "crashed").iterdir()}
    assert "progress.json" in names and "meta.json" not in names and not any(n.endswith(".tmp") for n in names)
    progress = json.loads((tmp_path / "crashed" / "progress.json").read_text())
    assert "train_000001.bin" in [shard["file"] for shard in progress["splits"]["train"]]
    damaged = bytearray((tmp_path / "crashed" / "train_000001.bin").read_bytes())
    damaged[-2] ^= 1  # a completed shard's last token becomes another valid id: rewritten, not reused
    (tmp_path / "crashed" / "train_000001.bin").write_bytes(damaged)
    monkeypatch.setattr(prepare.ShardWriter, "write", real_write)
    run(*args, f"--out_dir={tmp_path / 'crashed'}")
    assert shard_bytes(tmp_path / "crashed") == shard_bytes(tmp_path / "clean")


def test_prepared_directory_is_reused_guarded_and_forced(tmp_path, capsys):
    corpus = write_text_files(tmp_path / "docs", SMALL_DOCS)
    out = tmp_path / "out"
    args = [f"--input={corpus}", f"--out_dir={out}", "--block_chars=256"]
    run(*args)
    before = shard_bytes(out)
    run(*args)
    assert "already prepared" in capsys.readouterr().out and shard_bytes(out) == before
    with pytest.raises(ValueError, match="other settings.*seed.*--force"):
        run(*args, "--seed=5")
    run(*args, "--seed=5", "--force")
    assert json.loads((out / "meta.json").read_text())["seed"] == 5


def test_row_files_and_hub_code_path_on_local_data(tmp_path, monkeypatch):
    """.jsonl/.parquet go through the same datasets streaming code as Hub datasets, exercised here offline."""
    rows = tmp_path / "rows"
    rows.mkdir()
    pq.write_table(pa.table({"id": list(range(len(SMALL_DOCS))), "body": SMALL_DOCS}), rows / "part.parquet")
    run(
        f"--input={rows / 'part.parquet'}",
        "--text_column=body",
        f"--out_dir={tmp_path / 'parquet'}",
        "--val_fraction=0.3",
        "--block_chars=256",
    )
    assert reassemble(SMALL_DOCS, tmp_path / "parquet")["val"]
    with pytest.raises(ValueError, match="no column 'text'.*--text_column"):
        run(f"--input={rows / 'part.parquet'}", f"--out_dir={tmp_path / 'bad'}")

    # BookCorpus (the default): rows are sentences of one running text, joined with a space
    sentences = [
        f"he walked onto the porch{i % 3 * '!'}." if i % 2 else f"i've seen {i} of them ," for i in range(3000)
    ]
    pq.write_table(pa.table({"text": sentences}), rows / "part.parquet")
    monkeypatch.setattr("huggingface_hub.HfApi.dataset_info", lambda *args, **kwargs: None)  # the Hub "answers"
    monkeypatch.setattr(prepare, "BOOKCORPUS", str(rows))
    run(f"--out_dir={tmp_path / 'bookcorpus'}", "--block_chars=2000", "--val_fraction=0.2")
    meta = json.loads((tmp_path / "bookcorpus" / "meta.json").read_text())
    assert meta["source"].endswith("@refs/convert/parquet split train column text")
    used = reassemble([" ".join(sentences)], tmp_path / "bookcorpus")
    assert len(used["val"]) > 3  # contiguous runs of sentences, each opened by <|endoftext|>


def test_undecodable_bytes_are_replaced_counted_and_warned(tmp_path):
    corpus = tmp_path / "latin1"
    corpus.mkdir()
    (corpus / "a.txt").write_bytes(
        "Caf\u00e9 cr\u00e8me, d\u00e9j\u00e0 vu.".encode("latin-1") + " a real \ufffd".encode()
    )
    # a valid U+FFFD (and a check mark) cut in two by the reader's 1 MiB reads: not undecodable
    filler = "y " * ((sources.READ_BYTES - 2) // 2) + "y"
    (corpus / "b.txt.gz").write_bytes(gzip.compress(f"{filler}\ufffd{filler}\u2713 end".encode()))
    result = run_cli(f"--input={corpus}", f"--out_dir={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr
    assert "replaced 4 undecodable byte sequences with U+FFFD in " in result.stderr and "a.txt" in result.stderr
    assert "b.txt.gz" not in result.stderr
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["replaced_undecodable"] == 4
    reassemble(
        ["Caf\ufffd cr\ufffdme, d\ufffdj\ufffd vu. a real \ufffd", f"{filler}\ufffd{filler}\u2713 end"],
        tmp_path / "out",
    )


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda d: d / "missing", "no such file or directory"),
        (lambda d: d, "no .txt, .txt.gz, .jsonl or .parquet files"),
        (lambda d: write_text_files(d / "empty", ["", ""]), "has no text"),
        (lambda d: write_text_files(d / "tiny", ["one short document"]), "too little to hold out"),
    ],
)
def test_bad_input_is_a_one_line_error_and_writes_nothing(tmp_path, make_input, message):
    out = tmp_path / "out"
    result = run_cli(f"--input={make_input(tmp_path)}", f"--out_dir={out}")
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and message in result.stderr and "prepare.py: error:" in result.stderr
    assert not out.exists()


def test_tokenizer_with_ids_above_uint16_is_refused(tmp_path, monkeypatch):
    gpt2 = get_tokenizer()
    wide = tiktoken.Encoding(
        name="wide",
        pat_str=gpt2._pat_str,
        mergeable_ranks=gpt2._mergeable_ranks,
        special_tokens={"<|endoftext|>": 70000},
    )
    monkeypatch.setattr(prepare, "get_tokenizer", lambda: wide)
    with pytest.raises(ValueError, match="ids up to 70000.*uint16"):
        run("--dataset=austen", f"--out_dir={tmp_path / 'out'}")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="does not fit in uint16"):
        write_shard(tmp_path / "wide.bin", np.array([1, 70000]))
    assert not list(tmp_path.iterdir())


def test_disk_full_is_a_one_line_error_and_leaves_no_partial_shard(tmp_path):
    resource = pytest.importorskip("resource", reason="file size limits are POSIX-only")
    corpus = write_text_files(tmp_path / "docs", AUSTEN[:2])

    def small_disk():  # files stop growing at 200 kB, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    out = tmp_path / "out"
    result = run_cli(f"--input={corpus}", f"--out_dir={out}", "--shard_tokens=300000", preexec_fn=small_disk)
    assert result.returncode != 0 and result.stderr.count("\n") == 1
    assert f"writing {out / 'train_000000.bin'} failed: File too large" in result.stderr and "rerun" in result.stderr
    names = [p.name for p in out.iterdir()]
    assert "meta.json" not in names and not any(n.endswith(".tmp") for n in names)


@pytest.mark.parametrize("offline", ["0", "1"])
def test_default_bookcorpus_run_fails_fast_offline(tmp_path, silent_hub, offline):
    """A Hub out of reach fails in check_hub, before datasets' own retries (~25 s) start; told it is
    offline, nothing reaches for the Hub."""
    endpoint, connections_made = silent_hub
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": offline}
    result = run_cli(f"--out_dir={tmp_path / 'bookcorpus'}", env=env)
    if offline == "1":
        assert connections_made() == 0
    else:
        assert "cannot reach the Hugging Face Hub for bookcorpus/bookcorpus" in result.stderr, result.stderr
    assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
    assert "--dataset=austen" in result.stderr and "--input=PATH" in result.stderr
    assert not (tmp_path / "bookcorpus").exists()


def one_line_error(result: subprocess.CompletedProcess, *parts: str) -> None:
    """prepare.py failed with one line, `prepare.py: error: ...`, holding each of parts; no traceback."""
    assert result.returncode != 0 and result.stderr.startswith("prepare.py: error: "), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    for part in parts:
        assert part in result.stderr, result.stderr


def test_only_prepares_own_temp_files_are_removed(tmp_path):
    corpus = write_text_files(tmp_path / "docs", SMALL_DOCS)
    out = tmp_path / "out"
    out.mkdir()
    for name in ["notes.tmp", "train_000000.bin.tmp", "progress.json.tmp", "train_7.bin.tmp"]:
        (out / name).write_text("left here")
    run(f"--input={corpus}", f"--out_dir={out}", "--block_chars=256")
    assert sorted(p.name for p in out.glob("*.tmp")) == ["notes.tmp", "train_7.bin.tmp"]
    run(f"--input={corpus}", f"--out_dir={out}", "--block_chars=256", "--force")
    assert sorted(p.name for p in out.glob("*.tmp")) == ["notes.tmp", "train_7.bin.tmp"]


def test_text_with_a_byte_order_mark_is_decoded_as_it_announces(tmp_path):
    documents = [AUSTEN[0][:3000], AUSTEN[1][:3000], AUSTEN[2][:3000], AUSTEN[3][:3000] + " caf\u00e9 \u2713"]
    corpus = tmp_path / "marked"
    corpus.mkdir()
    (corpus / "0.txt").write_bytes(documents[0].encode("utf-8-sig"))
    (corpus / "1.txt").write_bytes(documents[1].encode("utf-16"))  # a mark, then the machine's byte order
    (corpus / "2.txt.gz").write_bytes(gzip.compress(documents[2].encode("utf-16-be").join([b"\xfe\xff", b""])))
    (corpus / "3.txt").write_bytes(documents[3].encode("utf-32"))
    run(f"--input={corpus}", f"--out_dir={tmp_path / 'out'}")
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["replaced_undecodable"] == 0
    reassemble(documents, tmp_path / "out")


@pytest.mark.parametrize(
    "content, message",
    [
        (AUSTEN[0][:8000].encode("utf-16-le"), "is not UTF-8 text: 8,000 of its first 16,000 characters"),
        (random.Random(0).randbytes(20_000), "is not UTF-8 text"),
        (AUSTEN[0][:8000].encode() + bytes(8000), "is not UTF-8 text"),
    ],
    ids=["utf-16-without-mark", "random-bytes", "mostly-nul"],
)
def test_text_that_is_mostly_nul_or_undecodable_is_refused_naming_the_file(tmp_path, content, message):
    corpus = write_text_files(tmp_path / "docs", AUSTEN[1:3])
    (corpus / "bad.txt").write_bytes(content)
    result = run_cli(f"--input={corpus}", f"--out_dir={tmp_path / 'out'}")
    one_line_error(result, f"{corpus / 'bad.txt'} {message}", "convert it to UTF-8")
    assert not (tmp_path / "out" / "meta.json").exists()


def test_a_directory_is_read_with_its_subdirectories_and_any_case_extension_and_says_what_it_read(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / ".git").mkdir()
    documents = {"B.TXT": AUSTEN[0][:5000], "a.txt": AUSTEN[1][:5000], "sub/c.Txt.GZ": AUSTEN[2][:5000]}
    for name, text in documents.items():
        (corpus / name).write_bytes(gzip.compress(text.encode()) if name.lower().endswith(".gz") else text.encode())
    (corpus / "d.md").write_text("# not read")
    (corpus / ".notes.txt").write_text("hidden: not read")
    (corpus / ".git" / "e.txt").write_text("in a hidden directory: not read")
    if os.name == "posix":
        (corpus / "link").symlink_to(corpus / "sub")  # would read c.Txt.GZ twice
    result = run_cli(f"--input={corpus}", f"--out_dir={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr
    assert f"--input={corpus}: reading 3 text files; skipped 1 not a .txt, .txt.gz, .jsonl or .parquet file (d.md)" in (
        result.stdout
    )
    assert "2 hidden (.git, .notes.txt)" in result.stdout
    assert os.name != "posix" or "1 links to directories (link)" in result.stdout
    reassemble(list(documents.values()), tmp_path / "out")  # in sorted order, subdirectories included


def interrupted_run(args: list[str], monkeypatch, after_writes: int) -> None:
    """A run stopped by Ctrl-C after some shard writes, leaving progress.json and finished shards."""
    real_write, writes = prepare.ShardWriter.write, 0

    def failing_write(self, tokens):
        nonlocal writes
        writes += 1
        if writes == after_writes:
            raise KeyboardInterrupt
        real_write(self, tokens)

    with monkeypatch.context() as patch:
        patch.setattr(prepare.ShardWriter, "write", failing_write)
        with pytest.raises(KeyboardInterrupt):
            run(*args)


def test_a_resume_over_changed_input_files_starts_over_and_says_so(tmp_path, monkeypatch, capsys):
    corpus = write_text_files(tmp_path / "docs", SMALL_DOCS)
    args = [f"--input={corpus}", "--val_fraction=0.3", "--shard_tokens=1025", "--block_chars=300"]
    interrupted_run([*args, f"--out_dir={tmp_path / 'resumed'}"], monkeypatch, after_writes=40)
    assert (tmp_path / "resumed" / "progress.json").exists()
    edited = [f"{document} An edit." for document in SMALL_DOCS]
    (corpus / "0000.txt").write_text(edited[0], encoding="utf-8")  # a changed size
    capsys.readouterr()
    run(*args, f"--out_dir={tmp_path / 'resumed'}")
    assert "the input changed since the interrupted run" in capsys.readouterr().out
    reassemble([edited[0], *SMALL_DOCS[1:]], tmp_path / "resumed")

    # the same size, a new modification time: also a change
    interrupted_run([*args, "--force", f"--out_dir={tmp_path / 'resumed'}"], monkeypatch, after_writes=40)
    (corpus / "0005.txt").write_text(SMALL_DOCS[5].upper(), encoding="utf-8")
    os.utime(corpus / "0005.txt", ns=(1, 1))
    run(*args, f"--out_dir={tmp_path / 'resumed'}")
    assert "starting over" in capsys.readouterr().out
    reassemble([edited[0], *SMALL_DOCS[1:5], SMALL_DOCS[5].upper(), *SMALL_DOCS[6:]], tmp_path / "resumed")
    with pytest.raises(ValueError, match="other settings .*input.*--force"):  # a finished preparation is kept
        (corpus / "0001.txt").unlink()
        run(*args, f"--out_dir={tmp_path / 'resumed'}")


def test_a_damaged_progress_file_starts_over(tmp_path, monkeypatch, capsys):
    corpus = write_text_files(tmp_path / "docs", SMALL_DOCS)
    args = [f"--input={corpus}", "--val_fraction=0.3", "--shard_tokens=1025", "--block_chars=300"]
    run(*args, f"--out_dir={tmp_path / 'clean'}")
    interrupted_run([*args, f"--out_dir={tmp_path / 'out'}"], monkeypatch, after_writes=40)
    (tmp_path / "out" / "progress.json").write_text('{"splits": {"train": [{"file": 3}]}}')
    capsys.readouterr()
    run(*args, f"--out_dir={tmp_path / 'out'}")
    assert "progress.json is damaged" in capsys.readouterr().out
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "clean")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps({"id": i, "text": text}) + "\n" for i, text in enumerate(rows)))
    return path


def test_rows_whose_text_is_not_a_string_are_refused_naming_the_file_and_line(tmp_path):
    rows = tmp_path / "rows"
    rows.mkdir()
    write_jsonl(rows / "a.jsonl", SMALL_DOCS[:60])
    write_jsonl(rows / "b.jsonl", [*SMALL_DOCS[60:63], 12345, *SMALL_DOCS[63:]])
    result = run_cli(f"--input={rows / 'b.jsonl'}", f"--out_dir={tmp_path / 'one'}")
    one_line_error(result, f"{rows / 'b.jsonl'}: line 4: 'text' is 12345, not a string", "fix the file")
    result = run_cli(f"--input={rows}", f"--out_dir={tmp_path / 'both'}")  # read as one dataset
    one_line_error(result, f"{rows / 'b.jsonl'}: line 4: 'text' is 12345, not a string")
    assert not (tmp_path / "one" / "meta.json").exists() and not (tmp_path / "both" / "meta.json").exists()


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("a.txt.gz", b"plain text, not gzip " * 300, "is not gzip data"),
        ("a.txt.gz", gzip.compress(AUSTEN[0][:20_000].encode())[:3000], "is truncated or damaged gzip data"),
        ("b.jsonl", b'{"text": "a row"}\n{"text": "a row cut sho', "line 2 is not JSON"),
        ("b.jsonl", b'{"text": "a row"}\n\nnot json at all\n', "line 3 is not JSON"),
        ("b.parquet", random.Random(0).randbytes(5000), "is not a readable Parquet file"),
    ],
    ids=["not-gzip", "truncated-gzip", "truncated-jsonl", "malformed-jsonl", "random-parquet"],
)
def test_a_damaged_input_file_is_one_line_naming_it(tmp_path, name, content, message):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    if name.endswith(".jsonl"):
        write_jsonl(corpus / "a.jsonl", SMALL_DOCS)
    elif name.endswith(".parquet"):
        pq.write_table(pa.table({"text": SMALL_DOCS}), corpus / "a.parquet")
    else:
        write_text_files(corpus / "sub", AUSTEN[:1])
    (corpus / name).write_bytes(content)
    result = run_cli(f"--input={corpus}", f"--out_dir={tmp_path / 'out'}", "--block_chars=2000")
    one_line_error(result, f"{corpus / name}", message, "leave it out of --input")


def test_empty_row_files_are_skipped_and_said(tmp_path):
    rows = tmp_path / "rows"
    rows.mkdir()
    (rows / "a.jsonl").write_text("")
    write_jsonl(rows / "b.jsonl", SMALL_DOCS)
    result = run_cli(f"--input={rows}", f"--out_dir={tmp_path / 'out'}", "--block_chars=300")
    assert result.returncode == 0, result.stderr
    assert "reading 1 jsonl file; skipped 1 empty (a.jsonl)" in result.stdout
    reassemble(SMALL_DOCS, tmp_path / "out")
    one_line_error(
        run_cli(f"--input={rows / 'a.jsonl'}", f"--out_dir={tmp_path / 'none'}"), "skipped 1 empty (a.jsonl)"
    )


@pytest.mark.parametrize(
    "limit, shard_tokens, failed", [(99_000, 50_000, "train_000000.bin"), (8000, 1025, "progress.json")]
)
def test_a_full_disk_anywhere_is_one_line_and_leaves_no_temp_file(tmp_path, limit, shard_tokens, failed):
    resource = pytest.importorskip("resource", reason="file size limits are POSIX-only")
    corpus = write_text_files(tmp_path / "docs", AUSTEN[:2])

    def small_disk():  # files stop growing at `limit` bytes, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "out"
    result = run_cli(f"--input={corpus}", f"--out_dir={out}", f"--shard_tokens={shard_tokens}", preexec_fn=small_disk)
    one_line_error(result, f"writing {out / failed} failed: File too large; free disk space and rerun")
    names = [p.name for p in out.iterdir()]
    assert "meta.json" not in names and not any(n.endswith(".tmp") for n in names)


def test_out_dir_that_is_a_file_is_one_line_saying_so(tmp_path):
    corpus = write_text_files(tmp_path / "docs", SMALL_DOCS)
    (tmp_path / "out").write_text("a file the user keeps")
    result = run_cli(f"--input={corpus}", f"--out_dir={tmp_path / 'out'}")
    one_line_error(result, f"--out_dir={tmp_path / 'out'} is a file; pass a directory")
    assert "disk space" not in result.stderr and (tmp_path / "out").read_text() == "a file the user keeps"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda out: (out / "meta.json").write_text('{"splits": '), "meta.json is not valid JSON"),
        (lambda out: (out / "meta.json").write_text('{"vocab_size": 50257}'), "'format_version' is None"),
        (
            lambda out: (out / "meta.json").write_text(
                json.dumps({**json.loads((out / "meta.json").read_text()), "format_version": 1})
            ),
            "'format_version' is 1, prepared by an older prepare.py; rerun prepare.py",
        ),
        (lambda out: (out / "train_000001.bin").write_bytes(b"\0" * 100), "train_000001.bin: truncated shard"),
        (lambda out: (out / "val_000000.bin").unlink(), "val_000000.bin not found"),
    ],
    ids=["meta-invalid-json", "meta-missing-key", "meta-older-format", "truncated-shard", "missing-shard"],
)
def test_a_damaged_preparation_is_not_reported_as_prepared(tmp_path, damage, message):
    corpus = write_text_files(tmp_path / "docs", SMALL_DOCS)
    args = [f"--input={corpus}", f"--out_dir={tmp_path / 'out'}", "--shard_tokens=1025", "--val_fraction=0.3"]
    run(*args)
    damage(tmp_path / "out")
    one_line_error(run_cli(*args), message, "--force")
    forced = run_cli(*args, "--force")
    assert forced.returncode == 0 and f"--force: replacing {tmp_path / 'out'}, " in forced.stdout, forced.stderr
    reassemble(SMALL_DOCS, tmp_path / "out")


def test_a_directory_another_prepare_is_writing_is_refused_at_once(tmp_path):
    corpus = write_text_files(tmp_path / "docs", SMALL_DOCS)
    args = [f"--input={corpus}", "--block_chars=300"]
    with FileLock(tmp_path / "out.lock"):  # as a first prepare.py on tmp_path / "out" holds it
        result = run_cli(*args, f"--out_dir={corpus / '..' / 'out'}")  # the same directory, spelled otherwise
    one_line_error(result, "is in use by another prepare.py", f"(it holds {tmp_path / 'out.lock'}); wait for it")
    assert not (tmp_path / "out").exists()
    run(*args, f"--out_dir={tmp_path / 'out'}")  # released: the lock is taken and given back
    reassemble(SMALL_DOCS, tmp_path / "out")


def test_a_finished_preparation_in_a_read_only_folder_is_reported_as_prepared(tmp_path):
    corpus = write_text_files(tmp_path / "docs", SMALL_DOCS)
    folder = tmp_path / "shared"
    args = [f"--input={corpus}", f"--out_dir={folder / 'out'}", "--block_chars=300"]
    run(*args)
    (folder / "out.lock").unlink()
    (folder / "out.lock").mkdir()  # no lock can be taken there, even by root, whom the modes below do not stop
    for path in (folder / "out", folder):
        path.chmod(0o555)
    try:
        read, write = run_cli(*args), run_cli(*args, "--force")
    finally:
        for path in (folder, folder / "out"):
            path.chmod(0o755)
    assert read.returncode == 0 and "is already prepared" in read.stdout, read.stderr
    one_line_error(write, "--out_dir")  # a run that must write needs write access and the lock
    reassemble(SMALL_DOCS, folder / "out")


@pytest.mark.parametrize(
    "pattern, name",
    [
        ("in/books.v2.txt", "books.v2"),
        ("in/books.v2.TXT.gz", "books.v2"),
        ("in/rows.jsonl", "rows"),
        ("in/part.0.parquet", "part.0"),
        ("in/.notes.txt", "notes"),
        ("in/books.d", "books.d"),
        ("in/books.d/*.txt", "books.d"),
    ],
)
def test_a_dataset_is_named_after_its_input_less_only_the_input_extension(pattern, name):
    assert prepare.input_name(pattern) == name


def test_an_input_that_leaves_no_name_asks_for_out_dir():
    with pytest.raises(ValueError, match="--input=in/.txt leaves the dataset no name; pass --out_dir"):
        prepare.input_name("in/.txt")


def test_a_directory_holding_another_sources_dataset_is_refused_naming_it_and_forced_says_what_it_replaces(tmp_path):
    first = write_text_files(tmp_path / "first", SMALL_DOCS)
    second = write_text_files(tmp_path / "second", [document.upper() for document in SMALL_DOCS])
    out = tmp_path / "out"
    run(f"--input={first}", f"--out_dir={out}", "--block_chars=300")
    splits = json.loads((out / "meta.json").read_text())["splits"]
    held = f"the dataset of {first} ({splits['train']['tokens']:,} train and {splits['val']['tokens']:,} val tokens)"
    result = run_cli(f"--input={second}", f"--out_dir={out}", "--block_chars=300")
    one_line_error(result, f"{out} holds {held}, another source; pass another --out_dir (--force would delete it")
    reassemble(SMALL_DOCS, out)  # untouched
    result = run_cli(f"--input={second}", f"--out_dir={out}", "--block_chars=300", "--force")
    assert result.returncode == 0 and f"--force: replacing {out}, {held}" in result.stdout, result.stderr
    reassemble([document.upper() for document in SMALL_DOCS], out)


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--dataset=a/b/c", "--dataset=a/b/c: not bookcorpus, austen or a Hub dataset's owner/name"),
        ("--text_column=", "--text_column is empty; name the column that holds the text"),
        ("--split=", "--split is empty; name a split"),
        ("--revision=", "--revision is empty; name a branch or commit"),
        ("--out_dir=/", "--out_dir=/ is the root of the file system; pass a directory under it"),
        ("--val_fraction=1", "--val_fraction=1.0: need 0 <= val_fraction < 1"),
        ("--val_fraction=nan", "--val_fraction=nan: need 0 <= val_fraction < 1"),
        ("--seed=1.5", "--seed=1.5: expected int"),
        ("--shard_tokens=1024", "--shard_tokens=1024: need 1,025 to 2,147,483,647 (a window of GPT-2's context"),
        ("--shard_tokens=2147483648", "--shard_tokens=2147483648: need 1,025 to 2,147,483,647"),
        ("--block_chars=255", "--block_chars=255: need 256 or more (spaces to cut chunks at)"),
        ("--workers=0", "--workers=0: need 1 or more"),
        ("--force=maybe", "--force=maybe: expected bool"),
    ],
)
def test_each_setting_out_of_range_is_one_line_naming_it_before_anything_is_read(tmp_path, monkeypatch, arg, message):
    monkeypatch.chdir(tmp_path)  # the default out_dir, data/bookcorpus, is relative to the repository, not here
    with pytest.raises(ValueError) as error:
        run(arg, *(["--out_dir=out"] if not arg.startswith("--out_dir") else []))
    assert str(error.value).startswith(message), error.value
    assert not list(tmp_path.iterdir())
