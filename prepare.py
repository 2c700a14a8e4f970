"""Tokenizes a corpus into uint16 token shards for train.py: fast, in bounded memory, resumable.

    python prepare.py                         # BookCorpus from the Hugging Face Hub
    python prepare.py --dataset=austen        # the six Austen novels bundled in assets/ (offline)
    python prepare.py --input='books/*.txt'   # .txt(.gz): a document per file; .jsonl/.parquet: one per row
    python prepare.py --dataset=owner/name --text_column=text --split=train   # any Hub dataset, streamed

Writes data/<name>/{train,val}_NNNNNN.bin in llm.c's format (shards.py) and meta.json. Each document
starts with <|endoftext|>, as in llm.c; BookCorpus rows are sentences of one running text, joined by spaces.

Input: --input takes a file, a glob, or a directory and all files under it but hidden ones, with
extensions in any case, and prints how many files it reads and what it skips, and why. Text is UTF-8
unless a byte-order mark says UTF-16 or UTF-32; undecodable bytes become U+FFFD (counted, warned), and
a file that is mostly NUL or undecodable (binary, UTF-16 without a mark) is refused. Row files are
checked before they are read together: .jsonl by a pass of pyarrow's parser (every text a string),
.parquet by its schema. A damaged file is one line naming it, and the line of a .jsonl at fault.

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
characters). Inputs of 16 blocks or more are cut and drawn with the read-ahead changing nothing.

Speed and memory: the main thread reads and cuts blocks, `workers` threads tokenize them (tiktoken
releases the GIL), at most 2 * workers blocks are in flight and shards stream to disk: peak RSS does
not grow with the corpus. Rows streamed through `datasets` (.jsonl, .parquet, the Hub) take several
times the memory of text files, nearly all of it datasets and pyarrow decoding a Parquet row group at a
time (BENCHMARKS.md has the figures).

Crash safety: a shard is written under a temp name and renamed once complete, then progress.json records
where it ended in the input, and the input files' names, sizes and modification times. A rerun over
the same files verifies those shards, reads the input again and tokenizes only what follows them: its
output is byte-identical to an uninterrupted run's; over changed files it starts over. meta.json,
written last, marks a finished preparation, whose shards a rerun checks; --force rebuilds from scratch.
Only prepare's own files (OWN_FILE) are ever deleted in the output directory.
"""

import codecs
import collections
import errno
import glob
import gzip
import hashlib
import itertools
import json
import logging
import os
import random
import re
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

import configurator
from common import UserError, atomic_write_bytes, first_sentence, text_encoding
from shards import ShardWriter, is_count, open_shard, read_meta
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
MAX_NOT_TEXT = 0.25  # a file with more NUL or undecodable characters than this share is refused: not text
INPUT_KINDS = "a .txt, .txt.gz, .jsonl or .parquet file"
# what prepare writes in out_dir, with temp names: all it ever deletes there
OWN_FILE = re.compile(r"((train|val)_\d{6}\.bin|(meta|progress)\.json)(\.tmp)?")
SPLITS = ("train", "val")
MIN_BLOCKS = 16  # an input of fewer blocks is cut into this many smaller ones (see the docstring)
MIN_CHARS = 4096  # ~1k tokens: less cannot give both splits something to work with
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
    val_fraction: float = 0.0015  # chance that a block of text is held out for validation (see the module docstring)
    seed: int = 1337  # seeds the validation draws: the same seed and input give the same split
    shard_tokens: int = 100_000_000  # tokens per shard file (the last of each split holds the rest)
    block_chars: int = 1 << 18  # text per validation draw and per tokenizer task
    workers: int = CPUS  # tokenizer threads; default: the CPUs this process may use
    force: bool = False  # delete this dataset's shards and rebuild


class Unit(NamedTuple):
    index: int
    split: str
    pieces: list[tuple[bool, str]]  # (starts with <|endoftext|>, text)


