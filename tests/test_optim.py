"""optim.py: Muon steps as torch's Muon does and honours the clip and the skip on the device; c_attn's
weight orthogonalized as q, k, v apart; the orthogonalizations split over torchrun ranks (this file, run
by torchrun, is the job); Muon takes the blocks' matrices and AdamW the rest; the warmup-stable-decay
schedule."""

import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import optim
import train
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent


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


def test_a_group_of_parts_steps_as_torchs_muon_on_each_block_of_rows():
    theirs = [torch.nn.Parameter(part.detach().clone()) for p in matrices() for part in p.chunk(2)]
    ours = matrices()
    reference = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.0, adjust_lr_fn="original")
    muon = optim.Muon([{"params": ours, "parts": 2}], lr=0.02, weight_decay=0.0, adjust_lr_fn="original")
    for _ in range(3):
        for p in ours:
            p.grad = torch.randn_like(p)
        for p, part in zip(theirs, (part for q in ours for part in q.grad.chunk(2)), strict=True):
            p.grad = part.clone()
        reference.step(), muon.step()
    assert torch.equal(torch.cat(theirs[:2]), ours[0]) and torch.equal(torch.cat(theirs[2:]), ours[1])


def test_torchs_muon_state_loads_and_parts_must_divide_the_rows():
    theirs = matrices()
    reference = torch.optim.Muon(theirs, lr=0.02, adjust_lr_fn="original")
    for p in theirs:
        p.grad = torch.randn_like(p)
    reference.step()
    muon = optim.Muon(matrices(), 0.02, adjust_lr_fn="original")
    muon.load_state_dict(reference.state_dict())  # its groups have no `parts`: 1
    for p in muon.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    muon.step()
    with pytest.raises(ValueError, match=r"a \(12, 4\) matrix does not split into 5 parts"):
        optim.Muon([{"params": matrices(), "parts": 5}])


def split_over_ranks(out_dir: Path) -> None:
    """Under torchrun: Muon split over the job's ranks steps every rank's weights and momenta as one
    process's Muon does, bit for bit; writes how many blocks this rank orthogonalized to out_dir/rank<r>."""
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(0)
    shapes = [(12, 4)] * 3 + [(4, 16)] * 3 + [(8, 8), (16, 4)]  # 3 q, k, v weights; wide; square; tall
    start = [torch.randn(shape, generator=generator) for shape in shapes]
    split, alone = ([torch.nn.Parameter(w.clone()) for w in start] for _ in range(2))

    def groups(params):
        return [{"params": params[:3], "parts": 3}, {"params": params[3:]}]

    args = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="original")
    muon_split, muon_alone = (
        optim.Muon(groups(split), rank=rank, world_size=world_size, **args),
        optim.Muon(groups(alone), **args),
    )
    newton_schulz, calls = optim._zeropower_via_newtonschulz, []
    optim._zeropower_via_newtonschulz = lambda *a: calls.append(1) or newton_schulz(*a)
    for step in range(4):  # step 1 clipped, step 2 skipped (NaN gradients)
        for muon in (muon_split, muon_alone):
            muon.grad_scale, muon.found_inf = torch.tensor(2.0 if step == 1 else 1.0), torch.tensor(float(step == 2))
        for p, q in zip(split, alone, strict=True):
            p.grad = torch.randn(p.shape, generator=generator) if step != 2 else torch.full(p.shape, math.nan)
            q.grad = p.grad.clone()
        before = len(calls)
        muon_split.step()
        mine = len(calls) - before
        muon_alone.step()
    for p, q in zip(split, alone, strict=True):
        assert torch.equal(p, q), "weights differ"
        assert torch.equal(muon_split.state[p]["momentum_buffer"], muon_alone.state[q]["momentum_buffer"])
    (out_dir / f"rank{rank}").write_text(f"{mine} of the {len(calls) - before - mine} blocks one process does")
    dist.destroy_process_group()


def test_ranks_split_the_orthogonalizations_and_apply_the_updates_of_one_process(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, tmp_path]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-3000:]
    # turns [first rank]: q, k, v weights (3 blocks) 0, 1 [0] and 2 [0]; wide 3, 4 [1] and 5 [1]; square 6 [0];
    # tall 7 [1]
    assert [(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)] == [
        "8 of the 14 blocks one process does",  # 0, 2, 4 and 6
        "6 of the 14 blocks one process does",  # 1, 3, 5 and 7
    ]


def test_muon_takes_the_blocks_matrices_c_attn_as_q_k_v_and_adamw_every_other_parameter_once():
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
    apart = {names[id(p)] for g in optimizer.param_groups if g.get("parts") == 3 for p in g["params"]}
    assert apart == {f"transformer.h.{i}.attn.c_attn.weight" for i in range(2)}
    assert decayed == {"transformer.wte.weight", "transformer.wpe.weight"}  # lm_head.weight is wte's
    assert all(name.endswith("bias") or ".ln_" in name for name in undecayed)
    assert len(muon) + len(decayed) + len(undecayed) == len(list(model.parameters()))


def test_train_py_hands_muon_the_jobs_rank_and_world_size():
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    optimizer = train.build_optimizer(train.TrainConfig(optimizer="muon"), model, SimpleNamespace(rank=1, world_size=2))
    assert (optimizer._muon.rank, optimizer._muon.world_size) == (1, 2)


def test_wsd_holds_the_peak_then_falls_linearly_over_the_cooldown():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    factor = optim.lr_schedule(optimizer, 10, 0.1, "wsd", cooldown_ratio=0.3).lr_lambdas[0]
    assert [factor(step) for step in range(11)] == pytest.approx([0, 1, 1, 1, 1, 1, 1, 1, 2 / 3, 1 / 3, 0])


if __name__ == "__main__":
    split_over_ranks(Path(sys.argv[1]))
