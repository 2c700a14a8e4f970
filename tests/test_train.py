"""train.py end to end on tiny models (CPU): exactness of resume, accumulation and DDP, the
schedule, HF interchange, config errors, preemption, wandb offline and non-finite losses."""

import ctypes
import json
import math
import queue
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import batching
import common
import configurator
import optim
import reporting
import train
from checkpoint import CHECKPOINT_PATTERN, TrainerState, latest_checkpoint
from common import UserError
from hf import from_pretrained, save_pretrained
from loss import compact_output_layer
from model import GPT, GPTConfig
from shards import TokenWindows

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--block_size=16",
    "--vocab_size=64",
    "--n_layer=2",
    "--n_head=2",
    "--n_embd=16",
    "--dropout=0.0",
    "--learning_rate=1e-2",
    "--log_interval=1",
    "--device=cpu",
    "--compile=False",
    "--dtype=float32",
]
TIMING_KEYS = {"tokens_per_s", "mfu"}


def args(data, out, *extra):
    return [f"--data_dir={data}", f"--out_dir={out}", "--run_name=run", *TINY, *extra]


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()]


def losses(out) -> list[float]:
    return [m["loss"] for m in metrics(out) if "loss" in m]


def weights(checkpoint) -> dict[str, torch.Tensor]:
    return load_file(Path(checkpoint) / "model.safetensors")


