"""Tokenizes a corpus into uint16 token shards for train.py: fast, in bounded memory, resumable.

    python prepare.py                         # BookCorpus from the Hugging Face Hub
    python prepare.py --dataset=austen        # the six Austen novels bundled in assets/ (offline)
    python prepare.py --input='books/*.txt'   # .txt(.gz): a document per file; .jsonl/.parquet: one per row
    python prepare.py --dataset=owner/name --text_column=text --split=train   # any Hub dataset, streamed

Writes data/<name>/{train,val}_NNNNNN.bin in llm.c's format (shards.py) and meta.json. Each document
starts with <|endoftext|>, as in llm.c; BookCorpus rows are sentences of one running text, joined by spaces.

Validation: the text goes in blocks of ~block_chars characters (small documents whole, large ones cut
before a space between two non-space characters, where GPT-2's pre-tokenizer splits anyway, so tokens
are exactly those of the whole document). Each block is held out with probability val_fraction, drawn
from a generator seeded with `seed`; the first block always trains. Blocks are contiguous text, so
nothing is in both splits; text that resumes after the other split's blocks starts with <|endoftext|>.

The share held out suits the input's size, which a stream does not tell up front; two rules settle it
in one pass, in bounded memory:
- Read-ahead: the first MIN_BLOCKS (16) blocks are read before any is assigned. An input that ends
  within them is small, and wholly in memory: it is cut again into blocks of 1/16 of its size.
- Fallback: when the input ends with less than half a block held out, the last block is held out,
  and the one before it too if the last is under half a block (the last two blocks wait for this).
So an input under 16 blocks (4M characters, ~1M tokens) holds out 3-9% of itself, a larger one at
least half a block, and from ~1/val_fraction blocks on (170M characters) the draws take over: 0.15%
of BookCorpus. Inputs under MIN_CHARS are refused. The read-ahead holds at most 16 blocks (4M
characters). Inputs of 16 blocks or more are cut and drawn as before these rules, so BookCorpus and
the bundled Austen give the same shards.

Speed and memory: the main thread reads and cuts blocks, `workers` threads tokenize them (tiktoken
releases the GIL), at most 2 * workers blocks are in flight and shards stream to disk: peak RSS does
not grow with the corpus. It is ~65 MB for text files, 350-450 MB for rows streamed through `datasets`
(.jsonl, .parquet, the Hub), nearly all of it datasets and pyarrow decoding a Parquet row group at a
time (measured on 200 MB of BookCorpus-like Parquet, 10k- and 100k-row groups).

Crash safety: a shard is written under a temp name and renamed once complete, then progress.json records
where it ended in the input. A rerun verifies those shards, reads the input again and tokenizes only
what follows them: its output is byte-identical to an uninterrupted run's. meta.json, written last,
marks a finished preparation; --force rebuilds from scratch.
"""

import codecs
import collections
import glob
import gzip
import itertools
import json
import os
import random
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

import configurator
from common import UserError, atomic_write_bytes
from shards import ShardWriter, read_shard
from tokenizer import EOT_ID, RANKS_SHA256, VOCAB_SIZE, get_tokenizer

ROOT = Path(__file__).parent
AUSTEN_GLOB = "assets/austen/*.txt.gz"
# datasets 4+ no longer runs loading scripts, and bookcorpus/bookcorpus has one. The Hub's dataset
# viewer publishes every public dataset as Parquet on its `refs/convert/parquet` branch, which
# load_dataset reads like any Parquet dataset: https://huggingface.co/docs/dataset-viewer/parquet
BOOKCORPUS = "bookcorpus/bookcorpus"
BOOKCORPUS_REVISION = "refs/convert/parquet"
OFFLINE_HINT = "offline, use --dataset=austen (bundled) or --input=PATH (.txt, .jsonl or .parquet files)"
ROW_FORMATS = {".jsonl": "json", ".parquet": "parquet"}  # the datasets builder for each
FORMAT_VERSION = 1  # of meta.json
READ_BYTES = 1 << 20
REPLACEMENT_UTF8 = "\ufffd".encode()
SPLITS = ("train", "val")
MIN_BLOCKS = 16  # an input of fewer blocks is cut into this many smaller ones (see the docstring)
MIN_CHARS = 4096  # ~1k tokens: less cannot give both splits something to work with


