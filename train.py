"""Trains GPT-2 on token shards with a plain loop: one process, or many with torchrun.

    python train.py config/austen.py                                 # small model, 2-core CPU
    torchrun --standalone --nproc_per_node=8 train.py config/bookcorpus.py   # the recipe
    python train.py config/austen.py --resume=auto                   # continue the newest checkpoint

Batches. A global batch is batch_size x gradient_accumulation_steps x world_size windows of
block_size + 1 tokens (batch_size and gradient_accumulation_steps are per device, as in the HF
Trainer). Epoch e visits the train windows in a permutation seeded by (seed, e); optimizer step s
takes the next global batch of it, and rank r's micro-step m a fixed slice of that, so the
sequence of global batches does not depend on how it is split over ranks and micro-steps, and
the step alone is the exact data position.

A run's directory (sample.py reads its newest checkpoint with latest_checkpoint):
out/<run>/train_config.json   the resolved config (not config.json: that name marks an HF model dir)
out/<run>/metrics.jsonl       one JSON record per log step and eval; loss.png plots it at the end
out/<run>/ckpt_<step:07d>/    written as ckpt_<step>.tmp then renamed, so every ckpt_* dir is complete
    config.json, model.safetensors   the model in HF format (GPT.save_pretrained)
    optimizer.pt                      AdamW state
    trainer_state.pt                  step, scheduler, RNG state of every rank, data order
    train_config.json                 the TrainConfig that wrote it
Every rank reads data and checkpoints from the same paths: on many nodes, a shared filesystem.
SIGTERM (preemption) or SIGINT ends the current step, saves a checkpoint and exits with status
128 + the signal; `--resume=auto` then continues as if nothing had happened (bitwise, on CPU).
"""

import dataclasses
import functools
import json
import math
import os
import re
import shutil
import signal
import time
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
from model import GPT, GPTConfig
from plot import plot_run
from shards import TokenWindows, atomic_write_bytes

CHECKPOINT_PATTERN = re.compile(r"ckpt_(\d+)")
NONFINITE_STEPS_BEFORE_STOP = 5  # skipped steps in a row that end the run
# Dense bf16 peak FLOP/s of one GPU, for MFU; the first key found in the device name wins.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


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
    # batch: global batch = batch_size x gradient_accumulation_steps x number of processes
    batch_size: int = 8  # sequences per device per micro-step
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step, on every device
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
    dtype: str = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast: 'bfloat16' or 'float32' (none)
    compile: bool = torch.cuda.is_available()


def checkpoints(run_dir) -> dict[int, Path]:
    """The complete checkpoint directories of a run by step (ckpt_*.tmp are unfinished)."""
    return {int(m.group(1)): p for p in Path(run_dir).glob("ckpt_*") if (m := CHECKPOINT_PATTERN.fullmatch(p.name)) and p.is_dir()}


def latest_checkpoint(run_dir) -> Path | None:
    """The newest complete checkpoint directory of a run, or None."""
    steps = checkpoints(run_dir)
    return steps[max(steps)] if steps else None


