"""train.py's answers to mistakes: one line naming the file or key and the fix, and nothing lost or
recorded untrue: a run directory in use, a resume with other optimizer settings, a damaged checkpoint,
non-finite weights, bad values and paths."""

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from test_train import ROOT, args, metrics

import checkpoint
import checksums
import optim
import train
from checkpoint import CHECKPOINT_FILES, latest_checkpoint
from common import UserError


@pytest.fixture(scope="module")
def data(make_token_data):
    return make_token_data()


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("finished")
    train.main(args(data, out, "--batch_size=8", "--max_steps=4", "--checkpoint_interval=2", "--eval_interval=2"))
    return out


def copy_run(finished, tmp_path) -> Path:
    shutil.copytree(finished / "run", tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize(
    "override,message",
    [
        ("--device=gpu", "device=gpu: not a device; use cpu, cuda"),
        ("--seed=-1", r"seed=-1: must be an integer in \[0, 2\*\*63\)"),
        ("--learning_rate=inf", "learning_rate=inf: must be a finite number"),
        ("--grad_clip=inf", "grad_clip=inf: must be a finite number"),
        ("--eps=nan", "eps=nan: must be a finite number"),
        ("--weight_decay=-0.1", "weight_decay=-0.1: must be 0 or more"),
        ("--lr_decay=step", "lr_decay='step': use 'cosine', 'linear' or 'wsd'"),
        ("--optimizer=sgd", "optimizer='sgd': use 'adamw' or 'muon'"),
        ("--cooldown_ratio=0", r"cooldown_ratio=0.0: must be in \(0, 1\]"),
        (
            "--lr_decay=wsd --warmup_ratio=0.9",
            r"warmup_ratio=0.9 and cooldown_ratio=0.2 overlap under lr_decay='wsd' .*; keep their sum at most 1",
        ),
        ("--muon_momentum=1", r"muon_momentum=1.0: must be in \[0, 1\)"),
        ("--dist_timeout_minutes=inf", "dist_timeout_minutes=inf: must be a finite number"),
        ("--run_name=", "run_name='': must name the run's own directory under out_dir"),
        (
            "--run_name=/abs/dir",
            r"run_name='/abs/dir': must name the run's own directory under out_dir, such as gpt2 \(not",
        ),
        ("--run_name=../up", "run_name='../up': must name the run's own directory under out_dir"),
    ],
)
def test_bad_values_are_refused_before_the_model_is_built(data, tmp_path, monkeypatch, override, message):
    monkeypatch.setattr(train, "GPT", None)  # building a model would be a TypeError
    with pytest.raises(UserError, match=message):
        train.main(args(data, tmp_path, *override.split(" ")))
    assert not (tmp_path / "run").exists()


def test_a_bad_device_is_one_line_without_a_traceback(data, tmp_path):
    command = [sys.executable, "train.py", *args(data, tmp_path, "--device=gpu")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert (
        result.stderr.strip().startswith("train.py: error: device=gpu: not a device")
        and "\n" not in result.stderr.strip()
    )


def test_an_out_dir_that_is_a_file_is_refused(data, tmp_path):
    (tmp_path / "file").write_text("mine\n")
    with pytest.raises(UserError, match="it or a parent is a file; pick another --out_dir"):
        train.main(args(data, tmp_path / "file", "--max_steps=1"))
    with pytest.raises(UserError, match="it or a parent is a file; pick another --out_dir"):
        train.main(args(data, tmp_path / "file" / "sub", "--max_steps=1"))
    assert (tmp_path / "file").read_text() == "mine\n"


@pytest.mark.parametrize("name", ["train_config.json", "metrics.jsonl"])
def test_a_run_file_that_cannot_be_written_is_named(data, tmp_path, name):
    (tmp_path / "run" / name).mkdir(parents=True)  # something else at its path, as a full disk refuses it too
    with pytest.raises(UserError, match=rf"could not write .*{name}.*\(Is a directory\); free space in .*run"):
        train.main(args(data, tmp_path, "--max_steps=2"))


def test_resuming_past_max_steps_is_refused_with_the_fix(data, finished, tmp_path):
    copy_run(finished, tmp_path)
    with pytest.raises(UserError, match="ckpt_0000004 is at step 4, past this run's last step 3 .*larger --max_steps"):
        train.main(args(data, tmp_path, "--batch_size=8", "--max_steps=3", "--resume=auto"))


def test_a_run_directory_in_use_is_refused_at_once(data, tmp_path):
    with FileLock(tmp_path / "run.lock"):  # as another process holds it
        with pytest.raises(UserError, match=r"run is in use by another train.py .*run\.lock"):
            train.main(args(data, tmp_path, "--max_steps=2"))
    assert not (tmp_path / "run").exists()
    train.main(args(data, tmp_path, "--max_steps=2"))  # released: the lock is taken and given back
    train.main(args(data, tmp_path, "--max_steps=3", "--resume=auto"))


def test_a_second_process_leaves_the_first_alone_and_a_killed_one_leaves_no_lock(data, tmp_path):
    long_run = [sys.executable, "train.py", *args(data, tmp_path, "--max_steps=100000", "--eval_interval=100000")]
    first = subprocess.Popen(long_run, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        metrics_path = tmp_path / "run" / "metrics.jsonl"
        deadline = time.time() + 120
        while not (metrics_path.exists() and len(metrics_path.read_text().splitlines()) >= 2):
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.1)
        config = (tmp_path / "run" / "train_config.json").read_text()
        second = [sys.executable, "train.py", *args(data, tmp_path, "--max_steps=5", "--seed=7")]
        result = subprocess.run(second, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1
        assert (
            result.stderr.strip().startswith("train.py: error: ") and "is in use by another train.py" in result.stderr
        )
        assert (tmp_path / "run" / "train_config.json").read_text() == config
        assert len(metrics(tmp_path)) >= 2 and metrics(tmp_path)[0]["step"] == 1  # nothing truncated
    finally:
        first.send_signal(signal.SIGKILL if hasattr(signal, "SIGKILL") else signal.SIGTERM)
        first.wait(timeout=60)
    train.main(args(data, tmp_path, "--max_steps=2"))  # the killed process's lock died with it


def test_a_resume_trains_with_its_own_optimizer_settings_and_says_so(data, finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    changed = [
        "--learning_rate=5e-3",
        "--weight_decay=0.1",
        "--beta2=0.99",
        "--eps=1e-6",
        "--grad_clip=0.5",
        "--lr_decay=linear",
    ]
    capsys.readouterr()
    train.main(
        args(data, tmp_path, "--batch_size=8", "--max_steps=8", "--eval_interval=100", *changed, "--resume=auto")
    )
    out = capsys.readouterr().out
    assert "resumed with changes: learning_rate 0.01 -> 0.005" in out and "max_steps 4 -> 8" in out
    assert "lr_decay cosine -> linear" in out
    # The schedule of an 8-step run with the new peak and decay, from step 4 on (the old one had reached 0 at step 4).
    reference = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-3)
    schedule = optim.lr_schedule(reference, 8, 0.05, "linear")
    expected_lrs = []
    for _ in range(8):
        expected_lrs.append(schedule.get_last_lr()[0])
        reference.step(), schedule.step()
    records = metrics(tmp_path)
    (note,) = [m for m in records if "resumed_with_changes" in m]
    assert note["step"] == 4 and note["resumed_with_changes"]["learning_rate"] == [1e-2, 5e-3]
    assert note["resumed_with_changes"]["lr"] == [0.0, pytest.approx(expected_lrs[4])]
    assert [m["lr"] for m in records if "loss" in m and m["step"] > 4] == pytest.approx(expected_lrs[4:])
    groups = torch.load(run / "ckpt_0000008" / "optimizer.pt", weights_only=True)["param_groups"]
    assert [(g["initial_lr"], g["betas"], g["eps"]) for g in groups] == [(5e-3, (0.9, 0.99), 1e-6)] * 2
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]  # biases and LayerNorm weights stay undecayed
    recorded = json.loads((run / "train_config.json").read_text())
    assert (recorded["learning_rate"], recorded["grad_clip"], recorded["max_steps"]) == (5e-3, 0.5, 8)


def flip_a_bit(path: Path) -> None:
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0x10  # inside the tensors: a finite weight (or moment) changes value
    path.write_bytes(content)


def nan_bytes(path: Path) -> None:
    content = bytearray(path.read_bytes())
    middle = len(content) // 2 // 4 * 4
    content[middle : middle + 16] = torch.full((4,), math.nan).numpy().tobytes()
    path.write_bytes(content)


@pytest.mark.parametrize(
    "file,how",
    [
        ("model.safetensors", flip_a_bit),
        ("model.safetensors", lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])),
        ("optimizer.pt", nan_bytes),
        ("trainer_state.pt", Path.unlink),
        ("config.json", lambda path: path.write_text('{"n_layer": 2,')),
        ("checksums.sha256", Path.unlink),
        ("checksums.sha256", lambda path: path.write_text(path.read_text().replace("  merges.txt", "  other.txt"))),
    ],
)
def test_a_damaged_checkpoint_names_the_intact_one_before_it(data, finished, tmp_path, file, how):
    run = copy_run(finished, tmp_path)
    how(run / "ckpt_0000004" / file)
    resume = args(data, tmp_path, "--batch_size=8", "--max_steps=4", "--checkpoint_interval=2", "--resume=auto")
    with pytest.raises(UserError, match=rf"ckpt_0000004/{file} (is damaged|is missing|does not list)") as refused:
        train.main(resume)
    fix = f"mv {run / 'ckpt_0000004'} {run / 'ckpt_0000004'}.damaged), then --resume=auto continues from "
    assert str(refused.value).endswith(fix + f"{run / 'ckpt_0000002'}, which is intact")
    # Doing as it says: the run continues from ckpt_2 and writes step 4 again.
    (run / "ckpt_0000004").rename(run / "ckpt_0000004.damaged")
    train.main(resume)
    assert latest_checkpoint(run).name == "ckpt_0000004"