@pytest.fixture(scope="module")
def data(make_token_data):
    return make_token_data()


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One process, the whole global batch of 8 in one micro-step, 4 steps."""
    out = tmp_path_factory.mktemp("reference")
    train.main(args(data, out, "--batch_size=8", "--max_steps=4", "--eval_interval=2"))
    return out


def assert_same_training(out, ref, rtol=1e-5, atol=1e-5):
    """Equal up to summation order. The key biases get only rounding noise as gradient (softmax
    ignores a shift shared by all keys) and Adam scales noise up to ~1e-6; a real difference is ~lr."""
    assert len(losses(out)) == len(losses(ref)) == 4
    assert losses(out) == pytest.approx(losses(ref), rel=rtol)
    ours, theirs = weights(latest_checkpoint(Path(out) / "run")), weights(latest_checkpoint(Path(ref) / "run"))
    for name in theirs:
        assert torch.allclose(ours[name], theirs[name], rtol=rtol, atol=atol), name


@pytest.mark.parametrize("optimizer", [["--optimizer=adamw"], ["--optimizer=muon", "--lr_decay=wsd"]])
def test_resume_is_bitwise_identical(data, tmp_path, capsys, optimizer):
    # dropout on: a resumed run must also continue every RNG stream exactly.
    extra = [
        *optimizer,
        "--dropout=0.1",
        "--batch_size=4",
        "--micro_batch_size=2",
        "--max_steps=6",
        "--checkpoint_interval=3",
        "--eval_interval=3",
    ]
    train.main(args(data, tmp_path, *extra))
    run = tmp_path / "run"
    uninterrupted = metrics(tmp_path)
    final = {name: (run / "ckpt_0000006" / name).read_bytes() for name in ("model.safetensors", "optimizer.pt")}
    with pytest.raises(ValueError, match="already has checkpoints"):
        train.main(args(data, tmp_path, *extra))
    # As if the run had died after writing ckpt_3: its later records must be replaced, not doubled.
    shutil.rmtree(run / "ckpt_0000006")
    capsys.readouterr()
    train.main(args(data, tmp_path, *extra, "--resume=auto"))
    assert "resumed from" in capsys.readouterr().out
    strip = lambda records: [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in records]  # noqa: E731
    assert strip(metrics(tmp_path)) == strip(uninterrupted)
    logged = [m for m in uninterrupted if "loss" in m][-1]
    assert ("muon_lr" in logged) == ("--optimizer=muon" in optimizer)  # Muon's own rate is logged too
    assert len(losses(tmp_path)) == 6 and len({m["step"] for m in uninterrupted if "val_loss" in m}) == 2
    # optimizer.pt pickles tensors in a fixed order; bytes equal means every moment and step equal
    assert {name: (run / "ckpt_0000006" / name).read_bytes() for name in final} == final
    assert (run / "loss.png").stat().st_size > 0
    assert json.loads((run / "train_config.json").read_text())["max_steps"] == 6
    assert not (run / "config.json").exists()  # would make sample.py take the run dir for an HF model


def test_trainer_state_is_a_plain_dict_that_loads_weights_only(reference, tmp_path):
    saved = torch.load(latest_checkpoint(reference / "run") / "trainer_state.pt", weights_only=True)
    assert type(saved) is dict and saved["step"] == 4 and len(saved["rng"]) == 1
    torch.save(dict(reversed(saved.items())), tmp_path / "trainer_state.pt")  # a writer's own key order
    state = TrainerState.load(tmp_path)
    assert (state.step, state.scheduler, state.data_order) == (saved["step"], saved["scheduler"], saved["data_order"])
    assert torch.equal(state.rng[0]["cpu"], saved["rng"][0]["cpu"])


def test_gradient_accumulation_matches_one_big_batch(data, reference, tmp_path):
    train.main(args(data, tmp_path, "--batch_size=8", "--micro_batch_size=2", "--max_steps=4", "--eval_interval=2"))
    assert_same_training(tmp_path, reference)


def test_gradient_accumulation_matches_one_big_batch_under_bf16_autocast(data, tmp_path):
    """The same in bf16 (native or emulated, whatever the CPU). bf16 matmuls keep 8 bits of mantissa,
    so the two summation orders move the weights apart by ~1e-3 after 4 steps, where a real difference
    is ~lr = 1e-2. The key biases are left out: their true gradient is 0 and Adam turns bf16 rounding
    noise into steps of ~lr (as test_fidelity says of fp32's much smaller noise)."""
    bf16 = ["--batch_size=8", "--max_steps=4", "--eval_interval=2", "--dtype=bfloat16"]
    train.main(args(data, tmp_path / "one", *bf16))
    train.main(args(data, tmp_path / "accumulated", *bf16, "--micro_batch_size=2"))
    assert losses(tmp_path / "accumulated") == pytest.approx(losses(tmp_path / "one"), rel=1e-3)
    ours, theirs = (weights(latest_checkpoint(tmp_path / name / "run")) for name in ("accumulated", "one"))
    for name in theirs:
        if name.endswith("c_attn.bias"):
            n_embd = len(theirs[name]) // 3  # (queries, keys, values)
            ours[name], theirs[name] = (torch.cat([t[:n_embd], t[2 * n_embd :]]) for t in (ours[name], theirs[name]))
        assert torch.allclose(ours[name], theirs[name], rtol=0, atol=3e-3), name


@pytest.mark.parametrize("decay", ["cosine", "linear"])
@pytest.mark.parametrize("max_steps,warmup_ratio", [(1, 0.05), (10, 0.0), (103, 0.05), (40, 0.5)])
def test_schedule_matches_transformers(max_steps, warmup_ratio, decay, tmp_path):
    from transformers import TrainingArguments, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    warmup_steps = TrainingArguments(output_dir=str(tmp_path), warmup_steps=warmup_ratio).get_warmup_steps(max_steps)
    ours, theirs = (torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2.5e-4) for _ in range(2))
    ours_schedule = optim.lr_schedule(ours, max_steps, warmup_ratio, decay)
    transformers_schedule = {"cosine": get_cosine_schedule_with_warmup, "linear": get_linear_schedule_with_warmup}
    theirs_schedule = transformers_schedule[decay](theirs, warmup_steps, max_steps)
    ours_lrs, theirs_lrs = [], []
    for _ in range(max_steps + 1):
        ours_lrs += ours_schedule.get_last_lr()
        theirs_lrs += theirs_schedule.get_last_lr()
        for optimizer, schedule in ((ours, ours_schedule), (theirs, theirs_schedule)):
            optimizer.step(), schedule.step()
    assert ours_lrs == theirs_lrs
    assert max(ours_lrs) == 2.5e-4 or (decay, max_steps) == ("linear", 1)  # transformers' one linear step is lr 0


