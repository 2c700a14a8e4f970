"""Training checkpoints: where they are, which one a run continues from, how one is written and loaded.

out/<run>/ckpt_<step:07d>/ is written as ckpt_<step>.tmp and renamed once complete, so every ckpt_*
directory is whole (a process killed mid-write leaves only a .tmp, cleared at the next write):
    config.json, model.safetensors   the model in HF format (GPT.save_pretrained)
    optimizer.pt                      AdamW state
    trainer_state.pt                  TrainerState as a plain dict: step, scheduler, RNG state of every rank, ...
    train_config.json                 the TrainConfig that wrote it
Everything is loaded with weights_only=True.
"""

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from common import UserError, publish, temp_path
from distributed import Job

CHECKPOINT_PATTERN = re.compile(r"ckpt_(\d+)")


@dataclass
class TrainerState:
    """What a checkpoint holds besides the model and optimizer; the defaults are a new run's.

    trainer_state.pt is its fields as a plain dict of tensors and primitives, so that torch.load with
    weights_only=True reads it.
    """

    step: int = 0  # optimizer steps done
    scheduler: dict | None = None  # the LambdaLR's state_dict
    rng: list[dict] = field(default_factory=list)  # each rank's {'cpu': state, 'cuda': state or None}, in rank order
    data_order: dict | None = None  # what fixes the order of the batches (seed, global batch, train windows)
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient, over the whole run
    wandb_run_id: str | None = None  # the wandb run a resumed run continues

    @classmethod
    def load(cls, checkpoint: Path) -> "TrainerState":
        return cls(**torch.load(checkpoint / "trainer_state.pt", weights_only=True))

    def save(self, checkpoint: Path) -> None:
        torch.save(asdict(self), checkpoint / "trainer_state.pt")


@dataclass
class Checkpoint:
    """A complete checkpoint directory and the trainer state read from it."""

    path: Path
    state: TrainerState


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


def find_resume_checkpoint(cfg, run_dir: Path, data_order: dict | None) -> Checkpoint | None:
    """The checkpoint a run (a TrainConfig) continues from, or None for a new run. Refuses to
    overwrite a run's checkpoints, and to continue one with another data order (None: not training).

    Rank 0 alone decides (Job.on_rank0) and reads its trainer state: on a shared filesystem with stale
    directory caches, ranks could list different newest checkpoints and continue from different steps.
    """
    existing = checkpoints(run_dir)
    if cfg.resume == "":
        if existing and not cfg.eval_only:
            raise UserError(
                f"{run_dir} already has checkpoints (newest {existing[max(existing)].name}); "
                "continue it with --resume=auto or pick another --run_name"
            )
        return None
    if cfg.resume == "auto":
        if not existing:
            return None
        path = existing[max(existing)]
    else:
        path = Path(cfg.resume)
        if not (path / "trainer_state.pt").is_file():
            raise UserError(
                f"--resume={cfg.resume}: no trainer_state.pt there; pass a ckpt_* directory or --resume=auto"
            )
    state = TrainerState.load(path)
    newer = [p.name for s, p in sorted(existing.items()) if s > state.step]
    if newer and not cfg.eval_only:
        raise UserError(
            f"{run_dir} has checkpoints newer than {path} ({newer[-1]}); "
            "resume into another --run_name so they stay apart"
        )
    if data_order is not None and state.data_order != data_order:
        raise UserError(
            f"{path} was trained with {state.data_order}, this run has {data_order}; "
            "resume with the same seed, batch_size and data, or start a new run"
        )
    return Checkpoint(path, state)


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
        if not rng_by_rank:
            return None
        return (
            f"saved by {len(rng_by_rank)} processes, this run has {job.world_size}: "
            "same data order, new dropout randomness"
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


class Checkpointer:
    """A training run's side of its checkpoints: it saves every cfg.checkpoint_interval steps, at the
    last step and at a stop, and restores the one a run continues from into the model's optimizer,
    schedule and random streams."""

    def __init__(self, job: Job, run_dir: Path, cfg, model, optimizer, scheduler, data_order: dict):
        self.job, self.run_dir, self.cfg = job, run_dir, cfg
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.data_order = data_order

    def restore(self, resume_from: Checkpoint | None) -> TrainerState:
        """Loads the optimizer and schedule of resume_from and continues this rank's random streams from it;
        a new run (None) seeds them from (seed, rank). Returns the trainer state the run continues with."""
        state = resume_from.state if resume_from else TrainerState()
        if resume_from:
            optimizer_path = resume_from.path / "optimizer.pt"
            self.optimizer.load_state_dict(torch.load(optimizer_path, map_location=self.cfg.device, weights_only=True))
            self.scheduler.load_state_dict(state.scheduler)
        note = restore_rng(state.rng, self.job, self.cfg.device, self.cfg.seed, state.step)
        if note:
            self.job.announce(f"{resume_from.path} was {note}")
        return state

    def should_save(self, step: int, last_step: bool, stopping: bool) -> bool:
        return step % self.cfg.checkpoint_interval == 0 or last_step or stopping

    def save(self, step: int, nonfinite_steps: int, wandb_run_id: str | None) -> Path:
        """Every rank hands its RNG state to rank 0, which writes the checkpoint; every rank returns once
        it is complete on disk (or raises if it could not be written)."""
        rng_by_rank = self.job.gather(rng_state(self.cfg.device))

        def write() -> Path:
            state = TrainerState(
                step, self.scheduler.state_dict(), rng_by_rank, self.data_order, nonfinite_steps, wandb_run_id
            )
            return write_checkpoint(self.run_dir, self.model, self.optimizer, state, self.cfg)

        path = self.job.on_rank0(write, share=True)
        self.job.announce(f"step {step}: saved {path}")
        return path


def write_checkpoint(run_dir: Path, model, optimizer, state: TrainerState, cfg) -> Path:
    """Writes ckpt_<step> under a temp name, renamed once complete; keeps the newest cfg.keep_checkpoints."""
    final = run_dir / f"ckpt_{state.step:07d}"
    tmp = temp_path(final)
    for unfinished in run_dir.glob("ckpt_*.tmp"):  # left by a process killed mid-write
        shutil.rmtree(unfinished)
    try:
        model.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        state.save(tmp)
        (tmp / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)  # only when a run redoes a step it already saved
        publish(tmp, final)
    except (OSError, RuntimeError, SafetensorError) as e:  # a full or failing disk; each writer has its own error type
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        raise UserError(
            f"could not write {final} ({str(e).strip().splitlines()[0]}); free space in {run_dir} (or fix the disk), "
            "then --resume=auto "
            + (
                f"continues from {previous.name}, which is intact"
                if previous
                else "starts the run again (no earlier checkpoint)"
            )
        ) from e
    for _, old in sorted(checkpoints(run_dir).items())[: -cfg.keep_checkpoints]:
        shutil.rmtree(old)
    return final
