"""What a training run reports: the console line, metrics.jsonl and wandb (Reporter), and the MFU it
reports, from nanoGPT's FLOP count and the GPUs' datasheet peaks."""

import json
import os
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch

from checkpoint import TrainerState, make_dir, then_resume, unwritable
from common import LOWER_LEARNING_RATE, UserError, atomic_write_bytes
from distributed import Job
from evaluator import EvalResult
from model import GPT

NONFINITE_STEPS_BEFORE_STOP = 5  # skipped steps in a row that end the run
# Dense bf16 tensor-core peak FLOP/s of one GPU (no sparsity), for MFU, from the vendor datasheets (which print
# the sparse figure, twice these): H100/H200 SXM 1,979 T sparse, PCIe 1,513, NVL 1,671; H800 as H100; GH200 as
# H100 SXM; B200 4.5 P sparse; A100 312 dense; L40S 362.05 dense; A10 125 dense; RTX 4090 165.2 dense (Ada
# whitepaper, fp32 accumulate). Keys are whole words of the device name; the longest that matches wins.
PEAK_BF16_FLOPS = {
    "H100": 989.4e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835.5e12,
    "H200": 989.4e12,
    "H200 NVL": 835.5e12,
    "H800": 989.4e12,
    "H800 PCIe": 756e12,
    "GH200": 989.4e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362.05e12,
    "A10": 125e12,
    "RTX 4090": 165.2e12,
}


