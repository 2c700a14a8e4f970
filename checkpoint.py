"""Training checkpoints: where they are, which one a run continues from, how one is written and loaded.

out/<run>/ckpt_<step:07d>/ is written as ckpt_<step>.tmp and renamed once complete, so every ckpt_*
directory is whole (a process killed mid-write leaves only a .tmp, cleared at the next write):
    config.json, model.safetensors   the model in HF format (hf.save_pretrained)
    vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json, generation_config.json
                                      GPT-2's tokenizer and generation ids: a complete HF model directory
                                      that AutoTokenizer, pipeline("text-generation") and lm_eval open
    optimizer.pt                      the optimizer's state (AdamW's, or Muon's and AdamW's: optim.py)
    trainer_state.pt                  TrainerState as a plain dict: step, scheduler, RNG state of every rank, ...
    train_config.json                 the TrainConfig that wrote it
Everything is loaded with weights_only=True. A checkpoint is written only when every weight and
optimizer tensor is finite, and one is resumed only when each of its files is whole (see `damage`).

out/<run>.lock is held by the job that writes out/<run> (its rank 0), for as long as it runs: a
second job on the same run is refused at once. It is an OS lock, released with its process
however that ends (kill -9 included); the empty file stays.
"""

import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

import tokenizer
from checksums import Damaged, checksum_problem, sha256, write_checksums
from common import LOWER_LEARNING_RATE, UserError, first_nonfinite, first_sentence, fsync, hold_lock, publish, temp_path
from distributed import Job
from hf import from_pretrained, save_pretrained
from model import GPT

CHECKPOINT_PATTERN = re.compile(r"ckpt_(\d+)")
# what write_checkpoint writes (and checksums.sha256 lists): the files below, in the module docstring's order
CHECKPOINT_FILES = (
    "config.json model.safetensors vocab.json merges.txt tokenizer_config.json special_tokens_map.json "
    "generation_config.json optimizer.pt trainer_state.pt train_config.json"
).split()


@dataclass
class TrainerState:
    """What a checkpoint holds besides the model and optimizer; the defaults are a new run's.

    trainer_state.pt is its fields as a plain dict of tensors and primitives, so that torch.load with
    weights_only=True reads it.
    """

    step: int = 0  # optimizer steps done
    scheduler: dict | None = None  # the LambdaLR's state_dict
    rng: list[dict] = field(default_factory=list)  # each rank's {'cpu': state, 'cuda': state or None}, in rank order
    data_order: dict | None = None  # what fixes the batches: seed, batch_size, block_size, the data's sha256s
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient, over the whole run
    wandb_run_id: str | None = None  # the wandb run a resumed run continues

    @classmethod
    def load(cls, checkpoint: Path) -> "TrainerState":
        return cls(**torch.load(checkpoint / "trainer_state.pt", weights_only=True))

    def save(self, checkpoint: Path) -> None:
        save_torch(asdict(self), checkpoint / "trainer_state.pt")


@dataclass
class Checkpoint:
    """A complete checkpoint directory, the trainer state and the config read from it."""

    path: Path
    state: TrainerState
    config: dict  # its train_config.json: what it was trained with


def make_dir(path: Path) -> None:
    """Creates directory `path` (and its parents), or says in one line why it cannot be one."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{path} cannot be a directory: it or a parent is a file; pick another --out_dir") from None
    except OSError as e:
        raise UserError(f"cannot create {path} ({e.strerror}); pick another --out_dir") from None


@contextmanager
def run_dir_lock(job: Job, run_dir: Path):
    """Holds out/<run>.lock on rank 0 while the block runs; refuses at once (on every rank) when
    another process holds it."""
    with ExitStack() as held:

        def acquire() -> None:
            make_dir(run_dir.parent)
            lock = run_dir.with_name(run_dir.name + ".lock")
            in_use, fix = f"{run_dir} is in use by another train.py", "wait for it to end, or pick another --run_name"
            held.enter_context(hold_lock(lock, in_use, fix))

        job.on_rank0(acquire)
        yield


def damage(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint directory, naming the file, or None when every file of it is as it was
    written: present and with the bytes its checksums.sha256 records (checksums.py). A checkpoint is only
    written when its weights and optimizer state are finite, so an intact one is a finite one."""
    if not checkpoint.is_dir():
        return f"{checkpoint} is not a directory"
    return checksum_problem(checkpoint, CHECKPOINT_FILES)


