"""sample.py on a tiny checkpoint: streamed text, the recipe's defaults, one-line errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sample
import tokenizer
from checkpoint import TrainerState, write_checkpoint
from common import UserError
from generate import generate
from hf import from_pretrained, save_pretrained
from model import GPT, GPTConfig
from optim import adamw

ROOT = Path(__file__).parent.parent
TINY = GPTConfig(block_size=128, n_layer=1, n_head=2, n_embd=16, dropout=0.0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as train.py writes it, with an older and a newer checkpoint."""
    run = tmp_path_factory.mktemp("out") / "tiny"
    for step in (10, 20):
        torch.manual_seed(step)
        save_pretrained(GPT(TINY), run / f"ckpt_{step:07d}")
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
    model = from_pretrained(run_dir / "ckpt_0000020").eval()
    torch.manual_seed(7)
    idx = torch.tensor([tokenizer.encode(prompt)])
    out = generate(model, idx, 12, top_k=10, top_p=0.95, eos_token_id=tokenizer.EOT_ID)
    assert result.stdout == tokenizer.decode(out[0].tolist()) + "\n"
    assert "ckpt_0000020" in result.stderr and "tokens/s]" in result.stderr


def test_prints_only_whole_characters(monkeypatch, capsys, run_dir):
    """Tokens that split a character are held back until it is complete, never printed as U+FFFD."""
    text = " café 👋"
    ids = tokenizer.encode(text)
    assert "\ufffd" in tokenizer.decode(ids[-1:])  # the emoji's last token alone is no character

    def scripted_generate(model, idx, max_new_tokens, callback, **sampling):
        for token in ids:
            callback(torch.tensor([token]))
        return torch.cat([idx, torch.tensor([ids])], dim=1)

    monkeypatch.setattr(sample, "generate", scripted_generate)
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
            "device=cuda but no GPU is visible",
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


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--top_k=-1", "--top_k=-1: expected a positive number of tokens, or None for all"),
        ("--max_new_tokens=-3", "--max_new_tokens=-3: expected a positive number of tokens"),
        ("--num_samples=0", "--num_samples=0: expected a positive number of continuations"),
        ("--seed=-1", "--seed=-1: expected a number from 0 to 2\\*\\*64 - 1"),
        ("--temperature=0", "--temperature=0.0: expected a finite number > 0 when sampling; .* --do_sample=False"),
        ("--temperature=nan", "--temperature=nan: expected a finite number > 0"),
        ("--top_p=0", "--top_p=0.0: expected a probability in \\(0, 1\\]"),
        ("--top_p=1.5", "--top_p=1.5: expected a probability in \\(0, 1\\]"),
        ("--device=gpu", "device=gpu: not a device; use cpu, cuda"),
    ],
)
def test_bad_values_are_refused_before_the_model_loads(arg, message):
    """The checkpoint does not exist: an error about it would mean the value was checked too late."""
    with pytest.raises(UserError, match=message):
        sample.main(["--ckpt=no/such/run", arg])


def test_a_bad_value_is_one_line_without_traceback():
    result = run_sample("--ckpt=no/such/run", "--top_k=-1")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "sample.py: error: --top_k=-1: expected a positive number of tokens, or None for all\n"


def test_greedy_decoding_takes_any_temperature(run_dir, capsys):
    sample.main([f"--ckpt={run_dir}", "--do_sample=False", "--temperature=0", "--max_new_tokens=2"])
    assert capsys.readouterr().out.startswith("I was telling her that")


@pytest.fixture(scope="module")
def padded_run(tmp_path_factory):
    """A checkpoint of a padded vocabulary (train.py's --vocab_size=50304) whose padding ids would win:
    the tokenizer's ids all score 0, the others far from it."""
    model = GPT(GPTConfig(**{**vars(TINY), "vocab_size": 50304}))
    with torch.no_grad():
        model.lm_head.weight[: tokenizer.VOCAB_SIZE] = 0
        model.lm_head.weight[tokenizer.VOCAB_SIZE :] = 100 * torch.randn(50304 - tokenizer.VOCAB_SIZE, TINY.n_embd)
    directory = tmp_path_factory.mktemp("padded") / "ckpt"
    save_pretrained(model, directory)
    return directory