class Reporter:
    """What the steps report, and when: the console line, metrics.jsonl and wandb of the log steps
    (mean loss, as the HF Trainer logs, grad norm, tokens/s, MFU, ETA) and of the evaluations, and
    the steps skipped for a non-finite loss or gradient (too many in a row stop the run), and the
    step whose update made weights non-finite (it stops the run, before anything saves them).

    The steps' (loss, grad norm, skipped, weights non-finite) stay on the device and are read back only
    in `read_back`, at the steps that log, evaluate or checkpoint. Rank 0 prints and records; every rank
    reads, so every rank stops alike. Used as a context manager: its wandb run finishes on the way out.
    """

    def __init__(
        self,
        job: Job,
        run_dir: Path,
        wandb_run,
        state: TrainerState,
        *,
        max_steps: int,
        log_interval: int,
        eval_interval: int,
        tokens_per_step: int,
        flops_per_token: float,
        memory: tuple[int, float] | None = None,
    ):
        """wandb_run: open_run's, on rank 0 (None elsewhere or when off); state: the run's as it starts;
        memory: (micro-batch, its predicted peak bytes) where choose_micro_batch measured them (a GPU)."""
        self._job, self._run_dir, self._wandb_run, self._max_steps = job, run_dir, wandb_run, max_steps
        self._log_interval, self._eval_interval = log_interval, eval_interval
        self._memory, self._steps_added = memory, 0
        self._flops_per_token, self._peak_flops = flops_per_token, peak_bf16_flops(job.device)
        self._tokens_per_step = tokens_per_step
        self.nonfinite_steps = state.nonfinite_steps  # skipped steps in the whole run
        self._in_a_row = 0
        self._unread = []  # (4,) device tensors of the steps since the last read
        self._finite = []  # (loss, grad norm) of the finite steps read since the last log line
        self._logged_step, self._seconds, self._clock_from = state.step, 0.0, time.perf_counter()
        self._samples = []  # [step, sample] of each eval, for wandb's table
        self.wandb_run_id = wandb_run.id if wandb_run else None  # what a checkpoint keeps to continue it

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc) -> None:
        if self._wandb_run:
            self._wandb_run.finish()

    def should_log(self, step: int) -> bool:
        return step % self._log_interval == 0 or step == self._max_steps

    def should_evaluate(self, step: int) -> bool:
        return step % self._eval_interval == 0 or step == self._max_steps

    def add_step(self, result: torch.Tensor) -> None:
        """A step's (loss, grad norm, skipped, weights non-finite) as train_step returns it, unread. After this
        process's second step (the optimizer's state is allocated by then), the peak memory against the
        prediction."""
        self._unread.append(result)
        self._steps_added += 1
        if self._memory and self._steps_added == 2:
            micro_batch_size, predicted_peak = self._memory
            self._job.announce(
                f"memory: peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB in the first steps, "
                f"{predicted_peak / 2**30:.1f} GiB predicted for micro-batch {micro_batch_size}"
            )

    @contextmanager
    def read_back(self, step: int):
        """Reads the steps up to `step` (waiting for the device, which ends their training time), records
        each skipped one and raises after too many in a row or at non-finite weights; the block's time
        (logging, evaluating, saving) is not training time."""
        results = torch.stack(self._unread).tolist() if self._unread else []
        self._unread = []
        self._seconds += time.perf_counter() - self._clock_from
        for s, (loss, grad_norm, skipped, weights_broken) in enumerate(results, start=step - len(results) + 1):
            if weights_broken:
                raise UserError(
                    f"step {s}: its update left weights holding inf or NaN, or near it (loss {loss:.4g}, grad norm "
                    f"{grad_norm:.4g}), so the run stops here; " + self._then_resume(LOWER_LEARNING_RATE)
                )
            if skipped:
                self._skipped(s, loss, grad_norm)
            else:
                self._in_a_row = 0
                self._finite.append((loss, grad_norm))
        yield
        self._clock_from = time.perf_counter()

    def _skipped(self, step: int, loss: float, grad_norm: float) -> None:
        self.nonfinite_steps += 1
        self._in_a_row += 1
        if self._job.rank == 0:
            skipped = f"step skipped ({self._in_a_row} in a row)"
            print(f"step {step}: non-finite loss {loss} or grad norm {grad_norm}; {skipped}", flush=True)
            self._record(step, {"skipped": "non-finite loss", "nonfinite_steps": self.nonfinite_steps})
        if self._in_a_row == NONFINITE_STEPS_BEFORE_STOP:
            raise UserError(
                f"loss was non-finite for {self._in_a_row} steps in a row (up to step {step}); "
                + self._then_resume(f"{LOWER_LEARNING_RATE} or check the data")
            )

    def _then_resume(self, fix: str) -> str:
        """checkpoint.then_resume, worked out on rank 0 alone: it verifies checkpoints, reading every byte."""
        return self._job.on_rank0(lambda: then_resume(self._run_dir, fix), share=True)

    def log(self, step: int, lr: float, muon_lr: float | None = None) -> None:
        """The log line and record of the steps read since the last one; none while all of them were skipped.
        lr: AdamW's at this step; muon_lr: Muon's, with optimizer='muon'."""
        if not self._finite:
            return
        losses, grad_norms = zip(*self._finite, strict=True)
        steps, seconds = step - self._logged_step, self._seconds
        self._finite, self._logged_step, self._seconds = [], step, 0.0
        loss, grad_norm = sum(losses) / len(losses), grad_norms[-1]
        tokens_per_s = steps * self._tokens_per_step / seconds
        mfu = (
            self._flops_per_token * tokens_per_s / self._job.world_size / self._peak_flops if self._peak_flops else None
        )
        eta = timedelta(seconds=round((self._max_steps - step) * seconds / steps))
        self._job.announce(
            f"step {step}/{self._max_steps} | loss {loss:.4f} | lr {lr:.2e}"
            + (f" (Muon {muon_lr:.2e})" if muon_lr is not None else "")
            + f" | grad norm {grad_norm:.3f} | "
            f"{tokens_per_s:,.0f} tok/s | MFU {f'{mfu:.1%}' if mfu else '-'} | ETA {eta}"
        )
        if self._job.rank == 0:
            metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "mfu": mfu}
            if muon_lr is not None:
                metrics["muon_lr"] = muon_lr
            self._record(step, {**metrics, "nonfinite_steps": self.nonfinite_steps})

    def log_changes(self, step: int, changes: dict) -> None:
        """What a resumed run changed of the checkpoint's optimization ({key: [checkpoint's, this run's]}),
        printed and recorded: from this step on the run's own values apply."""
        if not changes:
            return
        listed = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changes.items() if key != "lr")
        old_lr, new_lr = changes["lr"]
        self._job.announce(
            f"resumed with changes: {listed}; they apply from step {step + 1} on, the schedule continuing from step "
            f"{step} (lr {old_lr:.3e} -> {new_lr:.3e})"
        )
        if self._job.rank == 0:
            self._record(step, {"resumed_with_changes": changes})

    def log_eval(self, step: int, result: EvalResult) -> None:
        self._job.announce(f"step {step}: {result.describe()}")
        if self._job.rank == 0:
            self._record(step, result.record())

    def _record(self, step: int, metrics: dict) -> None:
        metrics = {"step": step, "tokens": step * self._tokens_per_step, **metrics}
        try:
            with open(self._run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
        except OSError as e:
            raise unwritable(self._run_dir, e) from None
        if self._wandb_run:
            self._wandb_run.log(self._for_wandb(step, metrics), step=step)

    def _for_wandb(self, step: int, metrics: dict) -> dict:
        """metrics with a sample as a table of every sample of this process, one row per eval step."""
        if "sample" not in metrics:
            return metrics
        import wandb

        self._samples.append([step, metrics["sample"]])
        return {**metrics, "sample": wandb.Table(columns=["step", "sample"], data=self._samples)}


def flops_per_token(model: GPT, block_size: int) -> float:
    """nanoGPT's estimate: 6 flops per parameter per token (forward + backward) plus attention over the full
    T x T scores (12 * n_layer * n_embd * block_size); position embeddings are lookups, not matmuls. Tools that
    count causal attention only (half the scores, as llm.c does) report a lower MFU for the same tokens/s, so
    across tools compare tokens/s. A compact softmax's output layer counts the columns it computes."""
    config = model.config
    columns = len(model.compact_vocab.column_rows) if model.compact_vocab else config.vocab_size  # the output layer's
    skipped = (config.vocab_size - columns) * config.n_embd
    matmul_params = model.num_params() - model.transformer.wpe.weight.numel() - skipped
    return 6 * matmul_params + 12 * config.n_layer * config.n_embd * block_size


def peak_bf16_flops(device: str) -> float | None:
    """The dense bf16 peak of the GPU (PEAK_BF16_FLOPS), None on a CPU or an unlisted GPU."""
    if not device.startswith("cuda"):
        return None
    return peak_bf16_flops_of(torch.cuda.get_device_name(device))


def peak_bf16_flops_of(device_name: str) -> float | None:
    """PEAK_BF16_FLOPS of the longest key that is whole words of device_name ("NVIDIA H100 NVL" -> "H100 NVL",
    "NVIDIA A100-SXM4-80GB" -> "A100", "NVIDIA A10G" -> None); None if no key is."""
    words = f" {' '.join(device_name.replace('-', ' ').split())} "
    matches = [name for name in PEAK_BF16_FLOPS if f" {name} " in words]
    return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None


def truncate_metrics(path: Path, step: int) -> None:
    """Drops the records after `step`: they come from an attempt that died before its next checkpoint."""
    if path.exists():
        kept = []
        for number, line in enumerate(path.read_text().splitlines(keepends=True), start=1):
            if not line.endswith("\n"):  # the partial last line of a killed writer
                continue
            try:
                record_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                raise UserError(
                    f"{path}, line {number}: not a metrics record; fix or remove that line, then resume again"
                ) from None
            if record_step <= step:
                kept.append(line)
        atomic_write_bytes(path, "".join(kept).encode())


def start_wandb(project: str, name: str, config: dict, run_id: str | None):
    import wandb

    if os.environ.get("WANDB_MODE") not in ("offline", "disabled") and not wandb.login(prompt=False, verify=False):
        raise UserError(
            "wandb_log=True but wandb has no API key; run `wandb login`, set WANDB_API_KEY, "
            "or log locally with WANDB_MODE=offline"
        )
    try:
        return wandb.init(project=project, name=name, id=run_id, resume="allow", config=config)
    except Exception as e:  # wandb raises many types (network, auth, server)
        raise UserError(
            f"wandb could not start a run ({type(e).__name__}: {e}); "
            "log locally with WANDB_MODE=offline and `wandb sync` later"
        ) from None


def open_run(
    run_dir: Path, config: dict, start_step: int, wandb_project: str | None, run_name: str, wandb_run_id: str | None
):
    """Rank 0, before any step: the run directory, its config (train_config.json) and metrics as of
    start_step, and the wandb run run_name of wandb_project (None: off), continuing wandb_run_id if set."""
    make_dir(run_dir)
    try:
        atomic_write_bytes(run_dir / "train_config.json", (json.dumps(config, indent=2) + "\n").encode())
        truncate_metrics(run_dir / "metrics.jsonl", start_step)
    except OSError as e:
        raise unwritable(run_dir, e) from None
    return start_wandb(wandb_project, run_name, config, wandb_run_id) if wandb_project else None
