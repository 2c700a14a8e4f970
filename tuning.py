"""How train.py's own settings are weighed against each other, for bench.py's quickstart and optimizer
sections: the quickstart's candidates by val loss against wall time, AdamW against Muon (+ wsd) by val
loss against tokens, each run in a process of its own (measure.py); and a Muon step at 124M with its
orthogonalizations split over torchrun ranks or not."""

import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import configurator
from measure import ROOT, last_val_loss, prepare_austen, run_train_py, timed_logs


def train_with_c_attn_whole() -> None:
    """train.py (arguments from sys.argv) with Muon orthogonalizing c_attn's fused (3C, C) weight whole,
    one lr adjustment (sqrt(3)) for it, where train.py's takes q, k and v apart (optim.muon_adamw)."""
    import train

    build = train.muon_adamw

    def whole(*args, **kwargs):
        optimizer = build(*args, **kwargs)
        for group in optimizer.param_groups:
            if "parts" in group:
                group["parts"] = 1
        return optimizer

    train.muon_adamw = whole
    configurator.run(train.main)


def muon_step_seconds() -> None:
    """Under torchrun (gloo): prints the best of 3 Muon steps (muon_adamw's, AdamW's part left out) on GPT-2
    124M's 48 block matrices (random gradients, rank 0's clock between barriers), the orthogonalizations split
    over the ranks if argv[1] is 'split', else every rank doing them all."""
    import torch
    import torch.distributed as dist

    import optim
    from model import GPT, GPTConfig

    dist.init_process_group("gloo")
    ranks = dict(rank=dist.get_rank(), world_size=dist.get_world_size()) if sys.argv[1] == "split" else {}
    model = GPT(GPTConfig())  # train.py's grouping of its matrices: c_attn as q, k, v apart
    muon = optim.muon_adamw(model, 0.0, 0.0, (0.9, 0.999), 1e-8, muon_lr=0.01, muon_momentum=0.95,
                            muon_weight_decay=0.0, **ranks)._muon  # fmt: skip
    for p in optim.block_matrices(model):
        p.grad = torch.randn_like(p)
    seconds = []
    for _ in range(3):
        dist.barrier()
        started = time.perf_counter()
        muon.step()
        dist.barrier()
        seconds.append(time.perf_counter() - started)
    if dist.get_rank() == 0:
        print(min(seconds))
    dist.destroy_process_group()


