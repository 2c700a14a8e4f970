"""Generation with the KV cache, token for token as GPT2LMHeadModel.generate, as free functions (as in gpt-fast):
sampling, the decode step (prefill is its first call), its attention mask over the cache, compiling it at the
call site, and use_onednn_linear, the CPU inference transform that sample.py and bench.py apply to a model.

    model = use_onednn_linear(hf.from_pretrained("gpt2"))
    out = generate(model, idx, 100, top_k=10, top_p=0.95)                                 # eager
    out = generate(model, idx, 100, top_k=10, top_p=0.95, decode=compile_decode_step(model))  # compiled
"""

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError
from model import GPT

# The recipe's generate call's sampling: sample.py's defaults, and each of train.py's eval samples.
RECIPE_SAMPLING = {"temperature": 1.0, "top_k": 10, "top_p": 0.95}
# oneDNN's matmul as an op of its own (torch.compile's CPU backend calls it); missing from builds without oneDNN.
ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class OneDNNLinear(nn.Linear):
    """nn.Linear that runs oneDNN's fp32 matmul on CPU when no gradient is needed (generation, evaluation).

    In fp32 on CPU, F.linear calls MKL, whose one-token matrix-vector products read the weights at a
    fraction of the memory bandwidth on AMD CPUs; oneDNN's kernel reads them faster (BENCHMARKS.md,
    generate). Results equal F.linear's to float rounding. bf16 already runs on oneDNN (and
    torch.compile prepacks it); gradients and autocast keep F.linear.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inference = not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
        if inference and x.dtype == torch.float32 and x.device.type == "cpu":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def use_onednn_linear(model: nn.Module) -> nn.Module:
    """Swaps every nn.Linear of model for a OneDNNLinear holding the same Parameters, so tied weights
    stay tied and state_dict names stay the same; returns model. Without oneDNN it changes nothing."""
    if not ONEDNN_LINEAR:
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                fast = OneDNNLinear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                fast.weight, fast.bias = child.weight, child.bias
                setattr(parent, name, fast)
    return model


def sample_next_token(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, generator=None
) -> torch.Tensor:
    """Draws one token per row of logits (B, vocab_size) float32, as HF generate(do_sample=True) does.

    HF's warpers in HF's order, each only where it changes something: temperature (!= 1), top-k
    (keeping ties with the k-th logit), top-p (removing the least likely tokens while their total
    probability is at most 1 - top_p, never the most likely one); then softmax over the vocabulary and
    torch.multinomial, which consumes the random stream exactly as HF's call does. Returns (B,) ids.
    """
    if temperature != 1.0:
        logits = logits / temperature
    if top_k:
        top = logits.topk(min(top_k, logits.size(-1)))  # (B, k) values and indices, descending
        logits = logits.masked_fill(logits < top.values[:, -1:], float("-inf"))
    if top_p is not None and top_p < 1.0:
        # HF sorts the whole vocabulary, but only top-k's survivors carry probability: sorting them is enough.
        n_candidates = int((logits > float("-inf")).sum(-1).max())  # top_k, unless logits tie with the k-th
        # (B, n_candidates), descending: top-k's own result unless ties made more survivors
        candidates, indices = top if top_k and n_candidates == top.values.size(-1) else logits.topk(n_candidates)
        # HF's cumulative probability in ascending order, read back descending.
        cumulative = candidates.flip(-1).softmax(-1).cumsum(-1).flip(-1)
        remove = cumulative <= 1 - top_p
        remove[:, 0] = False  # min_tokens_to_keep=1: the most likely token stays
        logits = logits.scatter(-1, indices, candidates.masked_fill(remove, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def decode_mask(
    input_pos: torch.Tensor, cache_len: int, dtype: torch.dtype, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """What GPT.forward needs to decode the tokens at cache positions input_pos (T,): the additive
    attention mask over the cache and the position ids.

    Each query sees the cached positions up to its own: mask (T, cache_len), positions input_pos.
    attention_mask (B, cache_len), as HF's: 1 where the cache holds a token, 0 where it holds padding
    (left-padded prompts). Padding is then hidden from every other query, and positions count tokens
    only, as HF's position_ids = attention_mask.cumsum(-1) - 1: mask (B, 1, T, cache_len), positions (B, T).
    The mask is 0 / -inf in dtype, the cache's: SDPA on CPU runs it faster than a boolean one.
    """
    slots = torch.arange(cache_len, device=input_pos.device)
    visible, positions = slots <= input_pos[:, None], input_pos
    if attention_mask is not None:
        positions = (attention_mask.cumsum(1)[:, input_pos] - 1).clamp(min=0)  # padding's own is unused
        # No query sees padding, but a padding query sees itself: an all -inf row is NaN on some SDPA backends.
        visible = (visible & (attention_mask[:, None, :].bool() | (slots == input_pos[:, None])))[:, None]
    mask = torch.zeros(visible.shape, dtype=dtype, device=input_pos.device).masked_fill_(~visible, float("-inf"))
    return mask, positions


def decode_step(
    model: GPT, tokens: torch.Tensor, input_pos: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Runs tokens (B, T) at cache positions input_pos (T,) through model, whose KV caches take their keys
    and values; returns the next-token logits (B, vocab_size), float32. Prefill is the prompts at 0..T-1,
    each later step one token (B, 1), in shapes that stay the same from token to token (see compile_decode_step).
    attention_mask (B, cache_len): see decode_mask."""
    cache = model.transformer.h[0].attn.kv_cache
    mask, positions = decode_mask(input_pos, cache.k.size(2), cache.k.dtype, attention_mask)
    logits, _ = model(tokens, input_pos=input_pos, mask=mask, positions=positions)
    return logits[:, -1].float()


