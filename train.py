"""Trains GPT-2 on token shards with a plain loop: one process, or many with torchrun.

    python train.py config/austen.py                                 # small model, CPU or one GPU
    torchrun --standalone --nproc_per_node=8 train.py config/bookcorpus.py   # the recipe
    python train.py config/austen.py --resume=auto                   # continue the newest checkpoint

Batches. An optimizer step takes batch_size windows of block_size + 1 tokens in all, over every
process: the global batch. Each process takes its share in micro-batches of micro_batch_size and
accumulates gradients over them (by default the largest micro-batch that fits: measured on a GPU,
the whole share on a CPU). Epoch e visits the train windows in a permutation seeded by (seed, e);
step s takes the next batch_size of it, and rank r's micro-step m a fixed slice of that, so the
sequence of global batches is the same however it is split over processes and micro-steps, and
the step alone is the exact data position.

The step never waits for the GPU: batches are read ahead and copied from pinned memory, a step with
a non-finite loss or gradient is skipped by the optimizer itself, on the device, and the loss and
gradient norm are read back only at the steps that log, evaluate or checkpoint.

An eval takes the val loss, scores the zero-shot tasks of `tasks` as lm-evaluation-harness does
(eval.py; "hellaswag/acc_norm" and the like in metrics.jsonl) and continues `sample_prompt` with a
fixed seed, so that the samples of a run differ only by its weights (Evaluator).

A run's directory (sample.py reads its newest checkpoint):
out/<run>/train_config.json   the resolved config (not config.json: that name marks an HF model dir)
out/<run>/metrics.jsonl       one JSON record per log step, skipped step and eval; loss.png plots it
out/<run>/ckpt_<step:07d>/    the checkpoints (checkpoint.py): complete HF model directories, tokenizer included
out/<run>.lock                held by the job training the run: a second one is refused (checkpoint.py)
Every rank reads data and checkpoints from the same paths: on many nodes, a shared filesystem.
SIGTERM (preemption), SIGINT or SIGHUP, to any or all processes of the job and however many times,
ends the current step on every rank, saves a checkpoint of it and exits with status 128 + the
signal once it is complete; `--resume=auto` then continues as if nothing had happened (bitwise, on
CPU). A failure on any rank ends the whole job within seconds (distributed.py says how).
A resumed run trains with its own learning rate, AdamW settings, clipping and schedule (continued
from the step reached); it prints and records in metrics.jsonl which of them differ from the checkpoint's.
"""

import dataclasses
import functools
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.lr_scheduler import LambdaLR

import configurator
import eval as zero_shot
import tokenizer
from checkpoint import (
    Checkpoint,
    Checkpointer,
    TrainerState,
    find_resume_checkpoint,
    latest_checkpoint,
    make_dir,
    run_dir_lock,
)
from common import UserError, atomic_write_bytes, check_device, keep_freed_memory, one_line
from distributed import Job
from loss import GPU_LOSS_CHUNK_ROWS, CompactVocab, tie_unseen_rows
from model import GPT, GPTConfig
from plot import plot_run
from sample import SampleConfig
from shards import TokenWindows

NONFINITE_STEPS_BEFORE_STOP = 5  # skipped steps in a row that end the run
# Dense bf16 tensor-core peak FLOP/s of one GPU (no sparsity), for MFU, from the vendor datasheets (which print
# the sparse figure, twice these): H100/H200 SXM 1,979 T sparse, PCIe 1,513, NVL 1,671; H800 as H100; GH200 as
# H100 SXM; B200 4.5 P sparse; A100 312 dense; L40S 362.05 dense; A10 125 dense; RTX 4090 165.2 dense (Ada
# whitepaper, fp32 accumulate). Keys are whole words of the device name; the longest that matches wins.
PEAK_BF16_FLOPS = {
    "H100": 989.4e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835.5e12,
    "H200": 989.4e12,
    "H200 NVL": 835.5e12,
    "H800": 989.4e12,
    "H800 PCIe": 756e12,
    "GH200": 989.4e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362.05e12,
    "A10": 125e12,
    "RTX 4090": 165.2e12,
}
# DDP's all-reduce buckets; the compiled graph splits at each. Larger than DDP's 25 MB so that GPT-2 small's
# 0.5 GB of fp32 gradients make 5 splits rather than 20, while the first all-reduce still starts a fifth of the
# way into the backward and overlaps the rest.
DDP_BUCKET_MB = 100
GPU_MEMORY_FOR_STEPS = 0.85  # of the GPU's memory, what the automatic micro-batch may fill