def newest_intact(run_dir: Path, before: int | None = None) -> Path | None:
    """The newest checkpoint of run_dir (before step `before`, if given) that damage finds whole."""
    steps = sorted(checkpoints(run_dir).items(), reverse=True)
    return next((path for step, path in steps if (before is None or step < before) and damage(path) is None), None)


def intact_before(checkpoint: Path) -> Path | None:
    """The newest intact checkpoint of the run of `checkpoint` (a ckpt_* directory) before it, or None."""
    step = CHECKPOINT_PATTERN.fullmatch(checkpoint.name)
    return newest_intact(checkpoint.parent, before=int(step.group(1))) if step else None


def from_checkpoint(source: str, flag: str, dropout: float | None) -> GPT:
    """hf.from_pretrained, where a damaged checkpoint's error names the newest intact one before it as the
    value to pass to `flag` (the option that named source)."""
    try:
        return from_pretrained(source, dropout=dropout)
    except Damaged as e:
        intact = intact_before(Path(source))
        fix = f"pass {flag}={intact}, the newest intact checkpoint before it" if intact else "pass an intact one"
        raise UserError(f"{e.problem}; {fix}") from None


def refuse_damaged(path: Path, problem: str, run_dir: Path) -> UserError:
    """The error for a damaged checkpoint: its problem, and the newest intact checkpoint before it."""
    intact = intact_before(path)
    if intact is None:
        fix = "no earlier checkpoint is intact: start a new run (another --run_name, or remove the damaged one)"
    elif path.parent.resolve() == run_dir.resolve():
        fix = f"move it aside (mv {path} {path}.damaged), then --resume=auto continues from {intact}, which is intact"
    else:
        fix = f"resume from --resume={intact} instead, which is intact"
    return UserError(f"{problem}; {fix}")


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


def then_resume(run_dir: Path, fix: str) -> str:
    """The end of an error that stops a run in run_dir: what to fix, then how it continues from its newest
    intact checkpoint (each newer one is verified first: damage)."""
    newest, intact = latest_checkpoint(run_dir), newest_intact(run_dir)
    if newest is None:
        return f"{fix}, then --resume=auto starts the run again (no checkpoint yet)"
    if intact is None:
        return f"{fix}, then start a new run (another --run_name): no checkpoint in {run_dir} is intact"
    if intact != newest:
        paths = [path for _, path in sorted(checkpoints(run_dir).items())]
        newer = ", ".join(path.name for path in paths[paths.index(intact) + 1 :])
        return f"{fix}, then move aside {newer} (damaged) and --resume=auto continues from {intact}, which is intact"
    return f"{fix}, then --resume=auto continues from {intact}, which is intact"


def unwritable(run_dir: Path, error: OSError) -> UserError:
    """The error for a run file that could not be written: a full disk, or something else at its path."""
    return UserError(
        f"could not write {error.filename2 or error.filename or run_dir} ({error.strerror or error}); "
        + then_resume(run_dir, f"free space in {run_dir} (or move aside what is at that path)")
    )


def find_resume_checkpoint(
    resume: str,
    eval_only: bool,
    run_dir: Path,
    *,
    data_order: dict | None,
    fixed: dict | None,
    data_dir: str,
    max_steps: int,
    steps_key: str,
) -> Checkpoint | None:
    """The checkpoint a run continues from (resume: '' none, 'auto' the newest, or a checkpoint's path), or
    None for a new run. Refuses to overwrite a run's checkpoints (unless eval_only), a damaged checkpoint
    (naming the intact one to take instead), and to continue one with another data order or other `fixed`
    config keys, those a resume continues as they are, such as the model's shape ({config key: value}; None:
    not training, as eval_only) or past the run's last step (max_steps, set by steps_key, a flag).

    Rank 0 alone decides (Job.on_rank0) and reads its trainer state: on a shared filesystem with stale
    directory caches, ranks could list different newest checkpoints and continue from different steps.
    """
    existing = checkpoints(run_dir)
    if resume == "":
        if existing and not eval_only:
            raise UserError(
                f"{run_dir} already has checkpoints (newest {existing[max(existing)].name}); "
                "continue it with --resume=auto or pick another --run_name"
            )
        return None
    if resume == "auto":
        if not existing:
            return None
        path = existing[max(existing)]
    else:
        path = Path(resume)
        if not path.is_dir():
            raise UserError(f"--resume={resume}: no such directory; pass a run's ckpt_* directory or --resume=auto")
        if not (path / "trainer_state.pt").is_file() and not CHECKPOINT_PATTERN.fullmatch(path.name):
            raise UserError(f"--resume={resume}: no trainer_state.pt there; pass a ckpt_* directory or --resume=auto")
    if problem := damage(path):
        raise refuse_damaged(path, problem, run_dir)
    state = TrainerState.load(path)
    config = json.loads((path / "train_config.json").read_text())
    newer = [p.name for s, p in sorted(existing.items()) if s > state.step]
    if newer and not eval_only:
        raise UserError(
            f"{run_dir} has checkpoints newer than {path} ({newer[-1]}); "
            "resume into another --run_name so they stay apart"
        )
    if data_order is not None:
        refuse_another_run(path, state.data_order or {}, data_order, config, fixed, data_dir)
    if data_order is not None and state.step > max_steps:
        raise UserError(
            f"{path} is at step {state.step}, past this run's last step {max_steps} "
            f"({steps_key}); pass a larger "
            f"--max_steps to train on (or --eval_only to evaluate it)"
        )
    return Checkpoint(path, state, config)


