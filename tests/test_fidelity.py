"""train.py learns as GPT2LMHeadModel under the HF Trainer does, step for step, in a controlled run:
the same initial weights, the same windows in the same order, no dropout, the recipe's
TrainingArguments (recipe.recipe_arguments). The final weights and every step's gradient norm and
learning rate agree to float rounding; a train.py whose schedule, optimizer groups, clipping or data
order drifted from the Trainer's does not. bench.py's fidelity section compares whole runs from
independent seeds."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import batching
import bench
import optim
import train
from checkpoint import latest_checkpoint
from common import UserError
from hf import hf_config, hf_state_dict
from loss import compact_output_layer
from model import GPT, GPTConfig
from recipe import RecipeWindows, recipe_arguments
from shards import TokenWindows

SEED, BATCH, STEPS, BLOCK = 3, 8, 30, 32  # 2 epochs of 15 steps over 124 windows
LEARNING_RATE = 3e-3
CLIP_AT = 0.3  # below most steps' gradient norm on this data (the recipe's 1.0 would never act)
SHAPE = dict(block_size=BLOCK, vocab_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
OURS = [
    *(f"--{key}={value}" for key, value in SHAPE.items()),
    f"--seed={SEED}",
    f"--batch_size={BATCH}",
    f"--max_steps={STEPS}",
    f"--learning_rate={LEARNING_RATE}",
    f"--grad_clip={CLIP_AT}",
    "--log_interval=1",
    "--eval_interval=1000",
    "--checkpoint_interval=1000",
    "--device=cpu",
    "--dtype=float32",
    "--compile=False",
]
# The two sides differ in the order of float operations (fused loss vs logits, attention kernels):
# after 30 steps their weights differ by ~1e-6 of each tensor's scale; each drift below by >= 4e-4.
WEIGHT_TOLERANCE = 1e-5


SOFTMAX = {16: "softmax over the 48 tokens of the train split", 0: "softmax over all 64 tokens"}


@pytest.fixture(scope="module", params=[16, 0], ids=["compact softmax", "whole softmax"])
def data(make_token_data, request):
    """With tokens 48-63 never in the data, a new model's loss takes the compact softmax (loss.CompactVocab),
    with every token in it, the whole one; the Trainer's is always the whole one."""
    return make_token_data(
        train_tokens=4000, val_tokens=600, vocab_size=SHAPE["vocab_size"], unused_tokens=request.param
    )


def window_order(num_windows: int) -> np.ndarray:
    """The windows in the order both sides read them, written out from train.py's docstring: epoch e
    is the permutation seeded by (seed, e), cut to whole batches."""
    steps_per_epoch = num_windows // BATCH
    epochs = math.ceil(STEPS / steps_per_epoch)
    order = np.concatenate(
        [np.random.default_rng([SEED, e]).permutation(num_windows)[: steps_per_epoch * BATCH] for e in range(epochs)]
    )
    return order[: STEPS * BATCH]


