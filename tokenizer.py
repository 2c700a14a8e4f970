"""The GPT-2 tokenizer, built offline from the BPE ranks shipped in assets/.

The ranks file is the one tiktoken downloads for its `gpt2` encoding, so ids are identical to
`tiktoken.get_encoding("gpt2")` and to Hugging Face's GPT-2 tokenizer, with no network access.
"""

import base64
import functools
import hashlib
from pathlib import Path

import tiktoken

from common import UserError

RANKS_PATH = Path(__file__).parent / "assets" / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenizer split pattern (tiktoken's r50k_base / gpt2).
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """Returns the GPT-2 encoding; raises ValueError if the ranks file is damaged."""
    contents = RANKS_PATH.read_bytes()
    digest = hashlib.sha256(contents).hexdigest()
    if digest != RANKS_SHA256:
        raise UserError(
            f"{RANKS_PATH} is damaged (sha256 {digest[:12]}..., expected {RANKS_SHA256[:12]}...); "
            "restore it with `git checkout -- assets/gpt2.tiktoken`"
        )
    # Same parsing as tiktoken.load.load_tiktoken_bpe, which would also copy the file to a cache.
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in contents.splitlines())}
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_SPLIT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: EOT_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )


def encode(text: str) -> list[int]:
    """Encodes ordinary text; a literal "<|endoftext|>" in it is encoded as text, not as EOT."""
    return get_tokenizer().encode_ordinary(text)


def decode(ids) -> str:
    """Decodes ids; an incomplete UTF-8 sequence (e.g. half an emoji) becomes U+FFFD, never an error."""
    return get_tokenizer().decode(list(ids), errors="replace")
