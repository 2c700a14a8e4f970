"""Every script imports and runs without the calls Linux has and macOS or Windows lack."""

import gzip
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Libraries come first: they deal with their platforms themselves. What is hidden after them is
# what our own code must do without: Linux-only os calls (missing on macOS and Windows) and POSIX-only
# os calls, signals and modules (missing on Windows).
QUICKSTART_WITHOUT_LINUX = """
import os, signal, sys
import matplotlib.pyplot, numpy, psutil, safetensors.torch, tiktoken, torch, tqdm

for module, names in {
    os: ["sched_getaffinity", "sched_setaffinity", "fork", "getuid", "getpgid", "killpg", "setsid"],
    signal: ["SIGKILL", "SIGHUP", "SIGUSR1", "SIGALRM", "SIGXFSZ", "alarm", "setitimer"],
}.items():
    for name in names:
        delattr(module, name)
for name in ["resource", "fcntl", "termios", "pwd", "grp"]:
    sys.modules[name] = None  # `import resource` fails, as on Windows

import bench, configurator, model, plot, prepare, sample, shards, tokenizer, train

corpus, data, out = sys.argv[1:]
assert prepare.PrepareConfig().workers >= 1
prepare.main([f"--input={corpus}", f"--out_dir={data}"])
train.main([f"--data_dir={data}", f"--out_dir={out}", "--run_name=run", "--block_size=32", "--n_layer=1", "--n_head=2",
            "--n_embd=16", "--batch_size=2", "--max_steps=2", "--device=cpu", "--compile=False", "--dtype=float32"])
sample.main([f"--ckpt={out}/run", "--max_new_tokens=3", "--device=cpu"])
"""


def test_quickstart_runs_without_linux_only_calls(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    emma = gzip.open(ROOT / "assets/austen/emma.txt.gz").read().decode()
    for i in range(3):
        (corpus / f"{i}.txt").write_text(emma[i * 20_000 : (i + 1) * 20_000], encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-c", QUICKSTART_WITHOUT_LINUX, str(corpus), str(tmp_path / "data"), str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train and" in result.stdout and "saved" in result.stdout and "tokens/s]" in result.stderr
    assert (tmp_path / "out" / "run" / "loss.png").is_file()
