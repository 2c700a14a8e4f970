"""Trains GPT-2 on token shards with a plain loop: one process, or many with torchrun.

    python train.py config/austen.py                                 # small model, CPU or one GPU
    torchrun --standalone --nproc_per_node=8 train.py config/bookcorpus.py   # the recipe
    python train.py config/austen.py --resume=auto                   # continue the newest checkpoint

Batches. An optimizer step takes batch_size windows of block_size + 1 tokens in all, over every
process: the global batch. Each process takes its share in micro-batches of micro_batch_size and
accumulates gradients over them (by default the largest micro-batch that fits: measured on a GPU,
the whole share on a CPU). The step alone is the exact data position (batching.py says how).

The step never waits for the GPU: batches are read ahead and copied from pinned memory, a step with
a non-finite loss or gradient is skipped by the optimizer itself, on the device, and the loss and
gradient norm are read back only at the steps that log, evaluate or checkpoint.

An eval takes the val loss, scores the zero-shot tasks of `tasks` as lm-evaluation-harness does
(zero_shot.py; "hellaswag/acc_norm" and the like in metrics.jsonl) and continues `sample_prompt` with a
fixed seed, so that the samples of a run differ only by its weights (evaluator.py). reporting.py
prints and records what the steps and evals measure.

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
import json
import math
import os
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import configurator
import zero_shot
from batching import batches, choose_micro_batch
from checkpoint import Checkpoint, Checkpointer, find_resume_checkpoint, from_checkpoint, run_dir_lock
from common import UserError, check_device, keep_freed_memory, one_line
from distributed import Job
from evaluator import Evaluator
from loss import compact_output_layer
from model import GPT, GPTConfig
from optim import adamw, check_schedule, clip_divisor, lr_schedule, muon_adamw
from plot import plot_run
from reporting import Reporter, flops_per_token, open_run
from shards import TokenWindows

# DDP's all-reduce buckets; the compiled graph splits at each. Four times DDP's default, so that GPT-2 small's
# fp32 gradients make a few splits rather than many, while the first all-reduce still starts early in the
# backward and overlaps the rest.
DDP_BUCKET_MB = 100


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
    # optimizer and schedule; the defaults are the HF Trainer's: AdamW, linear warmup then cosine decay to 0
    optimizer: str = "adamw"  # 'adamw'; or 'muon': Muon on the blocks' matrices, AdamW (the keys below) on the rest
    learning_rate: float = 2.5e-4  # AdamW's peak, reached at the end of the warmup
    weight_decay: float = 0.01  # not on biases and LayerNorm weights
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.999  # AdamW's second-moment decay
    eps: float = 1e-8  # AdamW's denominator term
    warmup_ratio: float = 0.05  # warmup steps = ceil(warmup_ratio x max_steps), as transformers
    lr_decay: str = "cosine"  # after the warmup, down to 0 at max_steps: 'cosine' (the HF Trainer's), 'linear', 'wsd'
    cooldown_ratio: float = 0.2  # wsd: the peak holds until the last cooldown_ratio of the steps, then falls linearly
    muon_learning_rate: float = 0.01  # Muon's peak (scaled by the schedule as learning_rate is)
    muon_momentum: float = 0.95  # Muon's Nesterov momentum
    muon_weight_decay: float = 0.0  # Muon's decoupled weight decay on the blocks' matrices
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


# The keys a resumed run takes from its own config rather than the checkpoint's: AdamW's hyperparameters,
# the clipping, the schedule (evaluated from the step reached on) and dropout.
OPTIMIZATION_KEYS = (
    "learning_rate weight_decay beta1 beta2 eps grad_clip warmup_ratio lr_decay cooldown_ratio muon_learning_rate "
    "muon_momentum muon_weight_decay max_steps epochs dropout"
).split()
MODEL_SHAPE_KEYS = ("vocab_size", "n_layer", "n_head", "n_embd")  # a loaded model keeps its own


def resume_changes(resumed: Checkpoint | None, cfg: TrainConfig, saved_lr: float | None, lr: float) -> dict:
    """What a resumed run changes of its checkpoint's config: {key: [checkpoint's, this run's]} of the
    OPTIMIZATION_KEYS that differ, with the learning rate at the step reached (saved_lr -> lr) as 'lr'."""
    if resumed is None:
        return {}
    saved, ours = resumed.config, asdict(cfg)
    changes = {key: [saved.get(key), ours[key]] for key in OPTIMIZATION_KEYS if saved.get(key) != ours[key]}
    return {**changes, "lr": [saved_lr, lr]} if changes else {}


def check_config(cfg: TrainConfig, world_size: int) -> None:
    """Refuses values that could only fail later (or silently do nothing), before anything is built."""
    positive = (
        "block_size vocab_size n_layer n_head n_embd batch_size micro_batch_size epochs max_steps learning_rate "
        "muon_learning_rate grad_clip eval_interval eval_windows task_limit sample_tokens log_interval "
        "checkpoint_interval keep_checkpoints dist_timeout_minutes"
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
    for key in ("weight_decay", "eps", "muon_weight_decay"):
        if (value := getattr(cfg, key)) < 0:
            raise UserError(f"{key}={value}: must be 0 or more")
    if not 0 <= cfg.seed < 2**63:
        raise UserError(f"seed={cfg.seed}: must be an integer in [0, 2**63)")
    for key in ("dropout", "beta1", "beta2", "muon_momentum"):
        if not 0 <= (value := getattr(cfg, key)) < 1:
            raise UserError(f"{key}={value}: must be in [0, 1)")
    check_schedule(cfg.warmup_ratio, cfg.lr_decay, cfg.cooldown_ratio)
    if cfg.optimizer not in ("adamw", "muon"):
        raise UserError(f"optimizer={cfg.optimizer!r}: use 'adamw' or 'muon'")
    if cfg.run_name.strip() in ("", ".", "..") or Path(cfg.run_name).name != cfg.run_name or "\\" in cfg.run_name:
        raise UserError(
            f"run_name={cfg.run_name!r}: must name the run's own directory under out_dir, such as gpt2 "
            "(not a path: out_dir says where runs live)"
        )
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
    val_indices: np.ndarray  # the val windows each evaluation takes
    train: TokenWindows | None = None  # None: only evaluating
    steps_per_epoch: int = 0  # whole global batches in the train split
    max_steps: int = 0  # the step the run ends after
    order: dict | None = None  # what fixes the batches: a resume with another would skip, repeat or change data


def load_data(cfg: TrainConfig) -> RunData:
    val = TokenWindows(cfg.data_dir, "val", cfg.block_size)
    val_indices = np.arange(len(val))
    if cfg.eval_windows is not None and cfg.eval_windows < len(val_indices):
        val_indices = np.sort(np.random.default_rng(cfg.seed).choice(len(val_indices), cfg.eval_windows, replace=False))
    if cfg.eval_only:
        return RunData(val, val_indices)
    train = TokenWindows(cfg.data_dir, "train", cfg.block_size)
    steps_per_epoch = len(train) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UserError(
            f"{cfg.data_dir}: the train split has {len(train)} windows of {cfg.block_size + 1} tokens, "
            f"fewer than one batch of {cfg.batch_size}; lower batch_size or block_size"
        )
    order = {
        "seed": cfg.seed, "batch_size": cfg.batch_size, "block_size": cfg.block_size,
        "train_data": train.fingerprint, "tokenizer": train.meta["tokenizer"],
        "tokenizer_sha256": train.meta.get("tokenizer_sha256"),  # GPT-2's; other tokenizers' data may leave it out
    }  # fmt: skip
    return RunData(val, val_indices, train, steps_per_epoch, cfg.max_steps or cfg.epochs * steps_per_epoch, order)


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
        config.check_data_fits(cfg.block_size, meta["vocab_size"], cfg.data_dir)
        torch.manual_seed(cfg.seed)  # the same initial weights whatever the number of ranks
        return GPT(config)
    model = from_checkpoint(str(source), "--init_from", cfg.dropout).train()  # eval mode from from_pretrained, as HF's
    model.config.check_data_fits(cfg.block_size, meta["vocab_size"], cfg.data_dir)
    return model


def with_model_shape(cfg: TrainConfig, model: GPT) -> TrainConfig:
    """cfg with a loaded model's own shape, so that the config a run saves tells the truth."""
    return dataclasses.replace(cfg, **{key: getattr(model.config, key) for key in MODEL_SHAPE_KEYS})


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


