"""The token shard format (llm.c's) and the one reader that prepare.py, train.py and tests share.

A shard `<split>_NNNNNN.bin` is a header of 256 little-endian int32 followed by the tokens:
    header[0] = 20240520 (magic), header[1] = 1 (version), header[2] = number of tokens,
    header[3:] = 0; then header[2] uint16 tokens (GPT-2 ids fit: 50257 < 65536).
`meta.json` beside the shards records the tokenizer, vocab size, EOT id and each shard's token
count; the reader checks meta.json's keys, and every shard against its header, its file size and
meta.json (its token count, every id below vocab_size), so damage is one line before training starts.
"""

import contextlib
import json
from pathlib import Path

import numpy as np

from common import UserError, publish, temp_path

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.uint16
COUNT_CHUNK_TOKENS = 1 << 24  # tokens_present counts in int64 chunks of 128 MB


class ShardWriter:
    """Streams tokens into a shard under a temp name, so a shard of any size never sits in memory.

    close() fills in the header and renames the file into place; on an exception inside a `with`
    block (or abort()) the temp file is deleted: a shard on disk is always complete.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tokens = 0
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
    """read_shard, checked against its meta.json entry: its token count, and every id below vocab_size
    (one pass over the file), so a stray id is this error rather than an IndexError mid-training."""
    path = Path(data_dir) / info["file"]
    tokens = read_shard(path)
    if len(tokens) != info["tokens"]:
        raise UserError(f"{path}: {len(tokens)} tokens but meta.json says {info['tokens']}; {REFRESH}")
    if len(tokens) and (largest := int(tokens.max())) >= vocab_size:
        raise UserError(
            f"{path}: token id {largest} is outside the vocabulary of meta.json (vocab_size {vocab_size}); {REFRESH}"
        )
    return tokens


def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def meta_problem(meta) -> str | None:
    """What makes a meta.json unusable to its readers, or None: they take vocab_size and, per split,
    its shards' file names and token counts."""
    if not isinstance(meta, dict):
        return "not a JSON object"
    if not is_count(meta.get("vocab_size")) or meta["vocab_size"] == 0:
        return "key 'vocab_size' is missing or not a positive integer"
    splits = meta.get("splits")
    if not isinstance(splits, dict) or not all(isinstance(split, dict) for split in splits.values()):
        return "key 'splits' is missing or not an object of splits"
    for name, split in splits.items():
        if not isinstance(split.get("shards"), list):
            return f"key 'splits.{name}.shards' is missing or not a list"
        for i, shard in enumerate(split["shards"]):
            if not (
                isinstance(shard, dict)
                and isinstance(shard.get("file"), str)
                and Path(shard["file"]).name == shard["file"]
                and is_count(shard.get("tokens"))
            ):
                return f"'splits.{name}.shards[{i}]' needs keys 'file' (a file name) and 'tokens' (a count)"
    return None


def read_meta(data_dir: Path) -> dict:
    """meta.json, with the keys its readers take checked (meta_problem); errors name the file and key."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise UserError(f"{path} not found; run `python prepare.py` (or --dataset=austen) first")
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
        counts = np.array([max(0, (len(s) - 1) // block_size) for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # window index where each shard begins
        if self.starts[-1] == 0:
            raise UserError(
                f"{self.data_dir}: '{split}' has fewer than block_size + 1 = {block_size + 1} tokens; "
                "use a smaller block_size or more data"
            )

    @property
    def fingerprint(self):  # TEMP STUB until prep29 merges
        import hashlib

        return hashlib.sha256(json.dumps(self.meta["splits"]).encode()).hexdigest()

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
