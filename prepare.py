"""Tokenizes a corpus into uint16 token shards for train.py: fast, in bounded memory, resumable.

    python prepare.py                         # BookCorpus from the Hugging Face Hub
    python prepare.py --dataset=austen        # the six Austen novels bundled in assets/ (offline)
    python prepare.py --input='books/*.txt'   # .txt(.gz): a document per file; .jsonl/.parquet: one per row
    python prepare.py --dataset=owner/name --text_column=text --split=train   # any Hub dataset, streamed

Writes data/<name>/{train,val}_NNNNNN.bin in llm.c's format (shards.py) and meta.json; <name> is the
dataset's, or --input's file or folder name less its input extension (input_name). A directory that holds
another source's dataset is refused. Each document starts with <|endoftext|>, as in llm.c; BookCorpus rows
are sentences of one running text, joined by spaces.

Input (sources.py reads it): --input takes a file, a glob, or a directory and all files under it but
hidden ones. Text is UTF-8 unless a byte-order mark says UTF-16 or UTF-32; undecodable bytes become
U+FFFD (counted, warned), and a file that is mostly NUL or undecodable is refused. Row files are checked
before they are read together; a damaged file is one line naming it, and the line of a .jsonl at fault.

Validation (chunks.py): the text goes in chunks of ~block_chars characters, each held out with probability
val_fraction; the share held out suits the input's size.

Speed and memory: the main thread reads and cuts chunks, `workers` threads tokenize them (tiktoken
releases the GIL), at most 2 * workers chunks are in flight and shards stream to disk: peak RSS does
not grow with the corpus. Rows streamed through `datasets` (.jsonl, .parquet, the Hub) take several
times the memory of text files: pyarrow decodes a Parquet row group at a time (BENCHMARKS.md).

Crash safety: a shard is written under a temp name and renamed once complete, then progress.json records
where it ended in the input, and the input files' names, sizes and modification times. A rerun over
the same files verifies those shards, reads the input again and tokenizes only what follows them: its
output is byte-identical to an uninterrupted run's; over changed files it starts over. meta.json,
written last, marks a finished preparation, whose shards a rerun checks, reading only (a read-only folder
will do); --force rebuilds from scratch.
Only prepare's own files (OWN_FILE) are ever deleted in the output directory. While prepare writes it
holds <out_dir>.lock beside it (data/<name>.lock), as train.py holds out/<run>.lock: a second prepare.py
on the same directory, however its path is spelled, is refused at once.
"""

import collections
import errno
import hashlib
import itertools
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

import configurator
from checksums import is_sha256
from chunks import MIN_BLOCK_CHARS, Unit, sized_chunks, split_chunks
from common import UserError, atomic_write_bytes, hold_lock
from shards import FORMAT_VERSION, MAX_TOKENS, ShardWriter, is_count, open_shard, read_meta
from sources import (
    PARQUET_EXPORT,
    ROW_FORMATS,
    dataset_documents,
    input_kind,
    input_stem,
    local_files,
    text_file_pieces,
)
from tokenizer import EOT_ID, RANKS_SHA256, VOCAB_SIZE, get_tokenizer

