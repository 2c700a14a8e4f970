"""GPT-2, written by hand, interchangeable with Hugging Face's GPT2LMHeadModel.

Parameter names mirror HF's (`transformer.h.0.attn.c_attn.weight`, ...), so moving weights
between the two is a rename-free copy in which HF's Conv1D weights, stored (in, out), are
transposed to nn.Linear's (out, in). Same weights give the same logits, loss and gradients.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError

IGNORE_INDEX = -100  # targets equal to this add nothing to the loss, as in HF
# Our Linear layers that are Conv1D in HF: their weights are stored transposed there.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# oneDNN's matmul as an op of its own (torch.compile's CPU backend calls it); missing from builds without oneDNN.
ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# An HF checkpoint's weights, looked for in this order: one file or an index of shards, safetensors
# before pickles; and the files to fetch from the Hub for each format, safetensors first.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
HUB_WEIGHT_PATTERNS = (WEIGHT_FILES[:2] + ("model-*.safetensors",), WEIGHT_FILES[2:] + ("pytorch_model-*.bin",))


# Rows per chunk of the output layer's loss on a GPU (on CPU: n_embd, see linear_cross_entropy).
# Chunk logits of 4096 x 50257 fp32 are 0.8 GB: large matmuls, a fixed and small part of memory.
GPU_LOSS_CHUNK_ROWS = 4096


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(F.linear(x, weight), targets, ignore_index=IGNORE_INDEX), to float rounding,
    gradients included, without ever holding the (N, vocab) logits.

    With a 50257-way output, the logits and their log-softmax cost more than the whole model at
    small widths (memory-bound passes over N * 50257 floats), and at GPT-2 small on a GPU they are
    13 GB at 64 x 1024 tokens in fp32. Here the rows go in chunks: each chunk's logits are computed,
    softmaxed in place and, when gradients are needed, turned straight into the gradients
    (softmax - one_hot) / N @ weight and its transpose @ x, which backward only scales (so gradient
    accumulation's loss scaling reaches them). Under autocast the matmuls run in its dtype, as
    nn.Linear's would, and the softmax in fp32. Plain tensor code with no data-dependent shapes and
    no host reads, so torch.compile traces it whole. Targets are checked as F.cross_entropy checks
    them (in [0, vocab) or IGNORE_INDEX); with none counted the mean is nan, as F.cross_entropy's.

    x: (N, C), weight: (vocab, C), targets: (N,). On CPU a chunk has C rows, so its logits (C, vocab)
    are as big as the weight gradient (vocab, C) that every chunk adds to: at small widths chunks stay
    in cache, at large ones the additions stay a small part of the matmuls. Measured on a 2-core
    AVX512 CPU, forward + backward against the plain version: 1.3x (C=128, fp32), 1.9x (C=128, bf16),
    1.0x (C=768, fp32), where fixed 128-row chunks were 0.7x.
    """
    chunk_rows = x.shape[1] if x.device.type == "cpu" else GPU_LOSS_CHUNK_ROWS
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(x, weight, targets, chunk_rows)
    return _chunked_cross_entropy(x, weight, targets, chunk_rows)


