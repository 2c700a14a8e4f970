"""Ours vs the Hugging Face reference, side by side in one run on this machine, as ratios.

    python bench.py                      # small defaults: a few minutes on a 2-core CPU
    python bench.py --full               # the 124M config
    python bench.py --sections=prepare   # any of: prepare,train,generate,fidelity
    python bench.py --sections=fidelity  # train.py's two starts vs the Trainer, 8 seeds each: hours on 2 cores

Absolute numbers on shared machines are noise; the ratio between two runs made back to back on
the same machine is the number to read. Results are printed as a table and written as JSON.
"""

import json
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

import configurator
from common import UserError
from measure import (
    default_device,
    machine_name,
    mean_tokens_per_s,
    prepare_austen,
    run_measured,
    run_train_py,
    timed_logs,
    val_loss,
    write_austen_corpus,
)
from shards import TokenWindows
from tuning import bench_optimizer, bench_quickstart


@dataclass
class BenchConfig:
    sections: str = "prepare,train,generate"  # comma-separated of: those, fidelity, quickstart, optimizer
    full: bool = False  # the 124M config (slow on CPU) instead of small defaults
    fidelity_seeds: int = 8  # runs of each side in the fidelity section
    fidelity_steps: int = 300  # optimizer steps of each fidelity run
    device: str = field(default_factory=lambda: default_device())  # where both sides run: cuda if torch sees a GPU
    json_path: str = "bench.json"  # the rows are also written here


# Each section returns rows: {"what", "unit", "ours", "reference", ...extra}; higher is better.
SECTIONS = {}


# prepare: prepare.py vs the recipe's pipeline, each in its own process so its memory is its own.


def ours_prepare(corpus: str, out_dir: str) -> None:
    """Child process (run_measured): prepare.py on the corpus; prints its seconds, CPU seconds and tokens."""
    import prepare
    from tokenizer import get_tokenizer

    get_tokenizer()  # built before the clock starts, like the recipe's tokenizer
    started, cpu_started = time.perf_counter(), time.process_time()
    prepare.main([f"--input={corpus}", f"--out_dir={out_dir}"])
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    meta = json.loads((Path(out_dir) / "meta.json").read_text())
    tokens = sum(split["tokens"] for split in meta["splits"].values())
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "tokens": tokens}))


def bench_prepare(cfg):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpora = {"Austen": 1, "~200 MB of Austen variations": 50} if cfg.full else {"Austen": 1}
        for label, copies in corpora.items():
            corpus = write_austen_corpus(Path(tmp) / f"corpus{copies}", copies)
            rounds = 3 if copies == 1 else 1  # a second or two per run: best of interleaved rounds
            runs = {"ours": [], "recipe": []}
            for i in range(rounds):
                runs["ours"].append(run_measured("bench.ours_prepare", corpus, Path(tmp) / f"ours{copies}_{i}"))
                runs["recipe"].append(run_measured("recipe.recipe_prepare", corpus, Path(tmp) / f"recipe{copies}_{i}"))
            best = {name: min(results, key=lambda r: r["seconds"]) for name, results in runs.items()}
            peak_rss_mb = {name: max(r["peak_rss_mb"] for r in results) for name, results in runs.items()}
            for name, result in best.items():
                # CPU time (all threads) is the figure a busy machine disturbs least
                print(
                    f"prepare, {label}: {name} {result['tokens']:,} tokens in {result['seconds']:.2f} s "
                    f"(best of {rounds}), "
                    f"{result['tokens'] / result['cpu_seconds'] / 1e6:.2f}M tokens per CPU second, "
                    f"peak RSS of all its processes {peak_rss_mb[name]:.0f} MB"
                )
            rows.append(
                {
                    "what": f"prepare tokens/s, {label}",
                    "unit": "M tok/s",
                    "ours": best["ours"]["tokens"] / best["ours"]["seconds"] / 1e6,
                    "reference": best["recipe"]["tokens"] / best["recipe"]["seconds"] / 1e6,
                    "ours_peak_rss_mb": peak_rss_mb["ours"],
                    "reference_peak_rss_mb": peak_rss_mb["recipe"],
                }
            )
    return rows


