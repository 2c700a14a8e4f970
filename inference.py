"""Loading a model to run it (sample.py, eval.py): the checkpoint a path or Hub name means, and the dtype."""

import sys
from pathlib import Path

import torch

from checkpoint import from_checkpoint, latest_checkpoint
from common import UserError, first_nonfinite
from model import GPT, GPTConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TRAIN_HINT = (
    "train one with `python prepare.py --dataset=austen && python train.py config/austen.py`, "
    "or pass --ckpt=DIR or --init=random"
)


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise UserError(f"--dtype={dtype}: expected one of {', '.join(DTYPES)}")


def newest_run(out_dir: Path) -> Path:
    runs = [run for run in out_dir.glob("*/") if latest_checkpoint(run)] if out_dir.is_dir() else []
    if not runs:
        raise UserError(f"no checkpoint under {out_dir}/; {TRAIN_HINT}")
    return max(runs, key=lambda run: latest_checkpoint(run).stat().st_mtime)


def load_model(ckpt: str | None, init: str) -> GPT:
    """The model of --ckpt (a run directory: its newest checkpoint; a checkpoint or HF GPT-2 directory; a
    Hub name, as train.py's --init_from; None: the newest run under out/), or with init='random' an
    untrained GPT-2 124M; without dropout, in eval mode."""
    if init == "random":
        return GPT(GPTConfig(dropout=0.0)).eval()
    if init != "checkpoint":
        raise UserError(f"--init={init}: expected checkpoint or random")
    source = ckpt if ckpt is not None else str(newest_run(Path("out")))
    if Path(source).is_dir() and not (Path(source) / "config.json").is_file():  # a run directory: its newest checkpoint
        checkpoint = latest_checkpoint(source)
        if checkpoint is None:
            raise UserError(f"{source} has neither config.json nor ckpt_* checkpoints; {TRAIN_HINT}")
        source = str(checkpoint)
    print(f"loading {source}", file=sys.stderr)
    model = from_checkpoint(source, "--ckpt", dropout=0.0)
    if broken := first_nonfinite(model.named_parameters()):
        raise UserError(
            f"{source}: {broken} holds inf or NaN, or values near it (training diverged before it); pass an earlier one"
        )
    return model
