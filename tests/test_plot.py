"""plot.py: the loss curves of a run."""

import json

import pytest

from common import UserError
from plot import plot_run


def test_a_partial_last_line_left_by_a_killed_writer_is_skipped(tmp_path):
    records = [{"step": 1, "tokens": 100, "loss": 5.0}, {"step": 2, "tokens": 200, "loss": 4.5, "val_loss": 4.6}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 3, "tok')
    assert plot_run(tmp_path).read_bytes()[:4] == b"\x89PNG"


def test_a_run_without_metrics_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="metrics.jsonl not found; pass a run directory"):
        plot_run(tmp_path)


def png_height(path) -> int:
    return int.from_bytes(path.read_bytes()[20:24], "big")  # the IHDR chunk: width, then height


def test_task_metrics_get_a_panel_of_their_own_only_when_present(tmp_path):
    records = [{"step": 1, "tokens": 100, "loss": 5.0}, {"step": 2, "tokens": 200, "val_loss": 4.6, "sample": "I was"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    alone = png_height(plot_run(tmp_path))
    records[1] |= {"hellaswag/acc": 0.26, "hellaswag/acc_norm": 0.27, "lambada_openai/perplexity": 4000.0}
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert png_height(plot_run(tmp_path)) > 1.5 * alone
