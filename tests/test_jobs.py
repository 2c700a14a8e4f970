"""Multi-process jobs under real torchrun process groups (gloo, CPU): stop signals sent as SLURM and
a terminal send them, failures on one rank, resumes from what rank 0 chose, and two "nodes"."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from filelock import FileLock, Timeout
from safetensors.torch import load_file
from test_train import TINY, assert_same_training, metrics, weights

import train
from checkpoint import latest_checkpoint

ROOT = Path(__file__).resolve().parent.parent
FAULTY_TRAIN = ROOT / "tests" / "faulty_train.py"
# A job that hangs is ended by finish() at its deadline and fails its test. Collectives keep train.py's
# default timeout (10 min), past every deadline here: a rank slowed by a loaded machine (rank 0 writing
# a checkpoint while the others wait) is never taken for a dead one.
JOB = ["--run_name=run", "--log_interval=1"]
STOP_TEST_STEPS = [
    "--max_steps=40",
    "--checkpoint_interval=1000",
    "--eval_interval=1000",
    "--eval_windows=2",
    "--dropout=0.1",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(data, out, *extra, fault=None, nproc=2, launcher=("--standalone",), model=TINY) -> subprocess.Popen:
    """Starts `torchrun train.py` (or faulty_train.py with $FAULT) in a session of its own, like a job step."""
    script = FAULTY_TRAIN if fault else ROOT / "train.py"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *launcher,
        f"--nproc_per_node={nproc}",
        str(script),
        f"--data_dir={data}",
        f"--out_dir={out}",
        *model,
        *JOB,
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAULT": fault or ""}
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def finish(job: subprocess.Popen, timeout=120) -> tuple[int, str, str]:
    try:
        stdout, stderr = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        stdout, stderr = job.communicate()
        pytest.fail(f"job still running after {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return job.returncode, stdout, stderr


def run_job(*args, **kwargs) -> str:
    returncode, stdout, stderr = finish(torchrun(*args, **kwargs))
    assert returncode == 0, stdout[-2000:] + stderr[-3000:]
    return stdout


def give_up(job: subprocess.Popen, what: str) -> None:
    """Fails the test with the job's output, its processes killed first (a live job's output never ends)."""
    try:
        os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:  # not a session of its own (slurm.sbatch's bash)
        job.kill()
    try:
        stdout, stderr = job.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # a process it started in a session of its own still holds the pipes
        stdout, stderr = "", "(its output did not end)"
    pytest.fail(f"{what}:\n{stdout[-3000:]}\n{stderr[-3000:]}")


def workers(job: subprocess.Popen, nproc=2) -> list[psutil.Process]:
    deadline = time.time() + 120
    while len(children := psutil.Process(job.pid).children()) < nproc:
        if job.poll() is not None or time.time() > deadline:
            give_up(job, f"{nproc} workers not started")
        time.sleep(0.05)
    return children


def wait_for_file(path: Path, job: subprocess.Popen, timeout=120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if job.poll() is not None or time.time() > deadline:
            give_up(job, f"no {path.name}")
        time.sleep(0.05)


def wait_for_step(out, step: int, job: subprocess.Popen, timeout=120) -> None:
    path = Path(out) / "run" / "metrics.jsonl"
    deadline = time.time() + timeout
    while not (path.exists() and any(m.get("step", 0) >= step for m in metrics(out))):
        if job.poll() is not None or time.time() > deadline:
            give_up(job, f"no step {step} logged")
        time.sleep(0.05)


def stop_step(stdout: str, signum: int) -> int:
    marker = f"stopped by signal {signum} at step "
    assert marker in stdout, stdout[-2000:]
    return int(stdout.split(marker)[1].split(";")[0])


def assert_complete_stop_checkpoint(out, step: int) -> Path:
    """The stop step's checkpoint is there and whole; no unfinished write is left."""
    run = Path(out) / "run"
    assert not list(run.glob("*.tmp")), list(run.glob("*.tmp"))
    checkpoint = latest_checkpoint(run)
    assert checkpoint.name == f"ckpt_{step:07d}"
    assert torch.load(checkpoint / "trainer_state.pt", weights_only=True)["step"] == step
    assert torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    assert load_file(checkpoint / "model.safetensors")
    return checkpoint