@pytest.mark.parametrize("file", ["model.safetensors", "config.json"])
def test_a_damaged_init_from_directory_is_named(data, finished, tmp_path, file):
    run = copy_run(finished, tmp_path / "old")
    damaged = run / "ckpt_0000004"
    (damaged / file).write_bytes((damaged / file).read_bytes()[:20])
    with pytest.raises(
        UserError,
        match=rf"ckpt_0000004/{file} is damaged \(its sha256 differs .*; pass --init_from={run / 'ckpt_0000002'}, "
        "the newest intact checkpoint before it",
    ):
        train.main(args(data, tmp_path, f"--init_from={damaged}", "--max_steps=1"))
    (damaged / "checksums.sha256").unlink()  # as an HF directory from elsewhere: its readers find the damage
    with pytest.raises(
        UserError, match=r"ckpt_0000004: its model does not load \((SafetensorError|JSONDecodeError): .*intact HF"
    ):
        train.main(args(data, tmp_path, f"--init_from={damaged}", "--max_steps=1"))


def test_a_checkpoint_is_never_written_with_nonfinite_optimizer_state(data, tmp_path, monkeypatch):
    """Optimizer state that turns NaN after step 4's update (the weights still finite): the checkpoint at
    step 4 is refused and the error names the newest finite one."""
    step, calls = train.train_step, []

    def breaks_the_moments(model, raw_model, optimizer, *rest):
        result = step(model, raw_model, optimizer, *rest)
        calls.append(1)
        if len(calls) == 4:
            optimizer.state[raw_model.transformer.wte.weight]["exp_avg"].fill_(math.nan)
        return result

    monkeypatch.setattr(train, "train_step", breaks_the_moments)
    with pytest.raises(
        UserError,
        match="step 4: .*wte.weight's exp_avg holds inf or NaN, or values near it, so no checkpoint is written; "
        r"lower learning_rate \(and muon_learning_rate with Muon\) or check the data, then --resume=auto continues "
        r"from .*ckpt_0000002, which is intact",
    ):
        train.main(args(data, tmp_path, "--max_steps=8", "--checkpoint_interval=2", "--log_interval=4"))
    assert latest_checkpoint(tmp_path / "run").name == "ckpt_0000002"


