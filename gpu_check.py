"""The GPU path measured in one run, printing as it goes: about 10 minutes on one H100/H200.

    python gpu_check.py                                    # on a GPU; results in gpu_check/results.json
    cp -r ../shared/gpu .gpu-ref && python gpu_check.py    # with llm.c's trainer beside ours
    python gpu_check.py --tiny --device=cpu                # the same steps on tiny shapes, on a CPU (CI runs it)

1. throughput: the recipe's model (124M, bf16, compiled) at micro-batch 8 x 1024 with the fused loss and
   with F.cross_entropy (bench.train_with_plain_loss), with the whole softmax (bench.train_with_independent_rows:
   what the HF Trainer and llm.c compute), and at 64 sequences a step in the micro-batch train.py picks: tok/s,
   MFU, the predicted and the real peak memory, and a torch.profiler table of the step; the HF Trainer at
   8 x 1024; llm.c's trainer (built without cuDNN, in the background from the start) at 8 and 64 x 1024
   where its sources are in llmc_dir.
2. quickstart: config/austen.py end to end (prepare.py, train.py, sample.py): seconds each, final val loss.
3. stop: a torchrun --nproc_per_node=1 job of the same model sent SIGTERM mid-run, then --resume=auto to
   its end, beside an unstopped run: the stop checkpoint, and the largest difference of the logged losses
   after the resume (bitwise equal on CPU; bf16 noise on a GPU). Not compiled: a stop does not depend on
   it, and each of the three runs would compile anew.
4. eval: eval.py on HellaSwag-shaped rows (made here, random words) at 124M bf16: items/s, and the time
   the 10,042 items of HellaSwag's validation set would take.
5. generate: sample.py's compiled decode against HF generate (bench.py --sections=generate).
6. muon: config/bookcorpus.py (AdamW) against config/bookcorpus_muon.py (Muon + wsd), 200 steps of 8 x 1024
   each on the Austen shards: tok/s (Newton-Schulz's cost at 124M) and the val loss each reaches.
A step that fails prints its error and the check goes on; the exit status is 1 if any failed. Each step
starts from an empty folder of its own under out_dir, so a rerun measures anew; the results, with the
machine and the torch and CUDA versions, go to json_path as each step ends. On a lent GPU with a
per-command limit, three calls: --steps=throughput, --steps=quickstart,stop,eval,generate, --steps=muon.
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import configurator
from checkpoint import damage
from common import UserError
from measure import (
    ROOT,
    default_device,
    last_val_loss,
    machine_name,
    mean_tokens_per_s,
    prepare_austen,
    run_measured,
    run_records,
    run_train_py,
    timed_logs,
)

HELLASWAG_VALIDATION_ITEMS = 10_042
MUON_STEPS = 200  # the muon step's: 1.6M tokens, 1.7 passes over the Austen shards


@dataclass
class GpuCheckConfig:
    tiny: bool = False  # 2 layers x 64, 64-token windows, a few steps: the whole check in minutes on a CPU
    steps: str = "throughput,quickstart,stop,eval,generate,muon"  # which of the steps above to run, in that order
    device: str = field(default_factory=default_device)  # cuda (one GPU) or cpu
    out_dir: str = "gpu_check"  # the data and runs (checkpoints of 1.4 GB each)
    json_path: str = "gpu_check.json"  # the results, rewritten as each step ends
    llmc_dir: str = ".gpu-ref"  # llm.c's sources with compare.sh (../shared/gpu copied here); missing: skipped


def model_args(cfg: GpuCheckConfig) -> dict:
    """The recipe's model as train.py keys (its defaults), or a tiny one."""
    if cfg.tiny:
        return dict(n_layer=2, n_head=2, n_embd=64, block_size=64, compile=False)
    return dict(block_size=1024, compile=cfg.device.startswith("cuda"))


def say(text: str) -> None:
    print(text, flush=True)


