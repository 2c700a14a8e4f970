from dataclasses import dataclass

import pytest

from configurator import ConfigError, parse_config


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