@dataclass
class TrainConfig:
    """Every key train.py reads. Defaults are the recipe's (config/bookcorpus.py spells it out)."""

    # where
    data_dir: str = "data/bookcorpus"  # the token shards and meta.json that prepare.py wrote
    out_dir: str = "out"  # where runs live
    run_name: str = "gpt2"  # the run lives in out_dir/run_name; also its wandb name
    init_from: str = "scratch"  # 'scratch' (new weights), or an HF GPT-2 directory / Hub name to finetune
    resume: str = ""  # '' a new run; 'auto' this run's newest checkpoint, or a new run if none; or a ckpt_* dir
    eval_only: bool = False  # evaluate the resumed / init_from model on the val split and exit
    seed: int = 42  # initial weights, data order, dropout and the eval sample
    # model (a loaded model keeps its own shape; block_size may then be shorter than its context)
    block_size: int = 1024  # tokens per training window (and a new model's context)
    vocab_size: int = 50257  # token embeddings and output classes
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # model width
    dropout: float = 0.1  # on embeddings, attention weights and residual branches, in training
    # batch
    batch_size: int = 64  # sequences per optimizer step, over all processes (the global batch)
    micro_batch_size: int | None = None  # sequences per process per forward/backward; None: the largest that fits
    epochs: int = 1  # passes over the train split, when max_steps is None
    max_steps: int | None = None  # None: epochs x steps per epoch
    # AdamW and schedule, as the HF Trainer: linear warmup then cosine (or linear) decay to 0
    learning_rate: float = 2.5e-4  # the peak, reached at the end of the warmup
    weight_decay: float = 0.01  # not on biases and LayerNorm weights
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.999  # AdamW's second-moment decay
    eps: float = 1e-8  # AdamW's denominator term
    warmup_ratio: float = 0.05  # warmup steps = ceil(warmup_ratio x max_steps), as transformers
    lr_decay: str = "cosine"  # after the warmup, down to 0 at max_steps: 'cosine' (the HF Trainer's) or 'linear'
    grad_clip: float = 1.0  # the largest gradient norm; larger ones are scaled down to it
    # eval, logging, checkpoints
    eval_interval: int = 500  # steps between evaluations on the val split (and at the last step)
    eval_windows: int | None = None  # val windows per eval (a fixed sample); None: the whole split
    tasks: str = ""  # comma-separated zero-shot tasks scored at each eval, as lm-eval: hellaswag, lambada_openai
    hellaswag_file: str | None = None  # a JSONL file of Rowan/hellaswag's validation rows; None: from the Hub (cached)
    lambada_openai_file: str | None = None  # a JSONL file of EleutherAI/lambada_openai's test rows; None: from the Hub
    task_limit: int | None = None  # score the first N items of each task; None: all
    sample_prompt: str = "I was telling her that"  # continued at each eval (rank 0, seed, sample.py's sampling); '' off
    sample_tokens: int = 64  # new tokens of each eval's sample, fewer where the model's context ends first
    log_interval: int = 10  # steps between log lines and metrics.jsonl records (and at the last step)
    checkpoint_interval: int = 5000  # steps between checkpoints (and at the last step and at a stop)
    keep_checkpoints: int = 10  # how many of the newest checkpoints to keep
    wandb_log: bool = False  # also log to Weights & Biases
    wandb_project: str = "gpt2-bookcorpus"  # the wandb project of the run
    # system
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # 'cuda' (one GPU per process) or 'cpu'
    dtype: str | None = None  # autocast 'bfloat16', or 'float32'; None: bfloat16 where the device runs it natively
    compile: bool = torch.cuda.is_available()  # torch.compile the model (by default where a GPU is visible)
    dist_timeout_minutes: float = 10.0  # how long a collective waits for a silent rank (a seen failure ends the job)


def check_config(cfg: TrainConfig, world_size: int) -> None:
    """Refuses values that could only fail later (or silently do nothing), before anything is built."""
    positive = (
        "block_size vocab_size n_layer n_head n_embd batch_size micro_batch_size epochs max_steps learning_rate "
        "grad_clip eval_interval eval_windows task_limit sample_tokens log_interval checkpoint_interval "
        "keep_checkpoints dist_timeout_minutes"
    ).split()
    for key in positive:
        if (value := getattr(cfg, key)) is not None and not value > 0:
            raise UserError(
                f"{key}={value}: must be positive"
                + (" (keep_checkpoints=1 keeps the newest only)" if key == "keep_checkpoints" else "")
            )
    for field in dataclasses.fields(cfg):
        if isinstance(value := getattr(cfg, field.name), float) and not math.isfinite(value):
            raise UserError(f"{field.name}={value}: must be a finite number")
    for key in ("weight_decay", "eps"):
        if (value := getattr(cfg, key)) < 0:
            raise UserError(f"{key}={value}: must be 0 or more")
    if not 0 <= cfg.seed < 2**63:
        raise UserError(f"seed={cfg.seed}: must be an integer in [0, 2**63)")
    for key in ("dropout", "beta1", "beta2"):
        if not 0 <= (value := getattr(cfg, key)) < 1:
            raise UserError(f"{key}={value}: must be in [0, 1)")
    if not 0 <= cfg.warmup_ratio <= 1:
        raise UserError(f"warmup_ratio={cfg.warmup_ratio}: must be in [0, 1] (a fraction of the steps)")
    if cfg.lr_decay not in ("cosine", "linear"):
        raise UserError(f"lr_decay={cfg.lr_decay!r}: use 'cosine' or 'linear'")
    if cfg.run_name.strip() in ("", ".", ".."):
        raise UserError(f"run_name={cfg.run_name!r}: must name the run's own directory under out_dir, such as gpt2")
    if cfg.init_from == "resume":
        raise UserError("init_from='resume' is not a starting point; use --resume=auto (this run's newest checkpoint)")
    check_device(cfg.device)
    zero_shot.task_names(cfg.tasks)
    if cfg.dtype not in (None, "bfloat16", "float32"):
        raise UserError(f"dtype={cfg.dtype}: use bfloat16 (autocast) or float32; float16 would need loss scaling")
    if cfg.batch_size % world_size:
        raise UserError(
            f"batch_size={cfg.batch_size} does not split over {world_size} processes; use a multiple of {world_size}"
        )
    if cfg.micro_batch_size and (cfg.batch_size // world_size) % cfg.micro_batch_size:
        raise UserError(
            f"micro_batch_size={cfg.micro_batch_size} does not divide the {cfg.batch_size // world_size} sequences "
            f"per process (batch_size={cfg.batch_size} over {world_size}); pick a divisor"
        )


def native_dtype(device: str) -> str:
    """bfloat16 where the device has bf16 matmuls (GPUs since Ampere; x86 CPUs with AVX512-BF16 or AMX),
    float32 elsewhere: a CPU without them emulates bf16, many times slower than it runs fp32 (BENCHMARKS.md)."""
    if device.startswith("cuda"):
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        native = any(torch.cpu.get_capabilities().get(flag) for flag in ("avx512_bf16", "amx_bf16"))
    return "bfloat16" if native else "float32"


def set_precision(cfg: TrainConfig):
    """The autocast context of the steps: bf16 matmuls with fp32 weights and optimizer, or none (fp32).
    On a GPU, fp32 matmuls outside autocast use TF32."""
    if cfg.device.startswith("cuda"):
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    if cfg.dtype == "bfloat16":
        return torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16)
    return nullcontext()


