"""Zero-shot HellaSwag and LAMBADA, scored as lm-evaluation-harness 0.4 scores them, so the figures sit
in the same tables as published GPT-2 results.

    python eval.py --ckpt=out/bookcorpus                                  # both tasks, rows from the Hub (cached)
    python eval.py --ckpt=out/bookcorpus --tasks=hellaswag --limit=500    # the first 500 items
    python eval.py --ckpt=DIR --hellaswag_file=hellaswag.jsonl --tasks=hellaswag    # local rows, offline
    torchrun --standalone --nproc_per_node=8 eval.py --ckpt=DIR --dtype=bfloat16    # items split over 8 GPUs
    python eval.py --ckpt=out/bookcorpus --tasks=val --data_dir=data/bookcorpus    # the mean loss on a prepared split

Prints a table, then as its last line one JSON object: {"hellaswag": {"acc": ..., "acc_norm": ...},
"lambada_openai": {"acc": ..., "perplexity": ...}}, with "val": {"loss": ..., "perplexity": ...} for --tasks=val
(train.py's evaluation of the split's windows: with --block_size=<the run's block_size>, the val loss
that training logs, for any checkpoint).

The tasks are scored by lm-eval's rules (zero_shot.py states them); log-softmax runs in float32 whatever
--dtype (lm-eval's runs in the model's dtype unless told otherwise).
Under torchrun each rank scores every world_size-th item; rank 0 sums and prints.
"""

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch

import configurator
import zero_shot
from common import UserError, check_device, perplexity
from distributed import Job
from evaluator import window_loss
from inference import DTYPES, check_dtype, load_model
from model import GPT
from shards import TokenWindows, read_meta

VAL = "val"  # the --tasks name of the loss on a prepared split


@dataclass
class EvalConfig:
    ckpt: str | None = None  # run dir (newest checkpoint), checkpoint, HF dir or Hub name; None: newest run in out/
    init: str = "checkpoint"  # or "random": an untrained GPT-2 124M (to time the tasks)
    tasks: str = "hellaswag,lambada_openai"  # comma-separated, from: hellaswag, lambada_openai, val
    hellaswag_file: str | None = None  # a JSONL file of Rowan/hellaswag's validation rows; None: from the Hub
    lambada_openai_file: str | None = None  # a JSONL file of EleutherAI/lambada_openai's test rows; None: from the Hub
    limit: int | None = None  # score the first N items of each task (val: its first N windows); None: all
    data_dir: str = "data/bookcorpus"  # --tasks=val: the token shards and meta.json that prepare.py wrote
    split: str = "val"  # --tasks=val: the split whose windows' mean loss is taken, val or train
    block_size: int | None = None  # --tasks=val: tokens per window, as train.py's block_size; None: the model's context
    batch_tokens: int = zero_shot.BATCH_TOKENS  # padded tokens per forward pass; logits of batch_tokens x vocab
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # cuda (under torchrun: each rank its own GPU) or cpu
    dtype: str = "float32"  # float32, bfloat16 or float16
    dist_timeout_minutes: float = 10.0  # under torchrun: how long a rank waits for the others


def split_loss(model: GPT, cfg: EvalConfig, job: Job) -> tuple[dict[str, float], int]:
    """The mean loss over the windows of block_size + 1 tokens of the split (the first cfg.limit of them, or
    all), as train.py evaluates it (its val loss for the same split, windows and model), and its perplexity;
    and the number of windows."""
    block_size = cfg.block_size or model.config.block_size
    model.config.check_data_fits(block_size, read_meta(cfg.data_dir)["vocab_size"], cfg.data_dir)
    windows = TokenWindows(cfg.data_dir, cfg.split, block_size)
    indices = np.arange(len(windows))[: cfg.limit]
    batch_size = max(1, cfg.batch_tokens // block_size)
    loss = window_loss(model, windows, indices, batch_size, job.device, nullcontext(), job)
    return {"loss": loss, "perplexity": perplexity(loss)}, len(indices)


# ---- the command ---------------------------------------------------------------------------------------


def check_config(cfg: EvalConfig) -> list[str]:
    """The tasks to run; a bad value is a one-line error."""
    names = zero_shot.task_names(cfg.tasks, also=(VAL,), at_least_one=True)
    if cfg.limit is not None and cfg.limit < 1:
        raise UserError(f"--limit={cfg.limit}: expected a positive number of items, or None for all")
    if cfg.batch_tokens < 1:
        raise UserError(f"--batch_tokens={cfg.batch_tokens}: expected a positive number")
    if cfg.split not in ("train", "val"):
        raise UserError(
            f"--split={cfg.split}: prepare.py writes a train and a val split only; pass --split=val or train"
        )
    if cfg.block_size is not None and cfg.block_size < 1:
        raise UserError(f"--block_size={cfg.block_size}: expected a positive number of tokens, or None for the model's")
    if not 0 < cfg.dist_timeout_minutes < math.inf:
        raise UserError(f"--dist_timeout_minutes={cfg.dist_timeout_minutes}: expected a finite number above 0")
    check_dtype(cfg.dtype)
    check_device(cfg.device)
    return names


def table(results: dict[str, dict[str, float]], counts: dict[str, int]) -> str:
    lines = [f"{'task':<16}{'items':>7}  {'metric':<12}{'value':>10}"]
    for name, metrics in results.items():
        for i, (metric, value) in enumerate(metrics.items()):
            lines.append(f"{name if i == 0 else '':<16}{counts[name] if i == 0 else '':>7}  {metric:<12}{value:>10.4f}")
    return "\n".join(lines)


def main(argv):
    cfg = configurator.parse_config(EvalConfig, argv)
    names = check_config(cfg)
    with Job(cfg.device, timedelta(minutes=cfg.dist_timeout_minutes)) as job:
        files = zero_shot.task_files(names, cfg.hellaswag_file, cfg.lambada_openai_file)  # in the order asked
        items = zero_shot.load_tasks(files, cfg.limit, job)  # before the model loads
        torch.manual_seed(0)  # --init=random: the same weights on every rank
        model = load_model(cfg.ckpt, cfg.init).to(job.device, DTYPES[cfg.dtype])
        for name, task_items in items.items():
            zero_shot.check_fits(name, task_items, model.config.block_size)
        results, counts = {}, {}
        for name in names:
            started = time.perf_counter()
            if name == VAL:
                results[name], counts[name] = split_loss(model, cfg, job)
            else:
                results[name] = zero_shot.evaluate(model, name, items[name], job, cfg.batch_tokens)
                counts[name] = len(items[name])
            seconds = time.perf_counter() - started
            if job.rank == 0:
                print(
                    f"{name}: {counts[name]} items in {seconds:.1f} s ({counts[name] / seconds:.1f} items/s)",
                    file=sys.stderr,
                )
        if job.rank == 0:
            print(table(results, counts))
            print(json.dumps(results))


if __name__ == "__main__":
    configurator.run(main)
