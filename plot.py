"""Loss curves of a training run: train and val loss against tokens seen, as a PNG; below them, when the
run scored zero-shot tasks (train.py's tasks key), their metrics against tokens seen.

    python plot.py out/austen        # writes out/austen/loss.png (train.py does this at the end)
"""

import io
import json
from pathlib import Path

import configurator
from common import UserError, atomic_write_bytes


def plot_run(run_dir) -> Path:
    """Reads run_dir/metrics.jsonl and writes run_dir/loss.png; returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise UserError(f"{metrics_path} not found; pass a run directory written by train.py, e.g. out/austen")
    # A writer killed mid-line leaves a partial last line (train.py drops it when the run resumes).
    lines = metrics_path.read_text(encoding="utf-8").splitlines(keepends=True)
    records = [json.loads(line) for line in lines if line.endswith("\n") and line.strip()]
    curves = {
        "train": [(r["tokens"], r["loss"]) for r in records if "loss" in r],
        "val": [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r],
    }
    if not any(curves.values()):
        raise UserError(f"{metrics_path} has no losses yet; plot again after the first log step")
    tasks = task_curves(records)
    fig, axes = plt.subplots(2 if tasks else 1, figsize=(8, 9 if tasks else 5), squeeze=False)
    ax = axes[0, 0]
    for (label, points), style in zip(curves.items(), ("-", "o-"), strict=True):
        if points:
            tokens, losses = zip(*points, strict=True)
            ax.plot(tokens, losses, style, label=label)
    ax.set(
        xlabel="tokens seen",
        ylabel="loss (nats per token)",
        title=f"{run_dir.name}: final val loss " + (f"{curves['val'][-1][1]:.3f}" if curves["val"] else "-"),
    )
    ax.grid(alpha=0.3)
    ax.legend()
    if tasks:
        plot_tasks(axes[1, 0], tasks)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    out_path = run_dir / "loss.png"
    atomic_write_bytes(out_path, png.getvalue())  # a reader never sees half a PNG
    return out_path


def task_curves(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """The zero-shot task metrics of the eval records, train.py's "task/metric" keys: {key: [(tokens, value)]}."""
    curves = {}
    for record in records:
        for key, value in record.items():
            if "/" in key:
                curves.setdefault(key, []).append((record["tokens"], value))
    return curves


def plot_tasks(ax, curves: dict[str, list[tuple[int, float]]]) -> None:
    """Accuracies on ax (0 to 1), perplexities on a second y axis (log scale): they differ by orders of magnitude."""
    perplexity_ax = None
    for key, points in curves.items():
        tokens, values = zip(*points, strict=True)
        if key.endswith("/perplexity"):
            perplexity_ax = perplexity_ax or ax.twinx()
            perplexity_ax.plot(tokens, values, "s--", color="tab:red", label=key)
        else:
            ax.plot(tokens, values, "o-", label=key)
    ax.set(xlabel="tokens seen", ylabel="accuracy", title="zero-shot tasks (as lm-evaluation-harness scores them)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if perplexity_ax:
        perplexity_ax.set(ylabel="perplexity", yscale="log")
        more_handles, more_labels = perplexity_ax.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels)


def main(argv: list[str]) -> None:
    if argv in (["--help"], ["-h"]):
        print(f"usage: python plot.py RUN_DIR\n\n{__doc__.strip()}")
        return
    if len(argv) != 1:
        raise UserError("usage: python plot.py RUN_DIR (e.g. out/austen)")
    print(f"wrote {plot_run(argv[0])}")


if __name__ == "__main__":
    configurator.run(main)
