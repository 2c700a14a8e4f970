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

A run's directory (sample.py reads its newest checkpoint):
out/<run>/train_config.json   the resolved config (not config.json: that name marks an HF model dir)
out/<run>/metrics.jsonl       one JSON record per log step, skipped step and eval; loss.png plots it
out/<run>/ckpt_<step:07d>/    the checkpoints (checkpoint.py)
Every rank reads data and checkpoints from the same paths: on many nodes, a shared filesystem.
SIGTERM (preemption), SIGINT or SIGHUP, to any or all processes of the job and however many times,
ends the current step on every rank, saves a checkpoint of it and exits with status 128 + the
signal once it is complete; `--resume=auto` then continues as if nothing had happened (bitwise, on
CPU). A failure on any rank ends the whole job within seconds (distributed.py says how).
"""

import dataclasses
import functools
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.lr_scheduler import LambdaLR

import configurator
from checkpoint import find_resume_checkpoint, latest_checkpoint, restore_rng, save_checkpoint
from common import UserError, atomic_write_bytes
from distributed import Job
from model import GPT, GPTConfig
from plot import plot_run
from shards import TokenWindows

NONFINITE_STEPS_BEFORE_STOP = 5  # skipped steps in a row that end the run
# Dense bf16 peak FLOP/s of one GPU, for MFU; the first key found in the device name wins.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}
GPU_MEMORY_FOR_STEPS = 0.85  # of the GPU's memory, what the automatic micro-batch may fill


@dataclass
class TrainConfig:
    """Every key train.py reads. Defaults are the recipe's (config/bookcorpus.py spells it out)."""

    # where
    data_dir: str = "data/bookcorpus"
    out_dir: str = "out"
    run_name: str = "gpt2"  # the run lives in out_dir/run_name; also its wandb name
    init_from: str = "scratch"  # 'scratch', an HF GPT-2 directory / Hub name to finetune, or 'resume' (nanoGPT's: this run's newest checkpoint, which must exist)
    resume: str = ""  # '' a new run; 'auto' this run's newest checkpoint, or a new run if none; or a ckpt_* dir
    eval_only: bool = False  # evaluate the resumed / init_from model on the val split and exit
    seed: int = 42
    # model (a loaded model keeps its own shape; block_size may then be shorter than its context)
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.1
    # batch
    batch_size: int = 64  # sequences per optimizer step, over all processes (the global batch)
    micro_batch_size: int | None = None  # sequences per process per forward/backward; None: the largest that fits
    epochs: int = 1
    max_steps: int | None = None  # None: epochs x steps per epoch
    # AdamW and schedule, as the HF Trainer: linear warmup then cosine to 0
    learning_rate: float = 2.5e-4
    weight_decay: float = 0.01  # not on biases and LayerNorm weights
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_ratio: float = 0.05  # warmup steps = ceil(warmup_ratio x max_steps), as transformers
    grad_clip: float = 1.0
    # eval, logging, checkpoints
    eval_interval: int = 500
    eval_windows: int | None = None  # val windows per eval (a fixed sample); None: the whole split
    log_interval: int = 10
    checkpoint_interval: int = 5000
    keep_checkpoints: int = 10
    wandb_log: bool = False
    wandb_project: str = "gpt2-bookcorpus"
    # system
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str | None = (
        None  # autocast 'bfloat16', or 'float32' (none); None: bfloat16 where the device runs it natively
    )
    compile: bool = torch.cuda.is_available()
    dist_timeout_minutes: float = (
        10.0  # how long a collective waits for a silent rank (failures that are seen end the job at once)
    )