def compile_decode_step(model: GPT) -> Callable:
    """decode_step compiled (at its first call, then once per KV cache shape); on CUDA as a CUDA graph.

    On CPU the gain needs `torch._inductor.config.freezing = True` while it compiles (sample.py and
    bench.py set it): the weights become constants of the compiled step, prepacked for oneDNN (see
    BENCHMARKS.md, generate). Frozen weights changed afterwards are not seen. The flag is global and
    would also freeze any model compiled for evaluation in training, so it is not set here.
    """
    cuda = model.lm_head.weight.device.type == "cuda"
    return torch.compile(decode_step, mode="reduce-overhead" if cuda else None, fullgraph=True)


@torch.inference_mode()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    do_sample: bool = True,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[torch.Tensor], None] | None = None,
    attention_mask: torch.Tensor | None = None,
    decode: Callable = decode_step,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Continues each prompt of idx (B, T) by max_new_tokens tokens; returns the ids (B, T + new).

    Same tokens as GPT2LMHeadModel.generate(idx, max_new_tokens=..., do_sample=..., temperature=...,
    top_k=..., top_p=..., attention_mask=...) for the same weights and torch seed (see
    sample_next_token; HF's top_k defaults to 50, pass top_k=0 to it for our None). do_sample=False
    is greedy. attention_mask (B, T), as HF's: 0 marks the padding on the left of shorter prompts,
    so prompts of different lengths share a batch. A sequence that emitted eos_token_id goes on with
    eos (HF's pad token for GPT-2); generation stops early once all have. callback(tokens), if
    given, receives each step's new tokens (B,) as they are chosen. decode runs each step after the
    prefill: decode_step, or compile_decode_step(model)'s. vocab_size: only ids below it are chosen, for a
    model whose vocabulary is padded beyond the tokenizer's (its extra ids decode to nothing); None: all.
    Runs in eval mode (no dropout), then gives the model back in the mode it found it in. Under
    torch.autocast the KV caches take autocast's dtype. They stay allocated for the next call (see
    GPT.setup_kv_cache); GPT.clear_kv_cache frees them.
    """
    B, T = idx.shape
    if do_sample and not temperature > 0:
        raise UserError(f"temperature={temperature} must be > 0 when sampling; for greedy decoding use do_sample=False")
    if attention_mask is not None and not attention_mask[:, -1].all():
        raise UserError(
            "attention_mask has padding at the end of a prompt; pad prompts on the left, as for HF generate"
        )
    device = idx.device.type
    autocast_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    model.setup_kv_cache(B, T + max_new_tokens, dtype=autocast_dtype)  # checks the context length
    if attention_mask is not None:  # over the whole cache: what comes after the prompts is tokens
        cache_len = model.transformer.h[0].attn.kv_cache.k.size(2)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, cache_len - T)], dim=1)
    was_training = model.training
    model.eval()
    try:
        logits = decode_step(model, idx, torch.arange(T, device=idx.device), attention_mask)  # prefill
        input_pos = torch.tensor([T], device=idx.device)
        unfinished = torch.ones(B, dtype=torch.bool, device=idx.device)
        tokens = [idx]
        for step in range(max_new_tokens):
            logits = logits[:, :vocab_size]  # (B, vocab_size); None keeps all
            if do_sample:
                next_token = sample_next_token(logits, temperature, top_k, top_p, generator)
            else:
                next_token = logits.argmax(-1)
            if eos_token_id is not None:
                next_token = next_token.masked_fill(~unfinished, eos_token_id)
                unfinished &= next_token != eos_token_id
            tokens.append(next_token[:, None])
            if callback is not None:
                callback(next_token)
            if step == max_new_tokens - 1 or (eos_token_id is not None and not unfinished.any()):
                break
            logits = decode(model, next_token[:, None], input_pos, attention_mask)
            input_pos += 1
    finally:
        model.train(was_training)
    return torch.cat(tokens, dim=1)
