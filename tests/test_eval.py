"""eval.py scores as lm-evaluation-harness does: the same random-init model and rows through lm-eval's HF
backend (the model saved as an HF directory with our tokenizer files, task configs pointing at local
JSONL rows) give the same log-likelihoods, accuracies and perplexity. Also: two ranks give one
process's scores, and a missing dataset or a bad value is a one-line error."""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import eval
import prepare
import sources
import tokenizer
import zero_shot
from common import UserError
from hf import from_pretrained, save_pretrained
from model import GPT, GPTConfig
from shards import TokenWindows

ROOT = Path(__file__).parent.parent
TINY = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, dropout=0.0)
LONG = " ".join(["The quick brown fox jumps over the lazy dog, again and again."] * 7)  # > 64 tokens

# Rowan/hellaswag's row format (label a string as on the Hub, or an int), with WikiHow's bracketed
# artifacts, a query left with a trailing space by preprocess (" [title]" -> ". "), and one item longer
# than the model's context.
HELLASWAG_ROWS = [
    {
        "ind": 4,
        "activity_label": "Removing ice from car",
        "ctx_a": "Then, the man writes over the snow covering the window of a car, and a woman smiles.",
        "ctx_b": "then",
        "ctx": "",
        "endings": [
            ", the man adds wax to the windshield and cuts it.",
            ", a person board a ski lift, while two men supporting the head of the person wearing winter clothes snow.",
            ", the man puts on a christmas coat, knitted with netting.",
            ", the man continues removing the snow on his car.",
        ],
        "source_id": "activitynet~v_-1IBHYS3L-Y",
        "split": "val",
        "split_type": "indomain",
        "label": "3",
    },
    {
        "ind": 5,
        "activity_label": "Home and Garden",
        "ctx_a": "[header] How to grow tomatoes [title] Pick a sunny spot.",
        "ctx_b": "you want at least six hours of light.  [step] Water deeply.",
        "ctx": "",
        "endings": [
            "[substeps] Mulch the soil around the plants.",
            "Buy a  car [title] Drive it.",
            "Tomatoes love shade and cold.",
            "Tomatoes are fruit, not vegetables 🍅.",
        ],
        "source_id": "wikihow~1",
        "split": "val",
        "split_type": "zeroshot",
        "label": "0",
    },
    {
        "ind": 6,
        "activity_label": "Personal Care and Style",
        "ctx_a": "[header] How to tie a tie [title] Drape the tie around your neck.",
        "ctx_b": "cross the wide end over the narrow end [title]",
        "ctx": "",
        "endings": ["Pull it tight.", "Then loop it up through the neck.", "Eat the tie.", "Tie it in 3 seconds!"],
        "source_id": "wikihow~2",
        "split": "val",
        "split_type": "zeroshot",
        "label": "1",
    },
    {
        "ind": 7,
        "activity_label": "Running a marathon",
        "ctx_a": LONG,
        "ctx_b": "and then",
        "ctx": "",
        "endings": ["it slept.", "it ran away quickly into the woods.", "nothing.", "the dog woke up"],
        "source_id": "activitynet~2",
        "split": "val",
        "split_type": "indomain",
        "label": 1,
    },
    {
        "ind": 8,
        "activity_label": "Playing piano",
        "ctx_a": "A girl sits at a piano. She plays a few notes.",
        "ctx_b": "she",
        "ctx": "",
        "endings": ["stops and laughs.", "plays a song   with both hands.", "eats the piano.", "is a piano."],
        "source_id": "activitynet~3",
        "split": "val",
        "split_type": "indomain",
        "label": "1",
    },
]
# EleutherAI/lambada_openai's row format: a passage whose last word is the target. One item is a single
# word (an empty context: lm-eval conditions on <|endoftext|>), one longer than the model's context, one
# that a random model with tied embeddings gets right (it tends to repeat its input token).
LAMBADA_ROWS = [
    {
        "text": "In my palm is a clear stone, and inside it is a small ivory statuette. A guardian angel.\n\n"
        '"Figured if you\'re going to be out at night getting hit by cars, you might as well have some backup."\n\n'
        "I look at him, feeling stunned. Like this is some sort of sign. But as I stare at Harlin, his mouth "
        "curved in a confident grin, I don't care about signs"
    },
    {"text": "Give me a minute to change and I'll meet you at the docks"},
    {"text": "Hello"},
    {"text": "the the the the"},
    {"text": LONG + " So the fox went home to its den"},
    {"text": "She said: “it's 1,234 miles,” and wasn't—it was 1,235 miles"},
]