ROOT = Path(__file__).parent
AUSTEN_GLOB = "assets/austen/*.txt.gz"
# datasets 4+ no longer runs loading scripts, and bookcorpus/bookcorpus has one: its Parquet export is read
BOOKCORPUS = "bookcorpus/bookcorpus"
BOOKCORPUS_REVISION = PARQUET_EXPORT
OFFLINE_HINT = "offline, use --dataset=austen (bundled) or --input=PATH (.txt, .jsonl or .parquet files)"
# what prepare writes in out_dir, with temp names: all it ever deletes there
OWN_FILE = re.compile(r"((train|val)_\d{6}\.bin|(meta|progress)\.json)(\.tmp)?")
SPLITS = ("train", "val")
# windows never cross shards: a shard shorter than one window (block_size + 1) at GPT-2's context is never read
MIN_SHARD_TOKENS = 1024 + 1
HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")  # a Hub dataset's name, with or without its owner
# the CPUs this process may use (as os.process_cpu_count of Python 3.13; affinity is Linux-only)
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class PrepareConfig:
    dataset: str = "bookcorpus"  # bookcorpus, austen (bundled) or a Hub dataset (owner/name)
    input: str = ""  # local .txt/.txt.gz/.jsonl/.parquet file, directory (all under it) or glob; replaces dataset
    text_column: str = "text"  # .jsonl/.parquet/Hub rows: the column holding the text
    split: str = "train"  # Hub datasets: the split to read; validation is carved out of it here
    revision: str | None = None  # Hub datasets: branch or commit (bookcorpus: refs/convert/parquet)
    out_dir: str = ""  # where the shards go; empty: data/<name of the dataset or input>
    val_fraction: float = 0.0015  # chance that a chunk of text is held out for validation (see the module docstring)
    seed: int = 1337  # seeds the validation draws: the same seed and input give the same split
    shard_tokens: int = 100_000_000  # tokens per shard file, >= 1025: one window of GPT-2's 1024-token context each
    block_chars: int = 1 << 18  # characters per chunk (a val draw, a tokenizer task); >= 256: spaces to cut at
    workers: int = CPUS  # tokenizer threads; default: the CPUs this process may use
    force: bool = False  # delete this dataset's shards and rebuild


def check_config(cfg: PrepareConfig) -> None:
    """Each value's range, as one line naming the key (configurator has checked the types)."""
    if not cfg.input and not HUB_NAME.fullmatch(cfg.dataset):
        raise UserError(f"--dataset={cfg.dataset}: not bookcorpus, austen or a Hub dataset's owner/name")
    for key, meaning in (("text_column", "the column that holds the text"), ("split", "a split, such as train")):
        if not getattr(cfg, key):
            raise UserError(f"--{key} is empty; name {meaning}")
    if cfg.revision == "":
        raise UserError("--revision is empty; name a branch or commit, or leave it None")
    if cfg.out_dir and Path(cfg.out_dir).resolve() == Path(cfg.out_dir).resolve().parent:
        raise UserError(f"--out_dir={cfg.out_dir} is the root of the file system; pass a directory under it")
    if not 0 <= cfg.val_fraction < 1:
        raise UserError(f"--val_fraction={cfg.val_fraction}: need 0 <= val_fraction < 1")
    if not MIN_SHARD_TOKENS <= cfg.shard_tokens <= MAX_TOKENS:
        raise UserError(
            f"--shard_tokens={cfg.shard_tokens}: need {MIN_SHARD_TOKENS:,} to {MAX_TOKENS:,} (a window of GPT-2's "
            "context fits in a shard; the header counts in int32)"
        )
    if cfg.block_chars < MIN_BLOCK_CHARS:
        raise UserError(f"--block_chars={cfg.block_chars}: need {MIN_BLOCK_CHARS} or more (spaces to cut chunks at)")
    if cfg.workers < 1:
        raise UserError(f"--workers={cfg.workers}: need 1 or more")
    max_id = get_tokenizer().max_token_value
    if max_id > np.iinfo(np.uint16).max:
        raise UserError(
            f"the tokenizer has ids up to {max_id}, but shards store uint16 (at most 65535); "
            "use a GPT-2-sized vocabulary"
        )


def input_fingerprint(files: list[Path]) -> dict:
    """Names, sizes and modification times of the input files: a resume over changed files starts over."""
    stats = [(os.path.abspath(path), path.stat().st_size, path.stat().st_mtime_ns) for path in files]
    return {
        "files": len(stats),
        "bytes": sum(size for _, size, _ in stats),
        "sha256": hashlib.sha256(json.dumps(stats).encode()).hexdigest(),
    }