def test_an_update_that_makes_weights_nonfinite_stops_the_run_at_that_step(data, finished, tmp_path):
    # A learning rate beyond float32 makes every updated weight inf or NaN at the first step it applies; one of
    # 1e37 makes them finite but ~1e37, whose squares overflow: diverged as surely.
    huge = ["--learning_rate=1e39", "--warmup_ratio=0", "--log_interval=3"]
    message = (
        r"step {}: its update left weights holding inf or NaN, or near it .*run stops here; lower learning_rate "
        r"\(and muon_learning_rate with Muon\), then "
    )
    with pytest.raises(
        UserError, match=message.format(1) + r"--resume=auto starts the run again \(no checkpoint yet\)"
    ):
        train.main(args(data, tmp_path / "new", "--max_steps=8", *huge))
    assert not latest_checkpoint(tmp_path / "new" / "run")
    run = copy_run(finished, tmp_path)  # resumed at step 4 with the huge rate: step 5 breaks, nothing is saved
    with pytest.raises(UserError, match=message.format(5) + f"--resume=auto continues from {run / 'ckpt_0000004'}, "):
        train.main(
            args(
                data,
                tmp_path,
                "--batch_size=8",
                "--max_steps=8",
                "--checkpoint_interval=1",
                *huge,
                "--resume=auto",
                "--learning_rate=1e37",
            )
        )
    assert latest_checkpoint(run).name == "ckpt_0000004"