@dataclass
class PrepareConfig:
    dataset: str = "bookcorpus"  # bookcorpus, austen (bundled) or a Hub dataset (owner/name)
    input: str = ""  # local .txt/.txt.gz/.jsonl/.parquet file, directory or glob; replaces dataset
    text_column: str = "text"  # .jsonl/.parquet/Hub rows: the column holding the text
    split: str = "train"  # Hub datasets: the split to read; validation is carved out of it here
    revision: str | None = None  # Hub datasets: branch or commit (bookcorpus: refs/convert/parquet)
    out_dir: str = ""  # default data/<name>
    val_fraction: float = 0.0015
    seed: int = 1337
    shard_tokens: int = 100_000_000
    block_chars: int = 1 << 18  # text per validation draw and per tokenizer task
    # tokenizer threads: the CPUs this process may use (as os.process_cpu_count of Python 3.13; affinity is Linux-only)
    workers: int = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    force: bool = False  # delete this dataset's shards and rebuild


class Unit(NamedTuple):
    index: int
    split: str
    pieces: list[tuple[bool, str]]  # (starts with <|endoftext|>, text)


def read_text_file(path: Path, replaced: collections.Counter):
    """Yields a file's text in pieces; undecodable bytes become U+FFFD and are counted per file."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    previous = b""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        while True:
            data = f.read(READ_BYTES)
            text = decoder.decode(data, final=not data)
            # a U+FFFD the file does not spell out itself (3 bytes, maybe across reads) replaced bad bytes;
            # two fast counts instead of a scan for them
            if count := text.count("\ufffd") - (previous[-2:] + data).count(REPLACEMENT_UTF8):
                replaced[str(path)] += count
            previous = data
            yield text
            if not data:
                return


def joined_rows(batches):
    """BookCorpus: rows are consecutive sentences of one running text, so they are joined with a space."""
    separator = ""
    for texts in batches:
        if text := " ".join(filter(None, texts)):
            yield separator + text
            separator = " "


def check_hub(repo: str, revision: str | None) -> None:
    """Fails in a second when the Hub is unreachable, where load_dataset retries for ~25 s."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:  # datasets then reads its cache, or says it can't
        return
    try:
        HfApi().dataset_info(repo, revision=revision, timeout=10)
    except HfHubHTTPError as e:  # the Hub answered: no such dataset or revision, gated, ...
        raise UserError(f"--dataset={repo}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # no answer; the transport's exception types vary across huggingface_hub versions
        raise UserError(
            f"cannot reach the Hugging Face Hub for {repo} ({type(e).__name__}: {e}); {OFFLINE_HINT}"
        ) from None


def dataset_documents(path: str, source: str, text_column: str, sentences: bool, hub: bool, **load_args):
    """Streams rows with `datasets`: a document per row, or (sentences) one document of them all.

    A generator, so nothing is imported, read or fetched until the text is needed.
    """
    if hub:
        check_hub(path, load_args.get("revision"))
    import datasets  # slow to import: only for row files and the Hub

    try:
        dataset = datasets.load_dataset(path, streaming=True, **load_args)
    except ConnectionError as e:
        raise UserError(f"cannot reach the Hugging Face Hub for {path} ({e}); {OFFLINE_HINT}") from None
    except RuntimeError as e:  # a loading script, which datasets no longer runs
        raise UserError(
            f"--dataset={path}: {e}; its Parquet export may work: --revision={BOOKCORPUS_REVISION}"
        ) from None
    if dataset.column_names and text_column not in dataset.column_names:
        raise UserError(
            f"{source} has no column '{text_column}' (it has {', '.join(dataset.column_names)}); pass --text_column=NAME"
        )
    # Arrow batches: datasets' default Python formatting goes row by row, 10x slower
    batches = (
        table[text_column].to_pylist()
        for table in dataset.select_columns([text_column]).with_format("arrow").iter(batch_size=1000)
    )
    if sentences:
        yield joined_rows(batches)
    else:
        yield from ([text] for texts in batches for text in texts if text)


def local_files(pattern: str) -> list[Path]:
    if any(c in pattern for c in "*?["):
        paths = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
    elif Path(pattern).is_dir():
        paths = sorted(Path(pattern).iterdir())
    elif Path(pattern).is_file():
        paths = [Path(pattern)]
    else:
        raise UserError(f"--input={pattern}: no such file or directory")
    files = [p for p in paths if p.is_file() and (p.name.endswith((".txt", ".txt.gz")) or p.suffix in ROW_FORMATS)]
    if not files:
        raise UserError(f"--input={pattern}: no .txt, .txt.gz, .jsonl or .parquet files there")
    if len({p.suffix if p.suffix in ROW_FORMATS else "text" for p in files}) > 1:
        raise UserError(f"--input={pattern} mixes text and row files; prepare one kind at a time")
    return files


def open_source(cfg: PrepareConfig, replaced: collections.Counter):
    """Returns (name, source description, documents); a document is an iterable of text pieces."""
    if cfg.input or cfg.dataset == "austen":
        files = local_files(cfg.input) if cfg.input else sorted(ROOT.glob(AUSTEN_GLOB))
        name = Path(re.split(r"[*?\[]", cfg.input)[0]).resolve().name.split(".")[0] if cfg.input else "austen"
        if files[0].suffix in ROW_FORMATS:
            source = f"{cfg.input} column {cfg.text_column}"
            return (
                name,
                source,
                dataset_documents(
                    ROW_FORMATS[files[0].suffix],
                    source,
                    cfg.text_column,
                    sentences=False,
                    hub=False,
                    data_files=[str(f) for f in files],
                    split="train",
                ),
            )
        return name, cfg.input or AUSTEN_GLOB, (read_text_file(f, replaced) for f in files)
    bookcorpus = cfg.dataset == "bookcorpus"
    repo = BOOKCORPUS if bookcorpus else cfg.dataset
    revision = cfg.revision or (BOOKCORPUS_REVISION if bookcorpus else None)
    source = f"hf://datasets/{repo}@{revision or 'main'} split {cfg.split} column {cfg.text_column}"
    return (
        repo.split("/")[-1],
        source,
        dataset_documents(
            repo, source, cfg.text_column, sentences=bookcorpus, hub=True, revision=revision, split=cfg.split
        ),
    )


def safe_cut(text: str, start: int, end: int) -> int:
    """The last index in (start, end) of a space between two non-space characters, else end."""
    i = text.rfind(" ", start + 1, end)
    while i > start and (text[i - 1].isspace() or i + 1 == len(text) or text[i + 1].isspace()):
        i = text.rfind(" ", start + 1, i)
    return i if i > start else end


def cut_blocks(documents, block_chars: int):
    """Yields blocks of about block_chars characters, as lists of (starts_document, text).

    Small documents share a block (fewer, larger tokenizer tasks); a large one is cut into several.
    """
    block, size = [], 0  # the documents that ended since the last block
    for document in documents:
        rest, starts_document = "", True
        for piece in document:
            text, start = rest + piece, 0
            while size + len(text) - start >= block_chars:
                if block:  # cut between documents rather than inside this one
                    yield block
                    block, size = [], 0
                    continue
                cut = safe_cut(text, start, start + block_chars)
                yield [(starts_document, text[start:cut])]
                starts_document, start = False, cut
            rest = text[start:]
        if rest:
            block.append((starts_document, rest))
            size += len(rest)
    if block:
        yield block


def block_chars_of(block) -> int:
    return sum(len(text) for _, text in block)


def documents_of(blocks):
    """The documents that cut_blocks cut these blocks from, each as a list of pieces."""
    document = []
    for block in blocks:
        for starts_document, text in block:
            if starts_document and document:
                yield document
                document = []
            document.append(text)
    if document:
        yield document


def sized_blocks(documents, block_chars: int):
    """cut_blocks at a length that suits the input's size (the docstring's read-ahead); returns (blocks, length)."""
    blocks = cut_blocks(documents, block_chars)
    head = list(itertools.islice(blocks, MIN_BLOCKS))
    if len(head) == MIN_BLOCKS:
        return itertools.chain(head, blocks), block_chars
    chars = sum(map(block_chars_of, head))
    if chars == 0:
        raise UserError("the input has no text; check the files (or --text_column)")
    if chars < MIN_CHARS:
        raise UserError(
            f"the input has {chars:,} characters, too little to hold out validation text; prepare at least {MIN_CHARS:,}"
        )
    small = -(-chars // MIN_BLOCKS)
    return cut_blocks(documents_of(head), small), small


def held_out_blocks(blocks, block_chars: int, val_fraction: float, seed: int):
    """Yields (block, whether it is held out): the seeded draws, then the docstring's fallback."""
    rng = random.Random(seed)
    last_two = collections.deque()  # [index, block, held out], still open to the fallback
    held_out_chars = 0
    for index, block in enumerate(blocks):
        held_out = rng.random() < val_fraction and index > 0
        held_out_chars += held_out * block_chars_of(block)
        last_two.append([index, block, held_out])
        if len(last_two) > 2:
            yield last_two.popleft()[1:]
    for entry in reversed(last_two):
        index, block, held_out = entry
        if held_out_chars >= block_chars / 2 or index == 0:
            break
        if not held_out:
            entry[2] = True
            held_out_chars += block_chars_of(block)
    yield from (entry[1:] for entry in last_two)


def split_blocks(blocks, block_chars: int, val_fraction: float, seed: int):
    """Numbers the blocks and assigns each to a split, as the module docstring says."""
    previous_split = None
    for index, (block, held_out) in enumerate(held_out_blocks(blocks, block_chars, val_fraction, seed)):
        split = "val" if held_out else "train"
        (starts_document, text), *others = block
        yield Unit(index, split, [(starts_document or split != previous_split, text), *others])
        previous_split = split


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
                chunk = tokens[offset : offset + self.shard_tokens - self.shard.tokens]
                self.shard.write(chunk)
                self.documents += int(np.count_nonzero(chunk == EOT_ID))
                offset += len(chunk)
                if self.shard.tokens == self.shard_tokens:
                    self.close_shard(end=[index, offset])
                    completed = True
        except OSError as e:
            raise UserError(
                f"writing {self.next_path()} failed: {e.strerror or e}; free disk space and rerun, finished shards are reused"
            ) from None
        return completed

    def next_path(self) -> Path:
        return self.out_dir / f"{self.split}_{len(self.shards):06d}.bin"

    def close_shard(self, end):
        self.shard.close()
        self.shards.append(
            {"file": self.shard.path.name, "tokens": self.shard.tokens, "documents": self.documents, "end": end}
        )
        self.shard = None

    def abort(self):
        if self.shard is not None:
            self.shard.abort()


def check_settings(path: Path, settings: dict) -> dict:
    saved = json.loads(path.read_text())
    changed = [key for key in settings if saved.get(key) != settings[key]]
    if changed:
        raise UserError(
            f"{path.parent} holds shards prepared with other settings ({', '.join(changed)}); pass --force to rebuild, or another --out_dir"
        )
    return saved


def intact(path: Path, tokens: int) -> bool:
    try:
        return len(read_shard(path)) == tokens
    except (OSError, ValueError):  # missing, truncated, not a shard
        return False


def main(argv):
    cfg = configurator.parse_config(PrepareConfig, argv)
    if not 0 <= cfg.val_fraction < 1 or min(cfg.shard_tokens, cfg.block_chars, cfg.workers) < 1:
        raise UserError("need 0 <= --val_fraction < 1 and --shard_tokens, --block_chars, --workers >= 1")
    max_id = get_tokenizer().max_token_value
    if max_id > np.iinfo(np.uint16).max:
        raise UserError(
            f"the tokenizer has ids up to {max_id}, but shards store uint16 (at most 65535); use a GPT-2-sized vocabulary"
        )
    replaced = collections.Counter()
    name, source, documents = open_source(cfg, replaced)
    out_dir = Path(cfg.out_dir or ROOT / "data" / name)
    settings = {
        "format_version": FORMAT_VERSION,
        "tokenizer": "gpt2",
        "tokenizer_sha256": RANKS_SHA256,
        "vocab_size": VOCAB_SIZE,
        "eot_id": EOT_ID,
        "source": source,
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "block_chars": cfg.block_chars,
        "shard_tokens": cfg.shard_tokens,
    }
    meta_path, progress_path = out_dir / "meta.json", out_dir / "progress.json"
    if cfg.force and out_dir.is_dir():
        for path in out_dir.iterdir():
            if re.fullmatch(r"(train|val)_\d{6}\.bin(\.tmp)?|(meta|progress)\.json(\.tmp)?", path.name):
                path.unlink()
    if meta_path.exists():
        splits = check_settings(meta_path, settings)["splits"]
        print(f"{out_dir} is already prepared ({splits['train']['tokens']:,} train tokens); --force rebuilds it")
        return
    completed = {split: [] for split in SPLITS}
    if progress_path.exists():
        saved = check_settings(progress_path, settings)["splits"]
        completed = {
            split: list(
                itertools.takewhile(lambda shard: intact(out_dir / shard["file"], shard["tokens"]), saved[split])
            )
            for split in SPLITS
        }
        print(f"resuming after {len(completed['train'])} train and {len(completed['val'])} val shards")
    for path in out_dir.glob("*.tmp"):  # left by a killed run
        path.unlink()

    writers = {split: SplitWriter(out_dir, split, cfg.shard_tokens, completed[split]) for split in SPLITS}
    units = split_blocks(*sized_blocks(documents, cfg.block_chars), cfg.val_fraction, cfg.seed)
    todo = (unit for unit in units if unit.index >= writers[unit.split].resume[0])
    started, tokenized = time.perf_counter(), 0
    try:
        with tqdm(desc=name, unit="tok", unit_scale=True, disable=None) as bar:
            for unit, tokens in tokenize(todo, cfg.workers):
                if writers[unit.split].add(unit.index, tokens):
                    progress = {**settings, "splits": {split: w.shards for split, w in writers.items()}}
                    atomic_write_bytes(progress_path, json.dumps(progress, indent=1).encode())
                bar.update(len(tokens))
                tokenized += len(tokens)
        for writer in writers.values():
            if writer.shard is not None:
                writer.close_shard(end=None)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    seconds = time.perf_counter() - started

    splits = {}
    for split, writer in writers.items():
        shards = [{key: shard[key] for key in ("file", "tokens", "documents")} for shard in writer.shards]
        splits[split] = {
            "tokens": sum(s["tokens"] for s in shards),
            "documents": sum(s["documents"] for s in shards),
            "shards": shards,
        }
    meta = {**settings, "replaced_undecodable": sum(replaced.values()), "splits": splits}
    atomic_write_bytes(meta_path, json.dumps(meta, indent=1).encode())
    progress_path.unlink(missing_ok=True)
    if replaced:
        print(
            f"warning: replaced {sum(replaced.values()):,} undecodable byte sequences with U+FFFD in {', '.join(replaced)}",
            file=sys.stderr,
        )
    print(
        f"{out_dir}: {splits['train']['tokens']:,} train and {splits['val']['tokens']:,} val tokens "
        f"({tokenized / seconds / 1e6:.1f}M tokens/s)"
    )


if __name__ == "__main__":
    os.environ.setdefault("USE_TORCH", "0")  # or datasets imports torch (~200 MB) for DataLoader support
    configurator.run(main)
