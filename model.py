"""GPT-2, written by hand, interchangeable with Hugging Face's GPT2LMHeadModel.

Parameter names mirror HF's (`transformer.h.0.attn.c_attn.weight`, ...), so moving weights between
the two is a rename-free copy (hf.py; HF's Conv1D weights are stored transposed). Same weights give
the same logits, loss and gradients. Generation lives in generate.py, the output layer's loss in loss.py.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError
from loss import CompactVocab, linear_cross_entropy


@dataclass
class GPTConfig:
    """Defaults are GPT2Config()'s: GPT-2 small, 124M parameters."""

    block_size: int = 1024  # the context: positions the model has (HF: n_positions)
    vocab_size: int = 50257  # token ids are in [0, vocab_size)
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block; must divide n_embd
    n_embd: int = 768  # width of the residual stream
    dropout: float = 0.1  # HF: embd_pdrop = resid_pdrop = attn_pdrop
    layer_norm_epsilon: float = 1e-5  # added to the variance in every LayerNorm
    initializer_range: float = 0.02  # std of the normal initial weights

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; pick a multiple")

    def check_data_fits(self, block_size: int, data_vocab_size: int, data_dir) -> None:
        """Refuses windows of block_size tokens longer than the context, and data of more token ids than the
        vocabulary (train.py, eval.py --tasks=val)."""
        if block_size > self.block_size:
            raise UserError(
                f"--block_size={block_size} is longer than the model's context of {self.block_size} positions; lower it"
            )
        if data_vocab_size > self.vocab_size:
            raise UserError(
                f"{data_dir} uses a vocabulary of {data_vocab_size} tokens but the model has "
                f"vocab_size={self.vocab_size}; pass the data the model was trained on (a new model: "
                f"--vocab_size={data_vocab_size})"
            )


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
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_cache: KVCache | None = None  # set by GPT.setup_kv_cache for generation

    def forward(
        self, x: torch.Tensor, input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, T, C). With the KV cache: input_pos (T,) are x's cache positions and mask, additive,
        (T, max_len) or (B, 1, T, max_len), says which cached positions each query sees; without it,
        attention is causal within x."""
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
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
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
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input and output embeddings
        self.apply(self._init_weights)
        # The loss's softmax over the columns of the tokens the training data contains (loss.CompactVocab),
        # set by train.py where the other tokens' rows are equal: the same values, fewer columns. In no
        # state_dict or checkpoint.
        self.compact_vocab: CompactVocab | None = None

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

    def check_context(self, n_tokens: int) -> None:
        """The one check of the context length: GPT-2 has no positions beyond block_size, and cropping
        silently would continue another text. forward checks its T, setup_kv_cache the cache it sizes."""
        if n_tokens > self.config.block_size:
            raise UserError(
                f"{n_tokens} tokens exceed the context of {self.config.block_size} tokens; shorten the input "
                f"(when generating: the prompt plus the new tokens) to at most {self.config.block_size}"
            )

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ):
        """idx, targets: (B, T) token ids; targets are idx shifted left by one, loss.IGNORE_INDEX to skip.

        Decoding with the KV caches of setup_kv_cache: input_pos (T,) are idx's cache positions, mask
        the additive attention mask over the cache (see CausalSelfAttention; generate.decode_mask
        builds it), positions (T,) or (B, T) the position ids (default: input_pos). Then only the last
        position's logits are computed (generation needs no others): (B, 1, vocab_size).

        Returns (logits (B, T, vocab_size), None) without targets, and (None, mean cross-entropy over
        the counted targets) with them: the loss never materializes the logits (loss.py), and with
        compact_vocab set, takes its softmax over the columns the training data uses, to the same value.
        """
        B, T = idx.shape
        self.check_context(T)
        if input_pos is None:
            positions = torch.arange(T, device=idx.device)
        elif mask is None or self.transformer.h[0].attn.kv_cache is None:
            raise ValueError(
                "input_pos is for decoding with KV caches: call setup_kv_cache(batch_size, max_len) first "
                "and pass the mask over them (generate.decode_mask)"
            )
        elif positions is None:
            positions = input_pos
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for block in self.transformer.h:
            x = block(x, input_pos, mask)
        if input_pos is not None:
            x = x[:, -1:]
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x), None
        return None, linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten(), self.compact_vocab)

    def setup_kv_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        """Gives every layer a KV cache for batch_size sequences of up to max_len tokens.

        Caches that already fit are kept (as in gpt-fast): a compiled decode step, which depends on
        the buffers it writes, then runs again without recompiling.
        """
        self.check_context(max_len)
        dtype, device = dtype or self.lm_head.weight.dtype, self.lm_head.weight.device
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
