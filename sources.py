"""Reading inputs: finding the files --input names, decoding text as its byte-order mark says, checking and
reading JSONL and Parquet rows, and rows of Hugging Face Hub datasets. prepare.py reads its corpus here,
sample.py its prompt files; each function takes plain values (paths, names, the argument that named a file).

Files: --input takes a file, a glob, or a directory and all files under it but hidden ones, with
extensions in any case; local_files says how many files it reads and what it skips, and why.
Text is UTF-8 unless a byte-order mark says UTF-16 or UTF-32. Read as a corpus (text_file_pieces), a
file is streamed, undecodable bytes become U+FFFD (counted per file), and a file that is mostly NUL or
undecodable (binary, UTF-16 without a mark) is refused; read whole (read_text), undecodable bytes are an
error. Row files are checked before they are read together: .jsonl by a pass of pyarrow's parser
(every text a string), .parquet by its schema. A damaged file is one line naming it, and the line of a
.jsonl at fault.
"""

import codecs
import collections
import glob
import gzip
import itertools
import json
import logging
import os
import zlib
from pathlib import Path

from common import UserError, first_sentence

TEXT_SUFFIXES = (".txt", ".txt.gz")
ROW_FORMATS = {".jsonl": "json", ".parquet": "parquet"}  # the datasets builder for each
INPUT_KINDS = "a .txt, .txt.gz, .jsonl or .parquet file"
# The Hub's dataset viewer publishes every public dataset as Parquet on this branch, which load_dataset
# reads like any Parquet dataset: https://huggingface.co/docs/dataset-viewer/parquet
PARQUET_EXPORT = "refs/convert/parquet"
READ_BYTES = 1 << 20  # what text_file_pieces reads at a time
MAX_NOT_TEXT = 0.25  # a file with more NUL or undecodable characters than this share is refused: not text
# (mark, the encoding it announces as Python names it, the decoder of the bytes after the mark);
# UTF-32's marks before UTF-16's, which they start with
BYTE_ORDER_MARKS = [
    (codecs.BOM_UTF32_LE, "utf-32", codecs.utf_32_le_decode),
    (codecs.BOM_UTF32_BE, "utf-32", codecs.utf_32_be_decode),
    (codecs.BOM_UTF8, "utf-8-sig", codecs.utf_8_decode),
    (codecs.BOM_UTF16_LE, "utf-16", codecs.utf_16_le_decode),
    (codecs.BOM_UTF16_BE, "utf-16", codecs.utf_16_be_decode),
]
NO_MARK = (b"", "utf-8", codecs.utf_8_decode)


# ---- files -------------------------------------------------------------------------------------


def input_kind(path: Path) -> str | None:
    """'text' for .txt(.gz), the suffix for row files, in any case; None for files prepare does not read."""
    name = path.name.lower()
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return Path(name).suffix if Path(name).suffix in ROW_FORMATS else None


def input_stem(path: Path) -> str:
    """A file's name less the extension that makes it an input (.txt, .txt.gz, .jsonl, .parquet, in any case)."""
    suffix = next((s for s in (*TEXT_SUFFIXES, *ROW_FORMATS) if path.name.lower().endswith(s)), "")
    return path.name[: len(path.name) - len(suffix)]


def unlisted(error: OSError):
    raise UserError(
        f"cannot list {error.filename}: {error.strerror}; check its permissions, or leave it out of --input"
    )


def under(directory: Path, skipped: dict[str, list[Path]]) -> list[Path]:
    """The files under a directory, its subdirectories included, sorted. Hidden names (.git, .DS_Store) and
    links to directories (which may loop) are not followed: they go to skipped["hidden"] and
    skipped["links to directories"]."""
    found = []
    for parent, subdirectories, names in os.walk(directory, onerror=unlisted):  # does not descend into links
        skipped["hidden"].extend(Path(parent, name) for name in subdirectories + names if name.startswith("."))
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        skipped["links to directories"].extend(
            Path(parent, name) for name in subdirectories if os.path.islink(os.path.join(parent, name))
        )
        found.extend(Path(parent, name) for name in names if not name.startswith("."))
    return sorted(found)


