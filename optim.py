"""How the weights are updated: AdamW grouped as the HF Trainer does, its learning-rate schedule, and
gradient clipping folded into the fused AdamW."""

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from model import GPT


def adamw(model: GPT, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8, fused: bool | None = None):
    """AdamW grouped as the HF Trainer does: no weight decay on biases and LayerNorm weights."""
    decay, no_decay = {}, {}  # keyed by id: the tied embedding is one parameter
    for module in model.modules():
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


def lr_schedule(optimizer, max_steps: int, warmup_ratio: float, decay: str = "cosine") -> LambdaLR:
    """transformers' get_cosine_schedule_with_warmup, or get_linear_schedule_with_warmup for decay='linear',
    warmup steps rounded up as the Trainer does."""
    warmup_steps = math.ceil(max_steps * warmup_ratio)

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if decay == "linear":
            return max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return LambdaLR(optimizer, lr_factor)


def clip_divisor(grad_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The fused AdamW's grad_scale that clips gradients of norm grad_norm to max_norm: its kernel divides
    each gradient by it as it reads it, where clip_grad_norm_ would multiply every gradient by
    max_norm / (norm + 1e-6) when below 1, in a pass of its own."""
    return ((grad_norm + 1e-6) / max_norm).clamp(min=1)
