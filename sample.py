"""Continue a prompt with a trained GPT-2, streaming tokens as they come; or many prompts in one batch.

    python sample.py --start="I was telling her that"        # the newest run under out/
    python sample.py --ckpt=out/austen --num_samples=3 --seed=2
    python sample.py --ckpt=path/to/gpt2 --start=FILE:prompt.txt --dtype=bfloat16
    python sample.py --ckpt=gpt2                               # a Hub model (online), as train.py's --init_from
    python sample.py --init=random                             # an untrained GPT-2 124M, as the recipe showed
    python sample.py --prompts=prompts.txt                     # one prompt per line, all continued in one batch

Defaults are the recipe's generate call: 100 new tokens, sampling with top_k=10 and top_p=0.95 at
temperature 1.0; with the same weights and seed the tokens equal GPT2LMHeadModel.generate's. With
--prompts, the prompts are left-padded to the longest and masked, as HF batches them: each
continuation equals HF generate's on that batch with its attention_mask. A batch prints each
prompt's text once all are done, separated by lines of dashes, each cut after its first <|endoftext|>.
A model whose vocabulary is padded beyond the tokenizer's 50257 ids (train.py's --vocab_size=50304)
samples among those 50257 only. Prompt files are UTF-8, or UTF-16/UTF-32 with a byte-order mark.
"""

import codecs
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import configurator
import tokenizer
from common import UserError, check_device
from generate import RECIPE_SAMPLING, compile_decode_step, decode_step, generate, use_onednn_linear
from inference import DTYPES, check_dtype, load_model
from model import GPT
from sources import read_text


@dataclass
class SampleConfig:
    ckpt: str | None = None  # run dir (its newest checkpoint), checkpoint, HF GPT-2 dir or Hub name; None: newest
    init: str = "checkpoint"  # or "random": an untrained GPT-2 124M
    start: str = "I was telling her that"  # the prompt, or FILE:path to read it from a file
    prompts: str | None = None  # a file of prompts, one per line (blank lines skipped), continued in one batch
    num_samples: int = 1  # continuations made one after another
    max_new_tokens: int = 100  # tokens generated per continuation
    temperature: float = RECIPE_SAMPLING["temperature"]  # divides the logits before sampling
    top_k: int | None = RECIPE_SAMPLING["top_k"]  # sample among the k most likely tokens; None: all
    top_p: float | None = RECIPE_SAMPLING["top_p"]  # then among the fewest whose probability reaches top_p; None: all
    do_sample: bool = True  # False: greedy decoding
    seed: int = 1337  # torch seed: the same seed and weights give HF generate's tokens
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # cpu, cuda or cuda:N
    dtype: str = "float32"  # float32, bfloat16 or float16
    compile: bool = False  # compile the one-token decode step (the first sample's time includes compiling)


def read_prompt(start: str) -> str:
    if start.startswith("FILE:"):
        return read_text(Path(start.removeprefix("FILE:")), f"--start={start}")
    return start


def read_prompts(path: str) -> list[str]:
    prompts = [line for line in read_text(Path(path), f"--prompts={path}").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"--prompts={path} has no prompts; write one per line")
    return prompts


def stream(model: GPT, prompt: str, prompt_ids: list[int], cfg: SampleConfig, sampling: dict) -> int:
    """Prints the prompt and its continuation token by token; returns the number of new tokens."""
    token_bytes = tokenizer.get_tokenizer().decode_single_token_bytes
    # A character may span tokens (e.g. an emoji): the incremental decoder prints only complete ones.
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    print(prompt, end="", flush=True)
    idx = torch.tensor([prompt_ids], device=cfg.device)  # (1, T)
    out = generate(
        model,
        idx,
        cfg.max_new_tokens,
        **sampling,
        callback=lambda token: print(utf8.decode(token_bytes(token.item())), end="", flush=True),
    )
    print(utf8.decode(b"", final=True))
    return out.shape[1] - idx.shape[1]


