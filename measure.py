"""How bench.py and gpu_check.py measure: each run in a process of its own (its memory, its own imports),
train.py as users run it or with one piece swapped (bench.py's train_with_* variants), and one scoring of any
trained model on the same val windows."""

import gzip
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from shards import TokenWindows

ROOT = Path(__file__).parent


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def machine_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def write_austen_corpus(directory: Path, copies: int) -> Path:
    """The bundled novels as .txt, `copies` times over; each copy after the first shuffles the paragraphs."""
    directory.mkdir()
    rng = random.Random(0)
    for path in sorted(ROOT.glob("assets/austen/*.txt.gz")):
        paragraphs = gzip.open(path).read().decode().split("\n\n")
        for copy in range(copies):
            (directory / f"{copy:03d}_{path.name[:-3]}").write_text("\n\n".join(paragraphs), encoding="utf-8")
            rng.shuffle(paragraphs)
    return directory


def run_measured(child: str, *args) -> dict:
    """Runs child, "module.function", with args in a process of its own, sampling the RSS of it and all its
    children; returns the JSON it prints + peak_rss_mb. bench.py and recipe.py import torch only inside the
    functions that need it, so a child carries only what its own function imports."""
    code = f"import sys, {child.split('.')[0]}; {child}(*sys.argv[1:])"
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", code, *map(str, args)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        root, peak = psutil.Process(process.pid), 0
        while process.poll() is None:
            try:
                peak = max(peak, sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]))
            except psutil.NoSuchProcess:  # a child ended between listing and reading
                pass
            time.sleep(0.02)
        if process.returncode:
            stderr.seek(0)
            raise RuntimeError(f"benchmark child failed: {stderr.read()[-2000:]}")
        return {**json.loads(process.stdout.read().splitlines()[-1]), "peak_rss_mb": peak / 2**20}


def prepare_austen(data_dir: Path) -> Path:
    """prepare.py --dataset=austen in its own process; a failure is a RuntimeError with its last lines."""
    command = [sys.executable, "prepare.py", "--dataset=austen", f"--out_dir={data_dir}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"prepare.py failed: {result.stderr[-2000:]}")
    return data_dir


def run_train_py(overrides: dict, variant: str = "") -> str:
    """Runs train.py with --key=value overrides in its own process, or with variant, "module.function" (one
    of bench.py's train_with_*), as that function runs it; returns what it printed."""
    script = ["-c", f"import {variant.split('.')[0]}; {variant}()"] if variant else ["train.py"]
    command = [sys.executable, *script, *(f"--{key}={value}" for key, value in overrides.items())]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"train.py failed: {result.stderr[-2000:]}")
    return result.stdout


def run_records(run_dir: Path) -> list[dict]:
    """Every record of a train.py run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def timed_logs(run_dir: Path) -> list[dict]:
    """train.py's log records with its own clock's tokens/s, after the first (which holds the warm-up)."""
    return [r for r in run_records(run_dir) if "tokens_per_s" in r][1:]


def mean_tokens_per_s(run_dir: Path) -> float:
    """The mean of a run's tokens/s over its timed logs."""
    timed = timed_logs(run_dir)
    return sum(r["tokens_per_s"] for r in timed) / len(timed)


def last_val_loss(run_dir: Path) -> float:
    """The val loss of a run's last eval."""
    return [r["val_loss"] for r in run_records(run_dir) if "val_loss" in r][-1]


def val_loss(model_dir: Path, windows: TokenWindows, device: str) -> float:
    """Mean next-token loss of the HF GPT-2 directory's model over every window, in fp32."""
    import torch

    from hf import from_pretrained

    model = from_pretrained(str(model_dir)).to(device)
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(windows), 32):
            indices = range(start, min(start + 32, len(windows)))
            tokens = torch.from_numpy(windows.batch(indices)).to(device)  # (B, T + 1)
            total += model(tokens[:, :-1], tokens[:, 1:])[1].item() * len(tokens)
    return total / len(windows)