# lm-eval's HF backend on the model directory (argv[1]) with the task configs in argv[2], as a JSON line:
# per task its metrics and each item's [[log-likelihood, greedy] per continuation]. Only our two task
# configs are indexed (indexing lm-eval's thousands takes seconds); batch_size=1 scores without padding.
LM_EVAL = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager

tasks = {"hellaswag_local": "hellaswag", "lambada_local": "lambada_openai"}
out = lm_eval.simple_evaluate(
    model="hf",
    model_args={"pretrained": sys.argv[1], "dtype": "float32"},
    tasks=list(tasks),
    task_manager=TaskManager(include_path=sys.argv[2], include_defaults=False),
    device="cpu",
    batch_size=1,
    bootstrap_iters=0,
    log_samples=True,
)
results = {}
for task, ours in tasks.items():
    metrics = out["results"][task].items()
    samples = sorted(out["samples"][task], key=lambda sample: sample["doc_id"])
    results[ours] = {
        "metrics": {k.removesuffix(",none"): v for k, v in metrics if k.endswith(",none") and "_stderr" not in k},
        "items": [[list(response) for response in sample["filtered_resps"]] for sample in samples],
    }
print(json.dumps(results))
"""


def lm_eval_tasks(directory: Path, hellaswag: Path, lambada: Path) -> None:
    """lm-eval's own task configs, included, with the rows from local JSONL files."""
    from lm_eval import tasks

    configs = Path(tasks.__file__).parent
    (directory / "hellaswag_local.yaml").write_text(
        f"include: {configs / 'hellaswag' / 'hellaswag.yaml'}\ntask: hellaswag_local\ndataset_path: json\n"
        f"training_split: null\ndataset_kwargs:\n  data_files:\n    validation: {hellaswag}\n"
    )
    (directory / "lambada_local.yaml").write_text(
        f"include: {configs / 'lambada' / 'lambada_openai.yaml'}\ntask: lambada_local\ndataset_path: json\n"
        f"dataset_name: null\ndataset_kwargs:\n  data_files:\n    test: {lambada}\n"
    )


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An HF model directory with our tokenizer files, and the rows of both tasks as JSONL."""
    directory = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    save_pretrained(GPT(TINY), directory / "ckpt")
    tokenizer.save_hf_tokenizer(directory / "ckpt", model_max_length=TINY.block_size)
    return {
        "ckpt": directory / "ckpt",
        "hellaswag": write_jsonl(directory / "hellaswag.jsonl", HELLASWAG_ROWS),
        "lambada_openai": write_jsonl(directory / "lambada.jsonl", LAMBADA_ROWS),
    }


def file_args(files) -> list[str]:
    return [
        f"--ckpt={files['ckpt']}",
        f"--hellaswag_file={files['hellaswag']}",
        f"--lambada_openai_file={files['lambada_openai']}",
        "--device=cpu",
    ]


@pytest.fixture(scope="module")
def ours(files) -> dict:
    """eval.py's JSON line, run in this process."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        eval.main(file_args(files))
    return json.loads(stdout.getvalue().splitlines()[-1])


