"""What every module shares: the error for mistakes the user can fix, and writes that never leave half a file."""

import os
from pathlib import Path


class UserError(ValueError):
    """A mistake or an environment problem the user fixes (a bad value, a missing file, the Hub out of
    reach, a full disk); the message names the problem and the fix. configurator.run prints it as one
    line; any other exception is a bug and keeps its traceback."""


def temp_path(path: Path) -> Path:
    """Where path is written until it is complete: path + '.tmp'."""
    return path.with_name(path.name + ".tmp")


def fsync(path: Path) -> None:
    """Flushes a file, or a directory's entries, to disk."""
    if os.name == "nt" and path.is_dir():
        return  # Windows cannot open a directory; NTFS journals renames itself
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(temp: Path, path: Path) -> None:
    """Gives a complete temp file or directory its final name in one atomic step, on disk before and after:
    a reader (or a crash) sees the old path or the whole new one, never part of it."""
    for written in [*temp.iterdir(), temp] if temp.is_dir() else [temp]:
        fsync(written)
    os.replace(temp, path)
    fsync(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes data to path through a temp name (removed if the write fails): never half a file."""
    path, temp = Path(path), temp_path(Path(path))
    try:
        temp.write_bytes(data)
        publish(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