SECTIONS["prepare"] = bench_prepare


def train_with_plain_loss() -> None:
    """train.py (arguments from sys.argv) with the output layer's loss as F.cross_entropy of the whole logits,
    as torch.compile makes it, in place of loss.linear_cross_entropy: the same run otherwise, so that the
    tokens/s of the two losses compare. With a CompactVocab, over the same columns."""
    import torch
    import torch.nn.functional as F

    import model
    import train
    from loss import IGNORE_INDEX

    def plain_cross_entropy(x, weight, targets, vocab=None):
        if vocab is None or not torch.is_grad_enabled():  # evaluations' targets may be unseen tokens
            return F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=IGNORE_INDEX)
        weight, targets = vocab.select(weight, targets)
        logits = F.linear(x, weight).float()
        logits = torch.cat([logits[:, :-1], logits[:, -1:] + vocab.log_unseen], 1)  # the unseen tokens' column
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)

    model.linear_cross_entropy = plain_cross_entropy
    configurator.run(train.main)


def train_with_independent_rows() -> None:
    """train.py (arguments from sys.argv) with a new model's output rows all drawn on their own, as GPT-2
    initializes them, instead of the unseen tokens' rows tied for loss.CompactVocab: the whole softmax."""
    import loss
    import train

    loss.tie_unseen_rows = lambda weight, seen: None
    configurator.run(train.main)


def train_with_freed_memory_returned() -> None:
    """train.py (arguments from sys.argv) without common.keep_freed_memory: glibc's default, which hands freed
    blocks back to the OS."""
    import train

    train.keep_freed_memory = lambda: None
    configurator.run(train.main)


