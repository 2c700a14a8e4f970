import json

import pytest

import tokenizer
from generate import generate
from hf import save_pretrained
from tokenizer import EOT_ID, VOCAB_SIZE, decode, encode, get_tokenizer


def test_known_ids():
    assert encode("Hello world") == [15496, 995]
    assert encode(" I was telling her that") == [314, 373, 5149, 607, 326]
    assert get_tokenizer().n_vocab == VOCAB_SIZE == 50257


def test_lossless_round_trip_on_hard_text():
    text = "Café naïve — Ünïcödé 🙂🚀 東京は晴れ。\t\n\n   spaces   and\r\nnewlines  ' s 's 1234567 ½"
    ids = encode(text)
    assert max(ids) < EOT_ID
    assert decode(ids) == text


def test_endoftext_handling():
    enc = get_tokenizer()
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT_ID]
    assert EOT_ID not in encode("a <|endoftext|> b")  # in ordinary text it is just text
    assert decode([EOT_ID]) == "<|endoftext|>"


def test_partial_utf8_decodes_without_error():
    ids = encode("🙂")
    assert len(ids) > 1  # an emoji spans several byte-level tokens
    assert decode(ids[:1]) == "\ufffd"


def test_damaged_ranks_file_is_refused(tmp_path, monkeypatch):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(tokenizer.RANKS_PATH.read_bytes()[:-10])
    monkeypatch.setattr(tokenizer, "RANKS_PATH", bad)
    tokenizer.get_tokenizer.cache_clear()
    try:
        with pytest.raises(ValueError, match="damaged"):
            get_tokenizer()
    finally:
        tokenizer.get_tokenizer.cache_clear()


HF_TEXTS = [
    "Hello world",
    "Café naïve — Ünïcödé 🙂🚀 東京は晴れ。\t\n\n   spaces   and\r\nnewlines  ' s 's 1234567 ½",
    "It's John's; they'll've we'RE I'M don't 'S",
    "   leading and trailing whitespace   \n\n",
    "digits 3.14159 2024-01-01 1,000,000 ١٢٣ ⅷ",
    "tabs\t\tand\u00a0no-break\u2003em spaces\n \n",
    "code: def f(x):\n    return x**2  # ok?!\n",
    "",
]


def test_hf_tokenizer_files_encode_and_decode_as_ours(tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_hf_tokenizer(tmp_path, model_max_length=64)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in HF_TEXTS:
        assert hf.encode(text) == encode(text), text
        assert hf.decode(encode(text)) == text
    assert hf.eos_token_id == hf.bos_token_id == EOT_ID
    assert len(hf) == VOCAB_SIZE
    assert hf.model_max_length == 64
    assert hf.decode([EOT_ID, *encode(" a")], skip_special_tokens=True) == " a"


def test_merges_are_in_rank_order(tmp_path):
    """merges.txt line i makes the token of id 256 + i, as in GPT-2's own file."""
    tokenizer.save_hf_tokenizer(tmp_path, model_max_length=1024)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + VOCAB_SIZE - 257
    assert merges[1] == "Ġ t" and vocab["Ġt"] == 256  # " t", the first merge
    assert all(vocab["".join(merge.split(" "))] == 256 + i for i, merge in enumerate(merges[1:]))


def test_a_model_directory_with_the_hf_files_generates_in_a_pipeline(tmp_path):
    """save_pretrained + save_hf_tokenizer + generation_config.json: HF's pipeline opens the directory
    as it is and continues a prompt greedily with our model's tokens."""
    import torch
    from transformers import pipeline

    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, dropout=0.0)).eval()
    save_pretrained(model, tmp_path)
    tokenizer.save_hf_tokenizer(tmp_path, model_max_length=64)
    (tmp_path / "generation_config.json").write_text(json.dumps(tokenizer.hf_generation_config()))
    prompt = "I was telling her that"
    ours = generate(model, torch.tensor([encode(prompt)]), max_new_tokens=8, do_sample=False)[0].tolist()
    generated = pipeline("text-generation", model=str(tmp_path), device="cpu")(
        prompt, max_new_tokens=8, do_sample=False, return_full_text=True
    )
    assert generated[0]["generated_text"] == decode(ours)
