"""The GPU step's parts that a CPU can check: the clip inside the fused AdamW, the device a process
selects, the MFU peak table and the automatic micro-batch's arithmetic."""

import copy
from datetime import timedelta

import pytest
import torch

import batching
import distributed
import optim
import reporting
import train
from model import GPT, GPTConfig


def test_clip_inside_adamw_equals_clip_grad_norm_then_adamw():
    torch.manual_seed(0)
    reference = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16, dropout=0.0))
    ours = copy.deepcopy(reference)
    optimizers = [optim.adamw(m, 1e-2, 0.1, (0.9, 0.95), 1e-8, fused=True) for m in (reference, ours)]
    schedulers = [optim.lr_schedule(o, 10, 0.0) for o in optimizers]
    job = train.Job("cpu", timedelta(minutes=1))
    no_autocast = torch.autocast("cpu", enabled=False)
    for step in range(4):
        tokens = torch.randint(0, 64, (2, 3, 17))  # micro-steps, micro-batch, T + 1
        for micro_step in tokens:
            (reference(micro_step[:, :-1], micro_step[:, 1:])[1] / 2).backward()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        optimizers[0].step()
        optimizers[0].zero_grad(set_to_none=True)
        schedulers[0].step()
        loss, grad_norm, skipped, weights_broken = train.train_step(
            ours, ours, optimizers[1], schedulers[1], tokens, no_autocast, 0.5, job
        )
        assert norm > 0.5 and skipped == 0 and weights_broken == 0  # the clip acts at every step
        torch.testing.assert_close(grad_norm, norm)
        # Float rounding (a divide for a multiply), which Adam scales up to the learning rate in the few weights
        # whose gradient is itself rounding noise (the key biases: softmax ignores a shift of the scores).
        tolerance = 1e-8 if step == 0 else 1e-5
        for a, b in zip(reference.parameters(), ours.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=tolerance)


def test_job_selects_the_cuda_device_it_is_given(monkeypatch):
    selected = []
    monkeypatch.setattr(distributed.torch.cuda, "set_device", selected.append)
    job = distributed.Job("cuda:1", timedelta(minutes=1))
    assert job.device == "cuda:1" and selected == ["cuda:1"]  # memory statistics and RNG state are GPU 1's
    distributed.Job("cpu", timedelta(minutes=1))
    assert selected == ["cuda:1"]


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.4e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835.5e12),
        ("NVIDIA H200", 989.4e12),
        ("NVIDIA H200 NVL", 835.5e12),
        ("NVIDIA H800", 989.4e12),
        ("NVIDIA GH200 480GB", 989.4e12),
        ("NVIDIA B200", 2250e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A10", 125e12),
        ("NVIDIA A10G", None),
        ("NVIDIA L40S", 362.05e12),
        ("NVIDIA GeForce RTX 4090", 165.2e12),
        ("Tesla T4", None),
    ],
)
def test_peak_table_matches_the_most_specific_name(name, peak):
    assert reporting.peak_bf16_flops_of(name) == peak


def test_probe_sizes_fill_a_loss_chunk_within_the_share():
    assert batching.probe_sizes(64, 1024) == (4, 8)  # 4096 rows: one whole loss chunk
    assert batching.probe_sizes(64, 256) == (16, 32)
    assert batching.probe_sizes(6, 1024) == (3, 6)
    assert batching.probe_sizes(2, 1024) == (1, 2)


def test_micro_batch_from_probe_peaks_with_gradients_in_both():
    gib = 2**30
    # Peaks of GPT-2 small at T=1024 as the two probes see them: 3 GiB of model, gradients and loss chunk,
    # 1 GiB per sequence of activations.
    fixed, per_sequence = batching.memory_line((4, 8), [7 * gib, 11 * gib])
    assert (fixed, per_sequence) == (3 * gib, gib)
    assert batching.largest_micro_batch(64, fixed, per_sequence, budget_bytes=68 * gib) == 64
    # Without the gradients in the first probe (its peak 0.5 GiB lower), the slope, and the choice, are off.
    fixed, per_sequence = batching.memory_line((4, 8), [6.5 * gib, 11 * gib])
    assert batching.largest_micro_batch(64, fixed, per_sequence, budget_bytes=68 * gib) == 32
