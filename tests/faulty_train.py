"""train.py with faults injected, named in $FAULT (comma-separated), for the multi-process tests (test_jobs.py).

FAULT=slow_batches,slow_checkpoints torchrun --nproc_per_node=2 tests/faulty_train.py --key=value ...
"""

import os
import resource
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.argv[0] = str(ROOT / "train.py")  # errors read "train.py: error: ...", as users see them

import checkpoint  # noqa: E402
import configurator  # noqa: E402
import evaluator  # noqa: E402
import shards  # noqa: E402
import train  # noqa: E402

RANK = int(os.environ.get("RANK", 0))


def slow_batches():
    """Every batch takes 50 ms to read, so that a signal sent after a logged step lands mid-run."""
    batch = shards.TokenWindows.batch

    def slow_batch(self, indices):
        time.sleep(0.05)
        return batch(self, indices)

    shards.TokenWindows.batch = slow_batch


def slow_checkpoints():
    """Rank 0 takes 3 s to write a checkpoint, as GPT-2 124M's 1.5 GB take on a real disk, and marks
    the start of each in <out_dir>/checkpoint_started: a signal sent once it shows lands mid-save."""
    write = checkpoint.write_checkpoint

    def slow_write(run_dir, *args, **kwargs):
        (run_dir.parent / "checkpoint_started").touch()
        time.sleep(3)
        return write(run_dir, *args, **kwargs)

    checkpoint.write_checkpoint = slow_write


def disk_full_at_second_checkpoint():
    """Rank 0's disk fills up as it starts its second checkpoint: the real writers then fail (EFBIG,
    as they would with ENOSPC) partway through."""
    write, calls = checkpoint.write_checkpoint, []

    def write_to_full_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        return write(*args, **kwargs)

    if RANK == 0:
        checkpoint.write_checkpoint = write_to_full_disk


def stale_listing():
    """Rank 1 lists the run directory as a stale network-filesystem cache would: without its newest checkpoint."""
    listing = checkpoint.checkpoints

    def stale(run_dir):
        found = listing(run_dir)
        if found:
            del found[max(found)]
        return found

    if RANK == 1:
        checkpoint.checkpoints = stale


def nan_loss_on_rank1_at_step_3():
    """Rank 1 alone gets a non-finite loss (and gradients) at step 3: rank 0 must skip the step too."""
    forward, calls = train.GPT.forward, []

    def poisoned(self, idx, targets=None, **kwargs):
        logits, loss = forward(self, idx, targets, **kwargs)
        if self.training:
            calls.append(1)
            if len(calls) == 3:
                loss = loss * float("nan")
        return logits, loss

    if RANK == 1:
        train.GPT.forward = poisoned


def rank1_fails_while_rank0_hangs():
    """At the first evaluation rank 1 fails, while rank 0 waits where no error can reach it (as in an
    NCCL collective whose peer is gone)."""

    def evaluate(*args, **kwargs):
        if RANK == 1:
            raise RuntimeError("simulated failure on rank 1")
        time.sleep(600)

    evaluator.window_loss = evaluate


FAULTS = {
    fault.__name__: fault
    for fault in (
        slow_batches,
        slow_checkpoints,
        disk_full_at_second_checkpoint,
        stale_listing,
        nan_loss_on_rank1_at_step_3,
        rank1_fails_while_rank0_hangs,
    )
}

if __name__ == "__main__":
    for name in os.environ["FAULT"].split(","):
        FAULTS[name]()
    configurator.run(train.main)
