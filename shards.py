"""The token shard format (llm.c's), meta.json beside it, and the one reader that prepare.py, train.py and
tests share.

A shard `<split>_NNNNNN.bin` is a header of 256 little-endian int32 followed by the tokens:
    header[0] = 20240520 (magic), header[1] = 1 (version), header[2] = number of tokens,
    header[3:] = 0; then header[2] uint16 tokens (GPT-2 ids fit: 50257 < 65536).
`meta.json` beside the shards (format_version FORMAT_VERSION) records the tokenizer ("tokenizer",
"tokenizer_sha256" of its ranks, "vocab_size", "eot_id") and, under "splits" -> "train"/"val", each
shard's "file", "tokens", "documents" and "sha256": the hex sha256 of the whole .bin file, header
included, so `sha256sum` verifies it; prepare.py adds what it was given (source, input files, seed, ...).
The reader checks every meta.json key it takes, for type and range (GPT-2's tokenizer must be this
project's: its ranks' sha256, EOT id and vocab size), and every shard against its header, its file size
and meta.json (its token count, its sha256, every id below vocab_size, in one pass), so damage is one
line before training starts.
"""

import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np

import tokenizer
from checksums import is_sha256, sha256
from common import UserError, publish, temp_path

FORMAT_VERSION = 2  # of meta.json: 2 added each shard's sha256
MAGIC = 20240520
VERSION = 1  # of a shard's header
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.uint16
MAX_TOKENS = 2**31 - 1  # in one shard: header[2] is an int32
COUNT_CHUNK_TOKENS = 1 << 24  # tokens_present counts in int64 chunks of 128 MB
SCAN_CHUNK_TOKENS = 1 << 19  # open_shard hashes and checks 1 MB at a time, while it is in the CPU's cache


class ShardWriter:
    """Streams tokens into a shard under a temp name, so a shard of any size never sits in memory.

    close() fills in the header, reads the file back for its sha256 and renames it into place; on an
    exception inside a `with` block (or abort()) the temp file is deleted: a shard on disk is always
    complete.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tokens = 0
        self.sha256 = None  # hex, of the whole file: known at close()
        self.temp = temp_path(self.path)
        self.file = open(self.temp, "wb")
        self.file.write(bytes(HEADER_BYTES))  # the token count is known at close()

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.size and int(tokens.max()) > np.iinfo(TOKEN_DTYPE).max:
            raise ValueError(
                f"token id {int(tokens.max())} does not fit in uint16; shards hold GPT-2-sized vocabularies"
            )
        self.file.write(tokens.astype("<u2", copy=False).tobytes())
        self.tokens += tokens.size

    def close(self) -> None:
        header = np.zeros(HEADER_INTS, dtype="<i4")
        header[:3] = (MAGIC, VERSION, self.tokens)
        self.file.seek(0)
        self.file.write(header.tobytes())
        self.file.close()
        self.sha256 = sha256(self.temp)
        publish(self.temp, self.path)

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # flushing the discarded tail fails on a full disk: it is deleted anyway
            self.file.close()
        self.temp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


REFRESH = "rerun prepare.py with the same arguments and --force"


def read_shard(path: Path) -> np.memmap:
    """Memory-maps a shard's tokens after checking its header and size; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found; {REFRESH}")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise UserError(f"{path}: truncated shard ({size} bytes, header alone is {HEADER_BYTES}); {REFRESH}")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC or header[1] != VERSION:
        raise UserError(f"{path}: not a token shard (magic {header[0]}, version {header[1]}); {REFRESH}")
    expected = HEADER_BYTES + int(header[2]) * 2
    if size != expected:
        raise UserError(f"{path}: size {size} bytes but header promises {expected}; the shard is damaged, {REFRESH}")
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(int(header[2]),))


def open_shard(data_dir: Path, info: dict, vocab_size: int) -> np.memmap:
    """read_shard, checked against its meta.json entry: its token count, its sha256, and every id below
    vocab_size (one pass over the file), so a damaged or replaced file, or a stray id, is this error
    rather than wrong data or an IndexError mid-training."""
    path = Path(data_dir) / info["file"]
    tokens = read_shard(path)
    if len(tokens) != info["tokens"]:
        raise UserError(f"{path}: {len(tokens)} tokens but meta.json says {info['tokens']}; {REFRESH}")
    digest, largest = hashlib.sha256(np.fromfile(path, dtype=np.uint8, count=HEADER_BYTES)), -1
    for start in range(0, len(tokens), SCAN_CHUNK_TOKENS):
        chunk = tokens[start : start + SCAN_CHUNK_TOKENS]
        digest.update(chunk)
        largest = max(largest, int(chunk.max()))
    if digest.hexdigest() != info["sha256"]:
        raise UserError(
            f"{path}: its sha256 differs from the one meta.json records, so the file is damaged or not the one "
            f"prepared; {REFRESH}"
        )
    if largest >= vocab_size:
        raise UserError(
            f"{path}: token id {largest} is outside the vocabulary of meta.json (vocab_size {vocab_size}); {REFRESH}"
        )
    return tokens