def find_resume_checkpoint(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint this run continues from, or None for a new run; refuses to overwrite one."""
    existing = checkpoints(run_dir)
    resume = cfg.resume or ("auto" if cfg.init_from == "resume" else "")
    if resume == "":
        if existing and not cfg.eval_only:
            raise configurator.UserError(f"{run_dir} already has checkpoints (newest {existing[max(existing)].name}); continue it with --resume=auto or pick another --run_name")
        return None
    if resume == "auto":
        if not existing and cfg.init_from == "resume":
            raise configurator.UserError(f"init_from='resume' but {run_dir} has no checkpoint; check --out_dir/--run_name, or use --resume=auto to start the run when none exists")
        return existing[max(existing)] if existing else None
    checkpoint = Path(resume)
    if not (checkpoint / "trainer_state.pt").is_file():
        raise configurator.UserError(f"--resume={resume}: no trainer_state.pt there; pass a ckpt_* directory or --resume=auto")
    step = torch.load(checkpoint / "trainer_state.pt", weights_only=True)["step"]
    newer = [path.name for s, path in sorted(existing.items()) if s > step]
    if newer and not cfg.eval_only:
        raise configurator.UserError(f"{run_dir} has checkpoints newer than {checkpoint} ({newer[-1]}); resume into another --run_name so they stay apart")
    return checkpoint


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
        raise configurator.UserError(f"block_size={cfg.block_size} is longer than the model's context of {config.block_size} positions; lower block_size")
    if meta["vocab_size"] > config.vocab_size:
        raise configurator.UserError(f"{cfg.data_dir} uses a vocabulary of {meta['vocab_size']} tokens but the model has vocab_size={config.vocab_size}; set vocab_size={meta['vocab_size']}")


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


@torch.no_grad()
def evaluate(model, windows: TokenWindows, rows: np.ndarray, batch_size: int, device: str, autocast, rank: int, world_size: int) -> float:
    """Mean loss over windows[rows], split across ranks; every rank returns the same value.

    Takes the plain model: ranks may run different numbers of batches, so no DDP forward.
    """
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # sum over windows of their mean loss
    mine = rows[rank::world_size]
    for i in range(0, len(mine), batch_size):
        tokens = torch.from_numpy(windows.batch(mine[i : i + batch_size])).to(device)  # (B, T + 1)
        with autocast:
            _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss_sum += loss.double() * len(tokens)
    if world_size > 1:
        dist.all_reduce(loss_sum)
    model.train()
    return loss_sum.item() / len(rows)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, model: GPT, optimizer, trainer_state: dict, cfg: TrainConfig, rank: int, world_size: int) -> Path:
    """Every rank calls this (to hand over its RNG state); rank 0 writes. Returns the directory."""
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if cfg.device.startswith("cuda") else None}
    rng_by_rank = [rng]
    if world_size > 1:
        rng_by_rank = [None] * world_size if rank == 0 else None
        dist.gather_object(rng, rng_by_rank, dst=0)
    final = run_dir / f"ckpt_{step:07d}"
    if rank != 0:
        return final
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-write
    model.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({**trainer_state, "step": step, "rng": rng_by_rank}, tmp / "trainer_state.pt")
    (tmp / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    for path in [*tmp.iterdir(), tmp]:  # on disk before the rename makes the checkpoint visible
        fsync(path)
    shutil.rmtree(final, ignore_errors=True)  # only when a run redoes a step it already saved
    os.rename(tmp, final)
    fsync(run_dir)
    for _, old in sorted(checkpoints(run_dir).items())[: -cfg.keep_checkpoints]:
        shutil.rmtree(old)
    return final


def truncate_metrics(path: Path, step: int) -> None:
    """Drops the records after `step`: they come from an attempt that died before its next checkpoint."""
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
        atomic_write_bytes(path, ["".join(kept).encode()])


def start_wandb(cfg: TrainConfig, run_id: str | None):
    import wandb

    if os.environ.get("WANDB_MODE") not in ("offline", "disabled") and not wandb.login(prompt=False, verify=False):
        raise configurator.UserError("wandb_log=True but wandb has no API key; run `wandb login`, set WANDB_API_KEY, or log locally with WANDB_MODE=offline")
    try:
        return wandb.init(project=cfg.wandb_project, name=cfg.run_name, id=run_id, resume="allow", config=asdict(cfg))
    except Exception as e:  # wandb raises many types (network, auth, server)
        raise OSError(f"wandb could not start a run ({type(e).__name__}: {e}); log locally with WANDB_MODE=offline and `wandb sync` later") from None


def main(argv: list[str]) -> None:
    cfg = configurator.parse_config(TrainConfig, argv)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise configurator.UserError(f"device={cfg.device} but no GPU is visible; use --device=cpu")
    if cfg.dtype not in ("bfloat16", "float32"):
        raise configurator.UserError(f"dtype={cfg.dtype}: use bfloat16 (autocast) or float32; float16 would need loss scaling")
    world_size = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    rank = int(os.environ.get("RANK", 0))
    if world_size > 1:
        if cfg.device.startswith("cuda"):
            cfg.device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(cfg.device)
            dist.init_process_group("nccl", device_id=torch.device(cfg.device))
        else:
            dist.init_process_group("gloo")
    try:
        train(cfg, rank, world_size)
        if world_size > 1:
            dist.barrier()
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def train(cfg: TrainConfig, rank: int, world_size: int) -> None:
    master = rank == 0
    on_gpu = cfg.device.startswith("cuda")
    if on_gpu:
        torch.backends.cuda.matmul.fp32_precision = "tf32"  # fp32 matmuls outside autocast
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    # bf16 matmuls, fp32 weights and optimizer; on CPUs with AVX512-BF16 or AMX it pays too.
    autocast = torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16) if cfg.dtype == "bfloat16" else nullcontext()
    run_dir = Path(cfg.out_dir) / cfg.run_name
    resume_from = find_resume_checkpoint(cfg, run_dir)
    source = resume_from or (None if cfg.init_from == "scratch" else cfg.init_from)
    if cfg.eval_only and source is None:
        raise configurator.UserError("eval_only needs weights: --resume=auto (this run's newest checkpoint), --resume=CKPT_DIR or --init_from=HF_DIR")

    val_windows = TokenWindows(cfg.data_dir, "val", cfg.block_size)
    val_rows = np.arange(len(val_windows))
    if cfg.eval_windows is not None and cfg.eval_windows < len(val_rows):
        val_rows = np.sort(np.random.default_rng(cfg.seed).choice(len(val_rows), cfg.eval_windows, replace=False))
    global_batch = cfg.batch_size * cfg.gradient_accumulation_steps * world_size
    if not cfg.eval_only:
        train_windows = TokenWindows(cfg.data_dir, "train", cfg.block_size)
        steps_per_epoch = len(train_windows) // global_batch
        if steps_per_epoch == 0:
            raise configurator.UserError(f"{cfg.data_dir}: the train split has {len(train_windows)} windows of {cfg.block_size + 1} tokens, fewer than one global batch of {global_batch}; lower batch_size, gradient_accumulation_steps or block_size")
        max_steps = cfg.max_steps or cfg.epochs * steps_per_epoch

    raw_model = build_model(cfg, source, val_windows.meta).to(cfg.device)
    # A loaded model keeps its shape: record it so the saved config tells the truth.
    cfg = dataclasses.replace(cfg, **{key: getattr(raw_model.config, key) for key in ("vocab_size", "n_layer", "n_head", "n_embd")})
    # DDP first, then compile: dynamo splits the graph at DDP's gradient buckets, so their
    # all-reduces overlap the backward pass.
    model = DDP(raw_model, device_ids=[torch.cuda.current_device()] if on_gpu else None) if world_size > 1 else raw_model
    if cfg.compile:
        model = torch.compile(model)
    if master:
        print(f"config: {json.dumps(asdict(cfg))}", flush=True)
        print(f"model: {raw_model.num_params():,} parameters, {'from ' + str(source) if source else 'new'}", flush=True)

    if cfg.eval_only:
        val_loss = evaluate(raw_model, val_windows, val_rows, cfg.batch_size, cfg.device, autocast, rank, world_size)
        if master:
            print(f"val loss {val_loss:.4f}, perplexity {math.exp(val_loss):.2f} ({len(val_rows)} windows of {cfg.block_size} tokens)", flush=True)
        return

    optimizer = raw_model.configure_optimizers(cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)
    scheduler = cosine_schedule(optimizer, max_steps, cfg.warmup_ratio)
    # What fixes the order of the batches: resuming with other values would skip or repeat data.
    data_order = {"seed": cfg.seed, "global_batch": global_batch, "train_windows": len(train_windows)}
    state = {"nonfinite_steps": 0, "wandb_run_id": None}
    start_step, rng_by_rank = 0, []
    if resume_from:
        saved = torch.load(resume_from / "trainer_state.pt", weights_only=True)
        if saved["data_order"] != data_order:
            raise configurator.UserError(f"{resume_from} was trained with {saved['data_order']}, this run has {data_order}; resume with the same seed, global batch and data, or start a new run")
        optimizer.load_state_dict(torch.load(resume_from / "optimizer.pt", map_location=cfg.device, weights_only=True))
        scheduler.load_state_dict(saved["scheduler"])
        state = {key: saved[key] for key in state}
        start_step = saved["step"]
        rng_by_rank = saved["rng"]
    if len(rng_by_rank) == world_size:
        torch.set_rng_state(rng_by_rank[rank]["cpu"])
        if on_gpu:
            torch.cuda.set_rng_state(rng_by_rank[rank]["cuda"])
    else:  # dropout streams differ per rank; a different world size cannot continue the saved ones
        if rng_by_rank and master:
            print(f"{resume_from} was saved by {len(rng_by_rank)} processes, this run has {world_size}: same data order, new dropout randomness", flush=True)
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, start_step, rank]).generate_state(1)[0]))

    metrics_path = run_dir / "metrics.jsonl"
    wandb_run = None
    if master:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        truncate_metrics(metrics_path, start_step)
        if cfg.wandb_log:
            wandb_run = start_wandb(cfg, state["wandb_run_id"])
            state["wandb_run_id"] = wandb_run.id
        print(
            f"global batch {global_batch} sequences = {cfg.batch_size} per device x {cfg.gradient_accumulation_steps} accumulation x {world_size} processes, "
            f"{global_batch * cfg.block_size:,} tokens; {steps_per_epoch:,} steps per epoch; steps {start_step} -> {max_steps}"
            + (f" (resumed from {resume_from})" if resume_from else ""),
            flush=True,
        )

    def record(step: int, metrics: dict) -> None:
        metrics = {"step": step, "tokens": step * global_batch * cfg.block_size, **metrics}
        with open(metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if wandb_run:
            wandb_run.log(metrics, step=step)

    # Stop at the end of the current step on SIGTERM (preemption) or SIGINT; a second one acts as usual.
    received_signal = 0

    def request_stop(signum, frame):
        nonlocal received_signal
        received_signal = signum
        signal.signal(signum, previous_handlers[signum])

    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}

    # nanoGPT's estimate: 6 flops per parameter per token (forward + backward) plus attention;
    # position embeddings are lookups, not matmuls.
    flops_per_token = 6 * (raw_model.num_params() - raw_model.transformer.wpe.weight.numel()) + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    peak_flops = next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in torch.cuda.get_device_name()), None) if on_gpu else None
    interval_losses, interval_time, logged_step, nonfinite_in_a_row = [], 0.0, start_step, 0
    try:
        for step in range(start_step, max_steps):
            step_start = time.time()
            epoch, batch_in_epoch = divmod(step, steps_per_epoch)
            rows = epoch_order(cfg.seed, epoch, len(train_windows))[batch_in_epoch * global_batch : (batch_in_epoch + 1) * global_batch]
            # Rows as (micro-step, rank, batch_size): this rank's micro-step m takes rows[m, rank].
            mine = rows.reshape(cfg.gradient_accumulation_steps, world_size, cfg.batch_size)[:, rank].ravel()
            tokens = torch.from_numpy(train_windows.batch(mine)).to(cfg.device)
            tokens = tokens.view(cfg.gradient_accumulation_steps, cfg.batch_size, cfg.block_size + 1)
            lr = scheduler.get_last_lr()[0]
            loss_sum = torch.zeros((), device=cfg.device)
            for micro_step in range(cfg.gradient_accumulation_steps):
                # Gradients are all-reduced once, in the backward of the last micro-step.
                last = micro_step == cfg.gradient_accumulation_steps - 1
                with model.no_sync() if world_size > 1 and not last else nullcontext():
                    with autocast:
                        _, loss = model(tokens[micro_step, :, :-1], tokens[micro_step, :, 1:])
                    loss = loss / cfg.gradient_accumulation_steps  # the mean over the global batch
                    loss.backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)  # equal on all ranks after DDP
            stop_signal = torch.tensor(received_signal, device=cfg.device)
            if world_size > 1:
                dist.all_reduce(loss_sum)
                dist.all_reduce(stop_signal, op=dist.ReduceOp.MAX)  # all ranks stop at the same step
            loss, grad_norm, stop_signal = (loss_sum / world_size).item(), grad_norm.item(), int(stop_signal)
            step_done = step + 1
            if math.isfinite(loss) and math.isfinite(grad_norm):
                optimizer.step()
                nonfinite_in_a_row = 0
            else:
                nonfinite_in_a_row += 1
                state["nonfinite_steps"] += 1
                if master:
                    print(f"step {step_done}: non-finite loss {loss} or grad norm {grad_norm}; step skipped ({nonfinite_in_a_row} in a row)", flush=True)
                    record(step_done, {"skipped": "non-finite loss", "nonfinite_steps": state["nonfinite_steps"]})
                if nonfinite_in_a_row == NONFINITE_STEPS_BEFORE_STOP:
                    last_good = latest_checkpoint(run_dir)
                    raise configurator.UserError(f"loss was non-finite for {nonfinite_in_a_row} steps in a row (up to step {step_done}); the last checkpoint is {last_good}; lower learning_rate or check the data")
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            interval_time += time.time() - step_start
            if nonfinite_in_a_row == 0:
                interval_losses.append(loss)
            last_step = step_done == max_steps

            if (step_done % cfg.log_interval == 0 or last_step) and interval_losses:
                steps_timed = step_done - logged_step
                tokens_per_s = steps_timed * global_batch * cfg.block_size / interval_time
                mfu = flops_per_token * tokens_per_s / world_size / peak_flops if peak_flops else None
                eta = timedelta(seconds=round((max_steps - step_done) * interval_time / steps_timed))
                train_loss = sum(interval_losses) / len(interval_losses)  # mean over the interval, as the HF Trainer logs
                if master:
                    print(
                        f"step {step_done}/{max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
                        f"{tokens_per_s:,.0f} tok/s | MFU {f'{mfu:.1%}' if mfu else '-'} | ETA {eta}",
                        flush=True,
                    )
                    record(step_done, {"loss": train_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "mfu": mfu, "nonfinite_steps": state["nonfinite_steps"]})
                interval_losses, interval_time, logged_step = [], 0.0, step_done
            if step_done % cfg.eval_interval == 0 or last_step:
                val_loss = evaluate(raw_model, val_windows, val_rows, cfg.batch_size, cfg.device, autocast, rank, world_size)
                if master:
                    print(f"step {step_done}: val loss {val_loss:.4f}, perplexity {math.exp(val_loss):.2f}", flush=True)
                    record(step_done, {"val_loss": val_loss, "val_perplexity": math.exp(val_loss)})
            if step_done % cfg.checkpoint_interval == 0 or last_step or stop_signal:
                trainer_state = {**state, "scheduler": scheduler.state_dict(), "data_order": data_order}
                path = save_checkpoint(run_dir, step_done, raw_model, optimizer, trainer_state, cfg, rank, world_size)
                if master:
                    print(f"step {step_done}: saved {path}", flush=True)
            if master and last_step:
                print(f"loss curves: {plot_run(run_dir)}", flush=True)
            if stop_signal:
                if master:
                    print(f"stopped by signal {stop_signal} at step {step_done}; continue with --resume=auto", flush=True)
                raise SystemExit(128 + stop_signal)
        if start_step == max_steps and master:
            print(f"{run_dir} already finished its {max_steps} steps", flush=True)
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        if wandb_run:
            wandb_run.finish()


if __name__ == "__main__":
    configurator.run(main)