@dataclass
class RunData:
    """The windows a run reads and the steps they make."""

    val: TokenWindows
    val_rows: np.ndarray  # the val windows each evaluation takes
    train: TokenWindows | None = None  # None: only evaluating
    steps_per_epoch: int = 0  # whole global batches in the train split
    max_steps: int = 0  # the step the run ends after
    order: dict | None = None  # what fixes the order of the batches: resuming with others would skip or repeat data


def load_data(cfg: TrainConfig) -> RunData:
    val = TokenWindows(cfg.data_dir, "val", cfg.block_size)
    val_rows = np.arange(len(val))
    if cfg.eval_windows is not None and cfg.eval_windows < len(val_rows):
        val_rows = np.sort(np.random.default_rng(cfg.seed).choice(len(val_rows), cfg.eval_windows, replace=False))
    if cfg.eval_only:
        return RunData(val, val_rows)
    train = TokenWindows(cfg.data_dir, "train", cfg.block_size)
    steps_per_epoch = len(train) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UserError(
            f"{cfg.data_dir}: the train split has {len(train)} windows of {cfg.block_size + 1} tokens, "
            f"fewer than one batch of {cfg.batch_size}; lower batch_size or block_size"
        )
    order = {"seed": cfg.seed, "global_batch": cfg.batch_size, "train_windows": len(train)}
    return RunData(val, val_rows, train, steps_per_epoch, cfg.max_steps or cfg.epochs * steps_per_epoch, order)


def model_source(cfg: TrainConfig, resume_from: Checkpoint | None) -> Path | str | None:
    """Where the weights come from: the checkpoint resumed, init_from's HF GPT-2, or None for new ones."""
    source = resume_from.path if resume_from else (None if cfg.init_from == "scratch" else cfg.init_from)
    if cfg.eval_only and source is None:
        raise UserError(
            "eval_only needs weights: --resume=auto (this run's newest checkpoint), --resume=CKPT_DIR "
            "or --init_from=HF_DIR"
        )
    return source


def build_model(cfg: TrainConfig, source, meta: dict) -> GPT:
    """A new model from the config keys, or the one in `source` (a checkpoint or HF GPT-2 dir/name).

    The data must fit the model: a new model is checked before it is built.
    """
    if source is None:
        config = GPTConfig(cfg.block_size, cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout)
        check_model_fits_data(config, cfg, meta)
        torch.manual_seed(cfg.seed)  # the same initial weights whatever the number of ranks
        return GPT(config)
    model = GPT.from_pretrained(str(source), dropout=cfg.dropout).train()  # eval mode from from_pretrained, as HF's
    check_model_fits_data(model.config, cfg, meta)
    return model


def compact_output_layer(model: GPT, windows: TokenWindows, new_model: bool) -> str:
    """Gives the model's loss the softmax over the tokens of the train windows (loss.CompactVocab), a new
    model's rows of the others tied first; says which softmax the model takes. A loaded model whose unseen
    rows differ (a pretrained one) keeps the whole softmax."""
    weight = model.lm_head.weight
    seen = torch.from_numpy(windows.tokens_present()).to(weight.device)
    seen = torch.cat([seen, seen.new_zeros(len(weight) - len(seen))])  # a model vocabulary beyond the data's
    if new_model:
        tie_unseen_rows(weight, seen)
    model.compact_vocab = CompactVocab.of(weight, seen)
    if model.compact_vocab is None:
        return f"softmax over all {len(weight):,} tokens"
    return (
        f"softmax over the {int(seen.sum()):,} tokens of the train split, the other {int((~seen).sum()):,} "
        "(one shared row) as one column"
    )


def check_model_fits_data(config: GPTConfig, cfg: TrainConfig, meta: dict) -> None:
    if cfg.block_size > config.block_size:
        raise UserError(
            f"block_size={cfg.block_size} is longer than the model's context of {config.block_size} positions; "
            "lower block_size"
        )
    if meta["vocab_size"] > config.vocab_size:
        raise UserError(
            f"{cfg.data_dir} uses a vocabulary of {meta['vocab_size']} tokens but the model has "
            f"vocab_size={config.vocab_size}; set vocab_size={meta['vocab_size']}"
        )


def with_model_shape(cfg: TrainConfig, model: GPT) -> TrainConfig:
    """cfg with a loaded model's own shape, so that the config a run saves tells the truth."""
    return dataclasses.replace(
        cfg, **{key: getattr(model.config, key) for key in ("vocab_size", "n_layer", "n_head", "n_embd")}
    )


