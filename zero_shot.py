"""Zero-shot HellaSwag and LAMBADA, scored as lm-evaluation-harness 0.4 scores them, so the figures sit in
the same tables as published GPT-2 results: the tasks, their rows, and the scoring that eval.py and
train.py's evaluations share.

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
Log-softmax runs in float32 whatever the model's dtype (lm-eval's runs in the model's dtype).
"""

import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import tokenizer
from common import UserError, perplexity
from distributed import Job
from model import GPT
from sources import hub_rows, read_jsonl

# Padded tokens per forward pass, by default: its (tokens x vocab) logits, which training never holds, fit any device.
BATCH_TOKENS = 4096


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
    return {"acc": totals["acc"] / count, "perplexity": perplexity(-totals["loglikelihood"] / count)}


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
    "endings": (
        "a non-empty list of strings",
        lambda value: isinstance(value, list) and value and all(isinstance(v, str) for v in value),
    ),
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


def offline_hint(name: str) -> str:
    repo, _, split = TASKS[name].hub
    return f"offline, pass --{name}_file=PATH, a JSONL file of {repo}'s {split} rows"


def load_items(name: str, path: str | None, limit: int | None) -> list[Item]:
    """The first `limit` items of a task (all for None), from a local JSONL file or else the Hub; a row that
    is not the task's is an error naming its line of the file (or its number in the Hub's split)."""
    task = TASKS[name]
    if path:
        source = f"--{name}_file={path}"
        rows = [(f"{source}, line {number}", row) for number, row in read_jsonl(Path(path), source)]
    else:
        source = task.hub[0]
        rows = [
            (f"{source}, row {number}", row) for number, row in enumerate(hub_rows(*task.hub, offline_hint(name)), 1)
        ]
    rows = rows[:limit]
    for where, row in rows:
        missing = [column for column in task.columns if column not in row]
        if missing:
            raise UserError(
                f"{where} lacks {', '.join(missing)}; expected {task.hub[0]}'s rows ({', '.join(task.columns)})"
            )
        for column in task.columns:
            kind, holds = COLUMN_KINDS[column]
            if not holds(row[column]):
                raise UserError(f"{where}: {column} is not {kind}; expected {task.hub[0]}'s rows")
        if "label" in task.columns and int(row["label"]) >= len(row["endings"]):
            raise UserError(
                f"{where}: label {row['label']} names no ending (it has {len(row['endings'])}, numbered from 0); "
                f"expected {task.hub[0]}'s rows"
            )
    if not rows:
        raise UserError(f"{source} has no rows")
    return [task.item(row) for _, row in rows]


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
class Candidate:
    """One (context, continuation) pair of an item, as the model reads it."""

    inputs: list[int]  # (context + continuation)[-(block_size + 1):][:-1]
    continuation: list[int]  # scored at the last len(continuation) positions of inputs


def check_fits(name: str, items: list[Item], block_size: int) -> None:
    """Refuses, before anything is scored, an item whose continuation is longer than the model's context
    (a longer context loses its start, as in lm-eval; a continuation cannot)."""
    for number, item in enumerate(items, 1):
        for continuation in item.continuations:
            if (length := len(encode_pair(item.context, continuation)[1])) > block_size:
                raise UserError(
                    f"{name} item {number}: a continuation of {length} tokens is longer than the model's context "
                    f"({block_size}); leave that row out"
                )


def candidates_of(item: Item, block_size: int) -> list[Candidate]:
    """The item's (context, continuation) pairs as the model reads them; check_fits has passed."""
    candidates = []
    for continuation in item.continuations:
        context_ids, continuation_ids = encode_pair(item.context, continuation)
        candidates.append(Candidate((context_ids + continuation_ids)[-(block_size + 1) :][:-1], continuation_ids))
    return candidates