class LinearCrossEntropy(torch.autograd.Function):
    """linear_cross_entropy with gradients, computed in the forward pass while each chunk's logits are at hand."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows: int):
        grad_x = torch.empty_like(x)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        loss = _chunked_cross_entropy(x, weight, targets, chunk_rows, grad_x, grad_weight)
        ctx.save_for_backward(grad_x, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_weight = ctx.saved_tensors
        return grad_x * grad_loss, grad_weight * grad_loss, None, None


def _chunked_cross_entropy(x, weight, targets, chunk_rows: int, grad_x=None, grad_weight=None) -> torch.Tensor:
    """The mean loss, chunk_rows rows at a time; given grad_x and grad_weight, also fills in its gradients."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    counted = targets != IGNORE_INDEX
    # On a GPU an asynchronous check (a device-side assert, as F.cross_entropy's): no host read.
    torch._assert_async(
        ((targets >= 0) & (targets < weight.shape[0]) | ~counted).all(),
        f"cross-entropy targets must be in [0, {weight.shape[0]}) or {IGNORE_INDEX} (ignored)",
    )
    n_counted = counted.sum()
    loss = torch.zeros((), dtype=torch.float32, device=x.device)
    weight = weight.to(dtype)  # cast once, not once per chunk
    for start in range(0, x.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        x_chunk, counted_chunk = x[rows].to(dtype), counted[rows]
        target = targets[rows].clamp(min=0).unsqueeze(1)  # (n, 1); ignored rows are masked out below
        logits = (x_chunk @ weight.t()).float()  # (n, V)
        target_logit = logits.gather(1, target).squeeze(1)
        row_max = logits.amax(1, keepdim=True)
        probs = logits.sub_(row_max).exp_()  # unnormalized, in place: one exp per logit
        row_sum = probs.sum(1, keepdim=True)
        loss += torch.where(counted_chunk, (row_sum.log() + row_max).squeeze(1) - target_logit, 0).sum()
        if grad_x is None:
            continue
        # d(mean loss)/d(logits) = (softmax - one_hot) / n_counted, 0 for rows that don't count
        probs.div_(row_sum * n_counted).scatter_add_(1, target, (-1 / n_counted).to(probs.dtype).expand(target.shape))
        probs = probs.masked_fill_(~counted_chunk.unsqueeze(1), 0).to(dtype)
        grad_x[rows] = probs @ weight
        if dtype == torch.float32:
            grad_weight.addmm_(probs.t(), x_chunk)  # in place: no (V, C) temporary per chunk
        else:  # CPU has no low-precision matmul into an fp32 result
            grad_weight += probs.t() @ x_chunk
    return loss / n_counted


@dataclass
class GPTConfig:
    """Defaults are GPT2Config()'s: GPT-2 small, 124M parameters."""

    block_size: int = 1024  # HF: n_positions
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.1  # HF: embd_pdrop = resid_pdrop = attn_pdrop
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; pick a multiple")


class Linear(nn.Linear):
    """nn.Linear that runs oneDNN's fp32 matmul on CPU when no gradient is needed (generation, evaluation).

    In fp32 on CPU, F.linear calls MKL, whose one-token matrix-vector products read the weights at
    a fraction of the memory bandwidth on AMD CPUs; oneDNN's kernel reads them ~2x faster. Measured
    on a 2-core AVX512 EPYC, 124M, bench.py: decoding 41 tokens/s vs 28 with F.linear, where HF
    generate makes 25; 256-row matmuls 1.2x. Results equal F.linear's to float rounding (~1e-6).
    bf16 already runs on oneDNN (and torch.compile prepacks it); training and autocast keep F.linear.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inference = not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
        if ONEDNN_LINEAR and inference and x.dtype == torch.float32 and x.device.type == "cpu":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class KVCache(nn.Module):
    """Keys and values of the positions decoded so far, in buffers allocated once (as in gpt-fast).

    Fixed shapes make every one-token decode step the same computation, so torch.compile compiles
    it once. The buffers are not persistent: they never appear in state_dict or checkpoints.
    """

    def __init__(self, batch_size: int, n_head: int, max_len: int, head_dim: int, dtype: torch.dtype, device):
        super().__init__()
        shape = (batch_size, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Writes k, v (B, n_head, T, head_dim) at positions input_pos (T,); returns the whole buffers."""
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_cache: KVCache | None = None  # set by GPT.setup_kv_cache for generation

    def forward(
        self, x: torch.Tensor, input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, T, C). Decoding with the KV cache: input_pos (T,) are x's cache positions, mask (T, max_len)
        or (B, 1, T, max_len) says which cached positions each query sees; otherwise attention is causal within x."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, n_head, max_len, head_dim)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=mask is None
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2's "gelu_new" is the tanh approximation of GELU.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), input_pos, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input and output embeddings
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """HF GPT-2's _init_weights: N(0, 0.02), residual projections N(0, 0.02/sqrt(2*n_layer))."""
        std = self.config.initializer_range
        if isinstance(module, (CausalSelfAttention, MLP)):
            # Runs after the Linear children were initialized (apply is post-order), as in HF.
            nn.init.normal_(module.c_proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # the tied embedding counts once

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ):
        """idx, targets: (B, T) token ids; targets are idx shifted left by one, IGNORE_INDEX to skip.
        input_pos: (T,) positions of idx when decoding with the KV caches of setup_kv_cache; then only
        the last position's logits are computed (generation needs no others): (B, 1, vocab_size).
        attention_mask (B, max_len), decoding only: 1 where the cache holds a token, 0 where it holds padding
        (left-padded prompts). Padding is then hidden from every other query, and positions count tokens
        only, as HF's position_ids = attention_mask.cumsum(-1) - 1.

        Returns (logits (B, T, vocab_size), None) without targets, and (None, mean cross-entropy over
        the counted targets) with them: the loss never materializes the logits (linear_cross_entropy).
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise UserError(
                f"sequence of {T} tokens is longer than the context ({self.config.block_size}); crop it to block_size"
            )
        if input_pos is None:  # the whole sequence at once, causal attention within it
            pos, mask = torch.arange(T, device=idx.device), None
        else:
            cache = self.transformer.h[0].attn.kv_cache
            if cache is None:
                raise ValueError(
                    "input_pos is for decoding with KV caches; call setup_kv_cache(batch_size, max_len) first"
                )
            # Each query sees the cached positions up to its own: (T, max_len), broadcast over batch and heads.
            slots = torch.arange(cache.k.size(2), device=idx.device)
            visible, pos = slots <= input_pos[:, None], input_pos
            if attention_mask is not None:
                pos = (attention_mask.cumsum(1)[:, input_pos] - 1).clamp(min=0)  # (B, T); padding's own is unused
                # No query sees padding, but a padding query sees itself: an all -inf row is NaN on some SDPA backends.
                visible = (visible & (attention_mask[:, None, :].bool() | (slots == input_pos[:, None])))[
                    :, None
                ]  # (B, 1, T, max_len)
            # Additive (0 / -inf) in the cache's dtype: SDPA on CPU runs it faster than a boolean mask (2x in bf16).
            mask = torch.zeros(visible.shape, dtype=cache.k.dtype, device=idx.device).masked_fill_(
                ~visible, float("-inf")
            )
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x, input_pos, mask)
        if input_pos is not None:
            x = x[:, -1:]
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x), None
        return None, linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten())

    def configure_optimizers(
        self, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8, fused: bool | None = None
    ):
        """AdamW grouped as the HF Trainer does: no weight decay on biases and LayerNorm weights."""
        decay, no_decay = {}, {}  # keyed by id: the tied embedding is one parameter
        for module in self.modules():
            for name, p in module.named_parameters(recurse=False):
                group = no_decay if name == "bias" or isinstance(module, nn.LayerNorm) else decay
                group[id(p)] = p
        groups = [
            {"params": list(decay.values()), "weight_decay": weight_decay},
            {"params": list(no_decay.values()), "weight_decay": 0.0},
        ]
        params = [*decay.values(), *no_decay.values()]
        if fused is None:  # fused AdamW exists for CUDA and CPU tensors in torch >= 2.4
            fused = all(p.device.type in ("cuda", "cpu") for p in params)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)

    # ---- Generation ---------------------------------------------------------------------------

    def setup_kv_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None, device=None) -> None:
        """Gives every layer a KV cache for batch_size sequences of up to max_len tokens.

        Caches that already fit are kept (as in gpt-fast): a compiled decode_step, which depends on
        the buffers it writes, then runs again without recompiling.
        """
        if max_len > self.config.block_size:
            raise ValueError(
                f"a KV cache of {max_len} positions is longer than the context ({self.config.block_size}); use max_len <= block_size"
            )
        dtype, device = dtype or self.lm_head.weight.dtype, torch.device(device or self.lm_head.weight.device)
        cache = self.transformer.h[0].attn.kv_cache
        if (
            cache is not None
            and (cache.k.size(0), cache.k.dtype, cache.k.device) == (batch_size, dtype, device)
            and cache.k.size(2) >= max_len
        ):
            return
        head_dim = self.config.n_embd // self.config.n_head
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch_size, self.config.n_head, max_len, head_dim, dtype, device)

    def clear_kv_cache(self) -> None:
        """Frees the KV caches."""
        for block in self.transformer.h:
            block.attn.kv_cache = None

    def decode_step(
        self, token: torch.Tensor, input_pos: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One token per sequence (B, 1) at position input_pos (1,) -> next-token logits (B, vocab_size), float32.

        attention_mask: (B, max_len), as for forward. Its shapes stay the same from token to token (the KV
        cache is preallocated): see compile_decode_step.
        """
        logits, _ = self(token, input_pos=input_pos, attention_mask=attention_mask)
        return logits[:, -1].float()

    def compile_decode_step(self) -> None:
        """Compiles decode_step (at its first call, then once per KV cache shape); on CUDA as a CUDA graph.

        On CPU the gain needs `torch._inductor.config.freezing = True` while it compiles (sample.py
        and bench.py set it): the weights become constants of the compiled step, prepacked for oneDNN.
        124M on a 2-core AVX512 CPU then decodes ~1.3x faster than eagerly in bf16; fp32 gains little
        (eager Linear already runs oneDNN). Frozen weights changed afterwards are not seen. The flag
        is global and would also freeze any model compiled for evaluation in training, so it is
        not set here.
        """
        cuda = self.lm_head.weight.device.type == "cuda"
        self.decode_step = torch.compile(self.decode_step, mode="reduce-overhead" if cuda else None, fullgraph=True)

    @torch.inference_mode()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        do_sample: bool = True,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        callback=None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Continues each prompt of idx (B, T) by max_new_tokens tokens; returns the ids (B, T + new).

        Same tokens as GPT2LMHeadModel.generate(idx, max_new_tokens=..., do_sample=..., temperature=...,
        top_k=..., top_p=..., attention_mask=...) for the same weights and torch seed (see
        sample_next_token; HF's top_k defaults to 50, pass top_k=0 to it for our None). do_sample=False
        is greedy. attention_mask (B, T), as HF's: 0 marks the padding on the left of shorter prompts,
        so prompts of different lengths share a batch. A sequence that emitted eos_token_id goes on with
        eos (HF's pad token for GPT-2); generation stops early once all have. callback(tokens), if
        given, receives each step's new tokens (B,) as they are chosen.
        A prompt plus max_new_tokens longer than the context (block_size) is an error before any
        work: GPT-2 has no positions beyond it, and silently cropping would continue another text.
        Runs in eval mode (no dropout), then gives the model back in the mode it found it in. Under
        torch.autocast the KV caches take autocast's dtype. They stay allocated for the next call (see
        setup_kv_cache); clear_kv_cache frees them.
        """
        B, T = idx.shape
        if T + max_new_tokens > self.config.block_size:
            raise UserError(
                f"{T} prompt tokens + {max_new_tokens} new tokens exceed the context of {self.config.block_size}; "
                "shorten the prompt or generate fewer tokens"
            )
        if do_sample and not temperature > 0:
            raise UserError(
                f"temperature={temperature} must be > 0 when sampling; for greedy decoding use do_sample=False"
            )
        if attention_mask is not None and not attention_mask[:, -1].all():
            raise UserError(
                "attention_mask has padding at the end of a prompt; pad prompts on the left, as for HF generate"
            )
        device = idx.device.type
        self.setup_kv_cache(
            B, T + max_new_tokens, dtype=torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        )
        if attention_mask is not None:  # over the whole cache: what comes after the prompts is tokens
            cache_len = self.transformer.h[0].attn.kv_cache.k.size(2)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, cache_len - T)], dim=1)
        was_training = self.training
        self.eval()
        try:
            logits, _ = self(
                idx, input_pos=torch.arange(T, device=idx.device), attention_mask=attention_mask
            )  # prefill: (B, 1, vocab_size)
            logits = logits[:, -1].float()
            input_pos = torch.tensor([T], device=idx.device)
            unfinished = torch.ones(B, dtype=torch.bool, device=idx.device)
            tokens = [idx]
            for step in range(max_new_tokens):
                next_token = (
                    sample_next_token(logits, temperature, top_k, top_p, generator) if do_sample else logits.argmax(-1)
                )
                if eos_token_id is not None:
                    next_token = next_token.masked_fill(~unfinished, eos_token_id)
                    unfinished &= next_token != eos_token_id
                tokens.append(next_token[:, None])
                if callback is not None:
                    callback(next_token)
                if step == max_new_tokens - 1 or (eos_token_id is not None and not unfinished.any()):
                    break
                logits = self.decode_step(next_token[:, None], input_pos, attention_mask)
                input_pos += 1
        finally:
            self.train(was_training)
        return torch.cat(tokens, dim=1)

    # ---- Hugging Face checkpoints -------------------------------------------------------------

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Our weights under HF's names and layouts (no lm_head.weight: it is tied to wte)."""
        return {
            name: (t.t() if name.endswith(CONV1D_SUFFIXES) else t).contiguous()
            for name, t in self.state_dict().items()
            if name != "lm_head.weight"
        }

    def save_pretrained(self, directory) -> None:
        """Writes config.json + model.safetensors that GPT2LMHeadModel.from_pretrained loads."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.hf_state_dict(), directory / "model.safetensors", metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(hf_config(self.config), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path_or_name: str, dropout: float | None = None) -> "GPT":
        """Loads an HF GPT-2 checkpoint directory (or a Hub name such as 'gpt2', when online), in eval
        mode as HF's from_pretrained: call .train() to train it. Weights come from model.safetensors,
        pytorch_model.bin (weights_only: no code runs) or either's shards (*.index.json)."""
        directory = Path(path_or_name)
        if not directory.is_dir():
            directory = _download(str(path_or_name))
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise UserError(
                f"{config_path} not found; expected an HF GPT-2 checkpoint directory (config.json and its weights)"
            )
        config = config_from_hf(json.loads(config_path.read_text()))
        if dropout is not None:
            config.dropout = dropout
        model = cls(config)
        model.load_hf_state_dict(_read_weights(directory))
        return model.eval()

    def load_hf_state_dict(self, hf_state: dict[str, torch.Tensor]) -> None:
        """Copies HF-named weights in; any missing, unexpected or misshaped tensor is an error."""
        ours = self.state_dict()
        loaded = {}
        for name, tensor in hf_state.items():
            name = name.replace("_orig_mod.", "")  # saved from a torch.compile'd model
            if not name.startswith(("transformer.", "lm_head.")):
                name = "transformer." + name  # GPT2Model checkpoints (e.g. the original 'gpt2') lack the prefix
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # old HF versions saved the causal mask as a buffer
            if name not in ours:
                raise UserError(f"checkpoint has unexpected tensor '{name}'; is it a GPT-2 checkpoint?")
            if name.endswith(CONV1D_SUFFIXES):
                tensor = tensor.t()
            if tensor.shape != ours[name].shape:
                raise UserError(
                    f"checkpoint tensor '{name}' has shape {tuple(tensor.shape)}, the config expects {tuple(ours[name].shape)}"
                )
            loaded[name] = tensor
        loaded.setdefault("lm_head.weight", loaded.get("transformer.wte.weight"))
        missing = [n for n in ours if n not in loaded or loaded[n] is None]
        if missing:
            raise UserError(
                f"checkpoint is missing {len(missing)} tensors, e.g. '{missing[0]}'; it is incomplete or not GPT-2"
            )
        self.load_state_dict(loaded)


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


def hf_config(config: GPTConfig) -> dict:
    """GPTConfig as the config.json of an HF GPT2LMHeadModel."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": config.initializer_range,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "torch_dtype": "float32",
    }


def config_from_hf(hf: dict) -> GPTConfig:
    """Reads an HF GPT-2 config.json; refuses variants this model does not implement."""
    if hf.get("model_type") != "gpt2":
        raise UserError(
            f"config.json has model_type {hf.get('model_type')!r}; only HF GPT-2 checkpoints (model_type 'gpt2') load"
        )
    unsupported = {
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
        "tie_word_embeddings": (True,),
    }
    for key, allowed in unsupported.items():
        if key in hf and hf[key] not in allowed:
            raise UserError(f"config.json sets {key}={hf[key]!r}; this model supports only {allowed[0]!r}")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise UserError(f"config.json sets n_inner={hf['n_inner']}; this model uses 4 * n_embd = {4 * hf['n_embd']}")
    dropouts = {hf.get(k, 0.1) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(dropouts) > 1:
        raise UserError(
            f"config.json has different dropouts {sorted(dropouts)}; this model uses one rate for all three"
        )
    return GPTConfig(
        block_size=hf["n_positions"],
        vocab_size=hf["vocab_size"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        dropout=dropouts.pop(),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        initializer_range=hf.get("initializer_range", 0.02),
    )


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors: from its one weights file, or from the shards its index lists."""
    from safetensors.torch import load_file

    found = next((name for name in WEIGHT_FILES if (directory / name).is_file()), None)
    if found is None:
        raise UserError(f"{directory} has none of {', '.join(WEIGHT_FILES)}; is it an HF GPT-2 checkpoint?")
    index = json.loads((directory / found).read_text()) if found.endswith(".index.json") else None
    state = {}
    for name in sorted(set(index["weight_map"].values())) if index else [found]:
        path = directory / name
        if not path.is_file():
            raise UserError(f"{path} not found, though {found} lists it; download or copy the checkpoint again")
        state.update(
            load_file(path)
            if path.suffix == ".safetensors"
            else torch.load(path, map_location="cpu", weights_only=True)
        )
    return state


def _download(name: str) -> Path:
    """Fetches config.json and the weights of a Hub model: its safetensors (one file or shards) if it has
    them, else its pytorch_model.bin (likewise). Offline, or from a local cache with HF_HUB_OFFLINE=1,
    it fails fast with one line."""
    from huggingface_hub import snapshot_download

    try:
        for weights in HUB_WEIGHT_PATTERNS:
            directory = Path(snapshot_download(name, allow_patterns=["config.json", *weights]))
            if any((directory / weights_file).is_file() for weights_file in WEIGHT_FILES):
                return directory
    except Exception as e:  # the Hub client raises many types (connection, auth, not found)
        raise UserError(
            f"'{name}' is not a local directory and could not be fetched from the Hugging Face Hub ({type(e).__name__}); "
            "pass a local checkpoint directory, or a Hub name such as gpt2 when online"
        ) from None
    raise UserError(f"the Hub model '{name}' has none of {', '.join(WEIGHT_FILES)}; is it a GPT-2 model?")