def test_checkpoint_loads_in_transformers_with_the_logged_val_loss(data, reference, capsys):
    from transformers import GPT2LMHeadModel

    checkpoint = latest_checkpoint(reference / "run")
    hf = GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    ours = from_pretrained(checkpoint).eval()
    val = TokenWindows(data, "val", 16)
    tokens = torch.from_numpy(val.batch(range(len(val))))  # (windows, 17)
    with torch.no_grad():
        logits = hf(tokens[:, :-1]).logits
        assert torch.allclose(logits, ours(tokens[:, :-1])[0], atol=1e-5)
    hf_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()
    logged = [m["val_loss"] for m in metrics(reference) if "val_loss" in m][-1]
    assert hf_loss == pytest.approx(logged, abs=1e-5)
    # eval_only gives the same number from the run's checkpoint and from the HF directory.
    capsys.readouterr()
    for source in ("--resume=auto", f"--init_from={checkpoint}"):
        train.main(args(data, reference, "--eval_only", source))
        assert f"val loss {logged:.4f}" in capsys.readouterr().out


def test_the_predicted_memory_is_compared_once_after_the_second_step(data, tmp_path, monkeypatch, capsys):
    """Where choose_micro_batch predicts a peak (a GPU), the Reporter sets the first steps' real peak beside
    it once the optimizer's state exists; on this CPU-only run the real peak reads 0."""
    monkeypatch.setattr(train, "choose_micro_batch", lambda *_, **__: (8, 1.5 * 2**30))
    train.main(args(data, tmp_path, "--batch_size=8", "--max_steps=4"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("memory:")]
    assert lines == ["memory: peak 0.0 GiB in the first steps, 1.5 GiB predicted for micro-batch 8"]


def test_mfu_counts_the_output_layer_columns_computed(data, tmp_path):
    cfg = configurator.parse_config(train.TrainConfig, args(data, tmp_path))
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16))
    whole = reporting.flops_per_token(model, cfg.block_size)
    compact_output_layer(model, TokenWindows(data, "train", 16).tokens_present(), new_model=True)
    assert (
        whole - reporting.flops_per_token(model, cfg.block_size) == 6 * 15 * 16
    )  # 49 of 64 columns: 15 rows of 16 fewer


def test_a_new_models_unseen_tokens_share_a_row_and_a_column_pretrained_ones_keep_theirs(
    data, reference, tmp_path, capsys
):
    """The data never contains tokens 48-63 (make_token_data): a new model starts their rows at zero and its
    loss takes the compact softmax (loss.CompactVocab), which keeps them tied, bit for bit; a model whose
    rows differ (an HF GPT-2) keeps the whole softmax. test_fidelity compares the compact one with the
    Trainer's whole softmax, step for step."""
    shape = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16)
    torch.manual_seed(train.TrainConfig.seed)  # as train.py builds a new model
    initial = GPT(shape).transformer.wte.weight.detach()
    trained = weights(latest_checkpoint(reference / "run"))["transformer.wte.weight"]
    assert (trained[48:] == trained[48]).all() and not torch.allclose(trained[48], initial[48], atol=1e-3)
    assert torch.equal(trained[:48] != initial[:48], torch.ones(48, 16, dtype=torch.bool))  # all seen rows learn
    train.main(args(data, tmp_path, "--max_steps=1"))
    out = capsys.readouterr().out
    assert "softmax over the 48 tokens of the train split, the other 16 (one shared row) as one column" in out
    pretrained = tmp_path / "pretrained"
    save_pretrained(GPT(shape), pretrained)
    train.main(args(data, tmp_path, "--run_name=tuned", f"--init_from={pretrained}", "--max_steps=1"))
    assert "softmax over all 64 tokens" in capsys.readouterr().out


