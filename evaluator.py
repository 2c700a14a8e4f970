"""What train.py measures at each evaluation (Evaluator), and the mean loss over token windows that its
evaluations and eval.py's --tasks=val both take (window_loss)."""

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

import tokenizer
import zero_shot
from common import UserError, first_nonfinite, perplexity
from distributed import Job
from generate import RECIPE_SAMPLING, generate
from model import GPT
from shards import TokenWindows


@torch.no_grad()
def window_loss(
    model, windows: TokenWindows, indices: np.ndarray, batch_size: int, device: str, autocast, job: Job
) -> float:
    """Mean loss over windows[indices] (train.py's val loss), split across ranks; every rank returns the same
    value. Takes the plain model: ranks may run different numbers of batches, so no DDP forward. Runs in
    eval mode and gives the model back in the mode it found it in."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # sum over windows of their mean loss
    mine = indices[job.rank :: job.world_size]
    for i in range(0, len(mine), batch_size):
        tokens = torch.from_numpy(windows.batch(mine[i : i + batch_size])).to(device)  # (B, T + 1)
        with autocast:
            _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss_sum += loss.double() * len(tokens)
    if job.world_size > 1:
        dist.all_reduce(loss_sum)
    model.train(was_training)
    return loss_sum.item() / len(indices)


@dataclass
class EvalResult:
    """One evaluation, as Reporter.log_eval prints and records it."""

    val_loss: float  # the mean loss over the val windows, on every rank
    tasks: dict[str, dict[str, float]]  # {task: {metric: value}} on rank 0; empty on the others
    sample: str | None  # the sample prompt and its continuation on rank 0; None on the others or when off

    def record(self) -> dict:
        """Flat keys for metrics.jsonl and wandb: a task's metric as task/metric (wandb groups them by task)."""
        return {
            "val_loss": self.val_loss,
            "val_perplexity": perplexity(self.val_loss),
            **{f"{task}/{metric}": value for task, metrics in self.tasks.items() for metric, value in metrics.items()},
            **({"sample": self.sample} if self.sample is not None else {}),
        }

    def describe(self) -> str:
        tasks = "".join(
            f"; {task} " + " ".join(f"{metric} {value:.4f}" for metric, value in metrics.items())
            for task, metrics in self.tasks.items()
        )
        sample = f"\nsample: {self.sample}" if self.sample is not None else ""
        return f"val loss {self.val_loss:.4f}, perplexity {perplexity(self.val_loss):.2f}{tasks}{sample}"


class Evaluator:
    """What an evaluation measures: the loss on the val windows, the zero-shot tasks (scored as
    lm-evaluation-harness scores them, zero_shot.py) and, on rank 0, a sample continuing the sample prompt.
    Both are GPT-2 text: the tasks refuse data of another tokenizer, the sample is left out (and says so).

    The sample draws from a generator of its own seeded with seed, with sample.py's sampling: samples
    differ only by the weights, and training's random streams go on as if there were none. The tasks'
    rows are read on construction (rank 0, shared), so a dataset out of reach is one line before any step.
    """

    def __init__(
        self,
        job: Job,
        model: GPT,
        autocast,
        *,
        val: TokenWindows,
        val_indices: np.ndarray,
        batch_size: int,
        task_files: dict[str, str | None],
        task_limit: int | None,
        sample_prompt: str,
        sample_tokens: int,
        seed: int,
    ):
        """val_indices: the windows of val each evaluation takes, batch_size at a time; task_files: {task: its
        JSONL file, or None for the Hub}; sample_prompt '' for no sample."""
        self._job, self._model, self._autocast, self._seed = job, model, autocast, seed
        self._val = functools.partial(window_loss, model, val, val_indices, batch_size, job.device, autocast, job)
        tokens = val.meta.get("tokenizer")
        if task_files and tokens != "gpt2":
            raise UserError(
                f"{val.data_dir} holds {tokens!r} tokens, but the tasks are scored in GPT-2's; prepare the data "
                "with prepare.py, or --tasks='' for none"
            )
        self._sampling = bool(sample_prompt) and tokens == "gpt2"
        if sample_prompt and not self._sampling:
            job.announce(f"no samples at evals: {val.data_dir} holds {tokens!r} tokens, not GPT-2's")
        self._items = zero_shot.load_tasks(task_files, task_limit, job)
        for name, items in self._items.items():  # every row, before the first step
            zero_shot.check_fits(name, items, model.config.block_size)
        self._prompt_text, self._prompt = sample_prompt, tokenizer.encode(sample_prompt)
        self._new_tokens = min(sample_tokens, model.config.block_size - len(self._prompt))
        if self._sampling and self._new_tokens < 1:
            raise UserError(
                f"sample_prompt={sample_prompt!r} is {len(self._prompt)} tokens, no shorter than the model's "
                f"context of {model.config.block_size}; shorten it, or --sample_prompt='' for no sample"
            )

    def __call__(self) -> EvalResult:
        val_loss = self._val()
        self._model.eval()
        with self._autocast:
            tasks = {
                name: zero_shot.evaluate(self._model, name, items, self._job, zero_shot.BATCH_TOKENS)
                for name, items in self._items.items()
            }
        self._model.train()
        sample = self._sample() if self._sampling and self._job.rank == 0 else None
        return EvalResult(val_loss, tasks if self._job.rank == 0 else {}, sample)

    def _sample(self) -> str | None:
        """The eval's sample; None, said in one line, where the weights hold inf or NaN (nothing to sample)."""
        if broken := first_nonfinite(self._model.named_parameters()):
            print(f"no sample at this eval: {broken} holds inf or NaN, or values near it", flush=True)
            return None
        generator = torch.Generator(self._job.device).manual_seed(self._seed)
        with self._autocast:
            ids = generate(
                self._model,
                torch.tensor([self._prompt], device=self._job.device),
                self._new_tokens,
                **RECIPE_SAMPLING,
                generator=generator,
                eos_token_id=tokenizer.EOT_ID,
                vocab_size=tokenizer.VOCAB_SIZE,  # a padded vocabulary's extra ids are no tokens
            )
        self._model.clear_kv_cache()
        return self._prompt_text + tokenizer.decode(ids[0, len(self._prompt) :].tolist())
