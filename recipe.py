"""The recipe we reproduce and measure against: GPT-2 small on BookCorpus with the HF Trainer, set up as
the blog recipe sets it up (its data pipeline, its TrainingArguments, GPT2LMHeadModel under the Trainer).
bench.py runs each side in a process of its own (bench.run_measured); tests/test_fidelity.py steps
train.py beside it."""

import itertools
import json
import time
from pathlib import Path

import numpy as np

from shards import TokenWindows


# The recipe: load_dataset("text") (a row per line, like BookCorpus' sentence rows), tokenize with
# datasets.map and HF's GPT-2 fast tokenizer, concatenate and cut 1024-token chunks.
def recipe_prepare(corpus: str, cache_dir: str) -> None:
    """Child process (run_measured): the recipe's pipeline on the corpus; prints as ours_prepare."""
    import datasets
    import pyarrow.compute as pc
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from tokenizer import EOT_TOKEN, GPT2_SPLIT_PATTERN, RANKS_PATH, get_tokenizer

    converter = TikTokenConverter(
        vocab_file=str(RANKS_PATH), pattern=GPT2_SPLIT_PATTERN, extra_special_tokens=[EOT_TOKEN]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=converter.converted(), eos_token=EOT_TOKEN)
    files = sorted(str(path) for path in Path(corpus).glob("*.txt"))
    sample = Path(files[0]).read_text(encoding="utf-8")[:100_000]
    assert tokenizer(sample)["input_ids"] == get_tokenizer().encode_ordinary(sample), "not the same tokenizer"

    def group_texts(batch, block_size=1024):
        joined = {key: list(itertools.chain(*batch[key])) for key in batch}
        total = len(joined["input_ids"]) // block_size * block_size
        return {key: [ids[i : i + block_size] for i in range(0, total, block_size)] for key, ids in joined.items()}

    started, cpu_started = time.perf_counter(), time.process_time()
    rows = datasets.load_dataset("text", data_files=files, split="train", cache_dir=cache_dir)
    tokenized = rows.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])
    tokenized.map(group_texts, batched=True)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    tokens = pc.sum(pc.list_value_length(tokenized.data.column("input_ids"))).as_py()
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "tokens": tokens}))


# The recipe's side: GPT2LMHeadModel under the HF Trainer, set up as the blog recipe sets it up.
class RecipeWindows:
    """train.py's windows as the Trainer's examples, in `order` (default: as stored): the same block_size
    inputs and next-token targets. The targets go in as shift_labels, which GPT2LMHeadModel's loss takes
    as they are; `labels` (unshifted, as the recipe's) would drop each window's last target."""

    def __init__(self, windows: TokenWindows, order=None):
        self.windows, self.order = windows, np.arange(len(windows)) if order is None else order

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        import torch

        window = torch.from_numpy(self.windows.batch([self.order[i]])[0])
        return {"input_ids": window[:-1], "labels": window[:-1], "shift_labels": window[1:]}


def recipe_arguments(out_dir, batch_size: int, steps: int, learning_rate: float, seed: int, gpu: bool, **overrides):
    """The recipe's TrainingArguments for `steps` optimizer steps, with any `overrides`: AdamW
    (transformers' default, fused; weight decay 0.01 off biases and LayerNorm), 5% linear warmup then
    cosine, clipping at 1.0, bf16 on a GPU. train.py's defaults are these."""
    from transformers import TrainingArguments

    recipe = dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=batch_size,
        max_steps=steps,
        learning_rate=learning_rate,
        seed=seed,
        weight_decay=0.01,
        warmup_steps=0.05,
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        bf16=gpu,
        use_cpu=not gpu,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        dataloader_drop_last=True,
        remove_unused_columns=False,
    )
    return TrainingArguments(**{**recipe, **overrides})


def recipe_train(run_json: str) -> None:
    """Child process (run_measured): GPT2LMHeadModel under the Trainer as the recipe sets it up, with the
    settings in run_json; prints its tokens/s after the untimed warm-up steps."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback

    run = json.loads(run_json)
    step_seconds = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_seconds.append(time.perf_counter() - self.started)

    torch.manual_seed(run["seed"])
    dropouts = dict.fromkeys(["resid_pdrop", "embd_pdrop", "attn_pdrop"], run["dropout"])
    shape = dict(n_layer=run["n_layer"], n_head=run["n_head"], n_embd=run["n_embd"], n_positions=run["block_size"])
    model = GPT2LMHeadModel(GPT2Config(**shape, **dropouts))
    args = recipe_arguments(
        run["out_dir"],
        run["batch_size"],
        run["steps"],
        run["learning_rate"],
        run["seed"],
        run["gpu"],
        logging_steps=run["steps"],
    )
    windows = RecipeWindows(TokenWindows(run["data_dir"], "train", run["block_size"]))
    trainer = Trainer(model=model, args=args, train_dataset=windows, callbacks=[StepTimer()])
    trainer.train()
    if run["save_model"]:
        trainer.save_model(run["out_dir"])
    timed = step_seconds[run["warmup_steps"] :]
    print(json.dumps({"tokens_per_s": run["batch_size"] * run["block_size"] * len(timed) / sum(timed)}))
