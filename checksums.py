"""Checksums of a directory's files, written with them and verified before they are read: bit rot, a
truncated copy or a hand edit is one line naming the file, never a model loaded in silence.

<dir>/checksums.sha256 is in sha256sum's format (`<hex digest>  <file name>` a line), so that
`sha256sum -c checksums.sha256` in the directory checks it by hand too. hashlib releases the GIL while
it hashes, so files hash on several cores at once, and beside the writes and fsyncs of a checkpoint.
"""

import hashlib
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import UserError

CHECKSUMS = "checksums.sha256"


class Damaged(UserError):
    """Files that differ from the checksums written with them; `problem` names the file, the message adds the fix."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem}; {fix}")
        self.problem = problem


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def is_sha256(value) -> bool:
    """Whether value is a sha256 as these files and meta.json write it: 64 lowercase hex digits."""
    return isinstance(value, str) and re.fullmatch("[0-9a-f]{64}", value) is not None


def write_checksums(directory: Path, digests: dict[str, str]) -> None:
    """checksums.sha256 of directory: digests is {file name: hex sha256}."""
    lines = "".join(f"{digest}  {name}\n" for name, digest in sorted(digests.items()))
    (directory / CHECKSUMS).write_text(lines)


def read_checksums(path: Path) -> dict[str, str]:
    """{file name: hex sha256} of a checksums.sha256; ValueError for a line that is not `<64 hex>  <name>`."""
    digests = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        digest, _, name = line.partition("  ")
        if not is_sha256(digest) or not name or Path(name).name != name:
            raise ValueError(f"line {number} is not '<sha256>  <file name>'")
        digests[name] = digest
    return digests


def checksum_problem(directory: Path, names) -> str | None:
    """What is wrong with the files `names` of directory against its checksums.sha256, naming the file:
    the checksums file missing or unreadable, a file it does not list, a file missing, or one whose bytes
    differ from those written. None when every one of them is as written."""
    directory, names = Path(directory), list(names)
    listing = directory / CHECKSUMS
    if not listing.is_file():
        return f"{listing} is missing"
    try:
        expected = read_checksums(listing)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{listing} is damaged ({e})"
    for name in names:
        if name not in expected:
            return f"{listing} does not list {name}"
        if not (directory / name).is_file():
            return f"{directory / name} is missing"
    with ThreadPoolExecutor() as pool:
        digests = dict(zip(names, pool.map(sha256, [directory / name for name in names]), strict=True))
    changed = [name for name in names if digests[name] != expected[name]]
    if changed:
        return f"{directory / changed[0]} is damaged (its sha256 differs from the one written with it)"
    return None