def input_name(pattern: str) -> str:
    """The dataset's name (data/<name>) for --input: the file or directory it names (a glob: the path up
    to its first wildcard, so books/*.txt is books), less the extension that makes it an input and any
    leading dots."""
    name = input_stem(Path(re.split(r"[*?\[]", pattern)[0]).resolve()).lstrip(".")
    if not name:
        raise UserError(f"--input={pattern} leaves the dataset no name; pass --out_dir")
    return name


def open_source(cfg: PrepareConfig, replaced: collections.Counter):
    """Returns (name, source description, documents, the local files or None, a line on what is read or
    None); a document is an iterable of text pieces."""
    if cfg.input or cfg.dataset == "austen":
        files, summary = local_files(cfg.input) if cfg.input else (sorted(ROOT.glob(AUSTEN_GLOB)), None)
        name = input_name(cfg.input) if cfg.input else "austen"
        where = os.path.abspath(cfg.input) if cfg.input else AUSTEN_GLOB  # one source however it is spelled
        kind = input_kind(files[0])
        if kind in ROW_FORMATS:
            source = f"{where} column {cfg.text_column}"
            documents = dataset_documents(
                ROW_FORMATS[kind], source, cfg.text_column, sentences=False, files=files, hint=OFFLINE_HINT,
                data_files=[str(f) for f in files], split="train",
            )  # fmt: skip
            return name, source, documents, files, summary
        return name, where, (text_file_pieces(f, replaced) for f in files), files, summary
    bookcorpus = cfg.dataset == "bookcorpus"
    repo = BOOKCORPUS if bookcorpus else cfg.dataset
    revision = cfg.revision or (BOOKCORPUS_REVISION if bookcorpus else None)
    source = f"hf://datasets/{repo}@{revision or 'main'} split {cfg.split} column {cfg.text_column}"
    documents = dataset_documents(
        repo, source, cfg.text_column, sentences=bookcorpus, files=[], hint=OFFLINE_HINT, revision=revision,
        split=cfg.split,
    )  # fmt: skip
    return repo.split("/")[-1], source, documents, None, None


def tokenize(units, workers: int):
    """Yields (unit, tokens) in order; threads encode up to 2 * workers units ahead of the consumer."""
    encoding = get_tokenizer()
    eot = np.array([EOT_ID], np.uint32)

    def encode(unit: Unit) -> np.ndarray:
        # encode_to_numpy skips building a Python list; disallowed_special=() makes a literal
        # "<|endoftext|>" in the text ordinary text, as encode_ordinary does
        parts = []
        for starts_with_eot, text in unit.pieces:
            if starts_with_eot:
                parts.append(eot)
            parts.append(encoding.encode_to_numpy(text, disallowed_special=()))
        return np.concatenate(parts)

    with ThreadPoolExecutor(workers) as pool:
        pending = collections.deque()
        for unit in units:
            pending.append((unit, pool.submit(encode, unit)))
            if len(pending) >= 2 * workers:
                unit, future = pending.popleft()
                yield unit, future.result()
        for unit, future in pending:
            yield unit, future.result()


