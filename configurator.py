"""Command-line configuration shared by every script: `[config.py] [--key=value ...]`.

Defaults are the fields of a dataclass. An optional Python file (first argument) assigns some of
them as plain variables, then `--key=value` overrides are parsed against each field's type, so
`--lr=1` is a float, `--compile=False` a bool and `--start="a=b"` a string. Unlike nanoGPT's
configurator nothing on the command line is exec'd, and an unknown key or a bad value is a
one-line error that names the closest valid key.
"""

import dataclasses
import difflib
import runpy
import sys
import types
import typing
from pathlib import Path

TRUE_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class ConfigError(ValueError):
    pass


def _field_types(cls) -> dict[str, type]:
    """Maps each field to its base type; `int | None` becomes int (None is spelled `None`)."""
    hints = typing.get_type_hints(cls)
    types_by_name = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        types_by_name[f.name] = hint
    return types_by_name


def _unknown_key(key: str, valid) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def parse_value(key: str, text: str, kind: type, optional: bool):
    if optional and text == "None":
        return None
    try:
        if kind is bool:
            return TRUE_WORDS[text.lower()]
        if kind in (int, float, str):
            return kind(text)
    except (KeyError, ValueError):
        pass
    raise ConfigError(f"--{key}={text}: expected {kind.__name__}{' or None' if optional else ''}")


def check_type(key: str, value, kind: type, optional: bool):
    """Values from a config file are Python objects: accept an int for a float, nothing looser."""
    if value is None and optional:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"config key '{key}' = {value!r}: expected {kind.__name__}")


def parse_config(cls, argv: list[str]):
    """Builds `cls` from `[config_file.py] [--key=value | --flag ...]`."""
    kinds = _field_types(cls)
    optional = {f.name: f.default is None for f in dataclasses.fields(cls)}
    values = {}
    args = list(argv)
    if args and not args[0].startswith("--"):
        path = Path(args.pop(0))
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; pass an existing file such as config/austen.py")
        for key, value in runpy.run_path(str(path)).items():
            if key.startswith("_") or isinstance(value, types.ModuleType):
                continue
            if key not in kinds:
                raise _unknown_key(key, kinds)
            values[key] = check_type(key, value, kinds[key], optional[key])
    for arg in args:
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}'; use --key=value (a config file goes first)")
        key, has_value, text = arg[2:].partition("=")
        if key not in kinds:
            raise _unknown_key(key, kinds)
        if not has_value:
            if kinds[key] is not bool:
                raise ConfigError(f"--{key} needs a value: --{key}=...")
            text = "True"
        values[key] = parse_value(key, text, kinds[key], optional[key])
    return cls(**values)


def run(main):
    """Runs a script's main(); a user error (bad config, missing file) or a diverged run
    (FloatingPointError) is one line on stderr."""
    try:
        main(sys.argv[1:])
    except (ValueError, OSError, FloatingPointError) as e:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
