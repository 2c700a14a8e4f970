"""What train.py's evaluations give besides the val loss, on a tiny model of GPT-2's vocabulary: the
zero-shot tasks (eval.py's scores of the checkpoint), a fixed-seed sample that leaves training's random
streams and the model as they were (a resumed run stays bitwise identical), checkpoints that HF's
AutoTokenizer and pipeline open as they are, eval.py --tasks=val giving the logged val loss, and a
dataset out of reach as one line before any step."""

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
from test_eval import HELLASWAG_ROWS, LAMBADA_ROWS, write_jsonl
from test_train import ROOT, TIMING_KEYS, metrics

import configurator
import eval
import evaluator
import tokenizer
import train
import zero_shot
from checkpoint import latest_checkpoint
from common import UserError
from distributed import Job
from generate import generate
from hf import from_pretrained

PROMPT = "I was telling her that"


@pytest.fixture(scope="module")
def data(make_token_data, tmp_path_factory):
    """Random ids of GPT-2's vocabulary in shards labelled as prepare.py labels GPT-2 tokens, and the tasks' rows."""
    directory = make_token_data(vocab_size=tokenizer.VOCAB_SIZE, gpt2=True)
    rows = tmp_path_factory.mktemp("rows")
    write_jsonl(rows / "hellaswag.jsonl", HELLASWAG_ROWS)
    write_jsonl(rows / "lambada.jsonl", LAMBADA_ROWS)
    return directory, rows


def args(data, out, *extra) -> list[str]:
    directory, rows = data
    return [
        f"--data_dir={directory}",
        f"--out_dir={out}",
        "--run_name=run",
        "--block_size=32",
        "--n_layer=1",
        "--n_head=2",
        "--n_embd=16",
        "--dropout=0.1",  # a resumed run must continue the dropout stream exactly, samples or not
        "--learning_rate=1e-2",
        "--batch_size=4",
        "--log_interval=1",
        "--device=cpu",
        "--compile=False",
        "--dtype=float32",
        "--tasks=hellaswag,lambada_openai",
        f"--hellaswag_file={rows / 'hellaswag.jsonl'}",
        f"--lambada_openai_file={rows / 'lambada.jsonl'}",
        f"--sample_prompt={PROMPT}",
        *extra,
    ]


RESUMED = ["--max_steps=4", "--eval_interval=2", "--checkpoint_interval=2"]


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """4 steps with tasks and a sample at steps 2 and 4, checkpoints at both."""
    out = tmp_path_factory.mktemp("run")
    train.main(args(data, out, *RESUMED))
    return out


def evals(out) -> list[dict]:
    return [record for record in metrics(out) if "val_loss" in record]


def test_each_eval_records_the_tasks_and_a_sample_of_the_checkpoint(data, run):
    records = evals(run)
    assert [record["step"] for record in records] == [2, 4]
    checkpoint = latest_checkpoint(run / "run")
    model = from_pretrained(str(checkpoint))  # eval mode, as train.py scores
    job = Job("cpu", timedelta(minutes=1))
    for name, rows in [("hellaswag", "hellaswag.jsonl"), ("lambada_openai", "lambada.jsonl")]:
        items = zero_shot.load_items(name, str(data[1] / rows), None)
        expected = zero_shot.evaluate(model, name, items, job, batch_tokens=4096)
        assert {metric: records[-1][f"{name}/{metric}"] for metric in expected} == pytest.approx(expected, rel=1e-6)
    # The sample: the recipe's sampling from a generator seeded with the run's seed, on the step's weights.
    generator = torch.Generator().manual_seed(42)
    prompt = tokenizer.encode(PROMPT)
    ids = generate(
        model, torch.tensor([prompt]), 32 - len(prompt), top_k=10, top_p=0.95, generator=generator, eos_token_id=50256
    )
    assert records[-1]["sample"] == PROMPT + tokenizer.decode(ids[0, len(prompt) :].tolist())
    assert records[0]["sample"] != records[-1]["sample"]  # other weights, same seed: another sample