class SplitWriter:
    """Cuts one split's tokens into shards of shard_tokens, continuing after `shards` already written.

    Each completed shard records `end` = [unit index, token offset] where it stopped, so a rerun can
    skip the units before it and the first `offset` tokens of that unit.
    """

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, shards: list[dict]):
        self.out_dir, self.split, self.shard_tokens, self.shards = out_dir, split, shard_tokens, shards
        self.resume = shards[-1]["end"] if shards else [0, 0]
        self.shard, self.documents = None, 0

    def add(self, index: int, tokens: np.ndarray) -> bool:
        """Writes a unit's tokens; returns whether that completed a shard."""
        offset = self.resume[1] if index == self.resume[0] else 0
        completed = False
        try:
            while offset < len(tokens):
                if self.shard is None:
                    self.out_dir.mkdir(parents=True, exist_ok=True)
                    self.shard, self.documents = ShardWriter(self.next_path()), 0
                part = tokens[offset : offset + self.shard_tokens - self.shard.tokens]
                self.shard.write(part)
                self.documents += int(np.count_nonzero(part == EOT_ID))
                offset += len(part)
                if self.shard.tokens == self.shard_tokens:
                    self.close_shard(end=[index, offset])
                    completed = True
        except OSError as e:
            raise write_error(self.next_path(), e) from None
        return completed

    def finish(self):
        """Closes the last, partly filled shard."""
        if self.shard is not None:
            try:
                self.close_shard(end=None)
            except OSError as e:
                raise write_error(self.next_path(), e) from None

    def next_path(self) -> Path:
        return self.out_dir / f"{self.split}_{len(self.shards):06d}.bin"

    def close_shard(self, end):
        self.shard.close()
        self.shards.append(
            {
                "file": self.shard.path.name,
                "tokens": self.shard.tokens,
                "documents": self.documents,
                "sha256": self.shard.sha256,
                "end": end,
            }
        )
        self.shard = None

    def abort(self):
        if self.shard is not None:
            self.shard.abort()


def write_error(path: Path, error: OSError) -> UserError:
    """A failed write as one line, with the fix its cause calls for."""
    if error.errno in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)):
        fix = "free disk space and rerun, finished shards are reused"
    else:
        fix = "check that --out_dir is a directory you can write to, or pass another"
    return UserError(f"writing {path} failed: {error.strerror or error}; {fix}")


def write_json(path: Path, data: dict) -> None:
    try:
        atomic_write_bytes(path, json.dumps(data, indent=1).encode())
    except OSError as e:
        raise write_error(path, e) from None


def remove_own_files(out_dir: Path, temps_only: bool) -> None:
    """Deletes what prepare wrote in out_dir (OWN_FILE), or only its temp files; nothing else there."""
    try:
        for path in out_dir.iterdir():
            if OWN_FILE.fullmatch(path.name) and (path.name.endswith(".tmp") or not temps_only):
                path.unlink()
    except OSError as e:
        raise UserError(f"cleaning up {e.filename} failed: {e.strerror or e}; remove it yourself and rerun") from None


def changed_settings(saved: dict, settings: dict) -> list[str]:
    return [key for key in settings if saved.get(key) != settings[key]]


def input_change(saved: dict, settings: dict) -> str:
    """How the input files differ from those recorded in `saved` (a fingerprint only tells so much)."""
    then, now = saved.get("input") or {}, settings["input"]
    counts = [
        f"{input_['files']:,} files, {input_['bytes']:,} bytes" if input_ else "unrecorded" for input_ in (then, now)
    ]
    return f"{counts[0]} then, {counts[1]} now" if counts[0] != counts[1] else "files modified since"


def holdings(out_dir: Path) -> str | None:
    """What out_dir holds, in words: the source and token counts its meta.json (or, for an interrupted
    run, progress.json) records, as far as they read; None where it holds neither file."""
    for name, what in (("meta.json", "the dataset"), ("progress.json", "an interrupted preparation")):
        if (out_dir / name).is_file():
            try:
                saved = json.loads((out_dir / name).read_bytes())
                splits = saved["splits"]
                train, val = (
                    splits[split]["tokens"] if name == "meta.json" else sum(shard["tokens"] for shard in splits[split])
                    for split in SPLITS
                )
                return f"{what} of {saved['source']} ({train:,} train and {val:,} val tokens)"
            except (OSError, ValueError, KeyError, TypeError):
                return f"a damaged {name}"
    return None


def other_settings(out_dir: Path, saved: dict, changed: list[str], settings: dict) -> UserError:
    if "source" in changed:
        return UserError(
            f"{out_dir} holds {holdings(out_dir)}, another source; pass another --out_dir "
            "(--force would delete it, and a run trained on it could not resume)"
        )
    named = [f"input: {input_change(saved, settings)}" if key == "input" else key for key in changed]
    return UserError(
        f"{out_dir} holds shards prepared with other settings ({', '.join(named)}); "
        "pass another --out_dir, or --force to rebuild it"
    )