def check_config(cfg: TrainConfig, world_size: int) -> None:
    """Refuses values that could only fail later (or silently do nothing), before anything is built."""
    positive = ["block_size", "vocab_size", "n_layer", "n_head", "n_embd", "batch_size", "micro_batch_size", "epochs", "max_steps",
                "learning_rate", "grad_clip", "eval_interval", "eval_windows", "log_interval", "checkpoint_interval", "keep_checkpoints",
                "dist_timeout_minutes"]  # fmt: skip
    for key in positive:
        if (value := getattr(cfg, key)) is not None and not value > 0:
            raise UserError(
                f"{key}={value}: must be positive"
                + (" (keep_checkpoints=1 keeps the newest only)" if key == "keep_checkpoints" else "")
            )
    for key in ("dropout", "beta1", "beta2"):
        if not 0 <= (value := getattr(cfg, key)) < 1:
            raise UserError(f"{key}={value}: must be in [0, 1)")
    if not 0 <= cfg.warmup_ratio <= 1:
        raise UserError(f"warmup_ratio={cfg.warmup_ratio}: must be in [0, 1] (a fraction of the steps)")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={cfg.device} but no GPU is visible; use --device=cpu")
    if cfg.dtype not in (None, "bfloat16", "float32"):
        raise UserError(f"dtype={cfg.dtype}: use bfloat16 (autocast) or float32; float16 would need loss scaling")
    if cfg.batch_size % world_size:
        raise UserError(
            f"batch_size={cfg.batch_size} does not split over {world_size} processes; use a multiple of {world_size}"
        )
    if cfg.micro_batch_size and (cfg.batch_size // world_size) % cfg.micro_batch_size:
        raise UserError(
            f"micro_batch_size={cfg.micro_batch_size} does not divide the {cfg.batch_size // world_size} sequences per process (batch_size={cfg.batch_size} over {world_size}); pick a divisor"
        )


def native_dtype(device: str) -> str:
    """bfloat16 where the device has bf16 matmuls (GPUs since Ampere; x86 CPUs with AVX512-BF16 or AMX),
    float32 elsewhere: a CPU without them emulates bf16 ~20x slower than it runs fp32 (a 2-core AVX2 EPYC)."""
    if device.startswith("cuda"):
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        native = any(torch.cpu.get_capabilities().get(flag) for flag in ("avx512_bf16", "amx_bf16"))
    return "bfloat16" if native else "float32"


def build_model(cfg: TrainConfig, source, meta: dict) -> GPT:
    """A new model from the config keys, or the one in `source` (a checkpoint or HF GPT-2 dir/name).

    The data must fit the model: a new model is checked before it is built.
    """
    if source is None:
        config = GPTConfig(cfg.block_size, cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout)
        check_model_fits_data(config, cfg, meta)
        torch.manual_seed(cfg.seed)  # the same initial weights whatever the number of ranks
        return GPT(config)
    model = GPT.from_pretrained(str(source), dropout=cfg.dropout).train()  # from_pretrained gives eval mode, as HF's
    check_model_fits_data(model.config, cfg, meta)
    return model


def check_model_fits_data(config: GPTConfig, cfg: TrainConfig, meta: dict) -> None:
    if cfg.block_size > config.block_size:
        raise UserError(
            f"block_size={cfg.block_size} is longer than the model's context of {config.block_size} positions; lower block_size"
        )
    if meta["vocab_size"] > config.vocab_size:
        raise UserError(
            f"{cfg.data_dir} uses a vocabulary of {meta['vocab_size']} tokens but the model has vocab_size={config.vocab_size}; set vocab_size={meta['vocab_size']}"
        )


def cosine_schedule(optimizer, max_steps: int, warmup_ratio: float) -> LambdaLR:
    """transformers' get_cosine_schedule_with_warmup, warmup steps rounded up as the Trainer does."""
    warmup_steps = math.ceil(max_steps * warmup_ratio)

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
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


def choose_micro_batch(cfg: TrainConfig, job: Job, model: GPT, autocast) -> int:
    """micro_batch_size, or else the largest that fits: on a GPU, from the memory that eager steps of 1
    and 2 sequences take (a compiled step takes less); on a CPU, each process's whole share."""
    per_rank = cfg.batch_size // job.world_size
    if cfg.micro_batch_size or not cfg.device.startswith("cuda"):
        return cfg.micro_batch_size or per_rank
    peaks = []
    for sequences in (1, 2):
        torch.cuda.reset_peak_memory_stats()
        tokens = torch.randint(0, model.config.vocab_size, (sequences, cfg.block_size + 1), device=cfg.device)
        with autocast:
            _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        peaks.append(torch.cuda.max_memory_allocated())
    model.zero_grad(set_to_none=True)
    adam_moments = 2 * sum(p.numel() * 4 for p in model.parameters())  # allocated at the first optimizer step
    budget = GPU_MEMORY_FOR_STEPS * torch.cuda.get_device_properties(cfg.device).total_memory - adam_moments
    chosen = largest_micro_batch(per_rank, 2 * peaks[0] - peaks[1], peaks[1] - peaks[0], budget)
    return job.agree(chosen, dist.ReduceOp.MIN)  # every rank must run as many micro-steps


def train_step(
    model, raw_model: GPT, optimizer, scheduler, tokens: torch.Tensor, autocast, grad_clip: float, job: Job
) -> torch.Tensor:
    """One optimizer step over tokens (micro-steps, micro-batch, T + 1). Returns (loss, grad norm,
    skipped) on the device, unread: the host goes on to the next step while the GPU works.

    A non-finite loss or gradient norm skips the update inside the fused AdamW (found_inf, as a
    GradScaler would tell it), on the device; every rank sees the same all-reduced loss and norm,
    so all skip alike. The schedule advances either way, as the HF Trainer's does.
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
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)  # equal on all ranks after DDP
    if job.world_size > 1:
        dist.all_reduce(loss_sum)
    loss = loss_sum / (micro_steps * job.world_size)
    skipped = (~(loss.isfinite() & grad_norm.isfinite())).float()
    optimizer.found_inf = skipped
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return torch.stack([loss, grad_norm, skipped])


class StepLog:
    """The steps since the last log line: their (loss, grad norm, skipped), kept on the device and read
    back only at the steps that log, evaluate or checkpoint, and the training time they took. Skipped
    steps are reported as they are read; too many in a row stop the run."""

    def __init__(self, start_step: int, nonfinite_steps: int):
        self.nonfinite_steps = nonfinite_steps  # skipped steps in the whole run
        self.in_a_row = 0
        self.unread = []  # (3,) device tensors of the steps since the last read
        self.finite = []  # (loss, grad norm) of the finite steps read since the last log line
        self.logged_step, self.seconds, self.clock_from = start_step, 0.0, time.perf_counter()

    def read(self, step: int, record, master: bool, run_dir: Path) -> None:
        """Reads the steps up to `step` (waiting for the device, which ends their training time);
        records each skipped one; raises after too many in a row."""
        rows = torch.stack(self.unread).tolist() if self.unread else []
        self.unread = []
        self.seconds += time.perf_counter() - self.clock_from
        for s, (loss, grad_norm, skipped) in enumerate(rows, start=step - len(rows) + 1):
            if not skipped:
                self.in_a_row = 0
                self.finite.append((loss, grad_norm))
                continue
            self.nonfinite_steps += 1
            self.in_a_row += 1
            if master:
                print(
                    f"step {s}: non-finite loss {loss} or grad norm {grad_norm}; step skipped ({self.in_a_row} in a row)",
                    flush=True,
                )
                record(s, {"skipped": "non-finite loss", "nonfinite_steps": self.nonfinite_steps})
            if self.in_a_row == NONFINITE_STEPS_BEFORE_STOP:
                raise UserError(
                    f"loss was non-finite for {self.in_a_row} steps in a row (up to step {s}); the last checkpoint is {latest_checkpoint(run_dir)}; lower learning_rate or check the data"
                )

    def resume_clock(self) -> None:
        """Training goes on: evaluating and saving took the time since the last read."""
        self.clock_from = time.perf_counter()

    def interval(self, step: int) -> tuple[int, float, float, float]:
        """(steps, training seconds, mean loss, last grad norm) since the last log line, which `step` is now."""
        losses, grad_norms = zip(*self.finite)
        result = (
            step - self.logged_step,
            self.seconds,
            sum(losses) / len(losses),
            grad_norms[-1],
        )  # the mean, as the HF Trainer logs
        self.finite, self.logged_step, self.seconds = [], step, 0.0
        return result


@torch.no_grad()
def evaluate(model, windows: TokenWindows, rows: np.ndarray, batch_size: int, device: str, autocast, job: Job) -> float:
    """Mean loss over windows[rows], split across ranks; every rank returns the same value.

    Takes the plain model: ranks may run different numbers of batches, so no DDP forward.
    """
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
    model.train()
    return loss_sum.item() / len(rows)


def truncate_metrics(path: Path, step: int) -> None:
    """Drops the records after `step`: they come from an attempt that died before its next checkpoint."""
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
        atomic_write_bytes(path, "".join(kept).encode())


def start_wandb(cfg: TrainConfig, run_id: str | None):
    import wandb

    if os.environ.get("WANDB_MODE") not in ("offline", "disabled") and not wandb.login(prompt=False, verify=False):
        raise UserError(
            "wandb_log=True but wandb has no API key; run `wandb login`, set WANDB_API_KEY, or log locally with WANDB_MODE=offline"
        )
    try:
        return wandb.init(project=cfg.wandb_project, name=cfg.run_name, id=run_id, resume="allow", config=asdict(cfg))
    except Exception as e:  # wandb raises many types (network, auth, server)
        raise UserError(
            f"wandb could not start a run ({type(e).__name__}: {e}); log locally with WANDB_MODE=offline and `wandb sync` later"
        ) from None


def open_run(cfg: TrainConfig, run_dir: Path, start_step: int, wandb_run_id: str | None):
    """Rank 0: the run directory, its config and metrics as of start_step, and wandb (None if off)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "train_config.json", (json.dumps(asdict(cfg), indent=2) + "\n").encode())
    truncate_metrics(run_dir / "metrics.jsonl", start_step)
    return start_wandb(cfg, wandb_run_id) if cfg.wandb_log else None