@pytest.fixture(scope="module")
def data(make_token_data):
    return make_token_data(train_tokens=20_000, val_tokens=600)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """Two processes, 40 steps without a stop (checkpoints at 20 and 40): what every stopped and
    resumed job must end with."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run_job(data, out, "--batch_size=4", *STOP_TEST_STEPS, "--checkpoint_interval=20")
    return out


def final_weights(out) -> dict[str, torch.Tensor]:
    return weights(Path(out) / "run" / "ckpt_0000040")


def assert_same_weights(out, reference) -> None:
    ours, theirs = final_weights(out), final_weights(reference)
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


def send(processes, signum):
    for process in processes:
        process.send_signal(signum)


@pytest.mark.parametrize(
    "how", ["SIGTERM twice to the workers", "SIGTERM to every process", "SIGINT to the process group"]
)
def test_a_stop_saves_the_stop_step_and_resumes_bit_for_bit(data, uninterrupted, tmp_path, how):
    # Batches take 50 ms and rank 0's checkpoint 3 s, so the signals land mid-run and the second copy
    # (sent once the save has started) mid-save: a rank that left early, or a handler spent by the first
    # copy, loses the save.
    job = torchrun(data, tmp_path, "--batch_size=4", *STOP_TEST_STEPS, fault="slow_batches,slow_checkpoints")
    ranks = workers(job)
    wait_for_step(tmp_path, 3, job)
    signum = signal.SIGINT if "SIGINT" in how else signal.SIGTERM
    if how == "SIGTERM twice to the workers":  # as when a signal misses the launcher, then a follow-up
        send(ranks, signum)
        wait_for_file(tmp_path / "checkpoint_started", job)
        send(ranks, signum)
    elif how == "SIGTERM to every process":  # as slurmstepd does on preemption: torchrun forwards its own copy too
        send([psutil.Process(job.pid), *ranks], signum)
    else:  # Ctrl-C in a terminal
        os.killpg(job.pid, signum)
    returncode, stdout, stderr = finish(job)
    assert returncode != 0, stderr[-3000:]
    if how == "SIGTERM twice to the workers":  # torchrun, not signalled itself, sums up how its ranks ended
        assert stderr.count(f"exitcode  : {128 + signum}") == 2, stderr[-3000:]
    step = stop_step(stdout, signum)
    assert 3 <= step < 40
    assert_complete_stop_checkpoint(tmp_path, step)

    run_job(data, tmp_path, "--batch_size=4", *STOP_TEST_STEPS, "--resume=auto")
    assert_same_weights(tmp_path, uninterrupted)


def test_sigterm_to_every_process_saves_gpt2_124m(data, tmp_path):
    """GPT-2 124M on CPU: steps take seconds and the checkpoint (~1.4 GB) seconds more to write."""
    gpt2 = ["--block_size=16", "--n_layer=12", "--n_head=12", "--n_embd=768", "--device=cpu", "--compile=False"]
    job = torchrun(data, tmp_path, "--batch_size=2", *STOP_TEST_STEPS, model=gpt2)
    ranks = workers(job)
    wait_for_step(tmp_path, 1, job, timeout=300)
    send([psutil.Process(job.pid), *ranks], signal.SIGTERM)
    returncode, stdout, stderr = finish(job, timeout=300)
    assert returncode != 0, stderr[-3000:]
    checkpoint = assert_complete_stop_checkpoint(tmp_path, stop_step(stdout, signal.SIGTERM))
    assert (
        len(load_file(checkpoint / "model.safetensors")) == 148
    )  # every tensor of GPT-2 small (HF names, lm_head tied)


def test_a_failed_checkpoint_write_ends_the_job_and_the_previous_one_resumes(data, tmp_path, capsys):
    job = torchrun(
        data,
        tmp_path,
        "--batch_size=4",
        "--max_steps=8",
        "--checkpoint_interval=2",
        fault="disk_full_at_second_checkpoint",
    )
    returncode, stdout, stderr = finish(job)
    assert returncode != 0
    assert "train.py: error: could not write" in stderr and "ckpt_0000002, which is intact" in stderr, stderr[-3000:]
    assert "rank 1 stops: rank 0 failed" in stderr
    run = tmp_path / "run"
    assert [p.name for p in run.iterdir() if p.name.startswith("ckpt")] == ["ckpt_0000002"]  # nothing half-written
    train.main(
        [
            f"--data_dir={data}",
            f"--out_dir={tmp_path}",
            *TINY,
            *JOB,
            "--batch_size=4",
            "--max_steps=8",
            "--checkpoint_interval=2",
            "--resume=auto",
        ]
    )
    assert "resumed from" in capsys.readouterr().out and latest_checkpoint(run).name == "ckpt_0000008"


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_step_nonfinite_on_one_rank_is_skipped_by_every_rank(data, tmp_path, optimizer):
    run_job(
        data, tmp_path, "--batch_size=4", "--max_steps=5", "--log_interval=5", f"--optimizer={optimizer}",
        fault="nan_loss_on_rank1_at_step_3",
    )  # fmt: skip
    records = metrics(tmp_path)  # rank 0's, whose own loss was finite
    assert [m["step"] for m in records if "skipped" in m] == [3] and records[-2]["nonfinite_steps"] == 1
    assert all(torch.isfinite(t).all() for t in weights(latest_checkpoint(tmp_path / "run")).values())


def test_ranks_with_different_listings_resume_the_same_checkpoint(data, uninterrupted, tmp_path):
    shutil.copytree(uninterrupted / "run", tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "ckpt_0000040")  # as if the job had died after step 20
    # Rank 1's listing misses ckpt_20 too (it would start anew): it must continue from rank 0's choice.
    stdout = run_job(data, tmp_path, "--batch_size=4", *STOP_TEST_STEPS, "--resume=auto", fault="stale_listing")
    assert "resumed from" in stdout and "ckpt_0000020" in stdout
    assert_same_weights(tmp_path, uninterrupted)


def test_rank0_holds_the_run_directory_for_its_job_and_a_second_job_is_refused(data, tmp_path):
    endless = ["--max_steps=100000", "--eval_interval=100000", "--checkpoint_interval=100000"]
    first = torchrun(data, tmp_path, "--batch_size=4", *endless, fault="slow_batches")
    wait_for_step(tmp_path, 2, first)
    with pytest.raises(Timeout):
        FileLock(tmp_path / "run.lock").acquire(timeout=0)
    returncode, stdout, stderr = finish(torchrun(data, tmp_path, "--batch_size=4", "--max_steps=2", "--seed=7"))
    assert returncode != 0, stderr[-3000:]
    assert "train.py: error: " in stderr and "is in use by another train.py" in stderr, stderr[-3000:]
    assert "rank 1 stops: rank 0 failed" in stderr
    assert metrics(tmp_path)[0]["step"] == 1 and first.poll() is None  # the first job's records and run go on
    os.killpg(first.pid, signal.SIGKILL)  # kill -9 of the whole job: its lock goes with it
    first.communicate()
    FileLock(tmp_path / "run.lock").acquire(timeout=0)


def two_nodes(data, out, *extra, fault=None):
    """Two torchrun launchers, one process each, meeting at a c10d rendezvous on localhost."""
    launcher = ("--nnodes=2", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}", "--rdzv_id=test")
    return [torchrun(data, out, *extra, fault=fault, nproc=1, launcher=launcher) for _ in range(2)]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])  # Muon's orthogonalizations split over the two ranks
def test_two_nodes_train_as_one_process_with_the_same_global_batch(
    make_token_data, tmp_path, tmp_path_factory, optimizer
):
    small = make_token_data()  # test_train's data and reference run: 1 process, batch 8, 4 steps
    reference = tmp_path_factory.mktemp("reference")
    train.main(
        [
            f"--data_dir={small}",
            f"--out_dir={reference}",
            "--run_name=run",
            *TINY,
            "--batch_size=8",
            "--max_steps=4",
            "--eval_interval=2",
            f"--optimizer={optimizer}",
        ]
    )
    # 2 nodes x 1 process x 2 micro-steps x 2 sequences: the same 8 sequences per step
    results = [
        finish(node)
        for node in two_nodes(
            small,
            tmp_path,
            "--batch_size=8",
            "--micro_batch_size=2",
            "--max_steps=4",
            "--eval_interval=2",
            f"--optimizer={optimizer}",
        )
    ]
    assert all(returncode == 0 for returncode, _, _ in results), results
    stdout = "".join(out for _, out, _ in results)
    assert (
        "= 2 processes x 2 micro-steps x 2 sequences" in stdout and stdout.count("sequences of 16 tokens") == 1
    )  # rank 0 alone prints
    # Muon casts each update to bf16 to orthogonalize it: a gradient one rounding apart (the all-reduce's order)
    # can land a bf16 ulp apart there, ~2e-5 of a weight at lr 0.01 (9e-5 at most after these 4 steps, measured);
    # ranks applying each other's updates (a wrong rank handed to Muon) differ by ~2e-2.
    assert_same_training(tmp_path, reference, atol=1e-3 if optimizer == "muon" else 1e-5)
    # Val loss is averaged over both ranks' halves of the val split.
    val = lambda out: [m["val_loss"] for m in metrics(out) if "val_loss" in m]  # noqa: E731
    assert val(tmp_path) == pytest.approx(val(reference), rel=1e-5)


def test_a_failure_on_one_node_ends_the_other(data, tmp_path):
    # rank 0 waits 600 s where no error reaches it: only the failure watcher ends it before finish's deadline
    results = [
        finish(node)
        for node in two_nodes(
            data,
            tmp_path,
            "--batch_size=4",
            "--max_steps=8",
            "--eval_interval=2",
            fault="rank1_fails_while_rank0_hangs",
        )
    ]
    assert all(returncode != 0 for returncode, _, _ in results)
    stderr = "".join(err for _, _, err in results)
    assert "simulated failure on rank 1" in stderr
    assert "rank 0 stops: rank 1 failed (RuntimeError: simulated failure on rank 1)" in stderr, stderr[-3000:]


FAKE_SLURM = {
    # srun: drops its own options and runs the step in a session of its own, as slurmstepd would
    # (torchrun, with faulty_train.py's slow batches in place of train.py, so a signal lands mid-run)
    "srun": 'while [[ $1 == --* ]]; do shift; done; shift; echo $$ > "$FAKE_SLURM/step.pid"\n'
    'exec setsid "$PYTHON" -m torch.distributed.run "${@/#train.py/$FAULTY_TRAIN}"',
    # scancel --signal=TERM JOB: the signal to every process of the step
    "scancel": 'kill -TERM -- -"$(cat "$FAKE_SLURM/step.pid")"',
    "scontrol": 'case $1 in show) echo localhost ;; requeue) echo "$2" >> "$FAKE_SLURM/requeued" ;; esac',
}


def test_slurm_script_saves_before_the_time_limit_requeues_and_resumes(make_token_data, tmp_path):
    """slurm.sbatch with stand-ins for srun, scancel and scontrol: not SLURM itself, but the script's part."""
    fake = tmp_path / "fake_slurm"
    fake.mkdir()
    for name, body in FAKE_SLURM.items():
        (fake / name).write_text(f"#!/bin/bash\n{body}\n")
        (fake / name).chmod(0o755)
    out = tmp_path / "out"
    train_args = [
        f"--data_dir={make_token_data(train_tokens=20_000)}",
        f"--out_dir={out}",
        *TINY,
        *JOB,
        "--batch_size=4",
        *STOP_TEST_STEPS,
    ]
    env = {
        **os.environ,
        "PATH": f"{fake}:{os.environ['PATH']}",
        "FAKE_SLURM": str(fake),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "FAULTY_TRAIN": str(FAULTY_TRAIN),
        "FAULT": "slow_batches",
        "SLURM_JOB_ID": "7",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": "localhost",
        "NPROC_PER_NODE": "2",
        "TRAIN_ARGS": " ".join(map(str, train_args)),
        "RDZV_PORT": str(free_port()),
    }
    script = subprocess.Popen(
        ["bash", "slurm.sbatch"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for_step(out, 3, script)
    script.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends five minutes before the limit
    returncode, stdout, stderr = finish(script)
    assert "time limit near" in stdout and (fake / "requeued").read_text() == "7\n", stdout[-2000:] + stderr[-3000:]
    assert_complete_stop_checkpoint(out, stop_step(stdout, signal.SIGTERM))

    returncode, stdout, stderr = finish(
        subprocess.Popen(
            ["bash", "slurm.sbatch"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    )
    assert returncode == 0 and "resumed from" in stdout, stderr[-3000:]
    assert (fake / "requeued").read_text() == "7\n"  # a finished run is not requeued
    assert latest_checkpoint(out / "run").name == "ckpt_0000040"
