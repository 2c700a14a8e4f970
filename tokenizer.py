"""The GPT-2 tokenizer, built offline from the BPE ranks shipped in assets/.

The ranks file is the one tiktoken downloads for its `gpt2` encoding, so ids are identical to
`tiktoken.get_encoding("gpt2")` and to Hugging Face's GPT-2 tokenizer, with no network access.
save_hf_tokenizer writes the same tokenizer in Hugging Face's files (vocab.json, merges.txt), so
that a checkpoint directory opens with AutoTokenizer without the Hub.
"""

import base64
import functools
import hashlib
import json
from pathlib import Path

import tiktoken

from common import UserError, atomic_write_bytes

RANKS_PATH = Path(__file__).parent / "assets" / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenizer split pattern (tiktoken's r50k_base / gpt2).
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """Returns the GPT-2 encoding; a damaged ranks file is a UserError naming the fix."""
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


def _byte_symbols() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, in which vocab.json and merges.txt spell tokens: the
    printable Latin-1 bytes stand for themselves, the other 68 for chr(256), chr(257), ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _merge_pair(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two tokens whose merge made token: BPE on its bytes, stopped at two parts. Every merge of a
    lower rank comes first, so the one left is the token's own."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        i = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], len(ranks)))
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


@functools.cache
def _vocab_and_merges() -> tuple[bytes, bytes]:
    """vocab.json (token -> id) and merges.txt (one merge per line, in rank order) of the bundled ranks."""
    encoding = get_tokenizer()
    ranks = {encoding.decode_single_token_bytes(rank): rank for rank in range(EOT_ID)}
    symbols = _byte_symbols()

    def spell(token: bytes) -> str:
        return "".join(symbols[b] for b in token)

    vocab = {spell(token): rank for token, rank in ranks.items()} | {EOT_TOKEN: EOT_ID}
    merges = [" ".join(map(spell, _merge_pair(token, ranks))) for token in ranks if len(token) > 1]
    return (
        json.dumps(vocab, ensure_ascii=False).encode(),
        ("#version: 0.2\n" + "\n".join(merges) + "\n").encode(),
    )


def save_hf_tokenizer(directory, model_max_length: int) -> None:
    """Writes vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into directory:
    AutoTokenizer.from_pretrained(directory) then encodes ordinary text as encode() does (it treats a
    literal "<|endoftext|>" as the special token, as HF's GPT-2 does) and decodes as decode() does
    (no clean-up of spaces before punctuation). model_max_length: the model's context, block_size."""
    vocab, merges = _vocab_and_merges()
    special = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN}
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        **special,
        "added_tokens_decoder": {
            str(EOT_ID): {
                "content": EOT_TOKEN,
                "lstrip": False,
                "normalized": True,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
        },
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "vocab.json": vocab,
        "merges.txt": merges,
        "tokenizer_config.json": (json.dumps(config, indent=2) + "\n").encode(),
        "special_tokens_map.json": (json.dumps(special, indent=2) + "\n").encode(),
    }
    for name, data in files.items():
        atomic_write_bytes(directory / name, data)


def hf_generation_config() -> dict:
    """The content of generation_config.json, as HF's gpt2 has it: generation starts and ends at <|endoftext|>."""
    return {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID}