def local_files(pattern: str) -> tuple[list[Path], str]:
    """The files --input names (a file, a glob, or a directory with all under it), and a line saying
    how many are read and which are skipped, and why: users see what their shards hold."""
    if any(c in pattern for c in "*?["):
        matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
    elif Path(pattern).exists():
        matches = [Path(pattern)]
    else:
        raise UserError(f"--input={pattern}: no such file or directory")
    skipped = {f"not {INPUT_KINDS}": [], "not regular files": [], "empty": [], "hidden": [], "links to directories": []}
    files = []
    for path in itertools.chain.from_iterable(under(p, skipped) if p.is_dir() else [p] for p in matches):
        if not input_kind(path):
            skipped[f"not {INPUT_KINDS}"].append(path)
        elif not path.is_file():  # a broken link, a device
            skipped["not regular files"].append(path)
        elif input_kind(path) != "text" and path.stat().st_size == 0:  # no rows, and datasets fails on it
            skipped["empty"].append(path)
        else:
            files.append(path)
    said = ", ".join(
        f"{len(paths)} {why} ({', '.join(path.name for path in paths[:3])}{', ...' * (len(paths) > 3)})"
        for why, paths in skipped.items()
        if paths
    )
    if not files:
        raise UserError(
            f"--input={pattern}: no .txt, .txt.gz, .jsonl or .parquet files there{f' (skipped {said})' * bool(said)}; "
            "pass a file, directory or glob that holds some"
        )
    kinds = {input_kind(path) for path in files}
    if len(kinds) > 1:
        raise UserError(f"--input={pattern} mixes text and row files; prepare one kind at a time")
    kind = "text" if kinds == {"text"} else kinds.pop().lstrip(".")
    summary = f"--input={pattern}: reading {len(files)} {kind} file{'s' * (len(files) != 1)}"
    return files, summary + f"; skipped {said}" * bool(said)


# ---- text --------------------------------------------------------------------------------------


def byte_order_mark(data: bytes) -> tuple[bytes, str, object]:
    """What the start of a text file announces: (its byte-order mark, the encoding as Python names it,
    the decoder of the bytes after the mark); without a mark, UTF-8."""
    return next((entry for entry in BYTE_ORDER_MARKS if data.startswith(entry[0])), NO_MARK)


def read_text(path: Path, arg: str) -> str:
    """A whole file's text (a prompt file, task rows), decoded as its byte-order mark says; undecodable
    bytes are an error. arg is the argument that named the file, for the errors."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{arg}: no such file; check the path") from None
    except IsADirectoryError:
        raise UserError(f"{arg} is a directory; pass a file") from None
    except OSError as e:
        raise UserError(f"{arg}: cannot read it ({e.strerror or e}); check that you may read it") from None
    encoding = byte_order_mark(data)[1]
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise UserError(
            f"{arg} is not {encoding.upper().removesuffix('-SIG')} text ({e.reason} at byte {e.start}); "
            "convert it to UTF-8"
        ) from None


def decode_replacing(decode, data: bytes, final: bool) -> tuple[str, int, int]:
    """decode(data) as errors="replace" decodes it, each undecodable sequence one U+FFFD: returns (text,
    bytes used, how many were replaced). Valid text decodes strictly at full speed; an error restarts
    the decoder after the sequence at fault, so a U+FFFD the text spells out itself is never counted."""
    view, parts, start = memoryview(data), [], 0
    while True:
        try:
            text, used = decode(view[start:], "strict", final)
        except UnicodeDecodeError as error:  # start and end are offsets into view[start:]
            parts += [decode(view[start : start + error.start], "strict", True)[0], "\ufffd"]
            start += error.end
            continue
        if not parts:
            return text, used, 0
        return "".join([*parts, text]), start + used, len(parts) // 2


def text_file_pieces(path: Path, replaced: collections.Counter):
    """Yields a file's text in pieces (of READ_BYTES read), decoded as its byte-order mark says.

    Undecodable bytes become U+FFFD, counted in replaced[str(path)]. A file whose text is more than
    MAX_NOT_TEXT NUL or undecodable characters is refused: binary data, UTF-16 without a mark, another encoding.
    """
    chars = not_text = 0
    try:
        with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb") as f:
            data = f.read(READ_BYTES)
            mark, encoding, decode = byte_order_mark(data)
            data, rest = data[len(mark) :], b""
            while True:
                buffer = rest + data if rest else data  # rest: a character cut by the previous read
                text, used, count = decode_replacing(decode, buffer, final=not data)
                rest = buffer[used:]
                if count:
                    replaced[str(path)] += count
                chars += len(text)
                not_text += count + (text.count("\x00") if "\x00" in text else 0)  # `in` is the faster scan
                if not_text > MAX_NOT_TEXT * chars:
                    raise UserError(
                        f"{path} is not {encoding.upper().removesuffix('-SIG')} text: {not_text:,} of its first "
                        f"{chars:,} characters are NUL or undecodable; convert it to UTF-8 (UTF-16 needs a "
                        "byte-order mark) or leave it out of --input"
                    )
                yield text
                if not data:
                    return
                data = f.read(READ_BYTES)
    except gzip.BadGzipFile as e:
        raise UserError(
            f"{path} is not gzip data ({e}); if it is plain text, rename it to .txt, "
            "else get it again or leave it out of --input"
        ) from None
    except (EOFError, zlib.error) as e:
        raise UserError(
            f"{path} is truncated or damaged gzip data ({e}); download or compress it again, or leave it out of --input"
        ) from None
    except OSError as e:
        raise UserError(f"reading {path} failed: {e.strerror or e}; check that it is a file you can read") from None


# ---- rows --------------------------------------------------------------------------------------


class BadJsonLine(ValueError):
    """A line of a JSONL file that is not JSON: its number (from 1) and the parser's error."""

    def __init__(self, number: int, error: ValueError):
        super().__init__(f"line {number}: {error}")
        self.number, self.error = number, error