def test_resume_with_tasks_and_samples_is_bitwise_identical(data, run, tmp_path):
    shutil.copytree(run / "run", tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "ckpt_0000004")  # as if the run had died after its checkpoint at step 2
    train.main(args(data, tmp_path, *RESUMED, "--resume=auto"))
    strip = lambda records: [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in records]  # noqa: E731
    assert strip(metrics(tmp_path)) == strip(metrics(run))
    for name in ("model.safetensors", "optimizer.pt"):
        resumed, uninterrupted = (out / "run" / "ckpt_0000004" / name for out in (tmp_path, run))
        assert resumed.read_bytes() == uninterrupted.read_bytes(), name


def test_an_eval_leaves_the_model_and_the_random_streams_as_they_were(data, tmp_path):
    cfg = configurator.parse_config(train.TrainConfig, args(data, tmp_path))
    job = Job("cpu", timedelta(minutes=1))
    run_data = train.load_data(cfg)
    torch.manual_seed(0)
    model = train.build_model(cfg, None, run_data.val.meta).train()
    evaluator = train.build_evaluator(cfg, job, model, run_data, 4, contextlib.nullcontext())
    before = torch.get_rng_state()
    result = evaluator()
    assert torch.equal(torch.get_rng_state(), before)
    assert model.training and all(block.attn.kv_cache is None for block in model.transformer.h)
    assert result.sample.startswith(PROMPT) and set(result.tasks) == {"hellaswag", "lambada_openai"}


def test_the_eval_sample_of_a_padded_vocabulary_is_text(data, tmp_path):
    """A model of a padded vocabulary (--vocab_size=50304) samples only ids the tokenizer has, even where
    the padding ids would win every draw."""
    cfg = configurator.parse_config(train.TrainConfig, args(data, tmp_path, "--vocab_size=50304", "--tasks="))
    run_data = train.load_data(cfg)
    model = train.build_model(cfg, None, run_data.val.meta)
    with torch.no_grad():
        model.lm_head.weight[: tokenizer.VOCAB_SIZE] = 0
        model.lm_head.weight[tokenizer.VOCAB_SIZE :] = 100 * torch.randn(50304 - tokenizer.VOCAB_SIZE, cfg.n_embd)
    evaluator = train.build_evaluator(
        cfg, Job("cpu", timedelta(minutes=1)), model, run_data, 4, contextlib.nullcontext()
    )
    assert evaluator().sample.startswith(PROMPT)


