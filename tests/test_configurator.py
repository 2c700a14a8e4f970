import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import configurator
from common import UserError
from configurator import ConfigError, parse_config

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Muon:
    learning_rate: float = 0.1
    muon_learning_rate: float = 0.01
    muon_weight_decay: float = 0.0


@pytest.mark.parametrize("key, meant", [("muon_lr", "muon_learning_rate"), ("muon_wd", "muon_weight_decay")])
def test_a_key_abbreviated_word_by_word_is_suggested(key, meant):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'; did you mean '{meant}'"):
        parse_config(Muon, [f"--{key}=1"])


@dataclass
class Example:
    learning_rate: float = 0.1
    steps: int = 10
    compile: bool = False
    start: str = "hello"
    top_k: int | None = 10


def test_values_are_typed_against_the_defaults():
    cfg = parse_config(Example, ["--learning_rate=1", "--steps=3", "--compile=0", "--start=a=b", "--top_k=None"])
    assert cfg == Example(learning_rate=1.0, steps=3, compile=False, start="a=b", top_k=None)
    assert isinstance(cfg.learning_rate, float)


def test_space_separated_values_and_bare_flags():
    cfg = parse_config(Example, ["--start", "I was telling her that", "--compile", "--steps", "7"])
    assert cfg == Example(start="I was telling her that", compile=True, steps=7)
    assert parse_config(Example, ["--compile", "False"]).compile is False