def offline_env(tmp_path: Path, **env) -> dict:
    return {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", **env}


def test_scores_equal_lm_evaluation_harness(files, ours, tmp_path):
    # the long items are cut from the left: their tokens exceed the model's positions
    for name, row in [("hellaswag", HELLASWAG_ROWS[3]), ("lambada_openai", LAMBADA_ROWS[4])]:
        item = zero_shot.TASKS[name].item(row)
        assert len(tokenizer.encode(item.context + item.continuations[0])) > TINY.block_size + 1

    lm_eval_tasks(tmp_path, files["hellaswag"], files["lambada_openai"])
    script = tmp_path / "lm_eval_run.py"
    script.write_text(LM_EVAL)
    done = subprocess.run(
        [sys.executable, str(script), str(files["ckpt"]), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=offline_env(tmp_path, HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reference = json.loads(done.stdout.splitlines()[-1])

    model = from_pretrained(str(files["ckpt"]))
    for name, rows in [("hellaswag", HELLASWAG_ROWS), ("lambada_openai", LAMBADA_ROWS)]:
        items = reference[name]["items"]
        assert len(items) == len(rows)
        for row, expected in zip(rows, items, strict=True):  # each continuation's (log-likelihood, greedy)
            item = zero_shot.TASKS[name].item(row)
            loglikelihoods, greedy = zero_shot.score_candidates(
                model, zero_shot.candidates_of(item, TINY.block_size), "cpu"
            )
            assert loglikelihoods == pytest.approx([ll for ll, _ in expected], rel=1e-5, abs=1e-4)
            assert greedy == [is_greedy for _, is_greedy in expected]
        metrics = reference[name]["metrics"]
        assert ours[name].keys() == metrics.keys()
        for metric, value in metrics.items():
            assert ours[name][metric] == (pytest.approx(value, rel=1e-5) if metric == "perplexity" else value), metric
    assert 0 < ours["lambada_openai"]["acc"] < 1  # a greedy hit and misses: acc is tested both ways
    assert ours["hellaswag"]["acc"] != ours["hellaswag"]["acc_norm"]  # the length normalization changes answers


def test_two_ranks_give_one_process_scores(files, ours):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "eval.py"),
            *file_args(files),
            "--batch_tokens=256",  # other batches than the one process's
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    two_ranks = json.loads(done.stdout.splitlines()[-1])
    assert two_ranks.keys() == ours.keys()
    for name, metrics in ours.items():
        assert two_ranks[name] == pytest.approx(metrics, rel=1e-6), name
    assert done.stdout.count('{"hellaswag"') == 1  # rank 0 alone prints


@pytest.mark.parametrize("offline", ["0", "1"])
def test_hub_out_of_reach_is_one_line_naming_the_local_option(files, tmp_path, silent_hub, offline):
    """Out of reach, the Hub fails in check_hub, before datasets' own retries (~25 s) start; told it is
    offline, nothing reaches for the Hub."""
    endpoint, connections_made = silent_hub
    done = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), f"--ckpt={files['ckpt']}", "--tasks=lambada_openai,hellaswag"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=offline_env(tmp_path, HF_HUB_OFFLINE=offline, HF_ENDPOINT=endpoint),
    )
    if offline == "1":
        assert connections_made() == 0
    else:
        assert "cannot reach the Hugging Face Hub" in done.stderr, done.stderr
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("eval.py: error:"), done.stderr
    assert "--lambada_openai_file=PATH" in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks=hellaswag,winogrande"], "--tasks=hellaswag,winogrande: expected a comma-separated list"),
        (["--limit=0"], "--limit=0: expected a positive number"),
        (["--hellaswag_file=missing.jsonl", "--tasks=hellaswag"], "--hellaswag_file=missing.jsonl: no such file"),
    ],
)
def test_bad_values_are_user_errors(args, message):
    with pytest.raises(UserError, match=message):
        eval.main(["--device=cpu", *args])


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"n_embd": "32"}, 'config.json sets n_embd="32"; set it to a positive integer'),
        ({"n_head": 0}, "config.json sets n_head=0; set it to a positive integer"),
    ],
)
def test_a_hand_edited_checkpoint_config_is_one_line_naming_the_key(files, tmp_path, edit, message):
    shutil.copytree(files["ckpt"], tmp_path / "ckpt")
    config = tmp_path / "ckpt" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **edit}))
    with pytest.raises(UserError, match=message):
        eval.main([*file_args(files), f"--ckpt={tmp_path / 'ckpt'}", "--tasks=lambada_openai"])


def test_rows_of_another_dataset_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", LAMBADA_ROWS)
    with pytest.raises(UserError, match="line 1 lacks activity_label, ctx_a, ctx_b, endings, label"):
        zero_shot.load_items("hellaswag", str(path), None)


def test_limit_takes_the_first_items(files):
    items = zero_shot.load_items("lambada_openai", str(files["lambada_openai"]), 2)
    assert [item.continuations for item in items] == [[" signs"], [" docks"]]
    assert items[1].context == "Give me a minute to change and I'll meet you at the"


