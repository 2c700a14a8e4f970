"""How the weights are updated: AdamW grouped as the HF Trainer does, or Muon on the blocks' matrices with
AdamW on the rest; the learning-rate schedule; gradient clipping folded into the optimizer's step.

Both optimizers take the fused AdamW's `grad_scale` (each gradient is divided by it as it is read: the
clip) and `found_inf` (1.0: the step leaves weights and moments as they were), device tensors set by
train_step, so that neither a clip nor a skip reads anything back from the GPU.
"""

import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz
from torch.optim.lr_scheduler import LambdaLR

from common import UserError
from model import GPT


def adamw(model: GPT, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8, fused: bool | None = None):
    """AdamW grouped as the HF Trainer does: no weight decay on biases and LayerNorm weights."""
    decay, no_decay = adamw_groups(model, exclude=set())
    if fused is None:  # fused AdamW exists for CUDA and CPU tensors in torch >= 2.4
        fused = all(p.device.type in ("cuda", "cpu") for p in decay + no_decay)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def adamw_groups(model: GPT, exclude: set) -> tuple[list, list]:
    """The parameters not in `exclude` (ids): (those with weight decay, those without: biases and LayerNorm
    weights), each parameter once (the tied embedding is one)."""
    decay, no_decay = {}, {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in exclude:
                group = no_decay if name == "bias" or isinstance(module, nn.LayerNorm) else decay
                group[id(p)] = p
    return list(decay.values()), list(no_decay.values())


def block_matrices(model: GPT) -> list[torch.Tensor]:
    """The 2-D weights of the transformer blocks (attention's c_attn and c_proj, the MLP's c_fc and c_proj):
    what Muon updates. Embeddings, LayerNorms and biases are not matrices of a linear map between hidden
    states, and stay with AdamW."""
    return [
        p
        for block in model.transformer.h
        for name, p in block.named_parameters()
        if name.endswith("weight") and p.ndim == 2
    ]


class Muon(torch.optim.Muon):
    """torch's Muon, step for step (its momentum, Newton-Schulz orthogonalization and lr adjustment), that
    also honours grad_scale and found_inf (module docstring): torch's takes neither, and a tensor learning
    rate would be read back to the host once per matrix. Two additions:

    - a group's `parts` (default 1): each matrix is orthogonalized as that many blocks of rows apart, each
      with its own lr adjustment: c_attn's (3C, C) weight as q, k and v (measured lower loss: BENCHMARKS.md);
    - over world_size ranks (rank this one), the matrices of each shape go in turns of world_size, one to a
      rank, the first rank of a turn following on from where the last turn ended (so the remainders spread
      over the ranks); each rank orthogonalizes its own and all_gather hands the results to all: every rank
      applies the updates one process would, bit for bit. Momentum, elementwise, is stepped on every rank.
    """

    grad_scale: torch.Tensor | None = None
    found_inf: torch.Tensor | None = None

    def __init__(self, params, *args, rank: int = 0, world_size: int = 1, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.rank, self.world_size = rank, world_size

    def add_param_group(self, param_group: dict) -> None:
        param_group.setdefault("parts", 1)
        for p in param_group["params"]:
            if p.shape[0] % param_group["parts"]:
                raise ValueError(f"a {tuple(p.shape)} matrix does not split into {param_group['parts']} parts")
        super().add_param_group(param_group)

    def __setstate__(self, state: dict) -> None:  # also load_state_dict's: a state dict from torch's Muon
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("parts", 1)

    @torch.no_grad()
    def step(self, closure=None):
        keep = 1.0 if self.found_inf is None else 1 - self.found_inf
        if self.world_size == 1:  # one matrix at a time, as torch's: one update held at once
            updates = ((param, group, orthogonalize(update, group)) for param, group, update in self._momenta())
        else:
            updates = self._orthogonalized_over_ranks()
        for param, group, update in updates:
            part_shape = (param.shape[0] // group["parts"], param.shape[1])
            param.mul_(1 - group["lr"] * group["weight_decay"] * keep)
            param.add_(update * keep, alpha=-_adjust_lr(group["lr"], group["adjust_lr_fn"], part_shape))

    def _momenta(self):
        """Steps each matrix's momentum buffer, yielding (param, its group, its update before orthogonalizing)
        in the groups' order."""
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            for param, grad, buffer in zip(params, grads, buffers, strict=True):
                if self.grad_scale is not None:
                    grad = grad / self.grad_scale
                if self.found_inf is not None:  # a skipped step moves the momentum toward itself: unchanged
                    grad = torch.where(self.found_inf.bool(), buffer, grad)
                buffer.lerp_(grad, 1 - group["momentum"])
                yield param, group, grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer

    def _orthogonalized_over_ranks(self) -> list:
        """(param, group, orthogonalized update) of every matrix with a gradient: this rank's own computed
        here, the others' all_gathered (bf16) from their ranks. Every rank plans the same turns (DDP gives
        all the same gradients); a turn of n < world_size matrices leaves world_size - n ranks idle."""
        same_kind = defaultdict(list)  # all_gather's tensors share a shape
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:  # as _init_group takes them
                    same_kind[param.shape, group["parts"]].append((param, group))
        turns, first, ranks = [], 0, self.world_size  # turns: (matrices, the rank that takes the first)
        for matrices in same_kind.values():
            for start in range(0, len(matrices), ranks):
                turns.append((matrices[start : start + ranks], first))
                first = (first + len(turns[-1][0])) % ranks
        mine = set()  # id(param) of this rank's matrices: only their updates are kept from the momentum pass
        for turn, first in turns:
            if (index := (self.rank - first) % ranks) < len(turn):
                mine.add(id(turn[index][0]))
        orthogonalized = {  # in the gather's dtype and layout (a tall matrix's comes back transposed)
            id(param): orthogonalize(update, group).to(torch.bfloat16).contiguous()
            for param, group, update in self._momenta()
            if id(param) in mine
        }
        updates, pending = [], []
        for turn, first in turns:
            like = turn[0][0]
            gathered = [torch.empty(like.shape, dtype=torch.bfloat16, device=like.device) for _ in range(ranks)]
            if (index := (self.rank - first) % ranks) < len(turn):
                gathered[self.rank] = orthogonalized[id(turn[index][0])]
            pending.append(dist.all_gather(gathered, gathered[self.rank], async_op=True))
            updates += [(param, group, gathered[(first + i) % ranks]) for i, (param, group) in enumerate(turn)]
        for work in pending:
            work.wait()
        return updates


def orthogonalize(update: torch.Tensor, group: dict) -> torch.Tensor:
    """torch's Newton-Schulz orthogonalization (bf16) of update, as group's `parts` blocks of rows apart."""
    args = group["ns_coefficients"], group["ns_steps"], group["eps"]
    if group["parts"] == 1:
        return _zeropower_via_newtonschulz(update, *args)
    return torch.cat([_zeropower_via_newtonschulz(part, *args) for part in update.chunk(group["parts"])])


class MuonAdamW(torch.optim.Optimizer):
    """Muon on some parameter groups, the fused AdamW on the others, as one optimizer: one schedule (each
    group's lr scaled alike from its own initial_lr), one state_dict, one step for train_step.

    The two inner optimizers step on this one's groups and state, handed to them at each step: a
    load_state_dict replaces both here."""

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW):
        self._muon, self._adamw = muon, adamw
        super().__init__([*adamw.param_groups, *muon.param_groups], {})
        self.grad_scale = self.found_inf = None

    @torch.no_grad()
    def step(self, closure=None):
        for inner in (self._muon, self._adamw):
            is_muon = inner is self._muon
            inner.param_groups = [group for group in self.param_groups if ("ns_steps" in group) == is_muon]
            inner.state = self.state
            inner.grad_scale, inner.found_inf = self.grad_scale, self.found_inf
            inner.step()


def muon_adamw(
    model: GPT,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    *,
    muon_lr: float,
    muon_momentum: float,
    muon_weight_decay: float,
    rank: int = 0,
    world_size: int = 1,
) -> MuonAdamW:
    """Muon (lr muon_lr, Nesterov momentum muon_momentum, weight decay muon_weight_decay, torch's 'original'
    lr adjustment; c_attn's weight as q, k, v apart; the orthogonalizations split over world_size ranks) on
    the block matrices, the fused AdamW as `adamw` groups it on every other parameter."""
    matrices = block_matrices(model)
    decay, no_decay = adamw_groups(model, exclude={id(p) for p in matrices})
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    rest = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    qkv = {id(block.attn.c_attn.weight) for block in model.transformer.h}
    muon_groups = [
        {"params": [p for p in matrices if id(p) in qkv], "parts": 3},
        {"params": [p for p in matrices if id(p) not in qkv]},
    ]
    muon = Muon(
        muon_groups, lr=muon_lr, momentum=muon_momentum, weight_decay=muon_weight_decay, adjust_lr_fn="original",
        rank=rank, world_size=world_size,
    )  # fmt: skip
    return MuonAdamW(muon, rest)


def check_schedule(warmup_ratio: float, decay: str, cooldown_ratio: float) -> None:
    """Refuses lr_schedule's arguments that name no schedule, or one whose phases overlap."""
    if not 0 <= warmup_ratio <= 1:
        raise UserError(f"warmup_ratio={warmup_ratio}: must be in [0, 1] (a fraction of the steps)")
    if decay not in ("cosine", "linear", "wsd"):
        raise UserError(f"lr_decay={decay!r}: use 'cosine', 'linear' or 'wsd'")
    if not 0 < cooldown_ratio <= 1:
        raise UserError(f"cooldown_ratio={cooldown_ratio}: must be in (0, 1] (a fraction of the steps)")
    if decay == "wsd" and warmup_ratio + cooldown_ratio > 1:
        raise UserError(
            f"warmup_ratio={warmup_ratio} and cooldown_ratio={cooldown_ratio} overlap under lr_decay='wsd' "
            "(the peak is never held); keep their sum at most 1"
        )


def lr_schedule(
    optimizer, max_steps: int, warmup_ratio: float, decay: str = "cosine", cooldown_ratio: float = 0.2
) -> LambdaLR:
    """transformers' get_cosine_schedule_with_warmup, or get_linear_schedule_with_warmup for decay='linear',
    warmup steps rounded up as the Trainer does; or decay='wsd' (warmup-stable-decay): after the warmup
    the peak holds, then falls linearly to 0 over the last cooldown_ratio of the steps."""
    warmup_steps = math.ceil(max_steps * warmup_ratio)
    cooldown_steps = max(1, math.ceil(max_steps * cooldown_ratio))

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if decay == "wsd":
            return max(0.0, min(1.0, (max_steps - step) / cooldown_steps))
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