def build_optimizer(cfg: TrainConfig, model: GPT, job: Job):
    """The fused AdamW (its found_inf lets train_step skip a non-finite step on the device), or Muon on the
    blocks' matrices with it on the rest (optim.py)."""
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        return adamw(model, cfg.learning_rate, cfg.weight_decay, betas, cfg.eps, fused=True)
    return muon_adamw(
        model, cfg.learning_rate, cfg.weight_decay, betas, cfg.eps, muon_lr=cfg.muon_learning_rate,
        muon_momentum=cfg.muon_momentum, muon_weight_decay=cfg.muon_weight_decay, rank=job.rank,
        world_size=job.world_size,
    )  # fmt: skip


def describe_batches(cfg: TrainConfig, job: Job, micro_batch_size: int, data: RunData, start_step: int) -> str:
    micro_steps = cfg.batch_size // job.world_size // micro_batch_size
    return (
        f"batch {cfg.batch_size} sequences of {cfg.block_size} tokens = {job.world_size} processes x {micro_steps} "
        f"micro-steps x {micro_batch_size} sequences ({'set' if cfg.micro_batch_size else 'the largest that fits'}); "
        f"{data.steps_per_epoch:,} steps per epoch; steps {start_step} -> {data.max_steps}"
    )


def train_step(
    model, raw_model: GPT, optimizer, scheduler, tokens: torch.Tensor, autocast, grad_clip: float, job: Job
) -> torch.Tensor:
    """One optimizer step over tokens (micro-steps, micro-batch, T + 1). Returns (loss, grad norm,
    skipped, weights non-finite) on the device, unread: the host goes on to the next step while the GPU works.

    Gradients are clipped to grad_clip by the optimizer (grad_scale). A non-finite loss or gradient norm
    skips the update inside the fused AdamW (found_inf, as a GradScaler would tell it), on the device;
    every rank sees the same all-reduced loss and norm, so all skip alike. The schedule advances
    either way, as the HF Trainer's does. A finite step can still push weights to inf or near it (a
    learning rate far too large): the weights' norm is checked after each update, and the optimizer state
    need not be, as it holds moments of clipped, finite gradients (and is checked at each checkpoint).
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
    with torch.no_grad():  # inf or NaN where a weight is, or is past ~1e19 (its square overflows): diverged
        weights_broken = ~torch.nn.utils.get_total_norm(raw_model.parameters()).isfinite()
    return torch.stack([loss, grad_norm, skipped, weights_broken.float()])


def build_evaluator(cfg: TrainConfig, job: Job, model: GPT, data: RunData, micro_batch_size: int, autocast):
    files = zero_shot.task_files(zero_shot.task_names(cfg.tasks), cfg.hellaswag_file, cfg.lambada_openai_file)
    return Evaluator(
        job, model, autocast, val=data.val, val_indices=data.val_indices, batch_size=micro_batch_size,
        task_files=files, task_limit=cfg.task_limit, sample_prompt=cfg.sample_prompt,
        sample_tokens=cfg.sample_tokens, seed=cfg.seed,
    )  # fmt: skip


def build_reporter(cfg: TrainConfig, job: Job, run_dir: Path, state, max_steps: int, model: GPT, memory) -> Reporter:
    """The run's Reporter, its directory and wandb opened first (rank 0): a failure there costs no step yet."""
    wandb_project = cfg.wandb_project if cfg.wandb_log else None
    wandb_run = job.on_rank0(
        lambda: open_run(run_dir, asdict(cfg), state.step, wandb_project, cfg.run_name, state.wandb_run_id)
    )
    return Reporter(
        job, run_dir, wandb_run, state, max_steps=max_steps, log_interval=cfg.log_interval,
        eval_interval=cfg.eval_interval, tokens_per_step=cfg.batch_size * cfg.block_size,
        flops_per_token=flops_per_token(model, cfg.block_size), memory=memory,
    )  # fmt: skip


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
    steps_key = f"max_steps={cfg.max_steps}" if cfg.max_steps else f"epochs={cfg.epochs}"
    # the shape keys a resume must repeat: those a new model of this run is built from (not init_from's)
    shape = {key: getattr(cfg, key) for key in MODEL_SHAPE_KEYS} if cfg.init_from == "scratch" else {}
    fixed = {**shape, "optimizer": cfg.optimizer}  # what a resume continues as it is
    resume_from = job.on_rank0(
        lambda: find_resume_checkpoint(
            cfg.resume,
            cfg.eval_only,
            run_dir,
            data_order=data.order,
            fixed=fixed,
            data_dir=cfg.data_dir,
            max_steps=data.max_steps,
            steps_key=steps_key,
        ),  # fmt: skip
        share=True,
    )
    source = model_source(cfg, resume_from)
    raw_model = build_model(cfg, source, data.val.meta).to(cfg.device)
    cfg = with_model_shape(cfg, raw_model)
    # measured with the whole softmax: an upper bound of the compact one's memory
    micro_batch_size, predicted_peak = choose_micro_batch(
        raw_model,
        job,
        autocast,
        batch_size=cfg.batch_size,
        block_size=cfg.block_size,
        micro_batch_size=cfg.micro_batch_size,
    )
    train_tokens = data.train.tokens_present() if data.train is not None else None
    softmax = f"; {compact_output_layer(raw_model, train_tokens, source is None)}" if train_tokens is not None else ""
    job.announce(f"config: {json.dumps(asdict(cfg))}")
    job.announce(f"model: {raw_model.num_params():,} parameters, {'from ' + str(source) if source else 'new'}{softmax}")
    evaluator = build_evaluator(cfg, job, raw_model, data, micro_batch_size, autocast)
    if cfg.eval_only:
        job.announce(f"{len(data.val_indices)} windows of {cfg.block_size} tokens: {evaluator().describe()}")
        return 0

    model = distribute(raw_model, cfg, job)
    optimizer = build_optimizer(cfg, raw_model, job)
    scheduler = lr_schedule(optimizer, data.max_steps, cfg.warmup_ratio, cfg.lr_decay, cfg.cooldown_ratio)
    checkpointer = Checkpointer(
        job, run_dir, raw_model, optimizer, scheduler, data_order=data.order, config=asdict(cfg), seed=cfg.seed,
        interval=cfg.checkpoint_interval, keep=cfg.keep_checkpoints,
    )  # fmt: skip
    state, saved_lr = checkpointer.restore(resume_from)
    changes = resume_changes(resume_from, cfg, saved_lr, scheduler.get_last_lr()[0])
    memory = (micro_batch_size, predicted_peak) if predicted_peak else None
    with build_reporter(cfg, job, run_dir, state, data.max_steps, raw_model, memory) as reporter:
        plan = describe_batches(cfg, job, micro_batch_size, data, state.step)
        job.announce(plan + (f" (resumed from {resume_from.path})" if resume_from else ""))
        reporter.log_changes(state.step, changes)
        if state.step == data.max_steps:
            job.announce(f"{run_dir} already finished its {data.max_steps} steps")
            return 0
        job.catch_stop_signals()
        feed = batches(
            data.train, seed=cfg.seed, batch_size=cfg.batch_size, micro_batch_size=micro_batch_size, rank=job.rank,
            world_size=job.world_size, steps_per_epoch=data.steps_per_epoch, start_step=state.step,
            max_steps=data.max_steps, device=cfg.device,
        )  # fmt: skip
        for step, tokens in enumerate(feed, start=state.step + 1):  # step: the number of steps done once this one is
            lrs = scheduler.get_last_lr()  # each group's: AdamW's first, Muon's last (optim.MuonAdamW)
            reporter.add_step(train_step(model, raw_model, optimizer, scheduler, tokens, autocast, cfg.grad_clip, job))
            last_step = step == data.max_steps
            stop_signal = job.stop_signal() if not last_step else 0  # the last step ends the run anyway
            save = checkpointer.should_save(step, last_step=last_step, stopping=stop_signal > 0)
            if not (reporter.should_log(step) or reporter.should_evaluate(step) or save):
                continue
            with reporter.read_back(step):
                if reporter.should_log(step):
                    reporter.log(step, lrs[0], lrs[-1] if cfg.optimizer == "muon" else None)
                if save:  # before the eval: an eval that fails loses no trained step
                    checkpointer.save(step, reporter.nonfinite_steps, reporter.wandb_run_id)
                if reporter.should_evaluate(step):
                    reporter.log_eval(step, evaluator())
            if stop_signal:
                job.announce(f"stopped by signal {stop_signal} at step {step}; continue with --resume=auto")
                return stop_signal
        job.on_rank0(lambda: draw_loss_curves(run_dir))
    return 0


def main(argv: list[str]) -> None:
    """Runs this process's part of the job; a stop signal ends it, after its checkpoint, with exit status
    128 + the signal."""
    cfg = configurator.parse_config(TrainConfig, argv)
    check_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    keep_freed_memory()
    with Job(cfg.device, timedelta(minutes=cfg.dist_timeout_minutes)) as job:
        # Evaluating writes nothing: it may read a run that another job is writing.
        with nullcontext() if cfg.eval_only else run_dir_lock(job, Path(cfg.out_dir) / cfg.run_name):
            stop_signal = train(
                dataclasses.replace(cfg, device=job.device, dtype=cfg.dtype or native_dtype(job.device)), job
            )
    if stop_signal:  # every rank stopped after the same step, its checkpoint complete
        sys.exit(128 + stop_signal)


if __name__ == "__main__":
    configurator.run(main)
