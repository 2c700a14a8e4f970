"""The processes of a training job: how they start, agree on a stop, and fail together.

`python train.py` is a job of one process, and every method below does the plain local thing.
Under torchrun (one or many nodes):
- Stop signals (SIGTERM from a scheduler or torchrun, SIGINT from a terminal, SIGHUP) are only
  remembered, never acted on mid-step, and further copies change nothing. After each step the ranks
  take the largest signal any of them received, so all stop after the same step.
- What must happen once (choose the checkpoint to resume, write a checkpoint, start wandb) runs on
  rank 0 through `on_rank0`, which tells every rank how it went, the result or the error: no rank
  waits for an answer that will not come, and all continue from the same answer.
- A rank that fails anywhere else posts its error in the job's key-value store (the one torchrun
  runs for the rendezvous). A thread in every rank watches that store and ends its process within
  about a second, where the others would otherwise wait in their next NCCL collective until the
  process-group timeout.
These small control messages go over a gloo (CPU) group: they never wait behind the GPU's queue.
"""

import os
import signal
import sys
import threading
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from common import UserError, one_line

# SIGHUP: a closed terminal, which torchrun also passes on to its workers.
STOP_SIGNALS = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
WATCH_SECONDS = 1.0  # how often each rank looks for another rank's failure


class RankFailed(UserError):
    """Another rank failed and printed its own error; this one stops too."""


class StopSignals:
    """Remembers the first stop signal instead of dying: the step in progress, and a checkpoint being
    written, always finish. Signals already ignored (SIGHUP under nohup) stay ignored."""

    def __init__(self, announce: bool):
        self.signum = 0
        self.announce = announce
        self.previous = {
            s: signal.signal(s, self._remember) for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN
        }

    def _remember(self, signum, frame):
        if not self.signum and self.announce:
            # os.write, not print: a handler may run while the main thread is inside print
            message = f"got {signal.Signals(signum).name}; stopping after this step with a checkpoint"
            os.write(2, f"{Path(sys.argv[0]).name}: {message}\n".encode())
        self.signum = self.signum or signum

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def ignore(self):
        for s in self.previous:
            signal.signal(s, signal.SIG_IGN)


class Job:
    """This process's place in the job: rank, world size, device, and the job-wide operations above."""

    def __init__(self, device: str, timeout: timedelta):
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
        self.rank = int(os.environ.get("RANK", 0))
        self.device = device
        self.control = None  # the group for control messages; None is the default group
        self.watcher = None
        if self.world_size > 1 and device.startswith("cuda"):
            self.device = f"cuda:{os.environ['LOCAL_RANK']}"
        if self.device.startswith("cuda:"):
            # the current device is the one that memory statistics and the checkpoint's CUDA RNG state refer to
            torch.cuda.set_device(self.device)
        if self.world_size > 1:
            if device.startswith("cuda"):
                dist.init_process_group("nccl", device_id=torch.device(self.device), timeout=timeout)
                self.control = dist.new_group(backend="gloo", timeout=timeout)
            else:
                dist.init_process_group("gloo", timeout=timeout)
            self.watcher = FailureWatcher(self.rank)
        self.stop_signals = None
        self.stopped = False  # the ranks agreed on a stop signal (stop_signal)

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, exc_type, error, traceback) -> None:
        """Ends this process's part in the job, telling the other ranks first if it ends in an error."""
        if error is not None:
            self.fail(error)
        self.close(clean=error is None)

    def announce(self, text: str) -> None:
        """Prints text once for the job (on rank 0), flushed at once so that it keeps its place among stderr's lines."""
        if self.rank == 0:
            print(text, flush=True)

    def catch_stop_signals(self) -> None:
        """From now on a stop signal stops the job after a step (before, it ends the process as usual:
        there is nothing to save yet, and evaluating alone stops at once)."""
        self.stop_signals = StopSignals(announce=self.rank == 0)

    def stop_signal(self) -> int:
        """The stop signal that any rank has received, 0 for none; the same answer on every rank."""
        signum = self.agree(self.stop_signals.signum, dist.ReduceOp.MAX)
        self.stopped = signum > 0
        return signum

    def agree(self, value: int, op: dist.ReduceOp) -> int:
        """op (MAX, MIN) over every rank's value: the same answer on every rank."""
        value = torch.tensor(value)
        if self.world_size > 1:
            dist.all_reduce(value, op=op, group=self.control)
        return int(value)

    def gather(self, obj) -> list | None:
        """Every rank's obj, in rank order, on rank 0 (None elsewhere)."""
        if self.world_size == 1:
            return [obj]
        objs = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, objs, dst=0, group=self.control)
        return objs

    def on_rank0(self, fn, share: bool = False):
        """Runs fn on rank 0 alone, and returns when every rank knows how it went.

        Returns fn's result on rank 0, and on every rank with share=True (it must pickle). If fn
        raises, rank 0 raises its error and the other ranks RankFailed.
        """
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - the others must hear of any failure; re-raised below
                error = e
        if self.world_size > 1:
            message = [result if share and error is None else None, one_line(error) if error else None]
            dist.broadcast_object_list(message, src=0, group=self.control)
            if self.rank != 0:
                result, failure = message
                if failure is not None:
                    raise RankFailed(f"rank {self.rank} stops: rank 0 failed ({failure})")
        if error is not None:
            raise error
        return result

    def fail(self, error: BaseException) -> None:
        """Tells every other rank that this one failed, so that they end too."""
        if self.watcher and not isinstance(error, RankFailed):
            self.watcher.post(f"rank {self.rank} failed ({one_line(error)})")

    def close(self, clean: bool) -> None:
        """Ends this process's part in the job. After a failure the process group is left to the exit
        (destroying it can wait on a peer that is gone). After a stop under torchrun, stop signals are
        ignored from now on: torchrun signals the ranks still running as soon as one has exited, and
        they must exit as it did (Python's shutdown resets the handlers it runs, but not SIG_IGN)."""
        if self.watcher:
            self.watcher.stop()
        if self.world_size > 1 and clean:
            dist.destroy_process_group()
        if self.stop_signals and self.stopped and self.world_size > 1:
            self.stop_signals.ignore()
        elif self.stop_signals:
            self.stop_signals.restore()


class FailureWatcher:
    """Posts this rank's failure to the job's store, and ends this process when another rank posts one.

    A store client of its own (the one in the process group serves the main thread), keyed by the
    torchrun run and restart, so that a restarted job does not read its previous attempt's failure.
    """

    def __init__(self, rank: int):
        self.rank = rank
        attempt = f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self.key = f"train.py/{attempt}/failed"
        self.store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=30)
        )
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="failure-watcher", daemon=True)
        self.thread.start()

    def _watch(self):
        while not self.stopped.wait(WATCH_SECONDS):
            try:
                failure = self.store.get(self.key).decode() if self.store.check([self.key]) else None
            except Exception:  # the store's host is gone (its node failed); the store raises several types
                failure = "the job's store stopped answering (the node that ran the rendezvous is gone?)"
            if failure and not self.stopped.is_set():
                sys.stderr.write(f"{Path(sys.argv[0]).name}: error: rank {self.rank} stops: {failure}\n")
                sys.stderr.flush()
                sys.stdout.flush()
                os._exit(1)

    def post(self, failure: str) -> None:
        self.stop()
        try:
            self.store.set(self.key, failure)
        except Exception:  # the store is gone too: the process-group timeout will end the others
            pass

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()