def main(argv: list[str]) -> None:
    cfg = configurator.parse_config(TrainConfig, argv)
    check_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    job = Job(cfg.device, timedelta(minutes=cfg.dist_timeout_minutes))
    clean = stopped = False
    try:
        train(dataclasses.replace(cfg, device=job.device, dtype=cfg.dtype or native_dtype(job.device)), job)
        clean = True
    except SystemExit:  # a stop signal: every rank stops after the same step, its checkpoint complete
        clean = stopped = True
        raise
    except BaseException as e:
        job.fail(e)
        raise
    finally:
        job.close(clean, stopped)


def train(cfg: TrainConfig, job: Job) -> None:
    master = job.rank == 0
    on_gpu = cfg.device.startswith("cuda")
    if on_gpu:
        torch.backends.cuda.matmul.fp32_precision = "tf32"  # fp32 matmuls outside autocast
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    # bf16 matmuls, fp32 weights and optimizer.
    autocast = (
        torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16)
        if cfg.dtype == "bfloat16"
        else nullcontext()
    )
    run_dir = Path(cfg.out_dir) / cfg.run_name

    val_windows = TokenWindows(cfg.data_dir, "val", cfg.block_size)
    val_rows = np.arange(len(val_windows))
    if cfg.eval_windows is not None and cfg.eval_windows < len(val_rows):
        val_rows = np.sort(np.random.default_rng(cfg.seed).choice(len(val_rows), cfg.eval_windows, replace=False))
    data_order = None
    if not cfg.eval_only:
        train_windows = TokenWindows(cfg.data_dir, "train", cfg.block_size)
        steps_per_epoch = len(train_windows) // cfg.batch_size
        if steps_per_epoch == 0:
            raise UserError(
                f"{cfg.data_dir}: the train split has {len(train_windows)} windows of {cfg.block_size + 1} tokens, fewer than one batch of {cfg.batch_size}; lower batch_size or block_size"
            )
        max_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
        # What fixes the order of the batches: resuming with other values would skip or repeat data.
        data_order = {"seed": cfg.seed, "global_batch": cfg.batch_size, "train_windows": len(train_windows)}
    resume_from = job.on_rank0(lambda: find_resume_checkpoint(cfg, run_dir, data_order), share=True)
    source = resume_from or (None if cfg.init_from == "scratch" else cfg.init_from)
    if cfg.eval_only and source is None:
        raise UserError(
            "eval_only needs weights: --resume=auto (this run's newest checkpoint), --resume=CKPT_DIR or --init_from=HF_DIR"
        )

    raw_model = build_model(cfg, source, val_windows.meta).to(cfg.device)
    # A loaded model keeps its shape: record it so the saved config tells the truth.
    cfg = dataclasses.replace(
        cfg, **{key: getattr(raw_model.config, key) for key in ("vocab_size", "n_layer", "n_head", "n_embd")}
    )
    micro_batch_size = choose_micro_batch(cfg, job, raw_model, autocast)
    # DDP first, then compile: dynamo splits the graph at DDP's gradient buckets, so their
    # all-reduces overlap the backward pass.
    model = (
        DDP(raw_model, device_ids=[torch.cuda.current_device()] if on_gpu else None)
        if job.world_size > 1
        else raw_model
    )
    if cfg.compile:
        model = torch.compile(model)
    if master:
        print(f"config: {json.dumps(asdict(cfg))}", flush=True)
        print(f"model: {raw_model.num_params():,} parameters, {'from ' + str(source) if source else 'new'}", flush=True)

    if cfg.eval_only:
        val_loss = evaluate(raw_model, val_windows, val_rows, micro_batch_size, cfg.device, autocast, job)
        if master:
            print(
                f"val loss {val_loss:.4f}, perplexity {math.exp(val_loss):.2f} ({len(val_rows)} windows of {cfg.block_size} tokens)",
                flush=True,
            )
        return

    # fused: its found_inf lets train_step skip a non-finite step on the device
    optimizer = raw_model.configure_optimizers(
        cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps, fused=True
    )
    scheduler = cosine_schedule(optimizer, max_steps, cfg.warmup_ratio)
    state = {"nonfinite_steps": 0, "wandb_run_id": None}
    start_step, rng_by_rank = 0, []
    if resume_from:
        saved = torch.load(resume_from / "trainer_state.pt", weights_only=True)
        optimizer.load_state_dict(torch.load(resume_from / "optimizer.pt", map_location=cfg.device, weights_only=True))
        scheduler.load_state_dict(saved["scheduler"])
        state = {key: saved[key] for key in state}
        start_step = saved["step"]
        rng_by_rank = saved["rng"]
    rng_note = restore_rng(rng_by_rank, job, cfg.device, cfg.seed, start_step)
    if rng_note and master:
        print(f"{resume_from} was {rng_note}", flush=True)

    # Before any step: a failure here (wandb, the run directory) costs nothing yet.
    wandb_run = job.on_rank0(lambda: open_run(cfg, run_dir, start_step, state["wandb_run_id"]))
    if master:
        state["wandb_run_id"] = wandb_run.id if wandb_run else None
        micro_steps = cfg.batch_size // job.world_size // micro_batch_size
        print(
            f"batch {cfg.batch_size} sequences of {cfg.block_size} tokens = {job.world_size} processes x {micro_steps} micro-steps x {micro_batch_size} sequences "
            f"({'set' if cfg.micro_batch_size else 'the largest that fits'}); {steps_per_epoch:,} steps per epoch; steps {start_step} -> {max_steps}"
            + (f" (resumed from {resume_from})" if resume_from else ""),
            flush=True,
        )
    metrics_path = run_dir / "metrics.jsonl"

    def record(step: int, metrics: dict) -> None:
        metrics = {"step": step, "tokens": step * cfg.batch_size * cfg.block_size, **metrics}
        with open(metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if wandb_run:
            wandb_run.log(metrics, step=step)

    # nanoGPT's estimate: 6 flops per parameter per token (forward + backward) plus attention;
    # position embeddings are lookups, not matmuls.
    flops_per_token = (
        6 * (raw_model.num_params() - raw_model.transformer.wpe.weight.numel())
        + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    )
    peak_flops = (
        next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in torch.cuda.get_device_name()), None)
        if on_gpu
        else None
    )

    def report(step: int, lr: float, steps_timed: int, seconds: float, train_loss: float, grad_norm: float) -> None:
        tokens_per_s = steps_timed * cfg.batch_size * cfg.block_size / seconds
        mfu = flops_per_token * tokens_per_s / job.world_size / peak_flops if peak_flops else None
        eta = timedelta(seconds=round((max_steps - step) * seconds / steps_timed))
        if master:
            print(f"step {step}/{max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
                  f"{tokens_per_s:,.0f} tok/s | MFU {f'{mfu:.1%}' if mfu else '-'} | ETA {eta}", flush=True)  # fmt: skip
            record(
                step,
                {
                    "loss": train_loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": tokens_per_s,
                    "mfu": mfu,
                    "nonfinite_steps": steps.nonfinite_steps,
                },
            )

    steps = StepLog(start_step, state["nonfinite_steps"])
    job.catch_stop_signals()
    try:
        feed = batches(train_windows, cfg, job, micro_batch_size, steps_per_epoch, start_step, max_steps)
        for step, tokens in enumerate(feed, start=start_step + 1):  # step: the number of steps done once this one is
            lr = scheduler.get_last_lr()[0]
            steps.unread.append(
                train_step(model, raw_model, optimizer, scheduler, tokens, autocast, cfg.grad_clip, job)
            )
            last_step = step == max_steps
            stop_signal = job.stop_signal() if not last_step else 0  # the last step ends the run anyway
            log = step % cfg.log_interval == 0 or last_step
            evaluate_now = step % cfg.eval_interval == 0 or last_step
            save = step % cfg.checkpoint_interval == 0 or last_step or stop_signal
            if not (log or evaluate_now or save):
                continue
            steps.read(step, record, master, run_dir)
            if log and steps.finite:
                report(step, lr, *steps.interval(step))
            if evaluate_now:
                val_loss = evaluate(raw_model, val_windows, val_rows, micro_batch_size, cfg.device, autocast, job)
                if master:
                    print(f"step {step}: val loss {val_loss:.4f}, perplexity {math.exp(val_loss):.2f}", flush=True)
                    record(step, {"val_loss": val_loss, "val_perplexity": math.exp(val_loss)})
            if save:
                trainer_state = {
                    "nonfinite_steps": steps.nonfinite_steps,
                    "wandb_run_id": state["wandb_run_id"],
                    "scheduler": scheduler.state_dict(),
                    "data_order": data_order,
                }
                path = save_checkpoint(job, run_dir, step, raw_model, optimizer, trainer_state, cfg)
                if master:
                    print(f"step {step}: saved {path}", flush=True)
            if last_step:
                job.on_rank0(lambda: print(f"loss curves: {plot_run(run_dir)}", flush=True))
            if stop_signal:
                if master:
                    print(f"stopped by signal {stop_signal} at step {step}; continue with --resume=auto", flush=True)
                raise SystemExit(128 + stop_signal)
            steps.resume_clock()
        if start_step == max_steps and master:
            print(f"{run_dir} already finished its {max_steps} steps", flush=True)
    finally:
        if wandb_run:
            wandb_run.finish()


if __name__ == "__main__":
    configurator.run(main)
