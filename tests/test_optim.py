"""optim.py: Muon steps as torch's Muon does and honours the clip and the skip on the device; Muon takes
the blocks' matrices and AdamW the rest; the warmup-stable-decay schedule."""

import math

import pytest
import torch

import optim
from model import GPT, GPTConfig


def matrices(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in [(12, 4), (4, 16)]]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_muon_steps_as_torchs_muon_with_the_clip_as_a_divided_gradient(weight_decay):
    theirs, ours = matrices(), matrices()
    reference = torch.optim.Muon(theirs, lr=0.02, weight_decay=weight_decay, adjust_lr_fn="original")
    muon = optim.Muon(ours, lr=0.02, weight_decay=weight_decay, adjust_lr_fn="original")
    muon.found_inf = torch.tensor(0.0)
    for step in range(3):
        gradients = [torch.randn_like(p) for p in theirs]
        muon.grad_scale = torch.tensor(2.0 if step == 1 else 1.0)  # step 1 clips: every gradient halved
        for p, q, g in zip(theirs, ours, gradients, strict=True):
            p.grad, q.grad = g / float(muon.grad_scale), g.clone()
        reference.step(), muon.step()
        for p, q in zip(theirs, ours, strict=True):
            if weight_decay:  # a tensor (1 - found_inf) in the decay factor: float rounding apart
                torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
            else:
                assert torch.equal(q, p) and torch.equal(
                    muon.state[q]["momentum_buffer"], reference.state[p]["momentum_buffer"]
                )


def test_a_skipped_muon_step_leaves_weights_and_momentum_as_they_were():
    ours = matrices()
    muon = optim.Muon(ours, lr=0.02, weight_decay=0.1, adjust_lr_fn="original")
    for p in ours:
        p.grad = torch.randn_like(p)
    muon.step()
    before = [(p.detach().clone(), muon.state[p]["momentum_buffer"].clone()) for p in ours]
    for p in ours:
        p.grad = torch.full_like(p, math.nan)
    muon.grad_scale, muon.found_inf = torch.tensor(math.nan), torch.tensor(1.0)
    muon.step()
    for p, (weight, momentum) in zip(ours, before, strict=True):
        assert torch.equal(p, weight) and torch.equal(muon.state[p]["momentum_buffer"], momentum)


def test_muon_takes_the_blocks_matrices_and_adamw_every_other_parameter_once():
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16))
    optimizer = optim.muon_adamw(
        model, 1e-3, 0.01, (0.9, 0.99), 1e-8, muon_lr=0.02, muon_momentum=0.95, muon_weight_decay=0.0
    )
    names = {id(p): name for name, p in model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.param_groups if "ns_steps" in g for p in g["params"]}
    decayed, undecayed = ({names[id(p)] for p in g["params"]} for g in optimizer.param_groups if "betas" in g)
    assert muon == {
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert decayed == {"transformer.wte.weight", "transformer.wpe.weight"}  # lm_head.weight is wte's
    assert all(name.endswith("bias") or ".ln_" in name for name in undecayed)
    assert len(muon) + len(decayed) + len(undecayed) == len(list(model.parameters()))


def test_wsd_holds_the_peak_then_falls_linearly_over_the_cooldown():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    factor = optim.lr_schedule(optimizer, 10, 0.1, "wsd", cooldown_ratio=0.3).lr_lambdas[0]
    assert [factor(step) for step in range(11)] == pytest.approx([0, 1, 1, 1, 1, 1, 1, 1, 2 / 3, 1 / 3, 0])
