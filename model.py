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

IGNORE_INDEX = -100  # targets equal to this add nothing to the loss, as in HF
# Our Linear layers that are Conv1D in HF: their weights are stored transposed there.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


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
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; pick a multiple")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx, targets: (B, T) token ids; targets are idx shifted left by one, IGNORE_INDEX to skip.

        Returns (logits (B, T, vocab_size), mean cross-entropy over counted targets or None).
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the context ({self.config.block_size}); crop it to block_size")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss

    def configure_optimizers(self, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8, fused: bool | None = None):
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
        """Loads an HF GPT-2 checkpoint directory (or a Hub name such as 'gpt2', when online)."""
        directory = Path(path_or_name)
        if not directory.is_dir():
            directory = _download(str(path_or_name))
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found; expected an HF GPT-2 checkpoint directory (config.json + model.safetensors)")
        config = config_from_hf(json.loads(config_path.read_text()))
        if dropout is not None:
            config.dropout = dropout
        model = cls(config)
        model.load_hf_state_dict(_read_weights(directory))
        return model

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
                raise ValueError(f"checkpoint has unexpected tensor '{name}'; is it a GPT-2 checkpoint?")
            if name.endswith(CONV1D_SUFFIXES):
                tensor = tensor.t()
            if tensor.shape != ours[name].shape:
                raise ValueError(f"checkpoint tensor '{name}' has shape {tuple(tensor.shape)}, the config expects {tuple(ours[name].shape)}")
            loaded[name] = tensor
        loaded.setdefault("lm_head.weight", loaded.get("transformer.wte.weight"))
        missing = [n for n in ours if n not in loaded or loaded[n] is None]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. '{missing[0]}'; it is incomplete or not GPT-2")
        self.load_state_dict(loaded)


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
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"config.json has model_type '{hf['model_type']}'; only GPT-2 checkpoints load")
    unsupported = {
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
        "tie_word_embeddings": (True,),
    }
    for key, allowed in unsupported.items():
        if key in hf and hf[key] not in allowed:
            raise ValueError(f"config.json sets {key}={hf[key]!r}; this model supports only {allowed[0]!r}")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise ValueError(f"config.json sets n_inner={hf['n_inner']}; this model uses 4 * n_embd = {4 * hf['n_embd']}")
    dropouts = {hf.get(k, 0.1) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(dropouts) > 1:
        raise ValueError(f"config.json has different dropouts {sorted(dropouts)}; this model uses one rate for all three")
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
    if (directory / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(directory / "model.safetensors")
    if (directory / "pytorch_model.bin").is_file():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory} has no model.safetensors or pytorch_model.bin; is it an HF GPT-2 checkpoint?")


def _download(name: str) -> Path:
    """Fetches config + weights of a Hub model; offline this fails fast with one line."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["config.json", "model.safetensors"]))
    except Exception as e:  # the Hub client raises many types (connection, auth, not found)
        raise OSError(f"'{name}' is not a local directory and could not be fetched from the Hugging Face Hub ({type(e).__name__}); pass a local checkpoint directory") from None