def item_batches(items: list[Item], block_size: int, batch_tokens: int):
    """Consecutive items whose candidates, padded to the longest, fit batch_tokens (at least one item each);
    yields (number of items, their candidates)."""
    batch, count = [], 0
    for item in items:
        candidates = candidates_of(item, block_size)
        grown = batch + candidates
        if batch and len(grown) * max(len(c.inputs) for c in grown) > batch_tokens:
            yield count, batch
            grown, count = candidates, 0
        batch, count = grown, count + 1
    if batch:
        yield count, batch


@torch.inference_mode()
def score_candidates(model: GPT, candidates: list[Candidate], device) -> tuple[list[float], list[bool]]:
    """Each candidate's continuation log-likelihood (summed over its tokens) and whether every one of its
    tokens is the argmax, from one forward pass of the candidates right-padded to the longest."""
    longest = max(len(c.inputs) for c in candidates)
    idx = torch.tensor([c.inputs + [tokenizer.EOT_ID] * (longest - len(c.inputs)) for c in candidates], device=device)
    logits, _ = model(idx)  # (B, longest, vocab_size); padding is causal-invisible to the real positions
    # The positions that predict continuation tokens, all candidates flattened: (N,) candidate and position.
    which = torch.tensor([i for i, c in enumerate(candidates) for _ in c.continuation], device=device)
    position = torch.tensor(
        [p for c in candidates for p in range(len(c.inputs) - len(c.continuation), len(c.inputs))], device=device
    )
    targets = torch.tensor([t for c in candidates for t in c.continuation], device=device)
    logprobs = F.log_softmax(logits[which, position].float(), dim=-1)  # (N, vocab_size)
    token_ll = logprobs.gather(1, targets[:, None]).squeeze(1).double()
    token_greedy = logprobs.argmax(-1) == targets
    sizes = [len(c.continuation) for c in candidates]
    loglikelihoods = [float(part.sum()) for part in token_ll.cpu().split(sizes)]
    greedy = [bool(part.all()) for part in token_greedy.cpu().split(sizes)]
    return loglikelihoods, greedy


def task_names(tasks: str, also: tuple[str, ...] = (), at_least_one: bool = False) -> list[str]:
    """The names in a comma-separated tasks list, each a zero-shot task or one of `also` (eval.py's val)."""
    names = [name for name in tasks.split(",") if name]
    choices = [*TASKS, *also]
    unknown = [name for name in names if name not in choices]
    if unknown or (at_least_one and not names):
        others = (
            f"; {', '.join(unknown)} is no task here (lm_eval --model hf --model_args pretrained=CKPT runs the others)"
            if unknown
            else ""
        )
        raise UserError(f"--tasks={tasks}: expected a comma-separated list from {', '.join(choices)}{others}")
    return names


def evaluate(model: GPT, name: str, items: list[Item], job: Job, batch_tokens: int) -> dict[str, float] | None:
    """The task's metrics over items, each rank scoring every world_size-th item; on rank 0, None elsewhere.
    The model is in eval mode, on job.device, in the dtype to evaluate in."""
    task = TASKS[name]
    mine = items[job.rank :: job.world_size]
    totals: dict[str, float] = {}
    progress = tqdm(total=len(items), desc=name, unit="item", disable=job.rank != 0 or None, file=sys.stderr)
    done = 0
    for count, candidates in item_batches(mine, model.config.block_size, batch_tokens):
        loglikelihoods, greedy = score_candidates(model, candidates, job.device)
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


def task_files(names: list[str], hellaswag_file: str | None, lambada_openai_file: str | None) -> dict:
    """{task: its local JSONL file, or None for the Hub} of the named tasks, from the scripts' <task>_file keys."""
    files = {"hellaswag": hellaswag_file, "lambada_openai": lambada_openai_file}
    return {name: files[name] for name in names if name in files}


def load_tasks(files: dict[str, str | None], limit: int | None, job: Job) -> dict[str, list[Item]]:
    """The items of each task of files ({task: its local JSONL file, or None for the Hub}): read by rank 0
    alone (the Hub once; offline, one error line on every rank) and shared."""
    return job.on_rank0(lambda: {name: load_items(name, path, limit) for name, path in files.items()}, share=True)