def test_optimizer_state_of_another_grouping_is_refused_naming_the_fix(data, finished, tmp_path):
    checkpoint_dir = copy_run(finished, tmp_path) / "ckpt_0000004"
    saved = torch.load(checkpoint_dir / "optimizer.pt", weights_only=True)
    saved["param_groups"][0]["params"] += saved["param_groups"].pop()["params"]  # one group, as another version's
    torch.save(saved, checkpoint_dir / "optimizer.pt")
    digests = checksums.read_checksums(checkpoint_dir / "checksums.sha256")
    checksums.write_checksums(
        checkpoint_dir, {**digests, "optimizer.pt": checksums.sha256(checkpoint_dir / "optimizer.pt")}
    )
    message = (
        r"optimizer.pt groups the parameters in 1 where this train.py's optimizer has 2: .*--run_name.* "
        r"--init_from=.*ckpt_0000004"
    )
    with pytest.raises(UserError, match=message):
        train.main(args(data, tmp_path, "--batch_size=8", "--max_steps=6", "--resume=auto"))


def test_a_damaged_metrics_line_is_named(data, finished, tmp_path):
    run = copy_run(finished, tmp_path)
    shutil.rmtree(run / "ckpt_0000004")
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join([lines[0], "garbage\n", *lines[1:]]))
    with pytest.raises(UserError, match=r"metrics.jsonl, line 2: not a metrics record; fix or remove that line"):
        train.main(args(data, tmp_path, "--batch_size=8", "--max_steps=4", "--checkpoint_interval=2", "--resume=auto"))
    assert "garbage\n" in (run / "metrics.jsonl").read_text()


@pytest.mark.parametrize(
    "overrides,differ,fix",
    [
        (["--n_layer=3"], "n_layer=2 then, 3 now", "--n_layer=2"),
        (["--n_embd=32", "--n_head=4"], "n_head=2 then, 4 now, n_embd=16 then, 32 now", "--n_head=2 --n_embd=16"),
        (["--block_size=8"], "block_size=16 then, 8 now", "--block_size=16"),
        (["--seed=7", "--batch_size=4"], "seed=42 then, 7 now, batch_size=8 then, 4 now", "--seed=42 --batch_size=8"),
        (["--optimizer=muon"], "optimizer=adamw then, muon now", "--optimizer=adamw"),
    ],
)
def test_a_resume_that_would_not_continue_the_run_names_what_differs(data, finished, tmp_path, overrides, differ, fix):
    copy_run(finished, tmp_path)
    message = rf"ckpt_0000004 was trained with other settings than this run's \({differ}\); .* resume with {fix}, or"
    with pytest.raises(UserError, match=message):
        train.main(args(data, tmp_path, "--batch_size=8", "--max_steps=6", *overrides, "--resume=auto"))


def test_a_resume_on_other_data_is_refused_naming_data_dir(data, finished, tmp_path, make_token_data):
    copy_run(finished, tmp_path)
    other = make_token_data(seed=1)  # as many windows as `data`, other tokens
    with pytest.raises(UserError, match=rf"ckpt_0000004 was trained on other data than {other} holds \(train_data "):
        train.main(args(other, tmp_path, "--batch_size=8", "--max_steps=6", "--resume=auto"))


def test_a_resume_lists_a_dropout_change(data, finished, tmp_path, capsys):
    copy_run(finished, tmp_path)
    capsys.readouterr()
    train.main(args(data, tmp_path, "--batch_size=8", "--max_steps=5", "--dropout=0.2", "--resume=auto"))
    assert re.search(r"resumed with changes: .*dropout 0.0 -> 0.2", capsys.readouterr().out)


def test_a_checkpoint_lists_the_checksum_of_each_of_its_files_as_sha256sum_checks_them(finished):
    checkpoint = finished / "run" / "ckpt_0000004"
    listed = [line.split("  ")[1] for line in (checkpoint / "checksums.sha256").read_text().splitlines()]
    assert (
        sorted(listed)
        == sorted(CHECKPOINT_FILES)
        == sorted(p.name for p in checkpoint.iterdir() if p != checkpoint / "checksums.sha256")
    )
    if shutil.which("sha256sum"):
        subprocess.run(["sha256sum", "--check", "--quiet", "checksums.sha256"], cwd=checkpoint, check=True)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's always-full device")
def test_a_full_disk_during_a_save_says_so():
    # torch.save(obj, path) would say "[enforce fail at inline_container.cc:672] . unexpected pos"
    with pytest.raises(OSError, match=r"No space left on device"):
        checkpoint.save_torch({"weights": torch.zeros(100_000)}, Path("/dev/full"))