def distribute(model: GPT, cfg: TrainConfig, job: Job):
    """The model the steps run: under DDP with several processes, compiled if cfg says so. DDP first, then
    compile: dynamo splits the graph at DDP's gradient buckets, so their all-reduces overlap the backward."""
    if job.world_size > 1:
        model = DDP(
            model,
            device_ids=[torch.cuda.current_device()] if cfg.device.startswith("cuda") else None,
            bucket_cap_mb=DDP_BUCKET_MB,
            gradient_as_bucket_view=True,  # gradients live in the buckets: not copied in and out, not held twice
        )
    return torch.compile(model) if cfg.compile else model


def describe_batches(cfg: TrainConfig, job: Job, micro_batch_size: int, data: RunData, start_step: int) -> str:
    micro_steps = cfg.batch_size // job.world_size // micro_batch_size
    return (
        f"batch {cfg.batch_size} sequences of {cfg.block_size} tokens = {job.world_size} processes x {micro_steps} "
        f"micro-steps x {micro_batch_size} sequences ({'set' if cfg.micro_batch_size else 'the largest that fits'}); "
        f"{data.steps_per_epoch:,} steps per epoch; steps {start_step} -> {data.max_steps}"
    )


def lr_schedule(optimizer, max_steps: int, warmup_ratio: float, decay: str = "cosine") -> LambdaLR:
    """transformers' get_cosine_schedule_with_warmup, or get_linear_schedule_with_warmup for decay='linear',
    warmup steps rounded up as the Trainer does."""
    warmup_steps = math.ceil(max_steps * warmup_ratio)

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if decay == "linear":
            return max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return LambdaLR(optimizer, lr_factor)


@functools.lru_cache(maxsize=1)
def epoch_order(seed: int, epoch: int, num_windows: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_windows)


def global_batch_rows(seed: int, step: int, steps_per_epoch: int, num_windows: int, batch_size: int) -> np.ndarray:
    """The windows of optimizer step `step`: the next batch_size of its epoch's permutation."""
    epoch, index = divmod(step, steps_per_epoch)
    return epoch_order(seed, epoch, num_windows)[index * batch_size : (index + 1) * batch_size]


def rank_rows(rows: np.ndarray, world_size: int, rank: int, micro_batch_size: int) -> np.ndarray:
    """This rank's share of a global batch as micro-batches (micro-steps, micro_batch_size): the rows
    as (micro-step, rank, micro_batch_size), rank r taking [:, r]."""
    return rows.reshape(-1, world_size, micro_batch_size)[:, rank]


def batches(
    windows: TokenWindows,
    cfg: TrainConfig,
    job: Job,
    micro_batch_size: int,
    steps_per_epoch: int,
    start_step: int,
    max_steps: int,
):
    """Each step's tokens for this rank, (micro-steps, micro_batch_size, block_size + 1) on the device.

    A thread reads the next step's windows while the current step runs; on a GPU they come from
    pinned memory, so the copy is asynchronous.
    """
    pin = cfg.device.startswith("cuda")

    def read(step: int) -> torch.Tensor:
        rows = rank_rows(
            global_batch_rows(cfg.seed, step, steps_per_epoch, len(windows), cfg.batch_size),
            job.world_size,
            job.rank,
            micro_batch_size,
        )
        tokens = torch.from_numpy(windows.batch(rows.ravel())).view(*rows.shape, -1)
        return tokens.pin_memory() if pin else tokens

    with ThreadPoolExecutor(1) as reader:
        upcoming = reader.submit(read, start_step)
        for step in range(start_step, max_steps):
            tokens = upcoming.result()
            if step + 1 < max_steps:
                upcoming = reader.submit(read, step + 1)
            yield tokens.to(cfg.device, non_blocking=True)


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


def choose_micro_batch(cfg: TrainConfig, job: Job, model: GPT, autocast) -> tuple[int, float | None]:
    """micro_batch_size, or else the largest that fits, with the peak memory predicted for it (None where
    nothing is measured). On a GPU, the prediction comes from the peaks of eager forward + backward passes at
    probe_sizes with the parameter gradients already allocated, as in every real micro-step (a compiled step
    takes less), plus AdamW's moments; on a CPU, the micro-batch is each process's whole share."""
    per_rank = cfg.batch_size // job.world_size
    if cfg.micro_batch_size or not cfg.device.startswith("cuda") or per_rank == 1:
        return cfg.micro_batch_size or per_rank, None
    sizes = probe_sizes(per_rank, cfg.block_size)

    def forward_backward(sequences: int) -> None:
        tokens = torch.randint(0, model.config.vocab_size, (sequences, cfg.block_size + 1), device=cfg.device)
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
    budget = GPU_MEMORY_FOR_STEPS * torch.cuda.get_device_properties(cfg.device).total_memory
    # every rank must run as many micro-steps
    chosen = job.agree(largest_micro_batch(per_rank, fixed, per_sequence, budget), dist.ReduceOp.MIN)
    return chosen, fixed + chosen * per_sequence


