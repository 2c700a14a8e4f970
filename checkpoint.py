"""Training checkpoints: where they are, which one a run continues from, and how one is written.

out/<run>/ckpt_<step:07d>/ is written as ckpt_<step>.tmp and renamed once complete, so every ckpt_*
directory is whole (a process killed mid-write leaves only a .tmp, cleared at the next write):
    config.json, model.safetensors   the model in HF format (GPT.save_pretrained)
    optimizer.pt                      AdamW state
    trainer_state.pt                  step, scheduler, RNG state of every rank, data order
    train_config.json                 the TrainConfig that wrote it
Everything is loaded with weights_only=True.
"""

import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from common import UserError, publish, temp_path
from distributed import Job

CHECKPOINT_PATTERN = re.compile(r"ckpt_(\d+)")


def checkpoints(run_dir) -> dict[int, Path]:
    """The complete checkpoint directories of a run by step (ckpt_*.tmp are unfinished)."""
    return {
        int(m.group(1)): p
        for p in Path(run_dir).glob("ckpt_*")
        if (m := CHECKPOINT_PATTERN.fullmatch(p.name)) and p.is_dir()
    }


def latest_checkpoint(run_dir) -> Path | None:
    """The newest complete checkpoint directory of a run, or None."""
    steps = checkpoints(run_dir)
    return steps[max(steps)] if steps else None


def find_resume_checkpoint(cfg, run_dir: Path, data_order: dict | None) -> Path | None:
    """The checkpoint a run (a TrainConfig) continues from, or None for a new run. Refuses to
    overwrite a run's checkpoints, and to continue one with another data order (None: not training).

    Rank 0 alone decides (Job.on_rank0): on a shared filesystem with stale directory caches, ranks
    could list different newest checkpoints and continue from different steps.
    """
    existing = checkpoints(run_dir)
    resume = cfg.resume or ("auto" if cfg.init_from == "resume" else "")
    if resume == "":
        if existing and not cfg.eval_only:
            raise UserError(
                f"{run_dir} already has checkpoints (newest {existing[max(existing)].name}); continue it with --resume=auto or pick another --run_name"
            )
        return None
    if resume == "auto":
        if not existing:
            if cfg.init_from == "resume":
                raise UserError(
                    f"init_from='resume' but {run_dir} has no checkpoint; check --out_dir/--run_name, or use --resume=auto to start the run when none exists"
                )
            return None
        checkpoint = existing[max(existing)]
    else:
        checkpoint = Path(resume)
        if not (checkpoint / "trainer_state.pt").is_file():
            raise UserError(f"--resume={resume}: no trainer_state.pt there; pass a ckpt_* directory or --resume=auto")
    saved = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    newer = [path.name for s, path in sorted(existing.items()) if s > saved["step"]]
    if newer and not cfg.eval_only:
        raise UserError(
            f"{run_dir} has checkpoints newer than {checkpoint} ({newer[-1]}); resume into another --run_name so they stay apart"
        )
    if data_order is not None and saved["data_order"] != data_order:
        raise UserError(
            f"{checkpoint} was trained with {saved['data_order']}, this run has {data_order}; resume with the same seed, batch_size and data, or start a new run"
        )
    return checkpoint


def rng_state(device: str) -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.startswith("cuda") else None}


def restore_rng(rng_by_rank: list[dict], job: Job, device: str, seed: int, step: int) -> str | None:
    """Continues this rank's random streams from a checkpoint; those it cannot continue (another
    process count, or a checkpoint from another kind of device) start anew from (seed, step, rank).
    Returns a note for the user when any did."""
    fresh = int(np.random.SeedSequence([seed, step, job.rank]).generate_state(1)[0])
    on_gpu = device.startswith("cuda")
    if len(rng_by_rank) != job.world_size:  # dropout streams are per rank
        torch.manual_seed(fresh)  # the CPU's and every GPU's
        return (
            f"saved by {len(rng_by_rank)} processes, this run has {job.world_size}: same data order, new dropout randomness"
            if rng_by_rank
            else None
        )
    saved = rng_by_rank[job.rank]
    torch.set_rng_state(saved["cpu"])
    if on_gpu and saved["cuda"] is None:
        torch.cuda.manual_seed(fresh)
        return "written on CPU: the GPU's dropout randomness starts anew"
    if on_gpu:
        torch.cuda.set_rng_state(saved["cuda"])
    elif saved["cuda"] is not None:
        return "written on a GPU: dropout on the CPU continues the CPU's random stream, not the GPU's"
    return None


def save_checkpoint(job: Job, run_dir: Path, step: int, model, optimizer, trainer_state: dict, cfg) -> Path:
    """Every rank hands its RNG state to rank 0, which writes the checkpoint; every rank returns once
    it is complete on disk (or raises if it could not be written)."""
    rng_by_rank = job.gather(rng_state(cfg.device))
    state = {**trainer_state, "step": step, "rng": rng_by_rank}
    return job.on_rank0(lambda: write_checkpoint(run_dir, step, model, optimizer, state, cfg), share=True)


def write_checkpoint(run_dir: Path, step: int, model, optimizer, trainer_state: dict, cfg) -> Path:
    """Writes ckpt_<step> under a temp name, renamed once complete; keeps the newest cfg.keep_checkpoints."""
    final = run_dir / f"ckpt_{step:07d}"
    tmp = temp_path(final)
    for unfinished in run_dir.glob("ckpt_*.tmp"):  # left by a process killed mid-write
        shutil.rmtree(unfinished)
    try:
        model.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)  # only when a run redoes a step it already saved
        publish(tmp, final)
    except (OSError, RuntimeError, SafetensorError) as e:  # a full or failing disk; each writer has its own error type
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        raise UserError(
            f"could not write {final} ({str(e).strip().splitlines()[0]}); free space in {run_dir} (or fix the disk), then --resume=auto "
            + (
                f"continues from {previous.name}, which is intact"
                if previous
                else "starts the run again (no earlier checkpoint)"
            )
        ) from e
    for _, old in sorted(checkpoints(run_dir).items())[: -cfg.keep_checkpoints]:
        shutil.rmtree(old)
    return final
