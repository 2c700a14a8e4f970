"""Command-line configuration shared by every script: `[config.py] [--key=value ...]`.

Defaults are the fields of a dataclass. An optional Python file (first argument) assigns some of
them as plain variables, then `--key=value` overrides are parsed against each field's type, so
`--lr=1` is a float, `--compile=False` a bool and `--start="a=b"` a string. Unlike nanoGPT's
configurator nothing on the command line is exec'd, and an unknown key or a bad value is a
one-line error that names the closest valid key.

UserError is the one exception for what the user can fix (a bad value, a missing file, the Hub out
of reach, a full disk); its message names the problem and the fix. run() prints it as one line and
lets everything else through with its traceback: a ValueError from a bug stays debuggable.
"""

import difflib
import runpy
import sys
import types
import typing
from pathlib import Path

from common import UserError

TRUE_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class ConfigError(UserError):
    """A bad config key or value."""


def _field_types(cls) -> dict[str, tuple[type, bool]]:
    """Maps each field to (base type, whether None is allowed): `int | None` is (int, True)."""
    types_by_name = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            types_by_name[name] = (next(arg for arg in args if arg is not type(None)), type(None) in args)
        else:
            types_by_name[name] = (hint, False)
    return types_by_name


def _unknown_key(key: str, valid) -> ConfigError:
    # A misspelling, or an abbreviation by initials as other trainers spell them (lr, wd, bs).
    initials = [name for name in valid if "".join(word[0] for word in name.split("_")) == key]
    close = difflib.get_close_matches(key, list(valid), n=1) or initials
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
    """Builds `cls` from `[config_file.py] [--key=value | --key value | --flag ...]`."""
    fields = _field_types(cls)
    values = {}
    args = list(argv)
    if args and not args[0].startswith("--"):
        path = Path(args.pop(0))
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; pass an existing file such as config/austen.py")
        for key, value in runpy.run_path(str(path)).items():
            if key.startswith("_") or isinstance(value, types.ModuleType):
                continue
            if key not in fields:
                raise _unknown_key(key, fields)
            values[key] = check_type(key, value, *fields[key])
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}'; use --key=value (a config file goes first)")
        key, has_value, text = arg[2:].partition("=")
        if key not in fields:
            raise _unknown_key(key, fields)
        if not has_value:  # `--key value` as argparse users type it, or a bare `--flag` for a bool
            if args and not args[0].startswith("--"):
                text = args.pop(0)
            elif fields[key][0] is bool:
                text = "True"
            else:
                raise ConfigError(f"--{key} needs a value: --{key}=VALUE or --{key} VALUE")
        values[key] = parse_value(key, text, *fields[key])
    return cls(**values)


def run(main):
    """Runs a script's main(): a UserError is one line on stderr (exit status 1), Ctrl-C exits with 130,
    and anything else propagates with its traceback."""
    try:
        main(sys.argv[1:])
    except UserError as e:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
