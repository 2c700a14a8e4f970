"""Which windows each step reads, on which rank and micro-step, and the micro-batch that fits the device.

Epoch e visits the train windows in a permutation seeded by (seed, e); step s takes the next batch_size
of it, and rank r's micro-step m a fixed slice of that, so the sequence of global batches is the same
however it is split over processes and micro-steps, and the step alone is the exact data position.
"""

import functools
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist

from distributed import Job
from loss import GPU_LOSS_CHUNK_ROWS
from model import GPT
from shards import TokenWindows

GPU_MEMORY_FOR_STEPS = 0.85  # of the GPU's memory, what the automatic micro-batch may fill


@functools.lru_cache(maxsize=1)
def epoch_order(seed: int, epoch: int, num_windows: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_windows)


def global_batch_windows(seed: int, step: int, steps_per_epoch: int, num_windows: int, batch_size: int) -> np.ndarray:
    """The window indices of optimizer step `step`: the next batch_size of its epoch's permutation."""
    epoch, index = divmod(step, steps_per_epoch)
    return epoch_order(seed, epoch, num_windows)[index * batch_size : (index + 1) * batch_size]


def rank_windows(windows: np.ndarray, world_size: int, rank: int, micro_batch_size: int) -> np.ndarray:
    """This rank's share of a global batch's window indices as micro-batches (micro-steps, micro_batch_size):
    the indices as (micro-step, rank, micro_batch_size), rank r taking [:, r]."""
    return windows.reshape(-1, world_size, micro_batch_size)[:, rank]


def batches(
    windows: TokenWindows,
    *,
    seed: int,
    batch_size: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    steps_per_epoch: int,
    start_step: int,
    max_steps: int,
    device: str,
):
    """Each step's tokens for this rank, (micro-steps, micro_batch_size, block_size + 1) on the device.

    A thread reads the next step's windows while the current step runs; on a GPU they come from
    pinned memory, so the copy is asynchronous.
    """
    pin = device.startswith("cuda")

    def read(step: int) -> torch.Tensor:
        indices = rank_windows(
            global_batch_windows(seed, step, steps_per_epoch, len(windows), batch_size),
            world_size,
            rank,
            micro_batch_size,
        )
        tokens = torch.from_numpy(windows.batch(indices.ravel())).view(*indices.shape, -1)
        return tokens.pin_memory() if pin else tokens

    with ThreadPoolExecutor(1) as reader:
        upcoming = reader.submit(read, start_step)
        for step in range(start_step, max_steps):
            tokens = upcoming.result()
            if step + 1 < max_steps:
                upcoming = reader.submit(read, step + 1)
            yield tokens.to(device, non_blocking=True)


def largest_micro_batch(per_rank: int, fixed_bytes: float, bytes_per_sequence: float, budget_bytes: float) -> int:
    """The largest divisor of per_rank whose step fits in budget_bytes (1 if none does)."""
    return max(
        [
            m
            for m in range(1, per_rank + 1)
            if per_rank % m == 0 and fixed_bytes + m * bytes_per_sequence <= budget_bytes
        ],
        default=1,
    )


def probe_sizes(per_rank: int, block_size: int) -> tuple[int, int]:
    """The micro-batches (sequences) whose memory the automatic choice measures: the smaller fills at least one
    chunk of the output layer's loss (whose temporaries stop growing there), the larger is twice it; both
    within the per-rank share."""
    small = max(1, min(math.ceil(GPU_LOSS_CHUNK_ROWS / block_size), per_rank // 2))
    return small, min(2 * small, per_rank)


def memory_line(sizes: tuple[int, int], peaks: list[float]) -> tuple[float, float]:
    """(fixed bytes, bytes per sequence) of the line through the peaks measured at two micro-batch sizes."""
    per_sequence = (peaks[1] - peaks[0]) / (sizes[1] - sizes[0])
    return peaks[0] - sizes[0] * per_sequence, per_sequence


def choose_micro_batch(
    model: GPT, job: Job, autocast, *, batch_size: int, block_size: int, micro_batch_size: int | None
) -> tuple[int, float | None]:
    """micro_batch_size, or else (None) the largest that fits, with the peak memory predicted for it (None where
    nothing is measured). On a GPU, the prediction comes from the peaks of eager forward + backward passes at
    probe_sizes with the parameter gradients already allocated, as in every real micro-step (a compiled step
    takes less), plus AdamW's moments; on a CPU, the micro-batch is each process's whole share."""
    per_rank = batch_size // job.world_size
    if micro_batch_size or not job.device.startswith("cuda") or per_rank == 1:
        return micro_batch_size or per_rank, None
    sizes = probe_sizes(per_rank, block_size)

    def forward_backward(sequences: int) -> None:
        tokens = torch.randint(0, model.config.vocab_size, (sequences, block_size + 1), device=job.device)
        with autocast:
            _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()

    forward_backward(sizes[0])  # allocates the gradients before either measurement
    peaks = []
    for sequences in sizes:
        torch.cuda.reset_peak_memory_stats()
        forward_backward(sequences)
        peaks.append(torch.cuda.max_memory_allocated())
    model.zero_grad(set_to_none=True)
    torch.cuda.reset_peak_memory_stats()  # from here on, the real steps' peak
    fixed, per_sequence = memory_line(sizes, peaks)
    fixed += 2 * sum(p.numel() * 4 for p in model.parameters())  # AdamW's moments, from the first step on
    budget = GPU_MEMORY_FOR_STEPS * torch.cuda.get_device_properties(job.device).total_memory
    # every rank must run as many micro-steps
    chosen = job.agree(largest_micro_batch(per_rank, fixed, per_sequence, budget), dist.ReduceOp.MIN)
    return chosen, fixed + chosen * per_sequence