def test_a_checkpoint_opens_in_auto_tokenizer_and_pipeline(run):
    from transformers import AutoTokenizer, pipeline

    checkpoint = str(latest_checkpoint(run / "run"))
    text = "Mr. Darcy's letter — 1,234 words, 🍅 and\n\ttabs  "
    assert AutoTokenizer.from_pretrained(checkpoint)(text)["input_ids"] == tokenizer.encode(text)
    generator = pipeline("text-generation", model=checkpoint, device="cpu")
    generated = generator(PROMPT, max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert generated.startswith(PROMPT) and len(generated) > len(PROMPT)
    assert json.loads((latest_checkpoint(run / "run") / "generation_config.json").read_text())["eos_token_id"] == 50256


def test_eval_py_val_equals_the_logged_val_loss(data, run):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        eval.main([f"--ckpt={run / 'run'}", "--tasks=val", f"--data_dir={data[0]}", "--device=cpu"])
    result = json.loads(stdout.getvalue().splitlines()[-1])
    logged = evals(run)[-1]["val_loss"]
    # training's evals take the compact softmax (loss.CompactVocab), eval.py the whole one: float rounding apart
    assert result["val"]["loss"] == pytest.approx(logged, rel=1e-6)
    assert result["val"]["perplexity"] == pytest.approx(evals(run)[-1]["val_perplexity"], rel=1e-5)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks=hellaswag,winogrande"], "tasks=hellaswag,winogrande: expected .*; winogrande is no task here"),
        (["--task_limit=0"], "task_limit=0: must be positive"),
        ([f"--sample_prompt={PROMPT * 8}"], "tokens, no shorter than the model's context of 32"),
    ],
)
def test_bad_values_are_one_line_before_any_step(data, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        train.main(args(data, tmp_path, "--max_steps=1", *extra))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_data_of_another_tokenizer_refuses_tasks_and_leaves_the_sample_out(make_token_data, tmp_path, capsys):
    directory = make_token_data()  # tokenizer "test", vocabulary of 64
    with pytest.raises(UserError, match="holds 'test' tokens, but the tasks are scored in GPT-2's; prepare the data"):
        train.main(args((directory, tmp_path), tmp_path, "--vocab_size=64", "--max_steps=1"))
    train.main(args((directory, tmp_path), tmp_path, "--vocab_size=64", "--max_steps=1", "--tasks="))
    assert "no samples at evals: " in capsys.readouterr().out
    assert [record for record in metrics(tmp_path) if "val_loss" in record and "sample" not in record]


def test_a_dataset_out_of_reach_is_one_line_before_any_step(data, tmp_path):
    command = [sys.executable, "train.py", *args(data, tmp_path, "--max_steps=1", "--hellaswag_file=None")]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("train.py: error:"), done.stderr
    assert "--hellaswag_file=PATH" in done.stderr
    assert "| loss" not in done.stdout and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_failing_eval_loses_no_trained_step(data, tmp_path, monkeypatch):
    """At a step that evaluates and saves, the checkpoint is written first."""

    def failing_eval(*args, **kwargs):
        raise RuntimeError("the eval fails")

    monkeypatch.setattr(evaluator, "window_loss", failing_eval)
    with pytest.raises(RuntimeError, match="the eval fails"):
        train.main(args(data, tmp_path, *RESUMED))
    assert latest_checkpoint(tmp_path / "run").name == "ckpt_0000002"


def test_an_eval_reports_a_loss_of_any_size_and_skips_the_sample_of_nonfinite_weights(data, tmp_path, capsys):
    cfg = configurator.parse_config(train.TrainConfig, args(data, tmp_path, "--tasks="))
    run_data = train.load_data(cfg)
    model = train.build_model(cfg, None, run_data.val.meta)
    job = Job("cpu", timedelta(minutes=1))
    huge = evaluator.EvalResult(800.0, {}, None)  # exp(800) overflows a float
    assert huge.record()["val_perplexity"] == math.inf and "perplexity inf" in huge.describe()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = math.nan
    result = train.build_evaluator(cfg, job, model, run_data, 4, contextlib.nullcontext())()
    assert result.sample is None and math.isnan(result.val_loss)
    assert "no sample at this eval: transformer.h.0.mlp.c_fc.weight holds inf or NaN" in capsys.readouterr().out


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{**HELLASWAG_ROWS[0], "endings": []}], "line 1: endings is not a non-empty list of strings"),
        ([HELLASWAG_ROWS[0], {**HELLASWAG_ROWS[1], "label": 4}], "line 2: label 4 names no ending .it has 4,"),
    ],
)
def test_task_rows_are_checked_before_any_step(data, tmp_path, rows, message):
    write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(UserError, match=message):
        train.main(args(data, tmp_path, "--max_steps=1", f"--hellaswag_file={tmp_path / 'rows.jsonl'}"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_continuation_longer_than_the_context_is_refused_before_any_step(data, tmp_path):
    write_jsonl(tmp_path / "rows.jsonl", [*LAMBADA_ROWS, {"text": "and then " + "".join(f"{i}q" for i in range(40))}])
    with pytest.raises(UserError, match=rf"lambada_openai item {len(LAMBADA_ROWS) + 1}: a continuation of \d+ tokens"):
        train.main(args(data, tmp_path, "--max_steps=1", f"--lambada_openai_file={tmp_path / 'rows.jsonl'}"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
