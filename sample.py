"""Continue a prompt with a trained GPT-2, streaming tokens as they come.

    python sample.py --start="I was telling her that"        # the newest run under out/
    python sample.py --ckpt=out/austen --num_samples=3 --seed=2
    python sample.py --ckpt=path/to/gpt2 --start=FILE:prompt.txt --dtype=bfloat16
    python sample.py --ckpt=gpt2                               # a Hub model (online), as train.py's --init_from
    python sample.py --init=random                             # an untrained GPT-2 124M, as the recipe showed

Defaults are the recipe's generate call: 100 new tokens, sampling with top_k=10 and top_p=0.95 at
temperature 1.0; with the same weights and seed the tokens equal GPT2LMHeadModel.generate's.
"""

import codecs
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import configurator
from configurator import UserError
import tokenizer
from model import GPT, GPTConfig
from train import latest_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TRAIN_HINT = "train one with `python prepare.py --dataset=austen && python train.py config/austen.py`, or pass --ckpt=DIR or --init=random"


@dataclass
class SampleConfig:
    ckpt: str | None = None  # a run directory (its newest checkpoint), a checkpoint, any HF GPT-2 directory or Hub name (gpt2); None: newest run under out/
    init: str = "checkpoint"  # or "random": an untrained GPT-2 124M
    start: str = "I was telling her that"  # the prompt, or FILE:path to read it from a file
    num_samples: int = 1
    max_new_tokens: int = 100
    temperature: float = 1.0
    top_k: int | None = 10
    top_p: float | None = 0.95
    do_sample: bool = True  # False: greedy decoding
    seed: int = 1337
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "float32"  # float32, bfloat16 or float16
    compile: bool = False  # compile the one-token decode step (the first sample's time includes compiling)


def newest_run(out_dir: Path) -> Path:
    runs = [run for run in out_dir.glob("*/") if latest_checkpoint(run)] if out_dir.is_dir() else []
    if not runs:
        raise UserError(f"no checkpoint under {out_dir}/; {TRAIN_HINT}")
    return max(runs, key=lambda run: latest_checkpoint(run).stat().st_mtime)


def load_model(cfg: SampleConfig) -> GPT:
    if cfg.init == "random":
        return GPT(GPTConfig(dropout=0.0))
    if cfg.init != "checkpoint":
        raise UserError(f"--init={cfg.init}: expected checkpoint or random")
    source = cfg.ckpt if cfg.ckpt is not None else str(newest_run(Path("out")))
    if Path(source).is_dir() and not (Path(source) / "config.json").is_file():  # a run directory: its newest checkpoint
        checkpoint = latest_checkpoint(source)
        if checkpoint is None:
            raise UserError(f"{source} has neither config.json nor ckpt_* checkpoints; {TRAIN_HINT}")
        source = str(checkpoint)
    print(f"loading {source}", file=sys.stderr)
    return GPT.from_pretrained(source, dropout=0.0)  # not a directory: a Hub name, as train.py's --init_from


def read_prompt(start: str) -> str:
    if start.startswith("FILE:"):
        path = Path(start.removeprefix("FILE:"))
        if not path.is_file():
            raise UserError(f"--start=FILE:{path}: no such file")
        return path.read_text(encoding="utf-8")
    return start


def main(argv):
    cfg = configurator.parse_config(SampleConfig, argv)
    if cfg.dtype not in DTYPES:
        raise UserError(f"--dtype={cfg.dtype}: expected one of {', '.join(DTYPES)}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={cfg.device}, but torch sees no CUDA GPU; use --device=cpu")
    prompt = read_prompt(cfg.start)
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise UserError("the prompt is empty; pass --start=TEXT or --start=FILE:prompt.txt")
    torch.manual_seed(cfg.seed)  # a random init is reproducible too
    model = load_model(cfg).to(cfg.device, DTYPES[cfg.dtype]).eval()
    context = model.config.block_size
    if len(prompt_ids) + cfg.max_new_tokens > context:
        raise UserError(
            f"the prompt ({len(prompt_ids)} tokens) + --max_new_tokens={cfg.max_new_tokens} exceed the context of {context} tokens; "
            "shorten the prompt or lower --max_new_tokens"
        )
    if cfg.compile:
        torch._inductor.config.freezing = True  # weights become prepacked constants: faster on CPU (see compile_decode_step)
        model.compile_decode_step()
    idx = torch.tensor([prompt_ids], device=cfg.device)  # (1, T)
    token_bytes = tokenizer.get_tokenizer().decode_single_token_bytes
    torch.manual_seed(cfg.seed)  # again, whatever loading drew: the same tokens as HF generate after manual_seed(seed)
    for sample in range(cfg.num_samples):
        # A character may span tokens (e.g. an emoji): the incremental decoder prints only complete ones.
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        print(prompt, end="", flush=True)
        started = time.perf_counter()
        out = model.generate(
            idx,
            cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            do_sample=cfg.do_sample,
            eos_token_id=tokenizer.EOT_ID,
            callback=lambda token: print(utf8.decode(token_bytes(token.item())), end="", flush=True),
        )
        seconds = time.perf_counter() - started
        print(utf8.decode(b"", final=True))
        new_tokens = out.shape[1] - idx.shape[1]
        print(f"[{new_tokens} tokens in {seconds:.2f} s: {new_tokens / seconds:.1f} tokens/s]", file=sys.stderr)
        if sample < cfg.num_samples - 1:
            print("---------------")


if __name__ == "__main__":
    configurator.run(main)