def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def meta_problem(meta) -> str | None:
    """What makes a meta.json unusable to its readers, or None. They take format_version; the tokenizer's
    name (GPT-2's must be this project's: its tokenizer_sha256, eot_id and vocab_size as tokenizer.py has
    them), vocab_size (ids are uint16) and eot_id; and per split its shards' file names, token counts and
    sha256s."""
    if not isinstance(meta, dict):
        return "not a JSON object"
    version = meta.get("format_version")
    if version != FORMAT_VERSION or not is_count(version):
        older = is_count(version) and version < FORMAT_VERSION
        return f"key 'format_version' is {version!r}, " + (
            "prepared by an older prepare.py" if older else f"not this code's {FORMAT_VERSION}"
        )
    name = meta.get("tokenizer")
    if not isinstance(name, str) or not name:
        return "key 'tokenizer' is missing or not a name"
    gpt2 = {"tokenizer_sha256": tokenizer.RANKS_SHA256, "eot_id": tokenizer.EOT_ID, "vocab_size": tokenizer.VOCAB_SIZE}
    for key, expected in gpt2.items() if name == "gpt2" else ():
        if meta.get(key) != expected or type(meta.get(key)) is not type(expected):
            return f"key '{key}' is {meta.get(key)!r}, but this project's GPT-2 tokenizer has {expected!r}"
    if not is_count(meta.get("vocab_size")) or not 0 < meta["vocab_size"] <= 1 << 16:
        return "key 'vocab_size' is missing or not an integer from 1 to 65536 (shards hold uint16 ids)"
    if not is_count(meta.get("eot_id")) or meta["eot_id"] >= meta["vocab_size"]:
        return "key 'eot_id' is missing or not an id below vocab_size"
    splits = meta.get("splits")
    if not isinstance(splits, dict) or not all(isinstance(split, dict) for split in splits.values()):
        return "key 'splits' is missing or not an object of splits"
    for split_name, split in splits.items():
        if not isinstance(split.get("shards"), list):
            return f"key 'splits.{split_name}.shards' is missing or not a list"
        for i, shard in enumerate(split["shards"]):
            if not (
                isinstance(shard, dict)
                and isinstance(shard.get("file"), str)
                and Path(shard["file"]).name == shard["file"]
                and is_count(shard.get("tokens"))
                and is_sha256(shard.get("sha256"))
            ):
                return (
                    f"'splits.{split_name}.shards[{i}]' needs keys 'file' (a file name), 'tokens' (a count) and "
                    "'sha256' (64 hex digits)"
                )
    return None


def read_meta(data_dir: Path) -> dict:
    """meta.json, with the keys its readers take checked (meta_problem); errors name the file and key."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise UserError(
            f"{path} not found; prepare the data first (`python prepare.py --dataset=austen`, or `python prepare.py` "
            "for BookCorpus), or pass --data_dir=DIR of data prepare.py wrote"
        )
    try:
        meta = json.loads(path.read_bytes())
    except OSError as e:
        raise UserError(f"reading {path} failed: {e.strerror or e}; check that it is a file you can read") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); {REFRESH}") from None
    if problem := meta_problem(meta):
        raise UserError(f"{path}: {problem}; {REFRESH}")
    return meta


class TokenWindows:
    """Non-overlapping windows of block_size + 1 tokens over one split's shards.

    Window i gives block_size inputs and block_size targets (shifted by one). Windows never cross
    a shard boundary; the tail of a shard shorter than a window is not used.
    """

    def __init__(self, data_dir: Path, split: str, block_size: int):
        self.data_dir = Path(data_dir)
        self.meta = read_meta(self.data_dir)
        self.block_size = block_size
        shard_infos = self.meta["splits"].get(split, {}).get("shards", [])
        if not shard_infos:
            raise UserError(f"{self.data_dir}: no '{split}' shards in meta.json; {REFRESH}")
        self.shards = [open_shard(self.data_dir, info, self.meta["vocab_size"]) for info in shard_infos]
        # the split's content in one value: the sha256 of its shards' sha256s, in order
        self.fingerprint = hashlib.sha256("".join(info["sha256"] for info in shard_infos).encode()).hexdigest()
        counts = np.array([max(0, (len(s) - 1) // block_size) for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # window index where each shard begins
        if self.starts[-1] == 0:
            if (tokens := sum(map(len, self.shards))) > block_size:
                raise UserError(
                    f"{self.data_dir}: '{split}' has {tokens:,} tokens, but none of its {len(self.shards):,} shards "
                    f"holds block_size + 1 = {block_size + 1} (windows do not cross shards); use a smaller "
                    "block_size, or prepare the data again with a larger --shard_tokens"
                )
            raise UserError(
                f"{self.data_dir}: '{split}' has fewer than block_size + 1 = {block_size + 1} tokens; "
                "use a smaller block_size or more data"
            )

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        shard = int(np.searchsorted(self.starts, i, side="right")) - 1
        offset = (i - int(self.starts[shard])) * self.block_size
        return np.asarray(self.shards[shard][offset : offset + self.block_size + 1])

    def tokens_present(self) -> np.ndarray:
        """(vocab_size,) bool: which tokens the split's shards contain (a pass over them, in chunks)."""
        present = np.zeros(self.meta["vocab_size"], dtype=bool)
        for shard in self.shards:
            for start in range(0, len(shard), COUNT_CHUNK_TOKENS):
                present |= np.bincount(shard[start : start + COUNT_CHUNK_TOKENS], minlength=len(present)) > 0
        return present

    def batch(self, indices) -> np.ndarray:
        """(len(indices), block_size + 1) int64, ready for torch.from_numpy."""
        return np.stack([self[int(i)] for i in indices]).astype(np.int64)