@pytest.fixture(scope="module")
def recipe(data, tmp_path_factory):
    """GPT2LMHeadModel under the Trainer from train.py's initial weights: its final weights and logs."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer

    torch.manual_seed(SEED)  # as train.py builds a new model
    ours = GPT(GPTConfig(**SHAPE))
    windows = TokenWindows(data, "train", BLOCK)
    compact_output_layer(ours, windows.tokens_present(), new_model=True)  # ties the rows of tokens not in the data
    model = GPT2LMHeadModel(GPT2Config(**hf_config(ours.config)))
    model.load_state_dict(hf_state_dict(ours), strict=False)  # lm_head.weight is tied to wte
    args = recipe_arguments(
        tmp_path_factory.mktemp("trainer"),
        BATCH,
        STEPS,
        LEARNING_RATE,
        SEED,
        gpu=False,
        max_grad_norm=CLIP_AT,
        logging_steps=1,
        train_sampling_strategy="sequential",
    )
    trainer = Trainer(model=model, args=args, train_dataset=RecipeWindows(windows, window_order(len(windows))))
    trainer.train()
    logs = [r for r in trainer.state.log_history if "grad_norm" in r]
    return {name: p.detach().clone() for name, p in model.state_dict().items()}, logs


def train_py(data, out) -> tuple[dict, list[dict]]:
    train.main([f"--data_dir={data}", f"--out_dir={out}", "--run_name=run", *OURS])
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return load_file(latest_checkpoint(out / "run") / "model.safetensors"), [r for r in records if "grad_norm" in r]


def largest_weight_difference(ours: dict, theirs: dict) -> float:
    """Max over tensors of max |ours - theirs|, relative to the tensor's largest weight.

    Leaves out the key bias (the middle third of c_attn.bias): its true gradient is 0, as softmax
    ignores the constant q.b_k it adds to all of a query's scores, so each side's gradient is float
    rounding, which Adam scales up to full-size steps in directions of its own."""
    differences = []
    for name in ours:
        a, b = ours[name], theirs[name]
        if name.endswith("attn.c_attn.bias"):
            a, b = (torch.cat([t[: len(t) // 3], t[-len(t) // 3 :]]) for t in (a, b))
        differences.append(((a - b).abs().max() / b.abs().max()).item())
    return max(differences)


def test_train_py_matches_the_trainer_step_for_step(data, recipe, tmp_path, capsys, request):
    theirs, their_logs = recipe
    ours, our_logs = train_py(data, tmp_path)
    assert SOFTMAX[request.node.callspec.params["data"]] in capsys.readouterr().out
    assert len(our_logs) == len(their_logs) == STEPS
    # Clipping acted and the schedule warmed up over ceil(5% of 30) = 2 steps.
    assert sum(r["grad_norm"] > CLIP_AT for r in our_logs) > STEPS // 2
    assert [r["lr"] for r in our_logs][:3] == pytest.approx([0.0, LEARNING_RATE / 2, LEARNING_RATE])
    assert [r["lr"] for r in our_logs] == pytest.approx([r["learning_rate"] for r in their_logs], rel=1e-12)
    assert [r["grad_norm"] for r in our_logs] == pytest.approx([r["grad_norm"] for r in their_logs], rel=1e-4)
    assert [r["loss"] for r in our_logs] == pytest.approx([r["loss"] for r in their_logs], rel=1e-5)
    assert largest_weight_difference(ours, theirs) < WEIGHT_TOLERANCE


def every_epoch_in_the_first_epochs_order(seed, step, steps_per_epoch, num_windows, batch_size):
    return GLOBAL_BATCH_WINDOWS(seed, step % steps_per_epoch, steps_per_epoch, num_windows, batch_size)


def weight_decay_on_every_parameter(model, lr, weight_decay, *args, **kwargs):
    optimizer = ADAMW(model, lr, weight_decay, *args, **kwargs)
    for group in optimizer.param_groups:
        group["weight_decay"] = weight_decay
    return optimizer


LR_SCHEDULE, GLOBAL_BATCH_WINDOWS, ADAMW, CLIP = (
    optim.lr_schedule,
    batching.global_batch_windows,
    optim.adamw,
    optim.clip_divisor,
)
DRIFTS = {
    "warmup steps rounded down": (
        train,
        "lr_schedule",
        lambda opt, steps, ratio, *rest: LR_SCHEDULE(opt, steps, math.floor(steps * ratio) / steps, *rest),
    ),
    "weight decay on biases and LayerNorm too": (train, "adamw", weight_decay_on_every_parameter),
    "no gradient clipping": (train, "clip_divisor", lambda grad_norm, max_norm: CLIP(grad_norm, math.inf)),
    "every epoch in the first epoch's order": (
        batching,
        "global_batch_windows",
        every_epoch_in_the_first_epochs_order,
    ),
}


@pytest.mark.parametrize("data", [16], indirect=True, ids=["compact softmax"])
@pytest.mark.parametrize("drift", DRIFTS)
def test_a_drift_from_the_trainer_is_caught(drift, data, recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(*DRIFTS[drift])
    ours, _ = train_py(data, tmp_path)
    assert largest_weight_difference(ours, recipe[0]) > 10 * WEIGHT_TOLERANCE


def test_the_fidelity_benchmark_refuses_a_spread_of_one_seed():
    with pytest.raises(UserError, match=">= 2 seeds per side"):
        bench.main(["--sections=fidelity", "--fidelity_seeds=1"])
