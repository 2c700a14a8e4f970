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

The rules are lm-eval's task configs and its HF backend (lm_eval/tasks/hellaswag, lm_eval/tasks/lambada,
lm_eval/api/model.py _encode_pair, lm_eval/models/huggingface.py _loglikelihood_tokens):
- hellaswag: Rowan/hellaswag's validation rows. Context: preprocess(activity_label + ": " + ctx_a + " " +
  ctx_b.capitalize()); the four continuations: " " + preprocess(ending). acc: the ending of highest summed
  log-likelihood is the label; acc_norm: the same with each divided by the ending's length in characters
  (without the space). A tie goes to the first ending (numpy.argmax).
- lambada_openai: EleutherAI/lambada_openai's test rows. Context: the text's words but the last (split on
  " "), target: " " + the last. acc: every target token is the argmax at its position; perplexity:
  exp(-mean over items of the target's summed log-likelihood).
- Tokens: trailing whitespace of the context moves to the front of the continuation; the continuation's
  tokens are encode(context + continuation) beyond the length of encode(context); an empty context is
  <|endoftext|>. The input is (context + continuation)[-(block_size + 1):][:-1]: a context too long for
  the model loses its start.
Log-softmax runs in float32 whatever --dtype (lm-eval's runs in the model's dtype unless told otherwise).
Under torchrun each rank scores every world_size-th item; rank 0 sums and prints.
"""

import json
import math
import re
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import configurator
import tokenizer
from common import UserError, check_device
from distributed import Job
from model import GPT
from sample import DTYPES, load_model, read_text
from shards import TokenWindows
from sources import check_hub

VAL = "val"  # the --tasks name of the loss on a prepared split


@dataclass
class EvalConfig:
    ckpt: str | None = None  # run dir (newest checkpoint), checkpoint, HF dir or Hub name; None: newest run in out/
    init: str = "checkpoint"  # or "random": an untrained GPT-2 124M (to time the tasks)
    tasks: str = "hellaswag,lambada_openai"  # comma-separated, from: hellaswag, lambada_openai, val
    hellaswag_file: str | None = None  # a JSONL file of Rowan/hellaswag's validation rows; None: from the Hub
    lambada_openai_file: str | None = None  # a JSONL file of EleutherAI/lambada_openai's test rows; None: from the Hub
    limit: int | None = None  # score the first N items of each task; None: all
    data_dir: str = "data/bookcorpus"  # --tasks=val: the token shards and meta.json that prepare.py wrote
    split: str = "val"  # --tasks=val: the split whose windows' mean loss is taken
    block_size: int | None = None  # --tasks=val: tokens per window, as train.py's block_size; None: the model's context
    batch_tokens: int = 4096  # padded tokens per forward pass; its logits take batch_tokens x 50257 x dtype's bytes
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # cuda (under torchrun: each rank its own GPU) or cpu
    dtype: str = "float32"  # float32, bfloat16 or float16
    dist_timeout_minutes: float = 10.0  # under torchrun: how long a rank waits for the others


@dataclass
class Item:
    """One question: a context and the continuations whose log-likelihoods answer it."""

    context: str
    continuations: list[str]
    label: int = 0  # hellaswag: the index of the right ending


# ---- the tasks -------------------------------------------------------------------------------


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag preprocess: drops WikiHow's bracketed artifacts ("[title]" ends a sentence)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_item(row: dict) -> Item:
    context = hellaswag_preprocess(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
    return Item(context, [" " + hellaswag_preprocess(ending) for ending in row["endings"]], int(row["label"]))


def hellaswag_scores(item: Item, loglikelihoods: list[float], greedy: list[bool]) -> dict[str, float]:
    lengths = [len(continuation) - 1 for continuation in item.continuations]  # the ending, without its space
    # An empty ending divides by zero: -inf, as numpy gives lm-eval.
    normalized = [ll / length if length else -math.inf for ll, length in zip(loglikelihoods, lengths, strict=True)]
    return {
        "acc": float(argmax(loglikelihoods) == item.label),
        "acc_norm": float(argmax(normalized) == item.label),
    }


def hellaswag_metrics(totals: dict[str, float], count: int) -> dict[str, float]:
    return {"acc": totals["acc"] / count, "acc_norm": totals["acc_norm"] / count}


def lambada_item(row: dict) -> Item:
    words = row["text"].split(" ")
    return Item(" ".join(words[:-1]), [" " + words[-1]])


def lambada_scores(item: Item, loglikelihoods: list[float], greedy: list[bool]) -> dict[str, float]:
    return {"acc": float(greedy[0]), "loglikelihood": loglikelihoods[0]}


def lambada_metrics(totals: dict[str, float], count: int) -> dict[str, float]:
    return {"acc": totals["acc"] / count, "perplexity": math.exp(-totals["loglikelihood"] / count)}


@dataclass(frozen=True)
class Task:
    """What tells one task from the other: its rows, its items and its metrics."""

    hub: tuple[str, str | None, str]  # the rows lm-eval reads: dataset, its config, its split
    columns: tuple[str, ...]  # what each row must have
    item: Callable[[dict], Item]  # a row as the item lm-eval makes of it
    scores: Callable[[Item, list[float], list[bool]], dict[str, float]]  # one item's, summed over items
    metrics: Callable[[dict[str, float], int], dict[str, float]]  # from the sums and the number of items


TASKS = {
    "hellaswag": Task(
        ("Rowan/hellaswag", None, "validation"),
        ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
        hellaswag_item,
        hellaswag_scores,
        hellaswag_metrics,
    ),
    "lambada_openai": Task(
        ("EleutherAI/lambada_openai", "default", "test"), ("text",), lambada_item, lambada_scores, lambada_metrics
    ),
}


# What each column of a row must hold, as json reads it: (said in the error, the check).
COLUMN_KINDS = {
    "activity_label": ("a string", lambda value: isinstance(value, str)),
    "ctx_a": ("a string", lambda value: isinstance(value, str)),
    "ctx_b": ("a string", lambda value: isinstance(value, str)),
    "endings": ("a list of strings", lambda value: isinstance(value, list) and all(isinstance(v, str) for v in value)),
    "label": (
        "an index (a number, or a string of digits as on the Hub)",
        lambda value: type(value) is int and value >= 0 or isinstance(value, str) and value.isdecimal(),
    ),
    "text": ("a string", lambda value: isinstance(value, str)),
}


def argmax(values: list[float]) -> int:
    """The index of the largest value, the first of ties."""
    return max(range(len(values)), key=values.__getitem__)


# ---- rows --------------------------------------------------------------------------------------


def read_jsonl(path: str, flag: str) -> list[dict]:
    rows = []
    for number, line in enumerate(read_text(Path(path), f"{flag}={path}").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{flag}={path}, line {number}: not JSON ({e}); write one JSON object per line"
                ) from None
            if not isinstance(rows[-1], dict):
                raise UserError(
                    f"{flag}={path}, line {number}: a JSON {type(rows[-1]).__name__}, not an object; "
                    "write one JSON object per line"
                )
    return rows


def hub_rows(name: str, task: Task) -> list[dict]:
    """The task's rows from the Hub through `datasets` (Parquet, cached); unreachable: a fast one-line error."""
    repo, config, split = task.hub
    hint = f"offline, pass --{name}_file=PATH, a JSONL file of {repo}'s {split} rows"
    check_hub(repo, None, hint)
    import datasets  # slow to import: only for the Hub

    try:
        return datasets.load_dataset(repo, config, split=split).to_list()
    except ConnectionError as e:  # HF_HUB_OFFLINE=1 without a cached copy
        raise UserError(f"cannot load {repo} ({e}); {hint}") from None


def load_items(name: str, path: str | None, limit: int | None) -> list[Item]:
    """The first `limit` items of a task (all for None), from a local JSONL file or else the Hub."""
    task = TASKS[name]
    source = f"--{name}_file={path}" if path else task.hub[0]
    rows = read_jsonl(path, f"--{name}_file") if path else hub_rows(name, task)
    rows = rows[:limit]
    for number, row in enumerate(rows, 1):
        missing = [column for column in task.columns if column not in row]
        if missing:
            raise UserError(
                f"{source}: row {number} lacks {', '.join(missing)}; "
                f"expected {task.hub[0]}'s rows ({', '.join(task.columns)})"
            )
        for column in task.columns:
            kind, holds = COLUMN_KINDS[column]
            if not holds(row[column]):
                raise UserError(f"{source}: row {number}'s {column} is not {kind}; expected {task.hub[0]}'s rows")
    if not rows:
        raise UserError(f"{source} has no rows")
    return [task.item(row) for row in rows]


# ---- scoring -------------------------------------------------------------------------------------


def encode_pair(context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's HF backend tokenizes them: the continuation's ids are
    those of the whole text beyond the context's own, so a token spanning the seam counts as the
    continuation's. lm-eval's empty context is the prefix token, <|endoftext|> for GPT-2."""
    if not context:
        return [tokenizer.EOT_ID], tokenizer.encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole, context_ids = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


@dataclass
class Row:
    """One (context, continuation) pair as the model reads it."""

    inputs: list[int]  # (context + continuation)[-(block_size + 1):][:-1]
    continuation: list[int]  # scored at the last len(continuation) positions of inputs


def rows_of(item: Item, block_size: int) -> list[Row]:
    rows = []
    for continuation in item.continuations:
        context_ids, continuation_ids = encode_pair(item.context, continuation)
        if len(continuation_ids) > block_size:
            raise UserError(
                f"a continuation of {len(continuation_ids)} tokens is longer than the model's context ({block_size})"
            )
        rows.append(Row((context_ids + continuation_ids)[-(block_size + 1) :][:-1], continuation_ids))
    return rows


def batches(items: list[Item], block_size: int, batch_tokens: int):
    """Consecutive items whose rows, padded to the longest, fit batch_tokens (at least one item each);
    yields (number of items, their rows)."""
    batch, count = [], 0
    for item in items:
        rows = rows_of(item, block_size)
        grown = batch + rows
        if batch and len(grown) * max(len(row.inputs) for row in grown) > batch_tokens:
            yield count, batch
            grown, count = rows, 0
        batch, count = grown, count + 1
    if batch:
        yield count, batch


@torch.inference_mode()
def score_rows(model: GPT, rows: list[Row], device) -> tuple[list[float], list[bool]]:
    """Each row's continuation log-likelihood (summed over its tokens) and whether every one of its tokens
    is the argmax, from one forward pass of the rows right-padded to the longest."""
    longest = max(len(row.inputs) for row in rows)
    idx = torch.tensor([row.inputs + [tokenizer.EOT_ID] * (longest - len(row.inputs)) for row in rows], device=device)
    logits, _ = model(idx)  # (B, longest, vocab_size); padding is causal-invisible to the real positions
    # The positions that predict continuation tokens, all rows flattened: (N,) row and position indices.
    which_row = torch.tensor([i for i, row in enumerate(rows) for _ in row.continuation], device=device)
    position = torch.tensor(
        [p for row in rows for p in range(len(row.inputs) - len(row.continuation), len(row.inputs))], device=device
    )
    targets = torch.tensor([t for row in rows for t in row.continuation], device=device)
    logprobs = F.log_softmax(logits[which_row, position].float(), dim=-1)  # (N, vocab_size)
    token_ll = logprobs.gather(1, targets[:, None]).squeeze(1).double()
    token_greedy = logprobs.argmax(-1) == targets
    sizes = [len(row.continuation) for row in rows]
    loglikelihoods = [float(part.sum()) for part in token_ll.cpu().split(sizes)]
    greedy = [bool(part.all()) for part in token_greedy.cpu().split(sizes)]
    return loglikelihoods, greedy


@torch.no_grad()
def window_loss(
    model, windows: TokenWindows, rows: np.ndarray, batch_size: int, device: str, autocast, job: Job
) -> float:
    """Mean loss over windows[rows] (train.py's val loss), split across ranks; every rank returns the same
    value. Takes the plain model: ranks may run different numbers of batches, so no DDP forward. Runs in
    eval mode and gives the model back in the mode it found it in."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # sum over windows of their mean loss
    mine = rows[job.rank :: job.world_size]
    for i in range(0, len(mine), batch_size):
        tokens = torch.from_numpy(windows.batch(mine[i : i + batch_size])).to(device)  # (B, T + 1)
        with autocast:
            _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss_sum += loss.double() * len(tokens)
    if job.world_size > 1:
        dist.all_reduce(loss_sum)
    model.train(was_training)
    return loss_sum.item() / len(rows)


def task_names(tasks: str) -> list[str]:
    """The zero-shot tasks of the tasks key, each one eval.py scores."""
    names = [name for name in tasks.split(",") if name]
    if unknown := [name for name in names if name not in TASKS]:
        raise UserError(
            f"tasks={tasks}: {', '.join(unknown)} is no task here; pick from {', '.join(TASKS)} "
            f"(lm_eval --model hf --model_args pretrained=CKPT runs the others on a checkpoint)"
        )
    return names


def split_loss(model: GPT, cfg: EvalConfig, job: Job) -> tuple[dict[str, float], int]:
    """The mean loss over every window of block_size + 1 tokens of the split, as train.py evaluates it (its
    val loss for the same split, windows and model), and its perplexity; and the number of windows."""
    block_size = cfg.block_size or model.config.block_size
    if block_size > model.config.block_size:
        raise UserError(
            f"--block_size={block_size} is longer than the model's context of {model.config.block_size}; lower it"
        )
    windows = TokenWindows(cfg.data_dir, cfg.split, block_size)
    if windows.meta["vocab_size"] > model.config.vocab_size:
        raise UserError(
            f"{cfg.data_dir} uses a vocabulary of {windows.meta['vocab_size']} tokens, the model has "
            f"{model.config.vocab_size}; pass the data the model was trained on"
        )
    batch_size = max(1, cfg.batch_tokens // block_size)
    loss = window_loss(model, windows, np.arange(len(windows)), batch_size, job.device, nullcontext(), job)
    return {"loss": loss, "perplexity": math.exp(loss)}, len(windows)


def evaluate(model: GPT, name: str, items: list[Item], job: Job, batch_tokens: int) -> dict[str, float] | None:
    """The task's metrics over items, each rank scoring every world_size-th item; on rank 0, None elsewhere.
    The model is in eval mode, on job.device, in the dtype to evaluate in."""
    task = TASKS[name]
    mine = items[job.rank :: job.world_size]
    totals: dict[str, float] = {}
    progress = tqdm(total=len(items), desc=name, unit="item", disable=job.rank != 0 or None, file=sys.stderr)
    done = 0
    for count, rows in batches(mine, model.config.block_size, batch_tokens):
        loglikelihoods, greedy = score_rows(model, rows, job.device)
        for item in mine[done : done + count]:
            n = len(item.continuations)
            for key, value in task.scores(item, loglikelihoods[:n], greedy[:n]).items():
                totals[key] = totals.get(key, 0.0) + value
            loglikelihoods, greedy = loglikelihoods[n:], greedy[n:]
        done += count
        progress.update(count * job.world_size)
    progress.close()
    gathered = job.gather(totals)
    if gathered is None:
        return None
    return task.metrics({key: sum(ranks.get(key, 0.0) for ranks in gathered) for key in gathered[0]}, len(items))


# ---- the command ---------------------------------------------------------------------------------------


def check_config(cfg: EvalConfig) -> list[str]:
    """The tasks to run; a bad value is a one-line error."""
    names = [name for name in cfg.tasks.split(",") if name]
    unknown = [name for name in names if name not in [*TASKS, VAL]]
    if unknown or not names:
        raise UserError(f"--tasks={cfg.tasks}: expected a comma-separated list from {', '.join([*TASKS, VAL])}")
    if cfg.limit is not None and cfg.limit < 1:
        raise UserError(f"--limit={cfg.limit}: expected a positive number of items, or None for all")
    if cfg.batch_tokens < 1:
        raise UserError(f"--batch_tokens={cfg.batch_tokens}: expected a positive number")
    if cfg.dtype not in DTYPES:
        raise UserError(f"--dtype={cfg.dtype}: expected one of {', '.join(DTYPES)}")
    check_device(cfg.device)
    return names


def table(results: dict[str, dict[str, float]], counts: dict[str, int]) -> str:
    lines = [f"{'task':<16}{'items':>7}  {'metric':<12}{'value':>10}"]
    for name, metrics in results.items():
        for i, (metric, value) in enumerate(metrics.items()):
            lines.append(f"{name if i == 0 else '':<16}{counts[name] if i == 0 else '':>7}  {metric:<12}{value:>10.4f}")
    return "\n".join(lines)


def load_tasks(names: list[str], cfg, limit: int | None, job: Job) -> dict[str, list[Item]]:
    """Each task's items, from its local file (cfg's `<task>_file`, EvalConfig's or TrainConfig's) or the
    Hub: read by rank 0 alone (the Hub once; offline, one error line on every rank) and shared."""
    return job.on_rank0(
        lambda: {name: load_items(name, getattr(cfg, f"{name}_file"), limit) for name in names}, share=True
    )


def main(argv):
    cfg = configurator.parse_config(EvalConfig, argv)
    names = check_config(cfg)
    job = Job(cfg.device, timedelta(minutes=cfg.dist_timeout_minutes))
    clean = False
    try:
        items = load_tasks([name for name in names if name != VAL], cfg, cfg.limit, job)  # before the model loads
        torch.manual_seed(0)  # --init=random: the same weights on every rank
        model = load_model(cfg).to(job.device, DTYPES[cfg.dtype]).eval()
        results, counts = {}, {}
        for name in names:
            started = time.perf_counter()
            if name == VAL:
                results[name], counts[name] = split_loss(model, cfg, job)
            else:
                results[name], counts[name] = (
                    evaluate(model, name, items[name], job, cfg.batch_tokens),
                    len(items[name]),
                )
            seconds = time.perf_counter() - started
            if job.rank == 0:
                print(
                    f"{name}: {counts[name]} items in {seconds:.1f} s ({counts[name] / seconds:.1f} items/s)",
                    file=sys.stderr,
                )
        if job.rank == 0:
            print(table(results, counts))
            print(json.dumps(results))
        clean = True
    except BaseException as e:
        job.fail(e)
        raise
    finally:
        job.close(clean, stopped=False)


if __name__ == "__main__":
    configurator.run(main)
