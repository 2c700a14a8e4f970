"""gpu_check.py's CPU path on tiny shapes: every step that a session lent a GPU spends its device time on
runs end to end here first, so that the one call on the GPU measures rather than debugs. (Its generate
step is bench.py's generate section, compiled: minutes on a CPU, so left out here.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import gpu_check
from common import UserError

ROOT = Path(__file__).resolve().parent.parent


def test_every_step_runs_on_tiny_shapes(tmp_path):
    steps = "--steps=throughput,quickstart,stop,eval,muon"
    json_path = tmp_path / "gpu_check.json"
    command = [sys.executable, "gpu_check.py", "--tiny", "--device=cpu", f"--out_dir={tmp_path}", steps]
    command.append(f"--json_path={json_path}")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(json_path.read_text())
    throughput = results["throughput"]
    assert throughput["8 x T, fused loss"]["micro_batch_size"] == 8
    assert throughput["64 x T a step, micro-batch auto"]["micro_batch_size"] == 16  # a CPU takes its whole share
    assert (
        throughput["8 x T, fused loss"]["softmax"] == "compact"
        and throughput["8 x T, whole softmax"]["softmax"] == "whole"
    )
    assert throughput["8 x T, whole softmax / HF Trainer"] > 0
    assert "Self CPU time total" in throughput["profile, 8 x T"]["table"]
    assert results["quickstart"]["val_loss"] < 11 and (tmp_path / "quickstart" / "austen" / "loss.png").is_file()
    assert 40 <= results["stop"]["stop_step"] < 160
    assert results["stop"]["largest_loss_difference_after_resume"] == 0.0  # on CPU a resume is bitwise
    assert results["eval"]["items_per_s"] > 0
    assert results["muon"]["Muon / AdamW tok/s"] > 0 and results["muon"]["bookcorpus_muon"]["val_loss"] < 11


def test_an_unknown_step_is_one_line_before_anything_runs(tmp_path):
    with pytest.raises(UserError, match="--steps=throughput,profit: profit is no step; choose from throughput,"):
        gpu_check.main([f"--out_dir={tmp_path}", "--steps=throughput,profit"])
    assert not any(tmp_path.iterdir())
