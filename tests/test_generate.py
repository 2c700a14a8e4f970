"""Generation: KV-cached decoding equals a full recompute, and its tokens equal HF generate's."""

import pytest
import torch
from test_model import make_pair, tokens
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from generate import (
    ONEDNN_LINEAR,
    OneDNNLinear,
    compile_decode_step,
    decode_mask,
    decode_step,
    generate,
    sample_next_token,
    use_onednn_linear,
)
from model import GPT, GPTConfig

# No bos/eos: HF would stop at its default eos (50256), which this vocabulary lacks anyway.
SMALL = dict(n_layer=2, n_head=3, n_embd=48, n_positions=128, vocab_size=101, bos_token_id=None, eos_token_id=None)
RECIPE = dict(do_sample=True, top_k=10, top_p=0.95)


def hf_generate(hf, idx, max_new_tokens, seed, attention_mask=None, **sampling):
    """HF generate with every default pinned: top_k=0 stands for our None (HF's default is 50)."""
    torch.manual_seed(seed)
    sampling.setdefault("top_k", 0)
    attention_mask = torch.ones_like(idx) if attention_mask is None else attention_mask
    return hf.generate(idx, attention_mask=attention_mask, max_new_tokens=max_new_tokens, **sampling)


def our_generate(ours, idx, max_new_tokens, seed, **sampling):
    torch.manual_seed(seed)
    return generate(ours, idx, max_new_tokens, **sampling)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Decoding is a chain of small ops; between threads they wait on each other, and on a busy
    2-core machine those waits (mostly in HF's many small ops) made these tests 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_pair():
    hf, ours = make_pair(**SMALL)
    return hf.eval(), ours.eval()


def test_cached_logits_equal_full_recompute(small_pair):
    _, ours = small_pair
    seq = tokens(101, 2, 40)
    prompt_len = 5
    ours.setup_kv_cache(2, 40)
    with torch.no_grad():
        full = ours(seq)[0]  # (2, 40, vocab)
        mask, _ = decode_mask(torch.arange(prompt_len), 40, torch.float32)
        prefill = ours(seq[:, :prompt_len], input_pos=torch.arange(prompt_len), mask=mask)[0]
        assert prefill.shape == (2, 1, 101)
        assert (prefill[:, 0] - full[:, prompt_len - 1]).abs().max() < 1e-5
        for pos in range(prompt_len, 40):
            step = decode_step(ours, seq[:, pos : pos + 1], torch.tensor([pos]))
            assert (step - full[:, pos]).abs().max() < 1e-5, pos
    ours.clear_kv_cache()


@pytest.mark.parametrize(
    "sampling",
    [
        RECIPE,
        dict(do_sample=False),
        dict(do_sample=True, temperature=0.7, top_p=0.9),
        dict(do_sample=True, temperature=1.3, top_k=5),
    ],
    ids=["recipe", "greedy", "temperature-top_p", "temperature-top_k"],
)
def test_tokens_equal_hf_generate_small(small_pair, sampling):
    hf, ours = small_pair
    idx = tokens(101, 3, 7)  # a batch of three prompts
    ref = hf_generate(hf, idx, 100, seed=3, **sampling)
    got = our_generate(ours, idx, 100, seed=3, **sampling)
    assert got.shape == (3, 107)
    assert torch.equal(got, ref)


def test_tokens_equal_hf_generate_full_config():
    torch.manual_seed(0)
    hf, ours = make_pair()  # GPT2Config(): 124M, eos 50256
    hf.eval(), ours.eval()
    idx = tokens(50256, 1, 8)  # no eos in the prompt: HF would mask it out as padding
    for sampling, new in [(RECIPE, 24), (dict(do_sample=False), 8)]:
        ref = hf_generate(hf, idx, new, seed=5, **sampling)
        got = our_generate(ours, idx, new, seed=5, eos_token_id=50256, **sampling)
        assert torch.equal(got, ref), sampling


def test_finished_sequences_emit_eos_and_generation_stops_early():
    # 11 tokens at temperature 3: eos (token 0) comes soon in every row
    hf, ours = make_pair(**{**SMALL, "vocab_size": 11, "eos_token_id": 0})
    hf.eval(), ours.eval()
    idx = tokens(11, 4, 3).clamp(min=1)
    ref = hf_generate(hf, idx, 100, seed=1, do_sample=True, temperature=3.0)
    got = our_generate(ours, idx, 100, seed=1, do_sample=True, temperature=3.0, eos_token_id=0)
    assert torch.equal(got, ref)
    assert got.shape[1] < 103  # stopped once every row had finished
    for row in got[:, 3:]:
        first_eos = (row == 0).nonzero()[0].item()
        assert (row[first_eos:] == 0).all()


def test_each_prompt_of_a_batch_continues_as_if_alone(small_pair):
    _, ours = small_pair
    idx = tokens(101, 3, 6, seed=4)
    batched = generate(ours, idx, 20, do_sample=False)
    for row in range(3):
        assert torch.equal(batched[row : row + 1], generate(ours, idx[row : row + 1], 20, do_sample=False))


@pytest.mark.parametrize("sampling", [RECIPE, dict(do_sample=False)], ids=["recipe", "greedy"])
def test_left_padded_prompts_give_hf_generates_tokens(small_pair, sampling):
    hf, ours = small_pair
    lengths = torch.tensor([7, 2, 5, 7])
    attention_mask = (torch.arange(7) >= 7 - lengths[:, None]).long()  # (4, 7), padding on the left
    idx = tokens(101, 4, 7, seed=6).masked_fill(attention_mask == 0, 100)  # the pad id is any token: masked
    ref = hf_generate(hf, idx, 30, seed=3, attention_mask=attention_mask, **sampling)
    got = our_generate(ours, idx, 30, seed=3, attention_mask=attention_mask, **sampling)
    assert torch.equal(got, ref)
    if not sampling["do_sample"]:  # greedy: each prompt continues as it would alone, padding unseen
        for row, length in enumerate(lengths):
            alone = generate(ours, idx[row : row + 1, 7 - length :], 30, do_sample=False)
            assert torch.equal(got[row, 7:], alone[0, length:]), row


def test_generate_is_in_eval_mode_whatever_the_caller_left(small_pair):
    _, ours = small_pair
    idx = tokens(101, 2, 5)
    reference = generate(ours, idx, 20, do_sample=False)
    for module in ours.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5  # as if trained with dropout: in train mode it would change the tokens
    try:
        ours.train()
        assert torch.equal(generate(ours, idx, 20, do_sample=False), reference)
        assert ours.training  # the caller's mode is given back
        ours.eval()
        generate(ours, idx, 20, do_sample=False)
        assert not ours.training
    finally:
        for module in ours.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0


def test_generate_under_autocast_with_fp32_weights(small_pair):
    _, ours = small_pair
    idx = tokens(101, 2, 5)
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for mask in (None, attention_mask):
            assert generate(ours, idx, 10, attention_mask=mask, **RECIPE).shape == (2, 15)
            assert ours.transformer.h[0].attn.kv_cache.k.dtype == torch.bfloat16  # autocast's, not the weights'
    assert ours.lm_head.weight.dtype == torch.float32


def test_right_padding_is_refused(small_pair):
    _, ours = small_pair
    with pytest.raises(ValueError, match="pad prompts on the left"):
        generate(ours, tokens(101, 2, 5), 3, attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))