def test_config_file_then_overrides(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("import math\nlearning_rate = 3\nsteps = 5\n_private = 1\n")
    assert parse_config(Example, [str(path), "--steps=6"]) == Example(learning_rate=3.0, steps=6)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr=1"], "unknown config key 'lr'; did you mean 'learning_rate'"),
        (["--xyz=1"], "valid keys: compile, learning_rate"),
        (["--learning_rat=1"], "did you mean 'learning_rate'"),
        (["--steps=1.5"], "expected int"),
        (["--compile=maybe"], "expected bool"),
        (["--steps"], "needs a value"),
        (["--steps=3", "extra"], "unexpected argument"),
        (["missing.py"], "not found"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(Example, argv)


def test_bad_config_file_values(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("steps = 'ten'\n")
    with pytest.raises(ConfigError, match="expected int"):
        parse_config(Example, [str(path)])
    path.write_text("stepz = 1\n")
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        parse_config(Example, [str(path)])


def test_run_prints_user_errors_as_one_line_and_keeps_other_tracebacks(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["script.py", "--x=1"])

    def main_raising(error):
        def main(argv):
            assert argv == ["--x=1"]
            raise error

        return main

    with pytest.raises(SystemExit) as exit_info:
        configurator.run(main_raising(UserError("--x=1: expected a path; pass --x=FILE")))
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "script.py: error: --x=1: expected a path; pass --x=FILE\n"
    assert issubclass(ConfigError, UserError) and issubclass(
        UserError, ValueError
    )  # callers catching ValueError still do
    with pytest.raises(SystemExit) as exit_info:
        configurator.run(main_raising(KeyboardInterrupt()))
    assert exit_info.value.code == 130
    for bug in (ValueError("a bug"), OSError("a bug"), ZeroDivisionError()):
        with pytest.raises(type(bug)):  # not SystemExit: the traceback survives
            configurator.run(main_raising(bug))


def run_prepare(code: str) -> subprocess.CompletedProcess:
    """prepare.py's command line (configurator.run(prepare.main)), after `code` ran in the same process."""
    script = f"import sys, configurator, prepare\n{code}\nsys.argv[0] = 'prepare.py'\nconfigurator.run(prepare.main)"
    return subprocess.run(
        [sys.executable, "-c", script, "--input=no/such/dir"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_a_user_mistake_is_one_line_on_stderr_and_a_bug_keeps_its_traceback():
    mistake = run_prepare("")
    assert mistake.returncode == 1 and mistake.stdout == ""
    assert mistake.stderr == "prepare.py: error: --input=no/such/dir: no such file or directory\n"
    # a bug inside the code (here: an internal function raising ValueError) is not dressed up as a user error
    bug = run_prepare("def broken(pattern):\n    raise ValueError('internal bug')\nprepare.local_files = broken")
    assert bug.returncode == 1
    assert "Traceback (most recent call last)" in bug.stderr and "in broken" in bug.stderr
    assert bug.stderr.rstrip().endswith("ValueError: internal bug")


@dataclass
class Documented:
    """An example."""

    # where
    data_dir: str = "data"  # where the shards are
    steps: int | None = None  # None: one epoch
    # how
    lr: float = 0.1  # the learning rate


def test_help_lists_each_key_with_its_type_default_and_meaning(capsys):
    assert configurator.field_help(Documented) == [
        ("where", "data_dir", "str", "where the shards are"),
        (None, "steps", "int | None", "None: one epoch"),
        ("how", "lr", "float", "the learning rate"),
    ]
    with pytest.raises(SystemExit) as exit_:
        parse_config(Documented, ["--steps=3", "-h"])
    assert exit_.value.code == 0
    assert "  --lr" in capsys.readouterr().out


@pytest.mark.parametrize(  # each flag on half the scripts: they share configurator's parser
    "script, flag",
    [("train.py", "--help"), ("prepare.py", "-h"), ("sample.py", "--help"), ("bench.py", "-h"), ("eval.py", "--help"),
     ("gpu_check.py", "-h")],
)  # fmt: skip
def test_every_script_answers_help_with_every_key_explained(script, flag):
    result = subprocess.run([sys.executable, script, flag], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr[-2000:]
    assert result.stdout.startswith(f"usage: python {script}")
    config_class = {"train.py": "TrainConfig", "prepare.py": "PrepareConfig", "sample.py": "SampleConfig",
                    "bench.py": "BenchConfig", "eval.py": "EvalConfig",
                    "gpu_check.py": "GpuCheckConfig"}[script]  # fmt: skip
    module = __import__(script.removesuffix(".py"))
    for _, key, _, meaning in configurator.field_help(getattr(module, config_class)):
        assert meaning, f"{script}: --{key} has no one-line meaning (a trailing comment on its field)"
        assert f"--{key} " in result.stdout


def test_plot_answers_help():
    result = subprocess.run([sys.executable, "plot.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "usage" in result.stdout.lower() and "plot.py" in result.stdout


def test_a_json_config_as_runs_record_it(tmp_path):
    path = tmp_path / "train_config.json"
    path.write_text('{"learning_rate": 1, "compile": true, "top_k": null, "start": "x"}')
    assert parse_config(Example, [str(path), "--steps=2"]) == Example(
        learning_rate=1.0, compile=True, top_k=None, start="x", steps=2
    )


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("cfg.json", '{"steps": 8', r"cfg.json is not valid JSON"),
        ("cfg.json", "[1, 2]", r"cfg.json holds a JSON list; it must be an object"),
        ("cfg.yaml", "steps: 8", r"cfg.yaml: expected a .py file of assignments or a .json object"),
        ("cfg.py", "steps = 8\nlearning_rate = (\n", r"cfg.py, line 2: .*; fix the Python there"),
        ("cfg.py", "steps = 8\n\nlearning_rate = false\n", r"cfg.py, line 3: NameError: name 'false' is not defined"),
        ("cfg.json", '{"steps": "8"}', r"config key 'steps' = '8': expected int"),
    ],
)
def test_config_files_that_cannot_be_read_are_one_line_errors(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse_config(Example, [str(path)])


def test_every_shipped_config_parses_and_the_muon_recipe_differs_from_the_recipe_only_in_its_optimizer():
    import dataclasses

    import train

    configs = {path.name: parse_config(train.TrainConfig, [str(path)]) for path in (ROOT / "config").glob("*.py")}
    assert {"austen.py", "bookcorpus.py", "bookcorpus_muon.py"} <= set(configs)
    recipe, muon = (dataclasses.asdict(configs[name]) for name in ("bookcorpus.py", "bookcorpus_muon.py"))
    differ = {key for key in recipe if recipe[key] != muon[key]}
    assert differ == {"run_name", "optimizer", "lr_decay", "max_steps"}