@pytest.mark.parametrize(
    "override,message",
    [
        ("--batch_size=eight", "expected int"),
        ("--block_size=700", "fewer than block_size"),  # the val split has 600 tokens
        ("--vocab_size=32", "vocabulary of 64 tokens .* --vocab_size=64"),
        ("--batch_size=300", "fewer than one batch"),
        ("--batch_size=0", "batch_size=0: must be positive"),
        ("--micro_batch_size=3", "micro_batch_size=3 does not divide the 64 sequences"),
        ("--eval_interval=0", "eval_interval=0: must be positive"),
        ("--log_interval=0", "log_interval=0: must be positive"),
        ("--checkpoint_interval=-1", "checkpoint_interval=-1: must be positive"),
        ("--keep_checkpoints=0", "keep_checkpoints=0: must be positive .keep_checkpoints=1 keeps the newest only"),
        ("--dropout=1.5", r"dropout=1.5: must be in \[0, 1\)"),
        (
            "--resume=/nonexistent",
            "--resume=/nonexistent: no such directory; pass a run.s ckpt_. directory or --resume=auto",
        ),
        ("--eval_only", "eval_only needs weights"),
        ("--dtype=float16", "use bfloat16 .* or float32"),
        ("--init_from=resume", "init_from=.resume. is not a starting point; use --resume=auto"),
    ],
)
def test_config_errors_come_before_the_model_is_built(data, tmp_path, monkeypatch, override, message):
    monkeypatch.setattr(train, "GPT", None)  # building a model would be a TypeError
    with pytest.raises((ValueError, OSError), match=message):  # what configurator.run prints as one line
        train.main(args(data, tmp_path, override))
    assert not (tmp_path / "run").exists()


