"""HDP runtime on a CUDA device (NCCL, one rank): same loss and gradients as the CPU
reference, and offloading through pinned host memory is bitwise exact.

Rings need two or more GPUs (NCCL refuses two ranks on one device); the ring path is
covered on CPU by test_ring_attention.py and test_runtime.py.
"""

from __future__ import annotations

import random

import pytest
import torch
from bitscale.hdp import HDPRunner, plan_batch
from bitscale.hdp.runtime import IGNORE_INDEX, summed_cross_entropy
from bitscale.hdp.tiny_model import TinyTransformer

from bitscale.testing import run_on_ranks

TOLERANCE = 1e-10


def _gpu_step(rank: int, world_size: int) -> dict:
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    lengths = [rng.randint(7, 200) for _ in range(32)]
    batch = [torch.randint(0, 64, (n,), generator=gen) for n in lengths]
    plan = plan_batch(lengths, 1, 256)

    torch.manual_seed(5)
    cpu_model = TinyTransformer().double()
    loss_sum = torch.zeros((), dtype=torch.float64)
    for tokens in batch:
        labels = torch.cat([tokens[1:], torch.tensor([IGNORE_INDEX])])
        loss_sum = loss_sum + summed_cross_entropy(
            cpu_model(tokens, torch.arange(len(tokens))), labels
        )
    (loss_sum / plan.stats.loss_tokens).backward()

    results = {}
    for ratio in (None, 0.5):
        model = TinyTransformer().double()
        model.load_state_dict(cpu_model.state_dict())
        model.cuda()
        runner = HDPRunner(model, offload_ratio=ratio)
        result = runner.step(batch, plan)
        results[ratio] = (result, {n: p.grad.cpu() for n, p in model.named_parameters()})
    (plain, plain_grads), (offloaded, off_grads) = results[None], results[0.5]
    grad_error = max(
        ((plain_grads[n] - p.grad).abs().max() / p.grad.abs().max()).item()
        for n, p in cpu_model.named_parameters()
    )
    return {
        "loss_error": abs(plain.loss - (loss_sum / plan.stats.loss_tokens).item()),
        "grad_error": grad_error,
        "bitwise": plain.loss == offloaded.loss
        and all(torch.equal(plain_grads[n], off_grads[n]) for n in plain_grads),
        "offload": offloaded.offload,
        "plain_offload": plain.offload,
    }


@pytest.mark.gpu
@pytest.mark.dist
def test_gpu_step_matches_cpu_and_offload_is_exact() -> None:
    (result,) = run_on_ranks(_gpu_step, 1, backend="nccl", timeout=300)
    assert result["loss_error"] <= TOLERANCE
    assert result["grad_error"] <= TOLERANCE
    assert result["bitwise"]
    moved = result["offload"]["offloaded_bytes"]
    assert moved > 0 and result["offload"]["reloaded_bytes"] == moved
    assert result["offload"]["peak_kept_bytes"] < result["plain_offload"]["peak_kept_bytes"]