REPLACED = "prepare.replace_counted"  # a codecs error handler: errors="replace", each replacement counted
replacements = [0]  # how many it made, in this process (only the main thread decodes)


def replace_counted(error: UnicodeDecodeError):
    replacements[0] += 1
    return "\ufffd", error.end


codecs.register_error(REPLACED, replace_counted)


def read_text_file(path: Path, replaced: collections.Counter):
    """Yields a file's text in pieces, decoded as its byte-order mark says (UTF-8, UTF-16, UTF-32; none: UTF-8).

    Undecodable bytes become U+FFFD and are counted per file. A file whose text is more than MAX_NOT_TEXT
    NUL or undecodable characters is refused: binary data, UTF-16 without a mark, another encoding.
    """
    chars = not_text = 0
    try:
        with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb") as f:
            data = f.read(READ_BYTES)
            encoding = text_encoding(data)
            decoder = codecs.getincrementaldecoder(encoding)(errors=REPLACED)
            while True:
                before = replacements[0]
                text = decoder.decode(data, final=not data)
                if count := replacements[0] - before:
                    replaced[str(path)] += count
                chars += len(text)
                not_text += count + text.count("\x00")
                if not_text > MAX_NOT_TEXT * chars:
                    raise UserError(
                        f"{path} is not {encoding.upper().removesuffix('-SIG')} text: {not_text:,} of its first "
                        f"{chars:,} characters are NUL or undecodable; convert it to UTF-8 (UTF-16 needs a "
                        "byte-order mark) or leave it out of --input"
                    )
                yield text
                if not data:
                    return
                data = f.read(READ_BYTES)
    except gzip.BadGzipFile as e:
        raise UserError(
            f"{path} is not gzip data ({e}); if it is plain text, rename it to .txt, "
            "else get it again or leave it out of --input"
        ) from None
    except (EOFError, zlib.error) as e:
        raise UserError(
            f"{path} is truncated or damaged gzip data ({e}); download or compress it again, or leave it out of --input"
        ) from None
    except OSError as e:
        raise UserError(f"reading {path} failed: {e.strerror or e}; check that it is a file you can read") from None


def joined_rows(batches):
    """BookCorpus: rows are consecutive sentences of one running text, so they are joined with a space."""
    separator = ""
    for texts in batches:
        if text := " ".join(filter(None, texts)):
            yield separator + text
            separator = " "


def check_hub(repo: str, revision: str | None, hint: str) -> None:
    """Fails in a second when the Hub is unreachable, where load_dataset retries for ~25 s; the error
    ends with hint, the caller's way to work offline."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:  # datasets then reads its cache, or says it can't
        return
    try:
        HfApi().dataset_info(repo, revision=revision, timeout=10)
    except HfHubHTTPError as e:  # the Hub answered: no such dataset or revision, gated, ...
        raise UserError(f"--dataset={repo}: {first_sentence(e)}") from None
    except Exception as e:  # no answer; the transport's exception types vary across huggingface_hub versions
        raise UserError(f"cannot reach the Hugging Face Hub for {repo} ({type(e).__name__}: {e}); {hint}") from None


def is_text_type(arrow_type) -> bool:
    import pyarrow as pa

    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_null(arrow_type)


def jsonl_problem(path: Path, text_column: str) -> tuple[str, bool]:
    """The error path of check_row_file: (the first line at fault, counted from 1, or "" if none), and whether
    the file has any rows. Python's json, a line at a time, names the line that pyarrow's error does not."""
    rows = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            rows += 1
            try:
                row = json.loads(line)
            except ValueError as e:  # not JSON, or not UTF-8
                return f"line {number} is not JSON ({e})", True
            if not isinstance(row, dict):
                return f"line {number} is not a JSON object", True
            if (value := row.get(text_column)) is not None and not isinstance(value, str):
                return f"line {number}: '{text_column}' is {json.dumps(value)[:40]}, not a string", True
    return "", rows > 0


def check_row_file(path: Path, text_column: str) -> None:
    """Refuses a row file that does not parse, or whose text is not strings, naming it (and the line): read
    with others, datasets casts a file's 12345 to "12345" after another file's strings, and it quotes every
    row as JSON in a file that mixes types. Parquet: the schema in its footer; .jsonl: a pass of pyarrow's parser."""
    import pyarrow as pa
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    if input_kind(path) == ".parquet":
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowException, OSError) as e:
            raise UserError(
                f"{path} is not a readable Parquet file ({e}); download or write it again, or leave it out of --input"
            ) from None
        if text_column not in schema.names:
            raise UserError(
                f"{path} has no column '{text_column}' (it has {', '.join(schema.names)}); pass --text_column=NAME"
            )
        if not is_text_type(schema.field(text_column).type):
            raise UserError(
                f"{path}: column '{text_column}' holds {schema.field(text_column).type}, not strings; "
                "pass --text_column=NAME of a column of strings"
            )
        return
    options = pj.ParseOptions(
        explicit_schema=pa.schema([(text_column, pa.string())]), unexpected_field_behavior="ignore"
    )
    try:
        for _ in pj.open_json(path, parse_options=options):
            pass
    except pa.ArrowInvalid as e:
        problem, has_rows = jsonl_problem(path, text_column)
        if problem or has_rows:  # pyarrow refuses a file of blank lines only, which holds no rows
            raise UserError(
                f"{path}: {problem or f'cannot be read as rows ({e})'}; fix the file or leave it out of --input"
            ) from None