@pytest.mark.parametrize(
    "top_k, top_p, temperature",
    [
        (10, 0.95, 1.0),
        (3, 0.5, 1.0),
        (None, 0.9, 0.8),
        (50, 0.99, 1.5),
        (1000, 0.9, 1.0),
        (7, None, 1.0),
        (10, 0.0, 1.0),
    ],
)
def test_sampling_equals_hf_warpers(top_k, top_p, temperature):
    """Our candidate-only top-p against HF's whole-vocabulary sort, on many random distributions."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        warpers.append(TopPLogitsWarper(top_p))
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0)) * 3
    torch.manual_seed(0)
    ref = torch.multinomial(warpers(None, logits).softmax(-1), 1).squeeze(1)
    torch.manual_seed(0)
    assert torch.equal(sample_next_token(logits, temperature, top_k, top_p), ref)


def test_top_k_keeps_ties_like_hf():
    logits = torch.randint(0, 6, (64, 50), generator=torch.Generator().manual_seed(0)).float()  # many ties
    torch.manual_seed(0)
    ref = torch.multinomial(TopKLogitsWarper(4)(None, logits).softmax(-1), 1).squeeze(1)
    torch.manual_seed(0)
    assert torch.equal(sample_next_token(logits, top_k=4), ref)


def test_context_overflow_is_an_error_and_kv_cache_stays_out_of_checkpoints():
    _, ours = make_pair(**{**SMALL, "n_positions": 37})
    names = set(ours.state_dict())
    with pytest.raises(ValueError, match="38 tokens exceed the context of 37 tokens"):
        generate(ours, tokens(101, 1, 30), 8)
    assert generate(ours.eval(), tokens(101, 1, 30), 7).shape == (1, 37)  # exactly the context is fine
    assert set(ours.state_dict()) == names  # the caches, still allocated, are no part of checkpoints
    ours.clear_kv_cache()
    with pytest.raises(ValueError, match="call setup_kv_cache"):
        ours(tokens(101, 1, 1), input_pos=torch.tensor([0]))
    with pytest.raises(ValueError, match="38 tokens exceed the context of 37 tokens"):
        ours.setup_kv_cache(1, 38)


def test_kv_caches_that_fit_are_reused(small_pair):
    _, ours = small_pair
    generate(ours, tokens(101, 2, 5), 20)
    cache = ours.transformer.h[0].attn.kv_cache
    generate(ours, tokens(101, 2, 9), 10)  # fits in the 25 positions: the compiled step keeps its buffers
    assert ours.transformer.h[0].attn.kv_cache is cache
    generate(ours, tokens(101, 3, 5), 10)  # another batch size needs other buffers
    assert ours.transformer.h[0].attn.kv_cache.k.shape == (3, 3, 15, 16)


@pytest.mark.slow  # compiling takes ~10-20 s on a 2-core CPU
def test_compiled_decode_step_gives_the_same_tokens():
    _, ours = make_pair(**{**SMALL, "n_layer": 1})
    ours.eval()
    idx = tokens(101, 2, 5)
    ref = our_generate(ours, idx, 30, seed=2, **RECIPE)
    compiled = compile_decode_step(ours)
    with torch._inductor.config.patch(freezing=True):
        assert torch.equal(our_generate(ours, idx, 30, seed=2, decode=compiled, **RECIPE), ref)
    assert torch.equal(our_generate(ours, idx, 30, seed=2, decode=compiled, **RECIPE), ref)


@pytest.mark.skipif(not ONEDNN_LINEAR, reason="this torch build has no oneDNN")
def test_onednn_linear_shares_the_model_and_runs_only_where_it_should():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=48, dropout=0.0)).eval()
    params, names = dict(model.named_parameters()), list(model.state_dict())
    idx = tokens(50, 2, 16)
    with torch.no_grad():
        reference_logits = model(idx)[0]
    assert use_onednn_linear(model) is model
    assert not any(type(m) is torch.nn.Linear for m in model.modules())  # every layer swapped
    assert isinstance(model.lm_head, OneDNNLinear)
    assert all(p is params[n] for n, p in model.named_parameters()) and len(params) == len(list(model.parameters()))
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    assert list(model.state_dict()) == names
    layer = model.transformer.h[0].mlp.c_fc
    x = torch.randn(3, 5, 48)
    reference = torch.nn.functional.linear(x, layer.weight, layer.bias)
    with torch.no_grad():  # oneDNN on CPU in fp32: equal to float rounding
        assert (layer(x) - reference).abs().max() < 1e-5
        assert (model(idx)[0] - reference_logits).abs().max() < 1e-5
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast is honoured (evaluation in bf16)
            assert layer(x).dtype == torch.bfloat16
    layer(x).sum().backward()  # training: F.linear with its gradients
    assert torch.allclose(layer.bias.grad, torch.full((192,), 15.0))


def test_onednn_linear_changes_nothing_without_onednn(monkeypatch):
    import generate

    monkeypatch.setattr(generate, "ONEDNN_LINEAR", False)  # builds without oneDNN: plain F.linear
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=48))
    assert use_onednn_linear(model) is model
    assert not any(isinstance(m, OneDNNLinear) for m in model.modules())


@pytest.mark.parametrize(
    "sampling", [RECIPE, dict(do_sample=True), dict(do_sample=False)], ids=["recipe", "all", "greedy"]
)
def test_vocab_size_keeps_padding_ids_from_being_chosen(sampling):
    """A padded vocabulary (101 ids, the tokenizer's 90) whose padding ids would win every draw."""
    model = GPT(GPTConfig(block_size=32, vocab_size=101, n_layer=1, n_head=2, n_embd=16, dropout=0.0)).eval()
    with torch.no_grad():
        model.lm_head.weight[:90] = 0
        model.lm_head.weight[90:] = 100 * torch.randn(11, 16)
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert (our_generate(model, idx, 20, seed=0, **sampling)[:, 3:] >= 90).any()  # without it they are chosen
    assert our_generate(model, idx, 20, seed=0, vocab_size=90, **sampling)[:, 3:].max() < 90