def continue_batch(
    model: GPT, prompts: list[str], prompt_ids: list[list[int]], cfg: SampleConfig, sampling: dict
) -> int:
    """Continues all prompts in one batch, left-padded and masked as HF batches them, then prints
    each; returns the number of new tokens in all."""
    longest = max(map(len, prompt_ids))
    padding = [longest - len(ids) for ids in prompt_ids]
    idx = torch.tensor(
        [[tokenizer.EOT_ID] * pad + ids for pad, ids in zip(padding, prompt_ids, strict=True)], device=cfg.device
    )  # (B, longest)
    attention_mask = torch.tensor(
        [[0] * pad + [1] * len(ids) for pad, ids in zip(padding, prompt_ids, strict=True)], device=cfg.device
    )
    out = generate(model, idx, cfg.max_new_tokens, **sampling, attention_mask=attention_mask)
    for i, (prompt, new) in enumerate(zip(prompts, out[:, longest:].tolist(), strict=True)):
        if tokenizer.EOT_ID in new:  # a finished sequence goes on with <|endoftext|>: print the first
            new = new[: new.index(tokenizer.EOT_ID) + 1]
        print(("---------------\n" if i else "") + prompt + tokenizer.decode(new))
    return out[:, longest:].numel()


def check_config(cfg: SampleConfig) -> None:
    """A bad value is a one-line error here, before the model loads."""
    if cfg.num_samples < 1:
        raise UserError(f"--num_samples={cfg.num_samples}: expected a positive number of continuations")
    if cfg.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens={cfg.max_new_tokens}: expected a positive number of tokens")
    if cfg.top_k is not None and cfg.top_k < 1:
        raise UserError(f"--top_k={cfg.top_k}: expected a positive number of tokens, or None for all")
    if cfg.top_p is not None and not 0 < cfg.top_p <= 1:
        raise UserError(f"--top_p={cfg.top_p}: expected a probability in (0, 1], or None for all")
    if cfg.do_sample and not (cfg.temperature > 0 and math.isfinite(cfg.temperature)):
        raise UserError(
            f"--temperature={cfg.temperature}: expected a finite number > 0 when sampling; "
            "for greedy decoding pass --do_sample=False"
        )
    if not 0 <= cfg.seed < 2**64:
        raise UserError(f"--seed={cfg.seed}: expected a number from 0 to 2**64 - 1")
    check_dtype(cfg.dtype)
    check_device(cfg.device)


def main(argv):
    cfg = configurator.parse_config(SampleConfig, argv)
    check_config(cfg)
    prompts = read_prompts(cfg.prompts) if cfg.prompts is not None else [read_prompt(cfg.start)]
    prompt_ids = [tokenizer.encode(prompt) for prompt in prompts]
    if not all(prompt_ids):
        raise UserError("the prompt is empty; pass --start=TEXT or --start=FILE:prompt.txt")
    torch.manual_seed(cfg.seed)  # a random init is reproducible too
    model = use_onednn_linear(load_model(cfg.ckpt, cfg.init).to(cfg.device, DTYPES[cfg.dtype]))
    # The KV caches every sample reuses, sized before anything is printed: a request beyond the context fails here.
    model.setup_kv_cache(len(prompts), max(map(len, prompt_ids)) + cfg.max_new_tokens)
    if cfg.compile:
        torch._inductor.config.freezing = True  # weights become prepacked constants: faster on CPU
    sampling = dict(
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        do_sample=cfg.do_sample,
        eos_token_id=tokenizer.EOT_ID,
        vocab_size=tokenizer.VOCAB_SIZE,  # a padded vocabulary's extra ids are never chosen: they decode to nothing
        decode=compile_decode_step(model) if cfg.compile else decode_step,
    )
    torch.manual_seed(cfg.seed)  # again, whatever loading drew: the same tokens as HF generate after manual_seed(seed)
    for sample in range(cfg.num_samples):
        if sample:
            print("---------------")
        started = time.perf_counter()
        if len(prompts) == 1:
            new_tokens = stream(model, prompts[0], prompt_ids[0], cfg, sampling)
        else:
            new_tokens = continue_batch(model, prompts, prompt_ids, cfg, sampling)
        seconds = time.perf_counter() - started
        print(f"[{new_tokens} tokens in {seconds:.2f} s: {new_tokens / seconds:.1f} tokens/s]", file=sys.stderr)


if __name__ == "__main__":
    configurator.run(main)