def train_step(
    model, raw_model: GPT, optimizer, scheduler, tokens: torch.Tensor, autocast, grad_clip: float, job: Job
) -> torch.Tensor:
    """One optimizer step over tokens (micro-steps, micro-batch, T + 1). Returns (loss, grad norm,
    skipped) on the device, unread: the host goes on to the next step while the GPU works.

    Gradients are clipped to grad_clip by the optimizer (grad_scale). A non-finite loss or gradient norm
    skips the update inside the fused AdamW (found_inf, as a GradScaler would tell it), on the device;
    every rank sees the same all-reduced loss and norm, so all skip alike. The schedule advances
    either way, as the HF Trainer's does.
    """
    micro_steps = tokens.shape[0]
    loss_sum = torch.zeros((), device=tokens.device)
    for micro_step in range(micro_steps):
        # Gradients are all-reduced once, in the backward of the last micro-step.
        last = micro_step == micro_steps - 1
        with model.no_sync() if job.world_size > 1 and not last else nullcontext():
            with autocast:
                _, loss = model(tokens[micro_step, :, :-1], tokens[micro_step, :, 1:])
            (loss / micro_steps).backward()  # the mean over the global batch
        loss_sum += loss.detach()
    grads = [p.grad for p in raw_model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads)  # equal on all ranks after DDP
    optimizer.grad_scale = clip_divisor(grad_norm, grad_clip)
    if job.world_size > 1:
        dist.all_reduce(loss_sum)
    loss = loss_sum / (micro_steps * job.world_size)
    skipped = (~(loss.isfinite() & grad_norm.isfinite())).float()
    optimizer.found_inf = skipped
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return torch.stack([loss, grad_norm, skipped])