def json_lines(lines):
    """Yields (number from 1, value) for each non-blank line of JSONL (str or bytes lines); raises
    BadJsonLine at the first line that is not JSON (or, bytes, not UTF-8)."""
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except ValueError as e:
                raise BadJsonLine(number, e) from None


def read_jsonl(path: Path, arg: str) -> list[tuple[int, dict]]:
    """A JSONL file's rows (JSON objects, blank lines skipped), read whole, each with its line number (from
    1, for the errors of those who check it); arg is the argument that named the file, for the errors."""
    rows = []
    try:
        for number, row in json_lines(read_text(path, arg).splitlines()):
            if not isinstance(row, dict):
                raise UserError(
                    f"{arg}, line {number}: a JSON {type(row).__name__}, not an object; write one JSON object per line"
                )
            rows.append((number, row))
    except BadJsonLine as e:
        raise UserError(f"{arg}, line {e.number}: not JSON ({e.error}); write one JSON object per line") from None
    return rows


def jsonl_problem(path: Path, text_column: str) -> tuple[str, bool]:
    """The error path of check_row_file: (the first line at fault, counted from 1, or "" if none), and whether
    the file has any rows. Python's json, a line at a time, names the line that pyarrow's error does not."""
    rows = 0
    with open(path, "rb") as f:
        try:
            for number, row in json_lines(f):
                rows += 1
                if not isinstance(row, dict):
                    return f"line {number} is not a JSON object", True
                if (value := row.get(text_column)) is not None and not isinstance(value, str):
                    return f"line {number}: '{text_column}' is {json.dumps(value)[:40]}, not a string", True
        except BadJsonLine as e:  # not JSON, or not UTF-8
            return f"line {e.number} is not JSON ({e.error})", True
    return "", rows > 0


def is_text_type(arrow_type) -> bool:
    import pyarrow as pa

    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_null(arrow_type)


def check_row_file(path: Path, text_column: str) -> None:
    """Refuses a row file that does not parse, or whose text is not strings, naming it (and the line): read
    with others, datasets casts a file's 12345 to "12345" after another file's strings, and it quotes every
    row as JSON in a file that mixes types. Parquet: the schema in its footer; .jsonl: a pass of pyarrow's parser."""
    import pyarrow as pa
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    if input_kind(path) == ".parquet":
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowException, OSError) as e:
            raise UserError(
                f"{path} is not a readable Parquet file ({e}); download or write it again, or leave it out of --input"
            ) from None
        if text_column not in schema.names:
            raise UserError(
                f"{path} has no column '{text_column}' (it has {', '.join(schema.names)}); pass --text_column=NAME"
            )
        if not is_text_type(schema.field(text_column).type):
            raise UserError(
                f"{path}: column '{text_column}' holds {schema.field(text_column).type}, not strings; "
                "pass --text_column=NAME of a column of strings"
            )
        return
    options = pj.ParseOptions(
        explicit_schema=pa.schema([(text_column, pa.string())]), unexpected_field_behavior="ignore"
    )
    try:
        for _ in pj.open_json(path, parse_options=options):
            pass
    except pa.ArrowInvalid as e:
        problem, has_rows = jsonl_problem(path, text_column)
        if problem or has_rows:  # pyarrow refuses a file of blank lines only, which holds no rows
            raise UserError(
                f"{path}: {problem or f'cannot be read as rows ({e})'}; fix the file or leave it out of --input"
            ) from None