def refuse_another_run(
    path: Path, saved_order: dict, data_order: dict, saved_config: dict, fixed: dict, data_dir: str
) -> None:
    """Refuses a resume that would not continue the checkpoint's run, naming what differs: other batches (the
    data order's seed, batch_size, block_size; its train_data and tokenizer, what data_dir holds) or `fixed`
    config keys other than the checkpoint's own config (its model's shape, its optimizer), all of them at once."""
    start_anew = f"or start a new run (another --run_name), from its weights with --init_from={path}"
    if None in (saved_order.get(key) for key in ("seed", "batch_size", "train_data")):
        raise UserError(f"{path} does not record its data order (an older train.py wrote it); start a new run")
    for key in ("train_data", "tokenizer", "tokenizer_sha256"):
        if (saved := saved_order.get(key)) != (value := data_order[key]):
            short = (lambda text: f"{text[:12]}...") if key != "tokenizer" else str  # hashes are long
            raise UserError(
                f"{path} was trained on other data than {data_dir} holds ({key} {short(str(saved))} then, "
                f"{short(str(value))} now); resume with the data it was trained on (--data_dir), {start_anew}"
            )
    differ = {key: (saved_order.get(key), value) for key, value in data_order.items() if saved_order.get(key) != value}
    differ |= {key: (saved_config.get(key), value) for key, value in fixed.items() if saved_config.get(key) != value}
    if differ:
        then_now = ", ".join(f"{key}={saved} then, {value} now" for key, (saved, value) in differ.items())
        flags = " ".join(f"--{key}={saved}" for key, (saved, _) in differ.items())
        raise UserError(
            f"{path} was trained with other settings than this run's ({then_now}); a resume continues its batches, "
            f"its model and optimizer as they were: resume with {flags}, {start_anew}"
        )


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
    """A training run's side of its checkpoints: it saves every `interval` steps, at the
    last step and at a stop, and restores the one a run continues from into the model's optimizer,
    schedule and random streams."""

    def __init__(
        self,
        job: Job,
        run_dir: Path,
        model,
        optimizer,
        scheduler,
        *,
        data_order: dict,
        config: dict,
        seed: int,
        interval: int,
        keep: int,
    ):
        """config: the run's, written beside each checkpoint (train_config.json); seed: where a new run's
        random streams start; keep: how many of the newest checkpoints stay."""
        self.job, self.run_dir, self.config, self.seed = job, run_dir, config, seed
        self.interval, self.keep = interval, keep
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.data_order = data_order

    def restore(self, resume_from: Checkpoint | None) -> tuple[TrainerState, float | None]:
        """Loads the optimizer's moments and step counts from resume_from, continues the schedule from its
        step and this rank's random streams from it; a new run (None) seeds them from (seed, step, rank).

        AdamW's hyperparameters and the schedule are this run's (the optimizer's and scheduler's as built),
        whatever the checkpoint's were, so that the config a run records is the one it trains with. Returns
        the trainer state the run continues with, and the learning rate the checkpoint's optimizer held
        (None for a new run).
        """
        state = resume_from.state if resume_from else TrainerState()
        saved_lr = None
        if resume_from:
            # its bytes were verified (damage) as the checkpoint was found
            saved = torch.load(resume_from.path / "optimizer.pt", map_location=self.job.device, weights_only=True)
            saved_lr = saved["param_groups"][0]["lr"]
            if (groups := len(saved["param_groups"])) != len(self.optimizer.param_groups):
                raise UserError(
                    f"{resume_from.path / 'optimizer.pt'} groups the parameters in {groups} where this train.py's "
                    f"optimizer has {len(self.optimizer.param_groups)}: another version wrote it; start a new run "
                    f"(another --run_name) from its weights with --init_from={resume_from.path}"
                )
            for saved_group, group in zip(saved["param_groups"], self.optimizer.param_groups, strict=True):
                saved_group.update({key: value for key, value in group.items() if key != "params"})
            self.optimizer.load_state_dict(saved)
            base_lrs = [group["initial_lr"] for group in self.optimizer.param_groups]
            self.scheduler.load_state_dict({**state.scheduler, "base_lrs": base_lrs, "last_epoch": state.step - 1})
            self.scheduler.step()  # this run's schedule at the step reached: sets each group's lr
        note = restore_rng(state.rng, self.job, self.job.device, self.seed, state.step)
        if note:
            self.job.announce(f"{resume_from.path} was {note}")
        return state, saved_lr

    def should_save(self, step: int, last_step: bool, stopping: bool) -> bool:
        return step % self.interval == 0 or last_step or stopping

    def save(self, step: int, nonfinite_steps: int, wandb_run_id: str | None) -> Path:
        """Every rank hands its RNG state to rank 0, which writes the checkpoint; every rank returns once
        it is complete on disk (or raises if it could not be written)."""
        rng_by_rank = self.job.gather(rng_state(self.job.device))

        def write() -> Path:
            if broken := nonfinite_tensor(self.model, self.optimizer):
                raise UserError(
                    f"step {step}: {broken} holds inf or NaN, or values near it, so no checkpoint is written; "
                    + then_resume(self.run_dir, f"{LOWER_LEARNING_RATE} or check the data")
                )
            state = TrainerState(
                step, self.scheduler.state_dict(), rng_by_rank, self.data_order, nonfinite_steps, wandb_run_id
            )
            return write_checkpoint(self.run_dir, self.model, self.optimizer, state, self.config, self.keep)

        path = self.job.on_rank0(write, share=True)
        self.job.announce(f"step {step}: saved {path}")
        return path