def train_with_profiler(profiled_steps: int = 3) -> None:
    """train.py (arguments from sys.argv) with torch.profiler around its last `profiled_steps` steps (after
    the warm-up and compiling); prints the operators and kernels that took the most device time (CPU time
    on a CPU) once they are done, and on a GPU the peak memory allocated."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import train

    step, taken = train.train_step, []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    profiler = profile(activities=activities)

    def profiled_step(*args, **kwargs):
        taken.append(1)
        if len(taken) == train_steps - profiled_steps + 1:
            profiler.start()
        result = step(*args, **kwargs)
        if len(taken) == train_steps:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            profiler.stop()
            by = "device_time_total" if torch.cuda.is_available() else "cpu_time_total"
            print(profiler.key_averages().table(sort_by=by, row_limit=15), flush=True)
            if torch.cuda.is_available():
                print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)
        return result

    train_steps = int(next(a for a in sys.argv if a.startswith("--max_steps=")).split("=")[1])
    train.train_step = profiled_step
    configurator.run(train.main)


# train: train.py (our model + loop) vs GPT2LMHeadModel under the HF Trainer (the recipe's loop), on
# the same windows with the same batch, AdamW (fused), schedule, clipping and precision (bf16 on GPU).
FREED_MEMORY_RETURNED = "freed memory handed back (glibc's default)"


def bench_train(cfg):
    gpu = cfg.device.startswith("cuda")
    shape = dict(n_layer=12, n_head=12, n_embd=768) if cfg.full else dict(n_layer=4, n_head=4, n_embd=128)
    block_size, batch_size, steps = (1024, 8, 60) if gpu else (256, 4, 12) if cfg.full else (256, 16, 30)
    warmup_steps = steps // 3  # not timed: allocator warm-up and, on GPU, torch.compile
    rounds = 1 if gpu else 2  # CPU: ours, HF, ours, HF, best of each, so a busy minute slows both alike
    # Ours at the Trainer's batch; on a GPU also the recipe's 64 sequences per step in the micro-batch
    # train.py picks (the largest that fits), accumulating the rest.
    # name: (run_train_py's variant, overrides)
    same_batch = {"batch_size": batch_size, "micro_batch_size": batch_size}
    variants = {f"{batch_size}x{block_size}": ("", same_batch)}
    if gpu:  # the same step with the loss of the full logits, so that the fused loss is a measured choice
        variants[f"{batch_size}x{block_size}, loss F.cross_entropy"] = ("bench.train_with_plain_loss", same_batch)
        variants[f"64x{block_size} per step, micro-batch auto"] = ("", {"batch_size": 64})
    else:  # the same step with freed memory handed back to the OS, so that keep_freed_memory is a measured choice
        returned = ("bench.train_with_freed_memory_returned", same_batch)
        variants[f"{batch_size}x{block_size}, {FREED_MEMORY_RETURNED}"] = returned
    ours, reference = {name: {"tokens_per_s": 0.0} for name in variants}, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = prepare_austen(Path(tmp) / "data")
        for round_ in range(rounds):
            for i, (name, (variant, settings)) in enumerate(variants.items()):
                run_name = f"bench{round_}_{i}"
                overrides = {
                    **shape,
                    **settings,
                    "block_size": block_size,
                    "max_steps": steps,
                    "log_interval": warmup_steps,
                    "eval_interval": 10**9,
                    "eval_windows": 1,
                    "checkpoint_interval": 10**9,
                    "data_dir": data_dir,
                    "out_dir": tmp,
                    "run_name": run_name,
                    "device": cfg.device,
                    "dtype": "bfloat16" if gpu else "float32",  # the Trainer's precision: bf16=gpu
                    "sample_prompt": "",
                }
                stdout = run_train_py(overrides, variant)
                timed = timed_logs(Path(tmp) / run_name)
                tokens_per_s = sum(r["tokens_per_s"] for r in timed) / len(timed)
                mfu = sum(r["mfu"] for r in timed) / len(timed) if timed[0]["mfu"] else None  # the same records
                if tokens_per_s > ours[name]["tokens_per_s"]:
                    micro = re.search(r"x (\d+) sequences", stdout).group(1)
                    ours[name] = {
                        "tokens_per_s": tokens_per_s,
                        "mfu": mfu,
                        "micro_batch_size": int(micro),
                        "softmax": "compact" if "one shared row" in stdout else "whole",  # loss.CompactVocab or not
                    }
            run = {
                **shape,
                "block_size": block_size,
                "batch_size": batch_size,
                "steps": steps,
                "warmup_steps": warmup_steps,
                "learning_rate": 2.5e-4,
                "dropout": 0.1,
                "seed": 0,
                "data_dir": str(data_dir),
                "out_dir": str(Path(tmp) / "hf"),
                "gpu": gpu,
                "save_model": False,
            }
            reference = max(reference, run_measured("recipe.recipe_train", json.dumps(run))["tokens_per_s"])
    rows = []
    for name, result in ours.items():
        mfu = f", MFU {result['mfu']:.1%}" if result["mfu"] else ""
        size, precision = "124M" if cfg.full else "small", "bf16" if gpu else "fp32"
        step = f"micro {result['micro_batch_size']}, {result['softmax']} softmax{mfu}"
        what = f"train tok/s, {size}, {precision}, {name} ({step})"
        rows.append({"what": what, "unit": "tok/s", "ours": result["tokens_per_s"], "reference": reference, **result})
    if not gpu:
        kept, returned = (ours[name]["tokens_per_s"] for name in list(variants)[:2])
        what = f"train tok/s, {size}, {precision}: common.keep_freed_memory against {FREED_MEMORY_RETURNED}"
        rows.append({"what": what, "unit": "tok/s", "ours": kept, "reference": returned})
    return rows


SECTIONS["train"] = bench_train


# fidelity: does train.py learn what the recipe learns? Each side trains from seeds of its own (initial
# weights, window order, dropout) with the same data, hyperparameters and steps; one evaluation
# (measure.val_loss) then scores every final model on the same val windows. The controlled twin (same
# weights and order, no dropout, agreeing to float rounding) is tests/test_fidelity.py.
# The sides: train.py as it is (a new model's unseen tokens' rows at zero, loss.CompactVocab), train.py with
# every row drawn on its own as GPT-2 draws them (the whole softmax), and the recipe.
FIDELITY_SIDES = {
    "ours": "train.py (compact softmax, unseen rows at zero)",
    "independent": "train.py, rows drawn independently (whole softmax)",
    "recipe": "HF Trainer",
}


def bench_fidelity(cfg):
    from scipy import stats

    from checkpoint import latest_checkpoint

    gpu = cfg.device.startswith("cuda")
    # CPU: the measurement that filed the comparison (4 x 128, 128 tokens, batch 8, lr 1e-3);
    # --full: the recipe's model.
    shape = dict(n_layer=12, n_head=12, n_embd=768) if cfg.full else dict(n_layer=4, n_head=4, n_embd=128)
    block_size, learning_rate = (1024, 2.5e-4) if cfg.full else (128, 1e-3)
    both = {**shape, "block_size": block_size, "batch_size": 8, "learning_rate": learning_rate, "dropout": 0.1}
    warmup_steps = max(1, cfg.fidelity_steps // 10)  # untimed
    ours_run = {
        **both,
        "micro_batch_size": 8,
        "max_steps": cfg.fidelity_steps,
        "dtype": "bfloat16" if gpu else "float32",
        "log_interval": warmup_steps,
        "eval_interval": 10**9,
        "eval_windows": 1,
        "checkpoint_interval": 10**9,
        "device": cfg.device,
        "sample_prompt": "",
    }
    recipe_run = {**both, "steps": cfg.fidelity_steps, "warmup_steps": warmup_steps, "gpu": gpu, "save_model": True}
    losses, seconds_per_step = {side: [] for side in FIDELITY_SIDES}, {side: [] for side in FIDELITY_SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = prepare_austen(Path(tmp) / "data")
        val = TokenWindows(data_dir, "val", block_size)
        # our two sides seed by seed first: their paired difference is known before the recipe's runs start
        for seed in range(cfg.fidelity_seeds):
            for side, (variant, softmax) in {
                "ours": ("", "one shared row"),
                "independent": ("bench.train_with_independent_rows", "softmax over all"),
            }.items():
                run_dir = Path(tmp) / f"{side}{seed}"
                run = {**ours_run, "seed": seed, "data_dir": data_dir, "out_dir": tmp, "run_name": run_dir.name}
                stdout = run_train_py(run, variant)
                assert softmax in stdout, f"{side} did not take its softmax: {stdout[:2000]}"
                losses[side].append(val_loss(latest_checkpoint(run_dir), val, cfg.device))
                tokens_per_s = mean_tokens_per_s(run_dir)
                seconds_per_step[side].append(8 * block_size / tokens_per_s)
                print(f"fidelity, seed {seed}: {FIDELITY_SIDES[side]}: val loss {losses[side][-1]:.4f}", flush=True)
        for seed in range(cfg.fidelity_seeds):
            recipe_dir = Path(tmp) / f"recipe{seed}"
            recipe_settings = {**recipe_run, "seed": seed, "data_dir": str(data_dir), "out_dir": str(recipe_dir)}
            recipe = run_measured("recipe.recipe_train", json.dumps(recipe_settings))
            losses["recipe"].append(val_loss(recipe_dir, val, cfg.device))
            seconds_per_step["recipe"].append(8 * block_size / recipe["tokens_per_s"])
            print(f"fidelity, seed {seed}: {FIDELITY_SIDES['recipe']}: val loss {losses['recipe'][-1]:.4f}", flush=True)
    model = "124M" if cfg.full else "4x128"
    size = f"{model}, {block_size} tokens x 8, {cfg.fidelity_steps} steps, {cfg.fidelity_seeds} seeds"
    runs = {side: np.array(values) for side, values in losses.items()}
    for side, values in runs.items():
        print(
            f"fidelity ({size}): {FIDELITY_SIDES[side]}: val loss {values.mean():.4f} ± {values.std(ddof=1):.4f} "
            f"(mean ± sd), {np.mean(seconds_per_step[side]):.3f} s per step"
        )
    # Each difference's 95% confidence interval: Welch's t against the recipe (its own seeds draw other
    # streams); paired t between our two sides, which share each seed's data order, dropout and seen rows.
    comparisons = {
        ("ours", "recipe"): stats.ttest_ind(runs["ours"], runs["recipe"], equal_var=False),
        ("independent", "recipe"): stats.ttest_ind(runs["independent"], runs["recipe"], equal_var=False),
        ("ours", "independent"): stats.ttest_rel(runs["ours"], runs["independent"]),
    }
    rows = []
    for (side, reference), test in comparisons.items():
        interval = test.confidence_interval(0.95)
        difference = runs[side].mean() - runs[reference].mean()
        print(
            f"fidelity: {FIDELITY_SIDES[side]} - {FIDELITY_SIDES[reference]} = {difference:+.4f} "
            f"({difference / runs[reference].mean():+.2%}), 95% CI [{interval.low:+.4f}, {interval.high:+.4f}], "
            f"p = {test.pvalue:.3f} ({'paired' if reference != 'recipe' else 'Welch'})"
        )
        rows.append(
            {
                "what": f"fidelity val loss, {size}: {FIDELITY_SIDES[side]} vs {FIDELITY_SIDES[reference]}",
                "unit": "loss",
                "ours": runs[side].mean(),
                "reference": runs[reference].mean(),
                "ours_sd": runs[side].std(ddof=1),
                "reference_sd": runs[reference].std(ddof=1),
                "difference_ci95": [interval.low, interval.high],
                "ours_runs": runs[side].tolist(),
                "reference_runs": runs[reference].tolist(),
            }
        )
    steps_per_s = {side: 1 / np.mean(values) for side, values in seconds_per_step.items()}
    what = f"fidelity steps/s, {size}"
    return [*rows, {"what": what, "unit": "steps/s", "ours": steps_per_s["ours"], "reference": steps_per_s["recipe"]}]


SECTIONS["fidelity"] = bench_fidelity

# quickstart and optimizer: train.py's settings against each other (tuning.py).
SECTIONS["quickstart"] = bench_quickstart
SECTIONS["optimizer"] = bench_optimizer


# generate: generate.generate on a model with generate.use_onednn_linear applied (fp32, bf16, eager and
# with the decode step compiled) and the bare matvecs of one token, each against GPT2LMHeadModel.generate
# in fp32 on the same weights; batch 1, the recipe's sampling.
GENERATE_NEW_TOKENS = 100


def best_seconds(runs: dict, repeats: int, sync) -> dict:
    """Fastest of `repeats` timings of each run after an untimed warm-up round, interleaved so that a
    busy machine slows all alike."""
    best = dict.fromkeys(runs, float("inf"))
    for repeat in range(repeats + 1):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            sync()
            if repeat:
                best[name] = min(best[name], time.perf_counter() - started)
    return best


def bench_generate(cfg):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import tokenizer
    from generate import RECIPE_SAMPLING, compile_decode_step, decode_step, generate, use_onednn_linear
    from hf import config_from_hf, load_hf_state_dict
    from model import GPT

    cuda = cfg.device.startswith("cuda")
    size, shape = ("124M", {}) if cfg.full else ("small", dict(n_layer=4, n_head=4, n_embd=128))
    torch.manual_seed(0)
    # No eos: every run makes all GENERATE_NEW_TOKENS tokens.
    hf = GPT2LMHeadModel(GPT2Config(**shape, bos_token_id=None, eos_token_id=None)).to(cfg.device).eval()
    ours, decode = {}, {}
    for name, dtype in [
        ("fp32", torch.float32),
        ("bf16", torch.bfloat16),
        ("fp32 compiled", torch.float32),
        ("bf16 compiled", torch.bfloat16),
    ]:
        ours[name] = GPT(config_from_hf(hf.config.to_dict()))
        load_hf_state_dict(ours[name], hf.state_dict())
        use_onednn_linear(ours[name].to(cfg.device, dtype).eval())
        decode[name] = compile_decode_step(ours[name]) if name.endswith("compiled") else decode_step
    idx = torch.tensor([tokenizer.encode("I was telling her that")], device=cfg.device)
    runs = {
        "HF fp32": lambda: hf.generate(
            idx,
            attention_mask=torch.ones_like(idx),
            max_new_tokens=GENERATE_NEW_TOKENS,
            do_sample=True,
            **RECIPE_SAMPLING,
        )
    }
    for name, model in ours.items():
        runs[name] = lambda model=model, step=decode[name]: generate(
            model, idx, GENERATE_NEW_TOKENS, decode=step, **RECIPE_SAMPLING
        )
    # The machine's limit: one token's bare matrix-vector products, every linear layer of every block
    # and the output embedding, with nothing around them: through our OneDNNLinear (oneDNN on CPU), and in
    # fp32 also through F.linear (MKL on CPU), as HF's layers run them.
    for name in ("fp32", "bf16"):
        layers = [m for m in ours[name].modules() if isinstance(m, torch.nn.Linear)]
        inputs = [torch.randn(1, m.in_features, dtype=m.weight.dtype, device=cfg.device) for m in layers]
        runs[f"matvec limit {name}"] = lambda layers=layers, inputs=inputs: [
            m(x) for m, x in zip(layers, inputs, strict=True)
        ]
        if name == "fp32":
            runs["matvec limit fp32, F.linear"] = lambda layers=layers, inputs=inputs: [
                torch.nn.functional.linear(x, m.weight, m.bias) for m, x in zip(layers, inputs, strict=True)
            ]
    # Freezing while the first, untimed round compiles: prepacked weights (see generate.compile_decode_step).
    with torch.inference_mode(), torch._inductor.config.patch(freezing=True):
        seconds = best_seconds(runs, repeats=4, sync=torch.cuda.synchronize if cuda else lambda: None)
    tokens_per_s = {name: (1 if name.startswith("matvec") else GENERATE_NEW_TOKENS) / s for name, s in seconds.items()}
    reference = tokens_per_s.pop("HF fp32")
    return [
        {"what": f"generate {size}, {name}", "unit": "tok/s", "ours": rate, "reference": reference}
        for name, rate in tokens_per_s.items()
    ]


SECTIONS["generate"] = bench_generate


def main(argv):
    import torch

    cfg = configurator.parse_config(BenchConfig, argv)
    names = cfg.sections.split(",")
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise UserError(f"unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    if "fidelity" in names and (cfg.fidelity_seeds < 2 or cfg.fidelity_steps < 10):
        raise UserError(
            f"fidelity_seeds={cfg.fidelity_seeds}, fidelity_steps={cfg.fidelity_steps}: "
            "a spread needs >= 2 seeds per side, a timing >= 10 steps"
        )
    rows = []
    print(f"machine: {machine_name(cfg.device)}; torch {torch.__version__}")
    print(f"{'what':<80} {'unit':<10} {'ours':>12} {'reference':>12} {'ratio':>7}")
    for name in names:
        for row in SECTIONS[name](cfg):
            row["ratio"] = row["ours"] / row["reference"]
            rows.append(row)
            print(
                f"{row['what']:<80} {row['unit']:<10} {row['ours']:>12.5g} {row['reference']:>12.5g} "
                f"{row['ratio']:>6.3f}x"
            )
    with open(cfg.json_path, "w") as f:
        json.dump({"machine": machine_name(cfg.device), "config": asdict(cfg), "rows": rows}, f, indent=2)
    print(f"wrote {cfg.json_path}")


if __name__ == "__main__":
    configurator.run(main)