def row_texts(dataset, source: str, text_column: str):
    """Yields the text column in batches (a str or None per row) through Arrow, as datasets' default
    Python formatting goes row by row, far slower; refuses a column that is not strings."""
    import pyarrow as pa

    rows = 0
    try:
        for table in dataset.select_columns([text_column]).with_format("arrow").iter(batch_size=1000):
            column = table[text_column]
            if not is_text_type(column.type):  # datasets gives JSON of mixed types as JSON text, strings quoted
                raise UserError(
                    f"{source}: column '{text_column}' holds {column.type}, not strings (rows {rows + 1:,} on); "
                    "pass --text_column=NAME of a column of strings"
                )
            yield column.to_pylist()
            rows += len(table)
    except UserError:
        raise
    except (pa.ArrowException, ValueError) as e:  # what pyarrow and datasets raise for data that does not parse
        raise UserError(
            f"{source}: cannot be read as rows ({type(e).__name__}: {e}); the data is damaged, get it again"
        ) from None


def dataset_documents(path: str, source: str, text_column: str, sentences: bool, files: list[Path], **load_args):
    """Streams rows with `datasets`, from the Hub or (data_files) local row `files`, each checked first:
    a document per row, or (sentences) one document of them all.

    A generator, so nothing is imported, read or fetched until the text is needed.
    """
    for file in files:
        check_row_file(file, text_column)
    if not files:
        check_hub(path, load_args.get("revision"), OFFLINE_HINT)
    import datasets  # slow to import: only for row files and the Hub

    logging.getLogger("datasets").setLevel(logging.CRITICAL)  # its log of a parse error repeats ours
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
            f"{source} has no column '{text_column}' (it has {', '.join(dataset.column_names)}); "
            "pass --text_column=NAME"
        )
    batches = row_texts(dataset, source, text_column)
    if sentences:
        yield joined_rows(batches)
    else:
        yield from ([text] for texts in batches for text in texts if text)


def input_kind(path: Path) -> str | None:
    """'text' for .txt(.gz), the suffix for row files, in any case; None for files prepare does not read."""
    name = path.name.lower()
    if name.endswith((".txt", ".txt.gz")):
        return "text"
    return Path(name).suffix if Path(name).suffix in ROW_FORMATS else None


def unlisted(error: OSError):
    raise UserError(
        f"cannot list {error.filename}: {error.strerror}; check its permissions, or leave it out of --input"
    )


