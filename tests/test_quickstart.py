"""The README's quickstart, shrunk to seconds: prepare the embedded corpus -> train -> checkpoint ->
sample -> plot, through the same command lines a user types, from the repository root."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result


def test_quickstart_end_to_end(tmp_path):
    data_dir, out_dir = tmp_path / "data", tmp_path / "out"
    run("prepare.py", "--dataset=austen", f"--out_dir={data_dir}")
    meta = json.loads((data_dir / "meta.json").read_text())
    # the README's numbers: the split of the bundled corpus is what it always was
    assert (meta["splits"]["train"]["tokens"], meta["splits"]["val"]["tokens"]) == (956_271, 37_064)

    # config/austen.py itself, made tiny: 1 layer, 8 steps
    tiny = [
        "--n_layer=1",
        "--n_head=2",
        "--n_embd=32",
        "--block_size=64",
        "--batch_size=4",
        "--max_steps=8",
        "--eval_interval=4",
        "--eval_windows=16",
        "--log_interval=2",
        "--checkpoint_interval=4",
    ]
    train = run("train.py", "config/austen.py", f"--data_dir={data_dir}", f"--out_dir={out_dir}", *tiny)
    run_dir = out_dir / "austen"
    assert sorted(p.name for p in run_dir.glob("ckpt_*")) == ["ckpt_0000004", "ckpt_0000008"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val_losses = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val_losses) == 2 and val_losses[-1] < val_losses[0] < math.log(50257) + 0.5
    assert "tok/s" in train.stdout
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    sample = run("sample.py", f"--ckpt={run_dir}", "--start=I was telling her that", "--max_new_tokens=20", "--seed=1")
    assert (
        sample.stdout.startswith("I was telling her that") and len(sample.stdout) > len("I was telling her that") + 10
    )

    (run_dir / "loss.png").unlink()
    assert "loss.png" in run("plot.py", str(run_dir)).stdout
    assert (run_dir / "loss.png").stat().st_size > 10_000


@pytest.mark.parametrize("gpu_visible, expected", [(True, ["cuda", "True", "None"]), (False, ["cpu", "False", "None"])])
def test_quickstart_config_trains_on_a_gpu_when_one_is_visible(gpu_visible, expected):
    """config/austen.py leaves device, compile and dtype to TrainConfig: the GPU, compiled, if torch sees
    one; else the CPU; bf16 where the device has it natively (train.native_dtype)."""
    code = (
        f"import torch\ntorch.cuda.is_available = lambda: {gpu_visible}\nimport configurator, train\n"
        "cfg = configurator.parse_config(train.TrainConfig, ['config/austen.py'])\n"
        "print(cfg.device, cfg.compile, cfg.dtype)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == expected