@pytest.mark.parametrize("args", [[], ["--do_sample=False"], ["--top_k=None", "--top_p=None"]])
def test_a_padded_vocabulary_samples_only_ids_the_tokenizer_has(padded_run, args, capsys, monkeypatch):
    chosen = []
    decode = tokenizer.get_tokenizer().decode_single_token_bytes
    monkeypatch.setattr(
        tokenizer.get_tokenizer(), "decode_single_token_bytes", lambda token: chosen.append(token) or decode(token)
    )
    sample.main([f"--ckpt={padded_run}", "--max_new_tokens=20", *args])
    assert len(chosen) == 20 and max(chosen) < tokenizer.VOCAB_SIZE
    assert capsys.readouterr().out.startswith("I was telling her that")


def test_a_padded_vocabulary_in_a_batch(padded_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\nIt was a dark and stormy night\n")
    sample.main([f"--ckpt={padded_run}", f"--prompts={prompts}", "--max_new_tokens=20", "--do_sample=False"])
    assert capsys.readouterr().out.count("---------------") == 1


def test_a_prompt_file_with_a_byte_order_mark_is_decoded(run_dir, tmp_path, capsys):
    for name, data in [("utf16.txt", "Il était une fois".encode("utf-16")), ("bom8.txt", "\ufeffOnce upon".encode())]:
        (tmp_path / name).write_bytes(data)
        sample.main([f"--ckpt={run_dir}", f"--start=FILE:{tmp_path / name}", "--max_new_tokens=1"])
        assert capsys.readouterr().out.startswith(data.decode("utf-16" if name == "utf16.txt" else "utf-8-sig"))


@pytest.mark.parametrize("flag", ["--start=FILE:", "--prompts="])
def test_bad_prompt_files_are_one_line_errors(run_dir, tmp_path, monkeypatch, flag):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait\n".encode("latin-1"))
    with pytest.raises(UserError, match=f"{flag}{latin1} is not UTF-8 text .*at byte 3.*; convert it to UTF-8"):
        sample.main([f"--ckpt={run_dir}", f"{flag}{latin1}"])
    with pytest.raises(UserError, match=f"{flag}{tmp_path} is a directory; pass a file"):
        sample.main([f"--ckpt={run_dir}", f"{flag}{tmp_path}"])
    unreadable = tmp_path / "unreadable.txt"
    unreadable.write_text("hello\n")

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "read_bytes", denied)  # chmod 000 would not stop root
    with pytest.raises(UserError, match=f"{flag}{unreadable}: cannot read it \\(Permission denied\\)"):
        sample.main([f"--ckpt={run_dir}", f"{flag}{unreadable}"])


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]),
            "ckpt: its model does not load .*; pass an intact HF GPT-2 directory",
        ),
        (lambda d: (d / "config.json").write_text("{"), "ckpt: its model does not load .*; pass an intact HF GPT-2"),
        (
            lambda d: (d / "config.json").write_text('{"model_type": "gpt2"}'),  # no n_embd, n_positions, ...
            "config.json has no n_positions; add it, .*, or pass an intact checkpoint",
        ),
    ],
)
def test_a_damaged_model_directory_is_one_line(tmp_path, damage, message):
    save_pretrained(GPT(TINY), tmp_path / "ckpt")
    damage(tmp_path / "ckpt")
    with pytest.raises(UserError, match=message):
        sample.main([f"--ckpt={tmp_path / 'ckpt'}", "--max_new_tokens=2"])


def test_a_damaged_checkpoint_names_the_newest_intact_one_before_it(tmp_path):
    model = GPT(TINY)
    optimizer = adamw(model, 1e-3, 0.0, (0.9, 0.99), 1e-8, fused=False)
    for step in (2, 4):
        write_checkpoint(tmp_path / "run", model, optimizer, TrainerState(step), {}, keep=5)
    weights = tmp_path / "run" / "ckpt_0000004" / "model.safetensors"
    content = bytearray(weights.read_bytes())
    content[len(content) // 2] ^= 1  # bit rot inside a weight: it stays finite
    weights.write_bytes(content)
    with pytest.raises(
        UserError,
        match=r"ckpt_0000004/model.safetensors is damaged \(its sha256 differs from the one written with it\); "
        r"pass --ckpt=.*ckpt_0000002, the newest intact checkpoint before it",
    ):
        sample.main([f"--ckpt={tmp_path / 'run'}", "--max_new_tokens=2"])


def test_weights_of_a_diverged_run_are_one_line(tmp_path):
    model = GPT(TINY)
    with torch.no_grad():
        model.transformer.wte.weight[3, 3] = float("inf")
    save_pretrained(model, tmp_path / "ckpt")
    with pytest.raises(UserError, match="ckpt: transformer.wte.weight holds inf or NaN.*; pass an earlier one"):
        sample.main([f"--ckpt={tmp_path / 'ckpt'}", "--max_new_tokens=2"])
