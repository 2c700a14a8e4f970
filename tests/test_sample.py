"""sample.py on a tiny checkpoint: streamed text, the recipe's defaults, one-line errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sample
import tokenizer
from model import GPT, GPTConfig

ROOT = Path(__file__).parent.parent
TINY = GPTConfig(block_size=128, n_layer=1, n_head=2, n_embd=16, dropout=0.0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as train.py writes it, with an older and a newer checkpoint."""
    run = tmp_path_factory.mktemp("out") / "tiny"
    for step in (10, 20):
        torch.manual_seed(step)
        GPT(TINY).save_pretrained(run / f"ckpt_{step:07d}")
    return run


def run_sample(*args, cwd=ROOT, env=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_streams_the_continuation_of_the_newest_checkpoint(run_dir):
    prompt = "I was telling her that"
    result = run_sample(f"--ckpt={run_dir}", f"--start={prompt}", "--max_new_tokens=12", "--seed=7")
    assert result.returncode == 0, result.stderr
    # The same generation in process, from the newest checkpoint and the same seed.
    model = GPT.from_pretrained(run_dir / "ckpt_0000020").eval()
    torch.manual_seed(7)
    idx = torch.tensor([tokenizer.encode(prompt)])
    out = model.generate(idx, 12, top_k=10, top_p=0.95, eos_token_id=tokenizer.EOT_ID)
    assert result.stdout == tokenizer.decode(out[0].tolist()) + "\n"
    assert "ckpt_0000020" in result.stderr and "tokens/s]" in result.stderr


def test_prints_only_whole_characters(monkeypatch, capsys, run_dir):
    """Tokens that split a character are held back until it is complete, never printed as U+FFFD."""
    text = " café 👋"
    ids = tokenizer.encode(text)
    assert "\ufffd" in tokenizer.decode(ids[-1:])  # the emoji's last token alone is no character

    def scripted_generate(self, idx, max_new_tokens, callback, **sampling):
        for token in ids:
            callback(torch.tensor([token]))
        return torch.cat([idx, torch.tensor([ids])], dim=1)

    monkeypatch.setattr(GPT, "generate", scripted_generate)
    sample.main([f"--ckpt={run_dir}", "--start=Hi"])
    assert capsys.readouterr().out == "Hi" + text + "\n"


def test_several_prompts_continue_in_one_batch_as_hf_generate_does(run_dir, tmp_path, capsys):
    from transformers import GPT2LMHeadModel

    prompts = ["I was telling her that", "Yes", "It is a truth universally acknowledged, that a single man"]
    (tmp_path / "prompts.txt").write_text(
        f"{prompts[0]}\n{prompts[1]}\n\n{prompts[2]}\n", encoding="utf-8"
    )  # blank lines skipped
    sample.main([f"--ckpt={run_dir}", f"--prompts={tmp_path / 'prompts.txt'}", "--max_new_tokens=12", "--seed=7"])
    # HF generate on the same batch: left-padded to the longest prompt, padding masked out
    ids = [tokenizer.encode(prompt) for prompt in prompts]
    longest = max(map(len, ids))
    idx = torch.tensor([[0] * (longest - len(row)) + row for row in ids])
    attention_mask = torch.tensor([[0] * (longest - len(row)) + [1] * len(row) for row in ids])
    hf = GPT2LMHeadModel.from_pretrained(run_dir / "ckpt_0000020")
    torch.manual_seed(7)
    out = hf.generate(idx, attention_mask=attention_mask, max_new_tokens=12, do_sample=True, top_k=10, top_p=0.95)
    continuations = [
        prompt + tokenizer.decode(row) + "\n" for prompt, row in zip(prompts, out[:, longest:].tolist(), strict=True)
    ]
    assert capsys.readouterr().out == "---------------\n".join(continuations)


def test_recipe_defaults():
    cfg = sample.SampleConfig()
    assert (cfg.max_new_tokens, cfg.top_k, cfg.top_p, cfg.temperature, cfg.do_sample) == (100, 10, 0.95, 1.0, True)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ckpt=no/such/run"], "'no/such/run' is not a local directory and could not be fetched"),
        (["--start="], "the prompt is empty"),
        (["--start=FILE:no-such-prompt.txt"], "no such file"),
        (["--prompts=no-such-prompts.txt"], "--prompts=no-such-prompts.txt: no such file"),
        (["--start=" + "word " * 120], "exceed the context of 128 tokens"),
        (["--dtype=float8"], "--dtype=float8: expected one of float32, bfloat16, float16"),
        (["--init=pretrained"], "--init=pretrained: expected checkpoint or random"),
        pytest.param(
            ["--device=cuda"],
            "sees no CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible"),
        ),
    ],
)
def test_bad_arguments_are_clear_errors(run_dir, args, message):
    with pytest.raises((ValueError, OSError), match=message.replace("+", "\\+")):
        sample.main([f"--ckpt={run_dir}", *args])


def test_without_checkpoint_it_says_how_to_train_one(tmp_path):
    result = run_sample("--max_new_tokens=1", cwd=tmp_path)  # no out/ here
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "python prepare.py --dataset=austen && python train.py config/austen.py" in result.stderr


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_a_hub_name_offline_is_a_one_line_error(tmp_path, env):
    """--ckpt takes what train.py's --init_from does; offline that is said in one line."""
    result = run_sample("--ckpt=gpt2", env={"HF_HOME": str(tmp_path), **env})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        "sample.py: error: 'gpt2' is not a local directory and could not be fetched from the Hugging Face Hub"
    )