def clip_divisor(grad_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The fused AdamW's grad_scale that clips gradients of norm grad_norm to max_norm: its kernel divides
    each gradient by it as it reads it, where clip_grad_norm_ would multiply every gradient by
    max_norm / (norm + 1e-6) when below 1, in a pass of its own."""
    return ((grad_norm + 1e-6) / max_norm).clamp(min=1)


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
            "val_perplexity": math.exp(self.val_loss),
            **{f"{task}/{metric}": value for task, metrics in self.tasks.items() for metric, value in metrics.items()},
            **({"sample": self.sample} if self.sample is not None else {}),
        }

    def describe(self) -> str:
        tasks = "".join(
            f"; {task} " + " ".join(f"{metric} {value:.4f}" for metric, value in metrics.items())
            for task, metrics in self.tasks.items()
        )
        sample = f"\nsample: {self.sample}" if self.sample is not None else ""
        return f"val loss {self.val_loss:.4f}, perplexity {math.exp(self.val_loss):.2f}{tasks}{sample}"


class Evaluator:
    """What an evaluation measures: the loss on the val windows, the zero-shot tasks of cfg.tasks (scored as
    lm-evaluation-harness scores them, eval.py) and, on rank 0, a sample continuing cfg.sample_prompt. Both
    are GPT-2 text: the tasks refuse data of another tokenizer, the sample is left out (and says so).

    The sample draws from a generator of its own seeded with cfg.seed, with sample.py's sampling: samples
    differ only by the weights, and training's random streams go on as if there were none. The tasks'
    rows are read on construction (rank 0, shared), so a dataset out of reach is one line before any step.
    """

    def __init__(self, cfg: TrainConfig, job: Job, model: GPT, data: RunData, micro_batch_size: int, autocast):
        self._cfg, self._job, self._model, self._autocast = cfg, job, model, autocast
        self._val = functools.partial(
            zero_shot.window_loss, model, data.val, data.val_rows, micro_batch_size, cfg.device, autocast, job
        )
        names = zero_shot.task_names(cfg.tasks)
        tokens = data.val.meta.get("tokenizer")
        if names and tokens != "gpt2":
            raise UserError(
                f"{cfg.data_dir} holds {tokens!r} tokens, but the tasks are scored in GPT-2's; prepare the data "
                "with prepare.py, or --tasks='' for none"
            )
        self._sampling = bool(cfg.sample_prompt) and tokens == "gpt2"
        if cfg.sample_prompt and not self._sampling:
            job.announce(f"no samples at evals: {cfg.data_dir} holds {tokens!r} tokens, not GPT-2's")
        self._items = zero_shot.load_tasks(names, cfg, cfg.task_limit, job)
        self._prompt = tokenizer.encode(cfg.sample_prompt)
        self._new_tokens = min(cfg.sample_tokens, model.config.block_size - len(self._prompt))
        if self._sampling and self._new_tokens < 1:
            raise UserError(
                f"sample_prompt={cfg.sample_prompt!r} is {len(self._prompt)} tokens, no shorter than the model's "
                f"context of {model.config.block_size}; shorten it, or --sample_prompt='' for no sample"
            )

    def __call__(self) -> EvalResult:
        val_loss = self._val()
        self._model.eval()
        with self._autocast:
            tasks = {
                # eval.py's default batch: its (tokens x 50257) logits, which training never holds, fit any device
                name: zero_shot.evaluate(self._model, name, items, self._job, zero_shot.EvalConfig.batch_tokens)
                for name, items in self._items.items()
            }
        self._model.train()
        sample = self._sample() if self._sampling and self._job.rank == 0 else None
        return EvalResult(val_loss, tasks if self._job.rank == 0 else {}, sample)

    def _sample(self) -> str:
        recipe = SampleConfig()
        generator = torch.Generator(self._cfg.device).manual_seed(self._cfg.seed)
        with self._autocast:
            ids = self._model.generate(
                torch.tensor([self._prompt], device=self._cfg.device),
                self._new_tokens,
                temperature=recipe.temperature,
                top_k=recipe.top_k,
                top_p=recipe.top_p,
                generator=generator,
                eos_token_id=tokenizer.EOT_ID,
                vocab_size=tokenizer.VOCAB_SIZE,  # a padded vocabulary's extra ids are no tokens
            )
        self._model.clear_kv_cache()
        return self._cfg.sample_prompt + tokenizer.decode(ids[0, len(self._prompt) :].tolist())


class Reporter:
    """What the steps report, and when: the console line, metrics.jsonl and wandb of the log steps
    (mean loss, as the HF Trainer logs, grad norm, tokens/s, MFU, ETA) and of the evaluations, and
    the steps skipped for a non-finite loss or gradient (too many in a row stop the run).

    The steps' (loss, grad norm, skipped) stay on the device and are read back only in `read_back`, at
    the steps that log, evaluate or checkpoint. Rank 0 prints and records; every rank reads, so every
    rank stops alike. Used as a context manager: its wandb run finishes on the way out.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        job: Job,
        run_dir: Path,
        max_steps: int,
        state: TrainerState,
        flops: float,
        memory: tuple[int, float] | None = None,
    ):
        """memory: (micro-batch, its predicted peak bytes) where choose_micro_batch measured them (a GPU)."""
        self._cfg, self._job, self._run_dir, self._max_steps = cfg, job, run_dir, max_steps
        self._memory, self._steps_added = memory, 0
        self._flops_per_token, self._peak_flops = flops, peak_bf16_flops(cfg.device)
        self._tokens_per_step = cfg.batch_size * cfg.block_size
        self.nonfinite_steps = state.nonfinite_steps  # skipped steps in the whole run
        self._in_a_row = 0
        self._unread = []  # (3,) device tensors of the steps since the last read
        self._finite = []  # (loss, grad norm) of the finite steps read since the last log line
        self._logged_step, self._seconds, self._clock_from = state.step, 0.0, time.perf_counter()
        self._samples = []  # [step, sample] of each eval, for wandb's table
        # Before any step: a failure here (wandb, the run directory) costs nothing yet.
        self._wandb_run = job.on_rank0(lambda: open_run(cfg, run_dir, state.step, state.wandb_run_id))
        self.wandb_run_id = self._wandb_run.id if self._wandb_run else None  # what a checkpoint keeps to continue it

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc) -> None:
        if self._wandb_run:
            self._wandb_run.finish()

    def should_log(self, step: int) -> bool:
        return step % self._cfg.log_interval == 0 or step == self._max_steps

    def should_evaluate(self, step: int) -> bool:
        return step % self._cfg.eval_interval == 0 or step == self._max_steps

    def add_step(self, result: torch.Tensor) -> None:
        """A step's (loss, grad norm, skipped) as train_step returns it, unread. After this process's second
        step (the optimizer's state is allocated by then), the peak memory against the prediction."""
        self._unread.append(result)
        self._steps_added += 1
        if self._memory and self._steps_added == 2:
            micro_batch_size, predicted_peak = self._memory
            self._job.announce(
                f"memory: peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB in the first steps, "
                f"{predicted_peak / 2**30:.1f} GiB predicted for micro-batch {micro_batch_size}"
            )

    @contextmanager
    def read_back(self, step: int):
        """Reads the steps up to `step` (waiting for the device, which ends their training time), records
        each skipped one and raises after too many in a row; the block's time (logging, evaluating,
        saving) is not training time."""
        rows = torch.stack(self._unread).tolist() if self._unread else []
        self._unread = []
        self._seconds += time.perf_counter() - self._clock_from
        for s, (loss, grad_norm, skipped) in enumerate(rows, start=step - len(rows) + 1):
            if skipped:
                self._skipped(s, loss, grad_norm)
            else:
                self._in_a_row = 0
                self._finite.append((loss, grad_norm))
        yield
        self._clock_from = time.perf_counter()

    def _skipped(self, step: int, loss: float, grad_norm: float) -> None:
        self.nonfinite_steps += 1
        self._in_a_row += 1
        if self._job.rank == 0:
            skipped = f"step skipped ({self._in_a_row} in a row)"
            print(f"step {step}: non-finite loss {loss} or grad norm {grad_norm}; {skipped}", flush=True)
            self._record(step, {"skipped": "non-finite loss", "nonfinite_steps": self.nonfinite_steps})
        if self._in_a_row == NONFINITE_STEPS_BEFORE_STOP:
            raise UserError(
                f"loss was non-finite for {self._in_a_row} steps in a row (up to step {step}); the last checkpoint is "
                f"{latest_checkpoint(self._run_dir)}; lower learning_rate or check the data"
            )

    def log(self, step: int, lr: float) -> None:
        """The log line and record of the steps read since the last one; none while all of them were skipped."""
        if not self._finite:
            return
        losses, grad_norms = zip(*self._finite, strict=True)
        steps, seconds = step - self._logged_step, self._seconds
        self._finite, self._logged_step, self._seconds = [], step, 0.0
        loss, grad_norm = sum(losses) / len(losses), grad_norms[-1]
        tokens_per_s = steps * self._tokens_per_step / seconds
        mfu = (
            self._flops_per_token * tokens_per_s / self._job.world_size / self._peak_flops if self._peak_flops else None
        )
        eta = timedelta(seconds=round((self._max_steps - step) * seconds / steps))
        self._job.announce(
            f"step {step}/{self._max_steps} | loss {loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
            f"{tokens_per_s:,.0f} tok/s | MFU {f'{mfu:.1%}' if mfu else '-'} | ETA {eta}"
        )
        if self._job.rank == 0:
            metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "mfu": mfu}
            self._record(step, {**metrics, "nonfinite_steps": self.nonfinite_steps})

    def log_changes(self, step: int, changes: dict) -> None:
        """What a resumed run changed of the checkpoint's optimization ({key: [checkpoint's, this run's]}),
        printed and recorded: from this step on the run's own values apply."""
        if not changes:
            return
        listed = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changes.items() if key != "lr")
        old_lr, new_lr = changes["lr"]
        self._job.announce(
            f"resumed with changes: {listed}; they apply from step {step + 1} on, the schedule continuing from step "
            f"{step} (lr {old_lr:.3e} -> {new_lr:.3e})"
        )
        if self._job.rank == 0:
            self._record(step, {"resumed_with_changes": changes})

    def log_eval(self, step: int, result: EvalResult) -> None:
        self._job.announce(f"step {step}: {result.describe()}")
        if self._job.rank == 0:
            self._record(step, result.record())

    def _record(self, step: int, metrics: dict) -> None:
        metrics = {"step": step, "tokens": step * self._tokens_per_step, **metrics}
        try:
            with open(self._run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
        except OSError as e:
            raise unwritable(self._run_dir, e) from None
        if self._wandb_run:
            self._wandb_run.log(self._for_wandb(step, metrics), step=step)

    def _for_wandb(self, step: int, metrics: dict) -> dict:
        """metrics with a sample as a table of every sample of this process, one row per eval step."""
        if "sample" not in metrics:
            return metrics
        import wandb

        self._samples.append([step, metrics["sample"]])
        return {**metrics, "sample": wandb.Table(columns=["step", "sample"], data=self._samples)}


def flops_per_token(model: GPT, cfg: TrainConfig) -> float:
    """nanoGPT's estimate: 6 flops per parameter per token (forward + backward) plus attention over the full
    T x T scores (12 * n_layer * n_embd * block_size); position embeddings are lookups, not matmuls. Tools that
    count causal attention only (half the scores, as llm.c does) report a lower MFU for the same tokens/s, so
    across tools compare tokens/s. A compact softmax's output layer counts the columns it computes."""
    columns = len(model.compact_vocab.column_rows) if model.compact_vocab else cfg.vocab_size  # the output layer's
    skipped = (cfg.vocab_size - columns) * cfg.n_embd
    matmul_params = model.num_params() - model.transformer.wpe.weight.numel() - skipped
    return 6 * matmul_params + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def peak_bf16_flops(device: str) -> float | None:
    """The dense bf16 peak of the GPU (PEAK_BF16_FLOPS), None on a CPU or an unlisted GPU."""
    if not device.startswith("cuda"):
        return None
    return peak_bf16_flops_of(torch.cuda.get_device_name(device))


def peak_bf16_flops_of(device_name: str) -> float | None:
    """PEAK_BF16_FLOPS of the longest key that is whole words of device_name ("NVIDIA H100 NVL" -> "H100 NVL",
    "NVIDIA A100-SXM4-80GB" -> "A100", "NVIDIA A10G" -> None); None if no key is."""
    words = f" {' '.join(device_name.replace('-', ' ').split())} "
    matches = [name for name in PEAK_BF16_FLOPS if f" {name} " in words]
    return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None


def truncate_metrics(path: Path, step: int) -> None:
    """Drops the records after `step`: they come from an attempt that died before its next checkpoint."""
    if path.exists():
        kept = []
        for number, line in enumerate(path.read_text().splitlines(keepends=True), start=1):
            if not line.endswith("\n"):  # the partial last line of a killed writer
                continue
            try:
                record_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                raise UserError(
                    f"{path}, line {number}: not a metrics record; fix or remove that line, then resume again"
                ) from None
            if record_step <= step:
                kept.append(line)
        atomic_write_bytes(path, "".join(kept).encode())


def start_wandb(cfg: TrainConfig, run_id: str | None):
    import wandb

    if os.environ.get("WANDB_MODE") not in ("offline", "disabled") and not wandb.login(prompt=False, verify=False):
        raise UserError(
            "wandb_log=True but wandb has no API key; run `wandb login`, set WANDB_API_KEY, "
            "or log locally with WANDB_MODE=offline"
        )
    try:
        return wandb.init(project=cfg.wandb_project, name=cfg.run_name, id=run_id, resume="allow", config=asdict(cfg))
    except Exception as e:  # wandb raises many types (network, auth, server)
        raise UserError(
            f"wandb could not start a run ({type(e).__name__}: {e}); "
            "log locally with WANDB_MODE=offline and `wandb sync` later"
        ) from None


def unwritable(run_dir: Path, error: OSError) -> UserError:
    """The error for a run file that could not be written: a full disk, or something else at its path."""
    newest = latest_checkpoint(run_dir)
    return UserError(
        f"could not write {error.filename2 or error.filename or run_dir} ({error.strerror or error}); free space in "
        f"{run_dir} (or move aside what is at that path), then --resume=auto "
        + (f"continues from {newest.name}" if newest else "starts the run again (no checkpoint yet)")
    )


def open_run(cfg: TrainConfig, run_dir: Path, start_step: int, wandb_run_id: str | None):
    """Rank 0: the run directory, its config and metrics as of start_step, and wandb (None if off)."""
    make_dir(run_dir)
    try:
        atomic_write_bytes(run_dir / "train_config.json", (json.dumps(asdict(cfg), indent=2) + "\n").encode())
        truncate_metrics(run_dir / "metrics.jsonl", start_step)
    except OSError as e:
        raise unwritable(run_dir, e) from None
    return start_wandb(cfg, wandb_run_id) if cfg.wandb_log else None


def main(argv: list[str]) -> None:
    """Runs this process's part of the job; a stop signal ends it, after its checkpoint, with exit status
    128 + the signal."""
    cfg = configurator.parse_config(TrainConfig, argv)
    check_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    keep_freed_memory()
    job = Job(cfg.device, timedelta(minutes=cfg.dist_timeout_minutes))
    clean, stop_signal = False, 0
    try:
        # Evaluating writes nothing: it may read a run that another job is writing.
        with nullcontext() if cfg.eval_only else run_dir_lock(job, Path(cfg.out_dir) / cfg.run_name):
            stop_signal = train(
                dataclasses.replace(cfg, device=job.device, dtype=cfg.dtype or native_dtype(job.device)), job
            )
        clean = True
    except BaseException as e:
        job.fail(e)
        raise
    finally:
        job.close(clean, stopped=stop_signal > 0)  # every rank stopped after the same step, its checkpoint complete
    if stop_signal:
        sys.exit(128 + stop_signal)


def draw_loss_curves(run_dir: Path) -> None:
    """loss.png of a finished run; a plot that fails (no losses logged, a matplotlib problem) is a warning,
    never the run's failure."""
    try:
        print(f"loss curves: {plot_run(run_dir)}", flush=True)
    except Exception as e:  # noqa: BLE001 - the run itself is complete and saved
        print(f"warning: no loss curves ({one_line(e)}); `python plot.py {run_dir}` draws them", flush=True)


def train(cfg: TrainConfig, job: Job) -> int:
    """Trains as cfg says (or, with eval_only, evaluates). Returns the stop signal that ended the run
    early, once its step is saved; 0 if none did."""
    autocast = set_precision(cfg)
    run_dir = Path(cfg.out_dir) / cfg.run_name
    data = load_data(cfg)
    resume_from = job.on_rank0(lambda: find_resume_checkpoint(cfg, run_dir, data.order, data.max_steps), share=True)
    source = model_source(cfg, resume_from)
    raw_model = build_model(cfg, source, data.val.meta).to(cfg.device)
    cfg = with_model_shape(cfg, raw_model)
    # measured with the whole softmax: an upper bound of the compact one's memory
    micro_batch_size, predicted_peak = choose_micro_batch(cfg, job, raw_model, autocast)
    softmax = compact_output_layer(raw_model, data.train, source is None) if data.train is not None else None
    job.announce(f"config: {json.dumps(asdict(cfg))}")
    job.announce(
        f"model: {raw_model.num_params():,} parameters, {'from ' + str(source) if source else 'new'}"
        + (f"; {softmax}" if softmax else "")
    )
    evaluator = Evaluator(cfg, job, raw_model, data, micro_batch_size, autocast)
    if cfg.eval_only:
        job.announce(f"{len(data.val_rows)} windows of {cfg.block_size} tokens: {evaluator().describe()}")
        return 0

    model = distribute(raw_model, cfg, job)
    # fused: its found_inf lets train_step skip a non-finite step on the device
    optimizer = raw_model.configure_optimizers(
        cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps, fused=True
    )
    scheduler = lr_schedule(optimizer, data.max_steps, cfg.warmup_ratio, cfg.lr_decay)
    checkpointer = Checkpointer(job, run_dir, cfg, raw_model, optimizer, scheduler, data.order)
    state, changes = checkpointer.restore(resume_from)
    memory = (micro_batch_size, predicted_peak) if predicted_peak else None
    with Reporter(cfg, job, run_dir, data.max_steps, state, flops_per_token(raw_model, cfg), memory) as reporter:
        plan = describe_batches(cfg, job, micro_batch_size, data, state.step)
        job.announce(plan + (f" (resumed from {resume_from.path})" if resume_from else ""))
        reporter.log_changes(state.step, changes)
        if state.step == data.max_steps:
            job.announce(f"{run_dir} already finished its {data.max_steps} steps")
            return 0
        job.catch_stop_signals()
        feed = batches(data.train, cfg, job, micro_batch_size, data.steps_per_epoch, state.step, data.max_steps)
        for step, tokens in enumerate(feed, start=state.step + 1):  # step: the number of steps done once this one is
            lr = scheduler.get_last_lr()[0]
            reporter.add_step(train_step(model, raw_model, optimizer, scheduler, tokens, autocast, cfg.grad_clip, job))
            last_step = step == data.max_steps
            stop_signal = job.stop_signal() if not last_step else 0  # the last step ends the run anyway
            save = checkpointer.should_save(step, last_step=last_step, stopping=stop_signal > 0)
            if not (reporter.should_log(step) or reporter.should_evaluate(step) or save):
                continue
            with reporter.read_back(step):
                if reporter.should_log(step):
                    reporter.log(step, lr)
                if reporter.should_evaluate(step):
                    reporter.log_eval(step, evaluator())
                if save:
                    checkpointer.save(step, reporter.nonfinite_steps, reporter.wandb_run_id)
            if stop_signal:
                job.announce(f"stopped by signal {stop_signal} at step {step}; continue with --resume=auto")
                return stop_signal
        job.on_rank0(lambda: draw_loss_curves(run_dir))
    return 0


if __name__ == "__main__":
    configurator.run(main)