def under(directory: Path, skipped: dict[str, list[Path]]) -> list[Path]:
    """The files under a directory, its subdirectories included, sorted. Hidden names (.git, .DS_Store) and
    links to directories (which may loop) are not followed: they go to skipped["hidden"] and
    skipped["links to directories"]."""
    found = []
    for parent, subdirectories, names in os.walk(directory, onerror=unlisted):  # does not descend into links
        skipped["hidden"].extend(Path(parent, name) for name in subdirectories + names if name.startswith("."))
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        skipped["links to directories"].extend(
            Path(parent, name) for name in subdirectories if os.path.islink(os.path.join(parent, name))
        )
        found.extend(Path(parent, name) for name in names if not name.startswith("."))
    return sorted(found)


def local_files(pattern: str) -> tuple[list[Path], str]:
    """The files --input names (a file, a glob, or a directory with all under it), and a line saying
    how many are read and which are skipped, and why: users see what their shards hold."""
    if any(c in pattern for c in "*?["):
        matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
    elif Path(pattern).exists():
        matches = [Path(pattern)]
    else:
        raise UserError(f"--input={pattern}: no such file or directory")
    skipped = {f"not {INPUT_KINDS}": [], "not regular files": [], "empty": [], "hidden": [], "links to directories": []}
    files = []
    for path in itertools.chain.from_iterable(under(p, skipped) if p.is_dir() else [p] for p in matches):
        if not input_kind(path):
            skipped[f"not {INPUT_KINDS}"].append(path)
        elif not path.is_file():  # a broken link, a device
            skipped["not regular files"].append(path)
        elif input_kind(path) != "text" and path.stat().st_size == 0:  # no rows, and datasets fails on it
            skipped["empty"].append(path)
        else:
            files.append(path)
    said = ", ".join(
        f"{len(paths)} {why} ({', '.join(path.name for path in paths[:3])}{', ...' * (len(paths) > 3)})"
        for why, paths in skipped.items()
        if paths
    )
    if not files:
        raise UserError(
            f"--input={pattern}: no .txt, .txt.gz, .jsonl or .parquet files there{f' (skipped {said})' * bool(said)}; "
            "pass a file, directory or glob that holds some"
        )
    kinds = {input_kind(path) for path in files}
    if len(kinds) > 1:
        raise UserError(f"--input={pattern} mixes text and row files; prepare one kind at a time")
    kind = "text" if kinds == {"text"} else kinds.pop().lstrip(".")
    summary = f"--input={pattern}: reading {len(files)} {kind} file{'s' * (len(files) != 1)}"
    return files, summary + f"; skipped {said}" * bool(said)


def input_fingerprint(files: list[Path]) -> dict:
    """Names, sizes and modification times of the input files: a resume over changed files starts over."""
    stats = [(str(path), path.stat().st_size, path.stat().st_mtime_ns) for path in files]
    return {
        "files": len(stats),
        "bytes": sum(size for _, size, _ in stats),
        "sha256": hashlib.sha256(json.dumps(stats).encode()).hexdigest(),
    }


