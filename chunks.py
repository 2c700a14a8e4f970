"""Cutting text into chunks and assigning each to the train or val split: prepare.py's tokenizer tasks.

Validation: the text goes in chunks of ~block_chars characters (small documents whole, large ones cut
before a space between two non-space characters, where GPT-2's pre-tokenizer splits anyway, so tokens
are exactly those of the whole document; text with no such space for a whole chunk, as a long URL, is
cut at the chunk's end, where its tokens may differ). Each chunk is held out with probability val_fraction, drawn
from a generator seeded with `seed`; the first chunk always trains. Chunks are contiguous text, so
nothing is in both splits; text that resumes after the other split's chunks starts with <|endoftext|>.

The share held out suits the input's size, which a stream does not tell up front; two rules settle it
in one pass, in bounded memory:
- Read-ahead: the first MIN_CHUNKS chunks are read before any is assigned. An input that ends within
  them is small, and wholly in memory: it is cut again into MIN_CHUNKS chunks of equal size.
- Fallback: when the input ends with less than half a chunk held out, the last chunk is held out,
  and the one before it too if the last is under half a chunk (the last two chunks wait for this).
So a small input holds out a few percent of itself, a larger one at least half a chunk, and one of
~1/val_fraction chunks or more about val_fraction, from the draws (BENCHMARKS.md has the shares at the
defaults). Inputs under MIN_CHARS are refused. The read-ahead holds at most MIN_CHUNKS chunks; inputs
of MIN_CHUNKS chunks or more are cut and drawn with the read-ahead changing nothing.
"""

import collections
import itertools
import random
from typing import NamedTuple

from common import UserError

MIN_CHUNKS = 16  # an input of fewer chunks is cut into this many smaller ones (see the docstring)
MIN_CHARS = 4096  # ~1k tokens: less cannot give both splits something to work with
# the smallest chunk the read-ahead cuts, and the smallest block_chars: dozens of spaces to cut at in prose
MIN_BLOCK_CHARS = MIN_CHARS // MIN_CHUNKS


class Unit(NamedTuple):
    """A chunk, numbered in input order and assigned to a split: one tokenizer task."""

    index: int
    split: str
    pieces: list[tuple[bool, str]]  # (starts with <|endoftext|>, text)


def safe_cut(text: str, start: int, end: int) -> int:
    """The last index in (start, end) of a space between two non-space characters, else end."""
    i = text.rfind(" ", start + 1, end)
    while i > start and (text[i - 1].isspace() or i + 1 == len(text) or text[i + 1].isspace()):
        i = text.rfind(" ", start + 1, i)
    return i if i > start else end


def cut_chunks(documents, chunk_chars: int):
    """Yields chunks of about chunk_chars characters, as lists of (starts_document, text).

    Small documents share a chunk (fewer, larger tokenizer tasks); a large one is cut into several.
    """
    chunk, size = [], 0  # the documents that ended since the last chunk
    for document in documents:
        rest, starts_document = "", True
        for piece in document:
            text, start = rest + piece, 0
            while size + len(text) - start >= chunk_chars:
                if chunk:  # cut between documents rather than inside this one
                    yield chunk
                    chunk, size = [], 0
                    continue
                cut = safe_cut(text, start, start + chunk_chars)
                yield [(starts_document, text[start:cut])]
                starts_document, start = False, cut
            rest = text[start:]
        if rest:
            chunk.append((starts_document, rest))
            size += len(rest)
    if chunk:
        yield chunk


def chunk_chars_of(chunk) -> int:
    return sum(len(text) for _, text in chunk)


def documents_of(chunks):
    """The documents that cut_chunks cut these chunks from, each as a list of pieces."""
    document = []
    for chunk in chunks:
        for starts_document, text in chunk:
            if starts_document and document:
                yield document
                document = []
            document.append(text)
    if document:
        yield document


def sized_chunks(documents, chunk_chars: int):
    """cut_chunks at a length that suits the input's size (the docstring's read-ahead); returns (chunks, length)."""
    chunks = cut_chunks(documents, chunk_chars)
    head = list(itertools.islice(chunks, MIN_CHUNKS))
    if len(head) == MIN_CHUNKS:
        return itertools.chain(head, chunks), chunk_chars
    chars = sum(map(chunk_chars_of, head))
    if chars == 0:
        raise UserError("the input has no text; check the files (or --text_column)")
    if chars < MIN_CHARS:
        raise UserError(
            f"the input has {chars:,} characters, too little to hold out validation text; "
            f"prepare at least {MIN_CHARS:,}"
        )
    small = -(-chars // MIN_CHUNKS)
    return cut_chunks(documents_of(head), small), small


def held_out_chunks(chunks, chunk_chars: int, val_fraction: float, seed: int):
    """Yields (chunk, whether it is held out): the seeded draws, then the docstring's fallback."""
    rng = random.Random(seed)
    last_two = collections.deque()  # [index, chunk, held out], still open to the fallback
    held_out_chars = 0
    for index, chunk in enumerate(chunks):
        held_out = rng.random() < val_fraction and index > 0
        held_out_chars += held_out * chunk_chars_of(chunk)
        last_two.append([index, chunk, held_out])
        if len(last_two) > 2:
            yield last_two.popleft()[1:]
    for entry in reversed(last_two):
        index, chunk, held_out = entry
        if held_out_chars >= chunk_chars / 2 or index == 0:
            break
        if not held_out:
            entry[2] = True
            held_out_chars += chunk_chars_of(chunk)
    yield from (entry[1:] for entry in last_two)


def split_chunks(chunks, chunk_chars: int, val_fraction: float, seed: int):
    """Numbers the chunks and assigns each to a split, as the module docstring says."""
    previous_split = None
    for index, (chunk, held_out) in enumerate(held_out_chunks(chunks, chunk_chars, val_fraction, seed)):
        split = "val" if held_out else "train"
        (starts_document, text), *others = chunk
        yield Unit(index, split, [(starts_document or split != previous_split, text), *others])
        previous_split = split