def muon_step_seconds_on_two_ranks(how: str) -> float:
    """muon_step_seconds under a 2-process torchrun, how: 'split' or 'every rank'."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python"]
    command = [*launch, sys.executable, "-c", "import tuning; tuning.muon_step_seconds()", how]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"muon_step_seconds ({how}) failed: {result.stderr[-2000:]}")
    return float(result.stdout.split()[-1])


# optimizer: AdamW against Muon (lr_decay='wsd') on a model whose blocks do most of the work (6 x 256 on the
# Austen shards, the compact softmax), each at its own swept optimum: the val loss AdamW reaches in
# OPTIMIZER_STEPS steps against what Muon reaches in 0.6x of them, over OPTIMIZER_SEEDS seeds. Loss only, so
# two runs at a time, one thread each; the seconds a step are those of the runs, side by side.
OPTIMIZER_SHAPE = dict(n_layer=6, n_head=4, n_embd=256, block_size=128, batch_size=8, dropout=0.0)
OPTIMIZER_STEPS = 600
OPTIMIZER_SEEDS = 3
ADAMW_LRS = (5e-4, 1e-3, 2e-3, 4e-3)
MUON_LRS = (0.0025, 0.005, 0.01, 0.02, 0.04)  # Muon's; the rest takes AdamW's best


def val_loss_and_step_seconds(overrides: dict, variant: str = "") -> tuple[float, float]:
    run_train_py(overrides, variant)
    run_dir = Path(overrides["out_dir"]) / overrides["run_name"]
    tokens = OPTIMIZER_SHAPE["batch_size"] * OPTIMIZER_SHAPE["block_size"]
    return last_val_loss(run_dir), np.mean([tokens / r["tokens_per_s"] for r in timed_logs(run_dir)])


def bench_optimizer(cfg):
    from concurrent.futures import ThreadPoolExecutor

    os.environ["OMP_NUM_THREADS"] = "1"  # the runs' children: two at a time on two cores
    split, unsplit = (muon_step_seconds_on_two_ranks(how) for how in ("split", "every rank"))  # first: a minute
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(2) as pool:
        base = {
            **OPTIMIZER_SHAPE, "data_dir": prepare_austen(Path(tmp) / "data"), "out_dir": tmp, "log_interval": 50,
            "eval_interval": 10**9, "checkpoint_interval": 10**9, "sample_prompt": "", "device": cfg.device,
        }  # fmt: skip
        adamw = dict(optimizer="adamw", lr_decay="linear", max_steps=OPTIMIZER_STEPS)
        muon = dict(optimizer="muon", lr_decay="wsd", cooldown_ratio=0.2)

        def run(name: str, seed: int = 0, variant: str = "", **overrides):  # a future of (val loss, s a step)
            overrides = {**base, **overrides, "seed": seed, "run_name": f"{name}{seed}"}
            return pool.submit(val_loss_and_step_seconds, overrides, variant)

        def report(name, futures):
            results = {key: future.result() for key, future in futures.items()}
            for key, (loss, seconds) in results.items():
                print(f"optimizer, {name} {key}: val loss {loss:.4f}, {seconds:.3f} s a step", flush=True)
            return results

        adamw_sweep = report("AdamW", {lr: run(f"adamw{lr}", learning_rate=lr, **adamw) for lr in ADAMW_LRS})
        adamw_lr = min(adamw_sweep, key=lambda lr: adamw_sweep[lr][0])
        muon_sweep = report("Muon", {
            lr: run(f"muon{lr}", learning_rate=adamw_lr, muon_learning_rate=lr, max_steps=OPTIMIZER_STEPS, **muon)
            for lr in MUON_LRS
        })  # fmt: skip
        muon_lr = min(muon_sweep, key=lambda lr: muon_sweep[lr][0])
        schedule = report("AdamW + wsd, the schedule alone", {adamw_lr: run(
            "adamw_wsd", learning_rate=adamw_lr, **{**adamw, "lr_decay": "wsd", "cooldown_ratio": 0.2},
        )})  # fmt: skip
        whole = report("Muon, c_attn whole", {muon_lr: run(
            "whole", variant="tuning.train_with_c_attn_whole", learning_rate=adamw_lr, muon_learning_rate=muon_lr,
            max_steps=OPTIMIZER_STEPS, **muon,
        )})  # fmt: skip
        short = int(OPTIMIZER_STEPS * 0.6)
        seeds = report("seeds", {
            **{("adamw", s): run("adamw", s, learning_rate=adamw_lr, **adamw) for s in range(1, OPTIMIZER_SEEDS)},
            **{("muon", seed): run("muon", seed, learning_rate=adamw_lr, muon_learning_rate=muon_lr, max_steps=short,
                                   **muon) for seed in range(OPTIMIZER_SEEDS)},
        })  # fmt: skip
    adamw_losses = [adamw_sweep[adamw_lr][0], *(seeds[("adamw", s)][0] for s in range(1, OPTIMIZER_SEEDS))]
    muon_losses = [seeds[("muon", s)][0] for s in range(OPTIMIZER_SEEDS)]
    size = f"6 x 256, 8 x 128 tokens a step, {OPTIMIZER_SEEDS} seeds"
    return [
        {"what": f"optimizer, {size}: val loss, Muon lr {muon_lr} + wsd in {short} steps vs AdamW lr {adamw_lr} in "
                 f"{OPTIMIZER_STEPS} (lower is better)", "unit": "loss", "ours": np.mean(muon_losses),
         "reference": np.mean(adamw_losses), "ours_runs": muon_losses, "reference_runs": adamw_losses},
        {"what": f"optimizer, {size}: val loss in {OPTIMIZER_STEPS} steps, Muon with c_attn as q, k, v apart vs whole "
                 "(lower is better)", "unit": "loss", "ours": muon_sweep[muon_lr][0], "reference": whole[muon_lr][0]},
        {"what": f"optimizer, {size}: val loss in {OPTIMIZER_STEPS} steps, AdamW + wsd vs AdamW + linear, seed 0 (the "
                 "schedule's part of Muon's gain; lower is better)", "unit": "loss", "ours": schedule[adamw_lr][0],
         "reference": adamw_sweep[adamw_lr][0]},
        {"what": f"optimizer, {size}: s a step, Muon vs AdamW (lower is better)", "unit": "s",
         "ours": muon_sweep[muon_lr][1], "reference": adamw_sweep[adamw_lr][1]},
        {"what": "optimizer, GPT-2 124M's block matrices: s a Muon step on 2 torchrun ranks of this CPU (gloo), one "
                 "thread each, the orthogonalizations split over them vs every rank doing all (lower is better)",
         "unit": "s",
         "ours": split, "reference": unsplit},
    ]  # fmt: skip


# quickstart: the README's first run, `train.py config/austen.py` on the bundled corpus, against other
# settings for it: each eval's val loss against the wall time since train.py started, and the time to
# QUICKSTART_TARGET. Long (3-6 minutes a candidate on 2 cores), so on request; rerun it when the
# step changes. The reference is config/austen.py; the others are the settings the sweep in BENCHMARKS.md
# weighed it against in the same wall time.
QUICKSTART_TARGET = 4.70
QUICKSTART_CANDIDATES = {
    "config/austen.py": {},
    "Muon lr 0.005": dict(muon_learning_rate=0.005),
    "AdamW lr 2e-3, linear decay, 2,000 steps (the earlier setting)": dict(
        optimizer="adamw", lr_decay="linear", max_steps=2000
    ),
    "AdamW, 2 x 256 per step, lr 1.4e-3, linear decay, 3,360 steps": dict(
        optimizer="adamw", lr_decay="linear", batch_size=2, learning_rate=1.4e-3, max_steps=3360
    ),
}


def timed_val_losses(overrides: dict) -> list[tuple[float, float]]:
    """Runs train.py config/austen.py with overrides, reading its lines as they come; returns (seconds
    since it started, val loss) of each evaluation."""
    command = [
        sys.executable,
        "train.py",
        "config/austen.py",
        *(f"--{key}={value}" for key, value in overrides.items()),
    ]
    started, curve = time.perf_counter(), []
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:
            if match := re.match(r"step \d+: val loss ([\d.]+)", line):
                curve.append((time.perf_counter() - started, float(match.group(1))))
    if process.returncode:
        raise RuntimeError(f"train.py {' '.join(command[2:])} failed with status {process.returncode}")
    return curve


def bench_quickstart(cfg):
    results = {}  # name: (seconds to QUICKSTART_TARGET, final val loss)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = prepare_austen(Path(tmp) / "data")
        for i, (name, overrides) in enumerate(QUICKSTART_CANDIDATES.items()):
            curve = timed_val_losses({**overrides, "data_dir": data_dir, "out_dir": tmp, "run_name": f"run{i}"})
            reached = next((seconds for seconds, loss in curve if loss <= QUICKSTART_TARGET), math.inf)
            results[name] = (reached, curve[-1][1])
            points = ", ".join(f"{seconds:.0f} s {loss:.3f}" for seconds, loss in curve)
            print(f"quickstart, {name}: val loss by wall time since train.py started: {points}", flush=True)
    reference = results["config/austen.py"]
    rows = []
    for name, (reached, final_loss) in results.items():
        what = f"quickstart, {name} (lower is better)"
        for measure, unit, ours, theirs in [(f"s to val {QUICKSTART_TARGET}", "s", reached, reference[0]),
                                            ("final val loss", "loss", final_loss, reference[1])]:  # fmt: skip
            rows.append({"what": f"{what}: {measure}", "unit": unit, "ours": ours, "reference": theirs})
    return rows