def run(command: list, timeout: float = 600, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """A command in its own process, its output as text; a failure is a RuntimeError with its last lines."""
    result = subprocess.run(list(map(str, command)), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if result.returncode:
        raise RuntimeError(f"{' '.join(map(str, command[:3]))} failed: {(result.stderr or result.stdout)[-1500:]}")
    return result


def fresh(directory: Path) -> Path:
    """An empty folder for one step: a rerun measures anew rather than meeting the last run's checkpoints."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


def throughput(cfg: GpuCheckConfig, out: Path, data_dir: Path) -> dict:
    gpu = cfg.device.startswith("cuda")
    llmc = Path(cfg.llmc_dir).resolve() / "llmc"
    with_llmc = gpu and not cfg.tiny and (llmc / "train_gpt2.cu").is_file()
    build = (
        start_llmc_build(llmc, out / "llmc_build.log") if with_llmc else None
    )  # on the CPU while our runs use the GPU
    steps, micro = (6 if cfg.tiny else 60), 8
    common = {
        **model_args(cfg),
        "max_steps": steps,
        "log_interval": steps // 3,  # the first log holds the warm-up (and compiling): timed_logs drops it
        "eval_interval": 10**9,
        "eval_windows": 1,
        "checkpoint_interval": 10**9,
        "sample_prompt": "",
        "data_dir": data_dir,
        "out_dir": out,
        "device": cfg.device,
        "dtype": "bfloat16" if gpu else "float32",
    }
    at_micro = {"batch_size": micro, "micro_batch_size": micro}
    variants = {  # name: (measure.run_train_py's variant, batch keys)
        f"{micro} x T, fused loss": ("", at_micro),
        f"{micro} x T, F.cross_entropy": ("bench.train_with_plain_loss", at_micro),
        f"{micro} x T, whole softmax": ("bench.train_with_independent_rows", at_micro),
        "64 x T a step, micro-batch auto": ("", {"batch_size": 16 if cfg.tiny else 64}),
    }
    results = {}
    for i, (name, (variant, batch)) in enumerate(variants.items()):
        stdout = run_train_py({**common, **batch, "run_name": f"v{i}"}, variant)
        memory = re.search(r"memory: peak ([\d.]+) GiB in the first steps, ([\d.]+) GiB predicted", stdout)
        results[name] = {
            "tokens_per_s": mean_tokens_per_s(out / f"v{i}"),
            "mfu": timed_logs(out / f"v{i}")[-1]["mfu"],
            "micro_batch_size": int(re.search(r"x (\d+) sequences", stdout).group(1)),
            "softmax": "compact" if "one shared row" in stdout else "whole",
            "peak_gib": float(memory.group(1)) if memory else None,
            "predicted_peak_gib": float(memory.group(2)) if memory else None,
        }
        say(f"throughput, {name}: {results[name]}")
    # Where the step's time goes, by torch.profiler: the largest costs left; and the real peak at 8 x T.
    profiled = run_train_py({**common, **at_micro, "run_name": "profile"}, "bench.train_with_profiler")
    table = re.search(r"^-{20}.*time total: [^\n]*$", profiled, re.M | re.S)
    peak = re.search(r"peak memory: ([\d.]+) GiB", profiled)
    results[f"profile, {micro} x T"] = {
        "table": table.group(0) if table else profiled[-4000:],
        "peak_gib": float(peak.group(1)) if peak else None,
    }
    say(f"throughput, profile of the last steps at {micro} x T:\n{results[f'profile, {micro} x T']['table']}")
    shape = model_args(cfg)
    recipe = {
        "n_layer": shape.get("n_layer", 12),
        "n_head": shape.get("n_head", 12),
        "n_embd": shape.get("n_embd", 768),
        "block_size": shape["block_size"],
        "batch_size": micro,
        "steps": steps,
        "warmup_steps": steps // 3,
        "learning_rate": 2.5e-4,
        "dropout": 0.1,
        "seed": 0,
        "data_dir": str(data_dir),
        "out_dir": str(out / "hf"),
        "gpu": gpu,
        "save_model": False,
    }
    hf = run_measured("recipe.recipe_train", json.dumps(recipe))["tokens_per_s"]
    results[f"HF Trainer, {micro} x T"] = {"tokens_per_s": hf}
    for name in (f"{micro} x T, fused loss", f"{micro} x T, whole softmax"):
        results[f"{name} / HF Trainer"] = results[name]["tokens_per_s"] / hf
    say(f"throughput, HF Trainer at {micro} x {shape['block_size']}: {hf:,.0f} tok/s")
    if build:
        results["llm.c"] = llmc_throughput(build, out / "llmc_build.log", llmc, data_dir, steps)
    else:
        say(f"throughput, llm.c: skipped (needs a GPU, the full model and {llmc}: cp -r ../shared/gpu {cfg.llmc_dir})")
    return results


def start_llmc_build(llmc: Path, log: Path) -> subprocess.Popen:
    """llm.c's trainer built as ../shared/gpu/compare.sh builds it (no cuDNN), in the background."""
    capability = run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"]).stdout.split()[0]
    command = [
        "make",
        "train_gpt2cu",
        "NO_MULTI_GPU=1",
        "USE_CUDNN=0",
        f"GPU_COMPUTE_CAPABILITY={capability.replace('.', '')}",
    ]
    with open(log, "w") as f:  # a file, not a pipe: make's output can never block it
        return subprocess.Popen(command, cwd=llmc, stdout=f, stderr=subprocess.STDOUT)


def llmc_throughput(build: subprocess.Popen, log: Path, llmc: Path, data_dir: Path, steps: int) -> dict:
    """llm.c's trainer on the same shards at micro-batches 8 and 64, as compare.sh runs it."""
    if build.wait(timeout=300):
        raise RuntimeError(f"llm.c did not build: {log.read_text()[-1500:]}")
    results = {}
    for batch in (8, 64):
        shards = f"{data_dir}/train_*.bin"
        command = ["./train_gpt2cu", "-i", shards, "-j", shards, "-e", "d12", "-b", batch, "-t", 1024, "-x", steps,
                   "-v", 100000, "-s", 0, "-h", 0, "-l", 2.5e-4]  # fmt: skip
        rates = re.findall(r"(\d+) tok/s", run(command, timeout=180, cwd=llmc).stdout)
        results[f"{batch} x 1024"] = int(rates[-1]) if rates else None
        say(f"throughput, llm.c at {batch} x 1024: {results[f'{batch} x 1024']} tok/s")
    return results


def quickstart(cfg: GpuCheckConfig, out: Path) -> dict:
    """The README's first run, as a user types it, timed step by step."""
    started = time.perf_counter()
    data_dir = prepare_austen(out / "data")
    prepare_seconds = time.perf_counter() - started
    say(f"quickstart, prepare.py: {prepare_seconds:.1f} s")
    tiny = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--max_steps=10", "--eval_interval=5"] if cfg.tiny else []
    started = time.perf_counter()
    run([sys.executable, "train.py", "config/austen.py", f"--data_dir={data_dir}", f"--out_dir={out}",
         f"--device={cfg.device}", *tiny], timeout=900)  # fmt: skip
    train_seconds = time.perf_counter() - started
    val_loss = last_val_loss(out / "austen")
    say(f"quickstart, train.py config/austen.py: {train_seconds:.1f} s, final val loss {val_loss:.3f}")
    started = time.perf_counter()
    sample = run([sys.executable, "sample.py", f"--ckpt={out / 'austen'}", f"--device={cfg.device}"]).stdout
    sample_seconds = time.perf_counter() - started
    say(f"quickstart, sample.py: {sample_seconds:.1f} s: {sample.strip()[:200]!r}")
    return {"prepare_s": prepare_seconds, "train_s": train_seconds, "val_loss": val_loss, "sample_s": sample_seconds}


def stop(cfg: GpuCheckConfig, out: Path, data_dir: Path) -> dict:
    """SIGTERM to a torchrun job (launcher and worker, as a scheduler's preemption sends it) once a few
    steps are logged; the stop checkpoint it leaves; --resume=auto to the end; an unstopped run beside."""
    # The SIGTERM goes once a quarter of the steps are logged: the rest leave it time to land before the end.
    steps, batch_size = (160, 2) if cfg.tiny else (300, 8)
    model = {**model_args(cfg), "compile": False}
    keys = {**model, "batch_size": batch_size, "max_steps": steps, "log_interval": 1, "eval_interval": 10**9,
            "eval_windows": 1, "checkpoint_interval": 10**9, "sample_prompt": "", "data_dir": data_dir,
            "device": cfg.device}  # fmt: skip
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py"]

    def command(run_dir: Path, *extra: str) -> list:
        return [*launch, *(f"--{k}={v}" for k, v in keys.items()), f"--out_dir={run_dir}", "--run_name=run", *extra]

    stopped, unstopped = out / "stopped", out / "unstopped"
    job = subprocess.Popen(list(map(str, command(stopped))), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)  # fmt: skip
    output = []
    for line in job.stdout:
        output.append(line)
        if (logged := re.match(r"step (\d+)/", line)) and int(logged.group(1)) >= steps // 4:
            os.killpg(job.pid, signal.SIGTERM)
            break
    output.extend(job.stdout)
    job.wait(timeout=600)
    stop_line = next((line for line in output if "stopped by signal" in line), None)
    if stop_line is None:
        raise RuntimeError(f"no stop checkpoint: {''.join(output)[-1500:]}")
    stop_step = int(re.search(r"at step (\d+)", stop_line).group(1))
    if problem := damage(stopped / "run" / f"ckpt_{stop_step:07d}"):
        raise RuntimeError(f"the stop checkpoint is not complete: {problem}")
    say(f"stop: SIGTERM; stopped at step {stop_step}, exit status {job.returncode}, {stopped}/run/ckpt_{stop_step:07d}")
    run(command(stopped, "--resume=auto"), timeout=900)
    run(command(unstopped), timeout=900)
    losses = [{r["step"]: r["loss"] for r in run_records(run / "run") if "loss" in r} for run in (stopped, unstopped)]
    after = [step for step in losses[1] if step > stop_step]
    largest = max(abs(losses[0][step] - losses[1][step]) for step in after)
    say(f"stop: resumed to step {steps}; largest loss difference after it, against an unstopped run: {largest:.2e}")
    return {"stop_step": stop_step, "exit_status": job.returncode, "largest_loss_difference_after_resume": largest}


def muon(cfg: GpuCheckConfig, out: Path, data_dir: Path) -> dict:
    """config/bookcorpus.py (AdamW) against config/bookcorpus_muon.py (Muon + wsd) on the Austen shards at
    8 x 1024 tokens a step (one GPU), the same MUON_STEPS steps each: tok/s, so what Newton-Schulz costs a
    step at 124M with one GPU doing it all, and the val loss each reaches: a first look at tokens-to-loss at
    124M (small data, a small batch, both configs' learning rates untuned for it)."""
    steps = 10 if cfg.tiny else MUON_STEPS
    keys = {**model_args(cfg), "batch_size": 8, "micro_batch_size": 8, "max_steps": steps, "eval_interval": 10**9,
            "log_interval": steps // 5, "checkpoint_interval": 10**9, "tasks": "", "sample_prompt": "",
            "wandb_log": False, "data_dir": data_dir, "out_dir": out, "device": cfg.device}  # fmt: skip
    results = {}
    for config in ("bookcorpus", "bookcorpus_muon"):
        run([sys.executable, "train.py", f"config/{config}.py", *(f"--{k}={v}" for k, v in keys.items())], timeout=900)
        results[config] = {"tokens_per_s": mean_tokens_per_s(out / config), "val_loss": last_val_loss(out / config)}
        say(f"muon, config/{config}.py, {steps} steps of 8 x {keys['block_size']}: {results[config]}")
    results["Muon / AdamW tok/s"] = results["bookcorpus_muon"]["tokens_per_s"] / results["bookcorpus"]["tokens_per_s"]
    return results


def hellaswag_rows(count: int) -> list[dict]:
    """Rows in Rowan/hellaswag's shape, of random words: eval.py's speed, not its accuracy."""
    words = "the man then woman car snow ice window over writes smiles person board lift coat removing".split()
    rng = random.Random(0)

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    return [
        {"activity_label": text(2), "ctx_a": text(20), "ctx_b": text(4), "endings": [text(12) for _ in range(4)],
         "label": rng.randrange(4)}
        for _ in range(count)
    ]  # fmt: skip


def evaluate(cfg: GpuCheckConfig, out: Path) -> dict:
    rows = out / "hellaswag_rows.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in hellaswag_rows(20 if cfg.tiny else 2000)))
    dtype = "bfloat16" if cfg.device.startswith("cuda") else "float32"
    result = run([sys.executable, "eval.py", "--init=random", "--tasks=hellaswag", f"--hellaswag_file={rows}",
                  f"--device={cfg.device}", f"--dtype={dtype}"], timeout=600)  # fmt: skip
    rate = float(re.search(r"hellaswag: \d+ items in [\d.]+ s \(([\d.]+) items/s\)", result.stderr).group(1))
    say(f"eval: {rate:.1f} HellaSwag items/s: {HELLASWAG_VALIDATION_ITEMS / rate / 60:.1f} min for the validation set")
    return {"items_per_s": rate, "validation_set_minutes": HELLASWAG_VALIDATION_ITEMS / rate / 60}


def generate(cfg: GpuCheckConfig, out: Path) -> dict:
    json_path = out / "bench_generate.json"
    run([sys.executable, "bench.py", "--sections=generate", f"--full={not cfg.tiny}", f"--device={cfg.device}",
         f"--json_path={json_path}"], timeout=900)  # fmt: skip
    rows = json.loads(json_path.read_text())["rows"]
    for row in rows:
        say(
            f"generate: {row['what']}: {row['ours']:,.1f} tok/s, HF generate {row['reference']:,.1f} "
            f"({row['ratio']:.2f}x)"
        )
    return {row["what"]: {"tokens_per_s": row["ours"], "hf_tokens_per_s": row["reference"]} for row in rows}


def main(argv: list[str]) -> None:
    cfg = configurator.parse_config(GpuCheckConfig, argv)
    out = Path(cfg.out_dir).resolve()  # the scripts run from the project's root
    steps = {
        "throughput": lambda: throughput(cfg, fresh(out / "throughput"), data_dir),
        "quickstart": lambda: quickstart(cfg, fresh(out / "quickstart")),
        "stop": lambda: stop(cfg, fresh(out / "stop"), data_dir),
        "eval": lambda: evaluate(cfg, fresh(out / "eval")),
        "generate": lambda: generate(cfg, fresh(out / "generate")),
        "muon": lambda: muon(cfg, fresh(out / "muon"), data_dir),
    }
    chosen = [name for name in cfg.steps.split(",") if name]
    if unknown := [name for name in chosen if name not in steps]:
        raise UserError(f"--steps={cfg.steps}: {', '.join(unknown)} is no step; choose from {','.join(steps)}")
    results, failed = {"machine": machine_name(cfg.device), "versions": versions()}, []
    say(f"gpu_check on {results['machine']} ({results['versions']}), {'tiny shapes' if cfg.tiny else 'GPT-2 124M'}")
    data_dir = prepare_austen(out / "data") if {"throughput", "stop", "muon"} & set(chosen) else None
    for name in chosen:
        started = time.perf_counter()
        try:
            results[name] = {**steps[name](), "seconds": time.perf_counter() - started}
        except Exception as e:  # noqa: BLE001 - one step's failure is reported; the others still run
            failed.append(name)
            results[name] = {"error": str(e)[-3000:]}
            say(f"{name}: FAILED: {e}")
        Path(cfg.json_path).write_text(json.dumps(results, indent=2) + "\n")
    say(f"wrote {cfg.json_path}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    if failed:
        sys.exit(1)


def versions() -> str:
    import torch

    return f"torch {torch.__version__}, CUDA {torch.version.cuda}"


if __name__ == "__main__":
    configurator.run(main)
