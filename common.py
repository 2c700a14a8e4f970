"""What every module shares: the error for mistakes the user can fix and short forms of errors, the check
of a --device, writes that never leave half a file, the lock that keeps a second job out of a directory,
and how the process's allocator keeps memory."""

import ctypes
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path

# The fix a diverged run's message names: both optimizers' rates (optimizer='muon' trains the blocks with its own).
LOWER_LEARNING_RATE = "lower learning_rate (and muon_learning_rate with Muon)"


class UserError(ValueError):
    """A mistake or an environment problem the user fixes (a bad value, a missing file, the Hub out of
    reach, a full disk); the message names the problem and the fix. configurator.run prints it as one
    line; any other exception is a bug and keeps its traceback."""


def perplexity(loss: float) -> float:
    """exp(loss); inf where that overflows a float (a loss above ~709.8): a value to report, not a crash."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def first_nonfinite(named_tensors) -> str | None:
    """The name of the first of (name, tensor) pairs that holds inf or NaN, or values so large (past ~1e19 in
    float32) that its norm overflows: a diverged tensor; None when all are finite."""
    import torch  # here: prepare.py, which needs no torch, imports this module

    return next(
        (name for name, tensor in named_tensors if not torch.linalg.vector_norm(tensor.detach()).isfinite()), None
    )


def one_line(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def first_sentence(error: BaseException) -> str:
    """A reader's error, short: torch's run on for lines of advice that do not fit a damaged file."""
    return one_line(error).split(". ")[0]


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


@contextmanager
def hold_lock(path: Path, in_use: str, fix: str):
    """Holds the lock file at path while the block runs; when another process holds it, refuses at once:
    UserError(f"{in_use} (it holds {path}); {fix}"). It is an OS lock, released with its process however
    that ends (kill -9 included); the empty file stays."""
    from filelock import FileLock, Timeout  # here: every module imports this one, few take a lock

    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"{in_use} (it holds {path}); {fix}") from None
    except OSError as e:
        raise UserError(
            f"cannot lock {path} ({e.strerror}): its folder must be writable; pick another --out_dir"
        ) from None
    try:
        yield
    finally:
        lock.release()


def check_device(device: str) -> None:
    """cpu, cuda, cuda:N or mps, where this machine has it; else a UserError naming the fix."""
    import torch  # here: prepare.py, which needs no torch, imports this module

    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device={device}: not a device; use cpu, cuda (cuda:N for the Nth GPU) or mps")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={device} but no GPU is visible; use --device=cpu")
    if parsed.type == "cuda" and (parsed.index or 0) >= (count := torch.cuda.device_count()):
        raise UserError(f"device={device} but {count} GPUs are visible; use cuda:0 to cuda:{count - 1}")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device={device} but this machine has no MPS (Apple GPU); use --device=cpu")


def keep_freed_memory() -> None:
    """Makes glibc's malloc keep freed blocks up to 32 MB for reuse instead of handing them back to the
    OS. A CPU training step allocates and frees tens of MB per output-layer chunk (loss.py); handed
    back, each comes again as fresh pages that the kernel faults in and zeroes one by one, a large part
    of a small model's step (BENCHMARKS.md). The process then holds its peak memory until it exits.
    Elsewhere than Linux (macOS, Windows) it does nothing."""
    if not sys.platform.startswith("linux"):
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    mallopt(m_mmap_threshold, 32 * 2**20)  # the largest glibc accepts: blocks above it stay mmap'd
    mallopt(m_trim_threshold, 2**31 - 1)  # never trim the heap's free top