def read_progress(path: Path) -> tuple[dict | None, str]:
    """progress.json, or (None, what is wrong) where it cannot guide a resume: the run then starts over."""
    try:
        progress = json.loads(path.read_bytes())
        for split in SPLITS:
            for shard in progress["splits"][split]:
                if not (
                    isinstance(shard["file"], str)
                    and all(map(is_count, (shard["tokens"], shard["documents"], *shard["end"])))
                    and is_sha256(shard["sha256"])
                    and len(shard["end"]) == 2
                ):
                    raise ValueError(f"shard entry {shard} is not a completed shard")
        return progress, ""
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        return None, f"{type(e).__name__}: {e}"


def intact(out_dir: Path, shard: dict) -> bool:
    try:
        open_shard(out_dir, shard, VOCAB_SIZE)
        return True
    except (OSError, UserError):  # missing, truncated, not a shard, other tokens
        return False


def check_out_dir(out_dir: Path) -> None:
    """Refuses an out_dir that prepare cannot write in."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out_dir={out_dir} is a file; pass a directory (it is created if missing)")
    if out_dir.is_dir() and not os.access(out_dir, os.R_OK | os.W_OK | os.X_OK):
        raise UserError(f"--out_dir={out_dir} is a directory you cannot read and write; pass another")


def already_prepared(out_dir: Path, settings: dict) -> bool:
    """Whether out_dir holds a finished preparation of these settings, its shards intact; one of other
    settings is an error."""
    if not (out_dir / "meta.json").exists():
        return False
    meta = read_meta(out_dir)
    if changed := changed_settings(meta, settings):
        raise other_settings(out_dir, meta, changed, settings)
    for split in SPLITS:  # a finished preparation is only as good as its shards
        for shard in meta["splits"].get(split, {}).get("shards", []):
            open_shard(out_dir, shard, VOCAB_SIZE)
    train_tokens = sum(shard["tokens"] for shard in meta["splits"].get("train", {}).get("shards", []))
    print(f"{out_dir} is already prepared ({train_tokens:,} train tokens); --force rebuilds it")
    return True


def completed_shards(out_dir: Path, progress_path: Path, settings: dict) -> dict[str, list[dict]]:
    """The shards of each split that an interrupted run of these settings completed and left intact;
    none where there is no such run, the input changed or the progress file is damaged."""
    completed = {split: [] for split in SPLITS}
    if not progress_path.exists():
        return completed
    progress, problem = read_progress(progress_path)
    changed = changed_settings(progress, settings) if progress else []
    if set(changed) - {"input"}:
        raise other_settings(out_dir, progress, changed, settings)
    if problem:
        print(f"{progress_path} is damaged ({problem}); starting over")
    elif changed:
        print(f"the input changed since the interrupted run ({input_change(progress, settings)}); starting over")
    if problem or changed:
        remove_own_files(out_dir, temps_only=False)
        return completed
    completed = {
        split: list(itertools.takewhile(lambda shard: intact(out_dir, shard), progress["splits"][split]))
        for split in SPLITS
    }
    print(f"resuming after {len(completed['train'])} train and {len(completed['val'])} val shards")
    return completed


def finish(meta_path: Path, progress_path: Path, settings: dict, writers: dict, replaced: collections.Counter) -> dict:
    """Writes meta.json, which marks the preparation finished, and removes the progress file; returns
    meta.json's splits."""
    splits = {}
    for split, writer in writers.items():
        shards = [{key: shard[key] for key in ("file", "tokens", "documents", "sha256")} for shard in writer.shards]
        splits[split] = {
            "tokens": sum(s["tokens"] for s in shards),
            "documents": sum(s["documents"] for s in shards),
            "shards": shards,
        }
    write_json(meta_path, {**settings, "replaced_undecodable": sum(replaced.values()), "splits": splits})
    try:
        progress_path.unlink(missing_ok=True)
    except OSError as e:
        raise UserError(f"removing {progress_path} failed: {e.strerror or e}; remove it yourself") from None
    if replaced:
        print(
            f"warning: replaced {sum(replaced.values()):,} undecodable byte sequences with U+FFFD "
            f"in {', '.join(replaced)}",
            file=sys.stderr,
        )
    return splits