def nonfinite_tensor(model, optimizer) -> str | None:
    """The name of the first weight or optimizer-state tensor holding inf or NaN; None when all are finite."""
    names = {param: name for name, param in model.named_parameters()}
    tensors = dict(model.named_parameters())
    for param, param_state in optimizer.state.items():
        tensors.update(
            {f"{names[param]}'s {key}": value for key, value in param_state.items() if torch.is_tensor(value)}
        )
    return first_nonfinite(tensors.items())


def write_checkpoint(run_dir: Path, model, optimizer, state: TrainerState, config: dict, keep: int) -> Path:
    """Writes ckpt_<step> under a temp name, renamed once complete, with the run's config and the checksums
    of its files; keeps the newest `keep` checkpoints."""
    final = run_dir / f"ckpt_{state.step:07d}"
    tmp = temp_path(final)
    for unfinished in run_dir.glob("ckpt_*.tmp"):  # left by a process killed mid-write
        shutil.rmtree(unfinished)
    try:
        with ThreadPoolExecutor() as hashing:  # each file hashes while the next is written and the disk syncs
            save_pretrained(model, tmp)
            digests = {"model.safetensors": hashing.submit(sha256, tmp / "model.safetensors")}
            tokenizer.save_hf_tokenizer(tmp, model_max_length=model.config.block_size)
            (tmp / "generation_config.json").write_text(json.dumps(tokenizer.hf_generation_config(), indent=2) + "\n")
            save_torch(optimizer.state_dict(), tmp / "optimizer.pt")
            state.save(tmp)
            (tmp / "train_config.json").write_text(json.dumps(config, indent=2) + "\n")
            for path in tmp.iterdir():
                digests.setdefault(path.name, hashing.submit(sha256, path))
            for path in tmp.iterdir():
                fsync(path)
            write_checksums(tmp, {name: digest.result() for name, digest in digests.items()})
        shutil.rmtree(final, ignore_errors=True)  # only when a run redoes a step it already saved
        publish(tmp, final)
    except (OSError, SafetensorError) as e:  # a full or failing disk; safetensors has its own error type
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            f"could not write {final} ({first_sentence(e)}); "
            + then_resume(run_dir, f"free space in {run_dir} (or fix the disk)")
        ) from e
    for _, old in sorted(checkpoints(run_dir).items())[:-keep]:
        shutil.rmtree(old)
    return final


def save_torch(obj, path: Path) -> None:
    """torch.save through a file object: a full disk is then OSError "No space left on device", where
    torch.save(obj, path) raises an opaque RuntimeError ("enforce fail at inline_container.cc")."""
    with open(path, "wb") as f:
        torch.save(obj, f)