def test_limit_takes_the_first_val_windows(files, make_token_data, capsys):
    data_dir = make_token_data()
    eval.main([f"--ckpt={files['ckpt']}", "--tasks=val", f"--data_dir={data_dir}", "--limit=3", "--device=cpu"])
    out = capsys.readouterr()
    windows = TokenWindows(data_dir, "val", TINY.block_size)
    assert len(windows) > 3
    tokens = torch.from_numpy(windows.batch(np.arange(3)))
    _, loss = from_pretrained(str(files["ckpt"]))(tokens[:, :-1], tokens[:, 1:])  # the mean over 3 equal windows
    assert json.loads(out.out.splitlines()[-1])["val"]["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert "val: 3 items in" in out.err


def test_trailing_space_of_the_context_moves_to_the_continuation():
    item = zero_shot.hellaswag_item(HELLASWAG_ROWS[2])
    assert item.context.endswith(". ")  # preprocess left it there
    context, continuation = zero_shot.encode_pair(item.context, item.continuations[0])
    assert tokenizer.decode(context) == item.context[:-1]
    assert tokenizer.decode(continuation) == "  Pull it tight."


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device=gpu"], "device=gpu: not a device; use cpu, cuda"),
        (["--batch_tokens=0"], "--batch_tokens=0: expected a positive number"),
        (["--limit=-2"], "--limit=-2: expected a positive number"),
        (["--split=test"], "--split=test: prepare.py writes a train and a val split only; pass --split=val or train"),
        (["--block_size=0"], "--block_size=0: expected a positive number of tokens, or None"),
        (["--dist_timeout_minutes=inf"], "--dist_timeout_minutes=inf: expected a finite number above 0"),
    ],
)
def test_bad_values_are_refused_before_the_rows_are_read(args, message):
    """The rows file does not exist: an error about it would mean the value was checked too late."""
    with pytest.raises(UserError, match=message):
        eval.main(["--hellaswag_file=missing.jsonl", "--tasks=hellaswag", *args])


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "one"}\n[1, 2]\n', "line 2: a JSON list, not an object; write one JSON object per line"),
        ('{"text": 12345}\n', "line 1: text is not a string; expected EleutherAI/lambada_openai's rows"),
        ("caf\xe9 au lait\n".encode("latin-1"), "is not UTF-8 text .*at byte 3.*; convert it to UTF-8"),
    ],
)
def test_malformed_row_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "rows.jsonl"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    with pytest.raises(UserError, match=message):
        zero_shot.load_items("lambada_openai", str(path), None)


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("endings", "four endings", "line 1: endings is not a non-empty list of strings"),
        ("label", "three", "line 1: label is not an index"),
        ("ctx_a", None, "line 1: ctx_a is not a string"),
    ],
)
def test_hellaswag_rows_of_the_wrong_types_are_refused(tmp_path, column, value, message):
    path = write_jsonl(tmp_path / "rows.jsonl", [{**HELLASWAG_ROWS[0], column: value}])
    with pytest.raises(UserError, match=message):
        zero_shot.load_items("hellaswag", str(path), None)


def test_a_label_past_the_endings_is_refused_naming_its_line(files, tmp_path):
    """Scored, it would count as wrong; eval.py refuses it as train.py does. Blank lines count as lines."""
    path = tmp_path / "rows.jsonl"
    path.write_text(f"{json.dumps(HELLASWAG_ROWS[0])}\n\n{json.dumps({**HELLASWAG_ROWS[1], 'label': '4'})}\n")
    with pytest.raises(
        UserError, match=re.escape(f"--hellaswag_file={path}, line 3: label 4 names no ending (it has 4,")
    ):
        eval.main([*file_args(files), f"--hellaswag_file={path}", "--tasks=hellaswag"])


def test_a_directory_or_an_unreadable_file_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=f"--hellaswag_file={tmp_path} is a directory; pass a file"):
        zero_shot.load_items("hellaswag", str(tmp_path), None)
    path = write_jsonl(tmp_path / "rows.jsonl", HELLASWAG_ROWS)

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "read_bytes", denied)  # chmod 000 would not stop root
    with pytest.raises(UserError, match=f"--hellaswag_file={path}: cannot read it \\(Permission denied\\)"):
        zero_shot.load_items("hellaswag", str(path), None)


def test_hub_out_of_reach_ends_with_the_callers_hint(monkeypatch):
    """check_hub's error ends with the hint its caller passes, eval.py's own, never prepare.py's."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub for owner/name .*; work offline$"):
        sources.check_hub("owner/name", None, "work offline")
    with pytest.raises(UserError) as error:
        zero_shot.load_items("lambada_openai", None, None)
    assert prepare.OFFLINE_HINT not in str(error.value) and "--lambada_openai_file=PATH" in str(error.value)
    assert str(error.value).endswith(
        "; offline, pass --lambada_openai_file=PATH, a JSONL file of EleutherAI/lambada_openai's test rows"
    )
