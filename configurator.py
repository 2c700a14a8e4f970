"""Command-line configuration shared by every script: `[config.py] [--key=value ...]`.

Defaults are the fields of a dataclass. An optional config file (first argument) sets some of them:
a Python file as plain variables, or a JSON object such as the train_config.json a run records (so a
run can be re-run from it). Then `--key=value` overrides are parsed against each field's type, so
`--lr=1` is a float, `--compile=False` a bool and `--start="a=b"` a string. Unlike nanoGPT's
configurator nothing on the command line is exec'd, and an unknown key or a bad value is a
one-line error that names the closest valid key.

`--help` (or `-h`) lists every key with its type, default and meaning, read from the dataclass's
source: a field's trailing comment is its meaning, a comment on a line of its own heads the fields
below it. The help cannot drift from the keys.

run() prints a common.UserError as one line and lets everything else through with its traceback:
a ValueError from a bug stays debuggable.
"""

import ast
import dataclasses
import difflib
import inspect
import io
import json
import runpy
import sys
import tokenize
import traceback
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
    # A misspelling, or an abbreviation by initials as other trainers spell them (lr, wd, bs, muon_lr).
    initials = [name for name in valid if _abbreviates(key.split("_"), name.split("_"))]
    close = difflib.get_close_matches(key, list(valid), n=1) or initials
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _abbreviates(parts: list[str], words: list[str]) -> bool:
    """Whether parts spell words in order, each part one word whole or the initials of a run of them."""
    if not parts or not words:
        return not parts and not words
    return any(
        parts[0] in ("_".join(words[:n]), "".join(word[0] for word in words[:n])) and _abbreviates(parts[1:], words[n:])
        for n in range(1, len(words) + 1)
    )


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


def field_help(cls) -> list[tuple[str | None, str, str, str]]:
    """(section heading or None, key, type, meaning) for each field of the dataclass cls, in order,
    from the comments in its source."""
    source = inspect.getsource(cls)
    comments = {}  # line number -> (comment, whether code precedes it on its line)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = (token.string.lstrip("#").strip(), bool(token.line[: token.start[1]].strip()))
    rows, heading, next_line = [], None, 1
    for node in ast.parse(source).body[0].body:
        if not isinstance(node, ast.AnnAssign):
            continue
        for line in range(next_line, node.lineno):  # own-line comments above this field: a new section
            if line in comments and not comments[line][1]:
                heading = comments[line][0]
        meaning = next(
            (text for line, (text, trailing) in comments.items() if trailing and line == node.end_lineno), ""
        )
        rows.append((heading, node.target.id, ast.unparse(node.annotation), meaning))
        heading, next_line = None, node.end_lineno + 1
    return rows


def print_help(cls) -> None:
    """The script's summary and examples (the first two paragraphs of its module docstring), then the keys."""
    script_doc = inspect.getdoc(sys.modules[cls.__module__]) or ""
    print(f"usage: python {Path(sys.argv[0]).name} [config.py] [--key=value ...]\n")
    print("\n\n".join(script_doc.split("\n\n")[:2]))
    print("\nkeys (--key=value; a config.py assigns them as variables):")
    defaults = {
        f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default for f in dataclasses.fields(cls)
    }
    for heading, key, kind, meaning in field_help(cls):
        if heading:
            print(f"\n  {heading}")
        default = defaults[key] if isinstance(defaults[key], str) and defaults[key] else repr(defaults[key])
        print(f"  --{key:<22} {kind:<12} {default:<18} {meaning}".rstrip())


def read_config_file(path: Path) -> dict:
    """The keys a config file sets: a .py file's top-level variables (names starting with _ and imported
    modules left out), or a .json object such as the train_config.json a run records."""
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass an existing file such as config/austen.py")
    if path.suffix == ".json":
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is not valid JSON ({e}); fix it or pass a .py config") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} holds a JSON {type(values).__name__}; it must be an object of keys")
        return values
    if path.suffix != ".py":
        raise ConfigError(f"config file {path}: expected a .py file of assignments or a .json object of keys")
    try:
        variables = runpy.run_path(str(path))
    except SyntaxError as e:
        raise ConfigError(f"config file {path}, line {e.lineno}: {e.msg}; fix the Python there") from None
    except Exception as e:  # an undefined name, a failed import, ...: say where in the file
        line = next(
            (frame.lineno for frame in reversed(traceback.extract_tb(e.__traceback__)) if frame.filename == str(path)),
            "?",
        )
        raise ConfigError(f"config file {path}, line {line}: {type(e).__name__}: {e}; fix the Python there") from None
    return {k: v for k, v in variables.items() if not k.startswith("_") and not isinstance(v, types.ModuleType)}


def parse_config(cls, argv: list[str]):
    """Builds `cls` from `[config_file.py] [--key=value | --key value | --flag ...]`; --help or -h
    prints every key and exits with status 0."""
    if "--help" in argv or "-h" in argv:
        print_help(cls)
        sys.exit(0)
    fields = _field_types(cls)
    values = {}
    args = list(argv)
    if args and not args[0].startswith("--"):
        for key, value in read_config_file(Path(args.pop(0))).items():
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
    except UserError as e:  # one write: the lines of several ranks on one stderr stay whole
        sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {e}\n")
        sys.stderr.flush()
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