def open_source(cfg: PrepareConfig, replaced: collections.Counter):
    """Returns (name, source description, documents, the local files or None, a line on what is read or
    None); a document is an iterable of text pieces."""
    if cfg.input or cfg.dataset == "austen":
        files, summary = local_files(cfg.input) if cfg.input else (sorted(ROOT.glob(AUSTEN_GLOB)), None)
        name = Path(re.split(r"[*?\[]", cfg.input)[0]).resolve().name.split(".")[0] if cfg.input else "austen"
        kind = input_kind(files[0])
        if kind in ROW_FORMATS:
            source = f"{cfg.input} column {cfg.text_column}"
            documents = dataset_documents(
                ROW_FORMATS[kind],
                source,
                cfg.text_column,
                sentences=False,
                files=files,
                data_files=[str(f) for f in files],
                split="train",
            )
            return name, source, documents, files, summary
        return name, cfg.input or AUSTEN_GLOB, (read_text_file(f, replaced) for f in files), files, summary
    bookcorpus = cfg.dataset == "bookcorpus"
    repo = BOOKCORPUS if bookcorpus else cfg.dataset
    revision = cfg.revision or (BOOKCORPUS_REVISION if bookcorpus else None)
    source = f"hf://datasets/{repo}@{revision or 'main'} split {cfg.split} column {cfg.text_column}"
    documents = dataset_documents(
        repo, source, cfg.text_column, sentences=bookcorpus, files=[], revision=revision, split=cfg.split
    )
    return repo.split("/")[-1], source, documents, None, None


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
            f"the input has {chars:,} characters, too little to hold out validation text; "
            f"prepare at least {MIN_CHARS:,}"
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
            {"file": self.shard.path.name, "tokens": self.shard.tokens, "documents": self.documents, "end": end}
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


def other_settings(out_dir: Path, saved: dict, changed: list[str], settings: dict) -> UserError:
    named = [f"input: {input_change(saved, settings)}" if key == "input" else key for key in changed]
    return UserError(
        f"{out_dir} holds shards prepared with other settings ({', '.join(named)}); "
        "pass --force to rebuild, or another --out_dir"
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


def check_config(cfg: PrepareConfig) -> None:
    if not 0 <= cfg.val_fraction < 1 or min(cfg.shard_tokens, cfg.block_chars, cfg.workers) < 1:
        raise UserError("need 0 <= --val_fraction < 1 and --shard_tokens, --block_chars, --workers >= 1")
    max_id = get_tokenizer().max_token_value
    if max_id > np.iinfo(np.uint16).max:
        raise UserError(
            f"the tokenizer has ids up to {max_id}, but shards store uint16 (at most 65535); "
            "use a GPT-2-sized vocabulary"
        )


def check_out_dir(out_dir: Path) -> None:
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


def main(argv):
    cfg = configurator.parse_config(PrepareConfig, argv)
    check_config(cfg)
    replaced = collections.Counter()
    name, source, documents, files, summary = open_source(cfg, replaced)
    out_dir = Path(cfg.out_dir or ROOT / "data" / name)
    check_out_dir(out_dir)
    settings = {
        "format_version": FORMAT_VERSION,
        "tokenizer": "gpt2",
        "tokenizer_sha256": RANKS_SHA256,
        "vocab_size": VOCAB_SIZE,
        "eot_id": EOT_ID,
        "source": source,
        **({"input": input_fingerprint(files)} if files else {}),
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "block_chars": cfg.block_chars,
        "shard_tokens": cfg.shard_tokens,
    }
    meta_path, progress_path = out_dir / "meta.json", out_dir / "progress.json"
    if cfg.force and out_dir.is_dir():
        remove_own_files(out_dir, temps_only=False)
    if already_prepared(out_dir, settings):
        return
    completed = completed_shards(out_dir, progress_path, settings)
    if out_dir.is_dir():
        remove_own_files(out_dir, temps_only=True)  # left by a killed run

    writers = {split: SplitWriter(out_dir, split, cfg.shard_tokens, completed[split]) for split in SPLITS}
    blocks, block_chars = sized_blocks(documents, cfg.block_chars)
    if summary:
        print(summary)
    units = split_blocks(blocks, block_chars, cfg.val_fraction, cfg.seed)
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


def finish(meta_path: Path, progress_path: Path, settings: dict, writers: dict, replaced: collections.Counter) -> dict:
    """Writes meta.json, which marks the preparation finished, and removes the progress file; returns
    meta.json's splits."""
    splits = {}
    for split, writer in writers.items():
        shards = [{key: shard[key] for key in ("file", "tokens", "documents")} for shard in writer.shards]
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


if __name__ == "__main__":
    os.environ.setdefault("USE_TORCH", "0")  # or datasets imports torch (~200 MB) for DataLoader support
    configurator.run(main)