def write_dataset(cfg: PrepareConfig, out_dir: Path, name: str, settings: dict, documents, summary, replaced) -> None:
    """Tokenizes the documents into out_dir's shards, after those an interrupted run left, then meta.json."""
    meta_path, progress_path = out_dir / "meta.json", out_dir / "progress.json"
    completed = completed_shards(out_dir, progress_path, settings)
    if out_dir.is_dir():
        remove_own_files(out_dir, temps_only=True)  # left by a killed run
    writers = {split: SplitWriter(out_dir, split, cfg.shard_tokens, completed[split]) for split in SPLITS}
    chunks, chunk_chars = sized_chunks(documents, cfg.block_chars)
    if summary:
        print(summary)
    units = split_chunks(chunks, chunk_chars, cfg.val_fraction, cfg.seed)
    todo = (unit for unit in units if unit.index >= writers[unit.split].resume[0])
    started, tokenized = time.perf_counter(), 0
    try:
        with tqdm(desc=name, unit="tok", unit_scale=True, disable=None) as bar:
            for unit, tokens in tokenize(todo, cfg.workers):
                if writers[unit.split].add(unit.index, tokens):
                    write_json(progress_path, {**settings, "splits": {split: w.shards for split, w in writers.items()}})
                bar.update(len(tokens))
                tokenized += len(tokens)
        for writer in writers.values():
            writer.finish()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    seconds = time.perf_counter() - started
    splits = finish(meta_path, progress_path, settings, writers, replaced)
    print(
        f"{out_dir}: {splits['train']['tokens']:,} train and {splits['val']['tokens']:,} val tokens "
        f"({tokenized / seconds / 1e6:.1f}M tokens/s)"
    )


def main(argv):
    cfg = configurator.parse_config(PrepareConfig, argv)
    check_config(cfg)
    replaced = collections.Counter()
    name, source, documents, files, summary = open_source(cfg, replaced)
    out_dir = Path(cfg.out_dir or ROOT / "data" / name)
    settings = {
        "format_version": FORMAT_VERSION, "tokenizer": "gpt2", "tokenizer_sha256": RANKS_SHA256,
        "vocab_size": VOCAB_SIZE, "eot_id": EOT_ID, "source": source,
        **({"input": input_fingerprint(files)} if files else {}),
        "seed": cfg.seed, "val_fraction": cfg.val_fraction, "block_chars": cfg.block_chars,
        "shard_tokens": cfg.shard_tokens,
    }  # fmt: skip
    if not cfg.force and already_prepared(out_dir, settings):
        return  # a read: it needs neither write access nor the lock
    check_out_dir(out_dir)
    lock = out_dir.resolve()
    in_use = f"{out_dir} is in use by another prepare.py"
    with hold_lock(lock.with_name(lock.name + ".lock"), in_use, "wait for it to end, or pick another --out_dir"):
        if not cfg.force and already_prepared(out_dir, settings):  # by a prepare that held the lock until now
            return
        if cfg.force and out_dir.is_dir():
            if replaced_data := holdings(out_dir):
                print(f"--force: replacing {out_dir}, {replaced_data}")
            remove_own_files(out_dir, temps_only=False)
        write_dataset(cfg, out_dir, name, settings, documents, summary, replaced)


if __name__ == "__main__":
    os.environ.setdefault("USE_TORCH", "0")  # or datasets imports torch (~200 MB) for DataLoader support
    configurator.run(main)