# ---- the Hugging Face Hub ----------------------------------------------------------------------


def check_hub(repo: str, revision: str | None, hint: str) -> None:
    """Fails in a second when the Hub is unreachable, where load_dataset retries for ~25 s; the error
    ends with hint, the caller's way to work offline."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:  # datasets then reads its cache, or says it can't
        return
    try:
        HfApi().dataset_info(repo, revision=revision, timeout=10)
    except HfHubHTTPError as e:  # the Hub answered: no such dataset or revision, gated, ...
        raise UserError(f"--dataset={repo}: {first_sentence(e)}") from None
    except Exception as e:  # no answer; the transport's exception types vary across huggingface_hub versions
        raise UserError(f"cannot reach the Hugging Face Hub for {repo} ({type(e).__name__}: {e}); {hint}") from None


def load_rows(path: str, hint: str, **load_args):
    """datasets.load_dataset(path, **load_args): a Hub dataset, or a builder (json, parquet) over
    data_files. A Hub dataset is first checked reachable (check_hub); out of reach, the error ends with
    hint. A RuntimeError is a loading script, which datasets no longer runs."""
    if "data_files" not in load_args:
        check_hub(path, load_args.get("revision"), hint)
    import datasets  # slow to import: only for row files and the Hub

    logging.getLogger("datasets").setLevel(logging.CRITICAL)  # its log of a parse error repeats ours
    try:
        return datasets.load_dataset(path, **load_args)
    except ConnectionError as e:  # HF_HUB_OFFLINE=1 without a cached copy
        raise UserError(f"cannot reach the Hugging Face Hub for {path} ({e}); {hint}") from None


def hub_rows(repo: str, config: str | None, split: str, hint: str) -> list[dict]:
    """A Hub dataset's split as rows (dicts), through `datasets` (Parquet, cached); out of reach, a fast
    one-line error ending with hint."""
    return load_rows(repo, hint, name=config, split=split).to_list()


def row_texts(dataset, source: str, text_column: str):
    """Yields the text column in batches (a str or None per row) through Arrow, as datasets' default
    Python formatting goes row by row, far slower; refuses a column that is not strings."""
    import pyarrow as pa

    if dataset.column_names and text_column not in dataset.column_names:
        raise UserError(
            f"{source} has no column '{text_column}' (it has {', '.join(dataset.column_names)}); "
            "pass --text_column=NAME"
        )
    rows = 0
    try:
        for table in dataset.select_columns([text_column]).with_format("arrow").iter(batch_size=1000):
            column = table[text_column]
            if not is_text_type(column.type):  # datasets gives JSON of mixed types as JSON text, strings quoted
                raise UserError(
                    f"{source}: column '{text_column}' holds {column.type}, not strings (rows {rows + 1:,} on); "
                    "pass --text_column=NAME of a column of strings"
                )
            yield column.to_pylist()
            rows += len(table)
    except UserError:
        raise
    except (pa.ArrowException, ValueError) as e:  # what pyarrow and datasets raise for data that does not parse
        raise UserError(
            f"{source}: cannot be read as rows ({type(e).__name__}: {e}); the data is damaged, get it again"
        ) from None


def joined_rows(batches):
    """BookCorpus: rows are consecutive sentences of one running text, so they are joined with a space."""
    separator = ""
    for texts in batches:
        if text := " ".join(filter(None, texts)):
            yield separator + text
            separator = " "


def dataset_documents(
    path: str, source: str, text_column: str, sentences: bool, files: list[Path], hint: str, **load_args
):
    """Streams rows with `datasets`, from the Hub or (data_files) local row `files`, each checked first:
    a document per row, or (sentences) one document of them all; source names them in errors, and hint
    ends the error of a Hub out of reach.

    A generator, so nothing is imported, read or fetched until the text is needed.
    """
    for file in files:
        check_row_file(file, text_column)
    try:
        dataset = load_rows(path, hint, streaming=True, **load_args)
    except RuntimeError as e:  # a loading script, which datasets no longer runs
        raise UserError(f"--dataset={path}: {e}; its Parquet export may work: --revision={PARQUET_EXPORT}") from None
    batches = row_texts(dataset, source, text_column)
    if sentences:
        yield joined_rows(batches)
    else:
        yield from ([text] for texts in batches for text in texts if text)