def test_unknown_key_is_one_line_with_a_suggestion():
    result = subprocess.run(
        [sys.executable, "train.py", "--lerning_rate=1"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert result.stderr.strip() == "train.py: error: unknown config key 'lerning_rate'; did you mean 'learning_rate'?"


def test_sigterm_saves_a_checkpoint_that_resumes(data, tmp_path):
    command = [
        sys.executable,
        "train.py",
        *args(data, tmp_path, "--max_steps=100000", "--checkpoint_interval=100000", "--eval_interval=100000"),
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics_path = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics_path.exists() and len(metrics_path.read_text().splitlines()) >= 3):
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"no 3 steps logged: {process.communicate()}")
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "stopped by signal 15" in stdout
    stopped_at = int(CHECKPOINT_PATTERN.fullmatch(latest_checkpoint(tmp_path / "run").name).group(1))
    assert stopped_at >= 3 and metrics(tmp_path)[-1]["step"] == stopped_at
    train.main(args(data, tmp_path, "--resume=auto", f"--max_steps={stopped_at + 2}"))
    assert [m["step"] for m in metrics(tmp_path)[-3:]] == [
        stopped_at + 1,
        stopped_at + 2,
        stopped_at + 2,
    ]  # 2 steps, final eval
    assert latest_checkpoint(tmp_path / "run").name == f"ckpt_{stopped_at + 2:07d}"


def test_wandb_offline_run_writes_its_files(data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    train.main(args(data, tmp_path, "--wandb_log=True", "--max_steps=2"))
    run_id = torch.load(latest_checkpoint(tmp_path / "run") / "trainer_state.pt", weights_only=True)["wandb_run_id"]
    (run_file,) = tmp_path.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
    assert run_file.stat().st_size > 0


def test_wandb_without_login_is_a_clear_error(data, tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no wandb settings
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with pytest.raises(ValueError, match="no API key.*WANDB_MODE=offline"):
        train.main(args(data, tmp_path, "--wandb_log=True", "--max_steps=2"))


def poison_training_losses(monkeypatch, steps):
    """Makes the training loss NaN on the given steps (1-based; one micro-step per step)."""
    forward, calls = GPT.forward, [0]

    def poisoned(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        if self.training:
            calls[0] += 1
            if calls[0] in steps:
                loss = loss * math.nan
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)


def test_a_nonfinite_loss_skips_the_step(data, tmp_path, monkeypatch):
    # The skip happens on the device; step 3 is read back, reported and recorded at the log step 4.
    poison_training_losses(monkeypatch, {3})
    train.main(args(data, tmp_path, "--max_steps=5", "--checkpoint_interval=2", "--log_interval=4"))
    records = metrics(tmp_path)
    assert [m["step"] for m in records if "skipped" in m] == [3]
    assert [m["step"] for m in records if "loss" in m] == [4, 5] and records[-2]["nonfinite_steps"] == 1
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert all(torch.isfinite(t).all() for t in weights(checkpoint).values())
    steps = {
        int(state["step"]) for state in torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"].values()
    }
    assert steps == {4}  # AdamW took 4 of the 5 steps: the bias correction did not count the skipped one


def test_nonfinite_losses_in_a_row_stop_the_run(data, tmp_path, monkeypatch, capsys):
    poison_training_losses(monkeypatch, set(range(3, 100)))
    monkeypatch.setattr(sys, "argv", ["train.py", *args(data, tmp_path, "--max_steps=50", "--checkpoint_interval=2")])
    with pytest.raises(SystemExit):
        configurator.run(train.main)
    assert re.match(
        r"train.py: error: loss was non-finite for 5 steps in a row .* lower learning_rate \(and muon_learning_rate "
        "with Muon\\) or check the data, "
        "then --resume=auto continues from .*ckpt_0000006, which is intact\n$",
        capsys.readouterr().err,
    )
    run = tmp_path / "run"
    assert latest_checkpoint(run).name == "ckpt_0000006"  # steps 3..7 skipped, no save at 7
    good, last = weights(run / "ckpt_0000002"), weights(latest_checkpoint(run))
    assert all(torch.equal(good[name], last[name]) for name in good)  # skipped steps changed nothing


@pytest.mark.parametrize("batch_size,steps_per_epoch", [(64, 3), (12, 5)])
def test_global_batches_do_not_depend_on_the_split(batch_size, steps_per_epoch):
    windows = batch_size * steps_per_epoch + 7  # the tail of an epoch is left out
    for step in range(2 * steps_per_epoch):  # across an epoch boundary
        rows = batching.global_batch_windows(42, step, steps_per_epoch, windows, batch_size)
        assert len(rows) == batch_size and len(set(rows)) == batch_size
        for world_size in (1, 2, 4):
            for micro in (m for m in range(1, batch_size // world_size + 1) if batch_size // world_size % m == 0):
                shares = [batching.rank_windows(rows, world_size, rank, micro) for rank in range(world_size)]
                assert all(share.shape == (batch_size // world_size // micro, micro) for share in shares)
                assert sorted(np.concatenate(shares, axis=None)) == sorted(rows)
    first_epoch = np.concatenate(
        [batching.global_batch_windows(42, s, steps_per_epoch, windows, batch_size) for s in range(steps_per_epoch)]
    )
    assert len(set(first_epoch)) == len(first_epoch)  # an epoch visits each window at most once


def test_the_automatic_micro_batch_is_the_largest_divisor_that_fits():
    assert batching.largest_micro_batch(64, fixed_bytes=10, bytes_per_sequence=1, budget_bytes=1000) == 64
    assert (
        batching.largest_micro_batch(64, fixed_bytes=10, bytes_per_sequence=1, budget_bytes=50) == 32
    )  # 40 fits, is no divisor
    assert batching.largest_micro_batch(8, fixed_bytes=10, bytes_per_sequence=4, budget_bytes=25) == 2
    assert (
        batching.largest_micro_batch(8, fixed_bytes=100, bytes_per_sequence=4, budget_bytes=25) == 1
    )  # nothing fits: try 1


def test_training_steps_read_nothing_back_from_the_device(data, tmp_path, monkeypatch):
    """A host read per step would make the CPU wait for the GPU every step: only log, eval and
    checkpoint steps may read (on CPU there is nothing to wait for, so count the reads instead)."""
    reads, step = [], train.train_step
    for method in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(
            torch.Tensor,
            method,
            lambda self, *a, _original=original, _name=method: reads.append(_name) or _original(self, *a),
        )

    def counted_step(*args, **kwargs):
        before = len(reads)
        result = step(*args, **kwargs)
        assert len(reads) == before, f"train_step read {reads[before:]} back"
        return result

    monkeypatch.setattr(train, "train_step", counted_step)
    train.main(
        args(data, tmp_path, "--max_steps=6", "--log_interval=3", "--eval_interval=1000", "--checkpoint_interval=1000")
    )
    assert [m["step"] for m in metrics(tmp_path) if "loss" in m] == [3, 6]
    assert reads.count("tolist") == 2  # one read of the steps per log line


def test_batches_are_read_ahead_while_a_step_runs(data, monkeypatch):
    windows = TokenWindows(data, "train", 16)
    rows = [list(batching.global_batch_windows(42, step, 10, len(windows), 4)) for step in (3, 4, 5)]
    expected = [torch.from_numpy(windows.batch(r)).view(2, 2, 17) for r in rows]  # one process, micro-batches of 2
    requested = queue.Queue()
    batch = TokenWindows.batch
    monkeypatch.setattr(
        TokenWindows, "batch", lambda self, indices: requested.put(list(indices)) or batch(self, indices)
    )
    feed = batching.batches(
        windows,
        seed=42,
        batch_size=4,
        micro_batch_size=2,
        rank=0,
        world_size=1,
        steps_per_epoch=10,
        start_step=3,
        max_steps=6,
        device="cpu",
    )
    assert torch.equal(next(feed), expected[0])
    assert [requested.get(timeout=30) for _ in range(2)] == rows[:2]  # step 4 is read before the consumer asks for it
    assert all(torch.equal(tokens, e) for tokens, e in zip(feed, expected[1:], strict=True))


@pytest.mark.machine_dtype
@pytest.mark.parametrize(
    "capabilities, expected",
    [
        ({"avx2": True, "avx512_bf16": False}, "float32"),
        ({"avx512_bf16": True}, "bfloat16"),
        ({"amx_bf16": True}, "bfloat16"),
    ],
)
def test_default_dtype_is_bf16_only_where_the_cpu_runs_it_natively(capabilities, expected, monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert train.native_dtype("cpu") == expected


def test_a_plot_that_fails_is_a_warning_not_the_runs_failure(data, tmp_path, monkeypatch, capsys):
    def failing_plot(run_dir):
        raise UserError("no losses yet")

    monkeypatch.setattr(train, "plot_run", failing_plot)
    train.main(args(data, tmp_path, "--batch_size=8", "--max_steps=2"))
    assert "warning: no loss curves (UserError: no losses yet)" in capsys.readouterr().out
    assert latest_checkpoint(tmp_path / "run").name == "ckpt_0000002"


# A block of a loss chunk's size (24 MB) allocated and freed after common.keep_freed_memory: where glibc
# put it (its own mmap, or the heap) and whether the heap kept it, read from mallinfo2's counters.
KEPT_BLOCK = """
import ctypes
import common

FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"

class MallInfo2(ctypes.Structure):  # malloc.h
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS.split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype, libc.free.argtypes = MallInfo2, ctypes.c_void_p, [ctypes.c_void_p]
common.keep_freed_memory()
size, before = 24 * 2**20, libc.mallinfo2()
block = libc.malloc(size)
allocated = libc.mallinfo2()
libc.free(block)
freed = libc.mallinfo2()
print(allocated.hblkhd - before.hblkhd, freed.arena - before.arena)
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="glibc >= 2.33's malloc"
)
def test_kept_memory_serves_a_loss_chunk_from_the_heap_and_keeps_it_when_freed():
    """What keep_freed_memory promises, by glibc's own counters (the speed it buys is bench.py's train row):
    a block of a loss chunk's size comes from the heap, not from a mapping of its own, and stays with the
    process when freed, for the next chunk to reuse without faulting in new pages."""
    result = subprocess.run([sys.executable, "-c", KEPT_BLOCK], cwd=ROOT, capture_output=True, text=True, check=True)
    in_own_mapping, heap_kept = map(int, result.stdout.split())
    assert in_own_mapping == 0 and heap_kept >= 24 * 2**20


def test_keeping_freed_memory_does_nothing_off_linux(monkeypatch):
    def no_libc(*args):
        raise AssertionError("keep_freed_memory reached for glibc off Linux")

    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    common.keep_freed_memory()
