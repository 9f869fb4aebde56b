"""Long context on the CPU: memory linear in tokens, and bf16 training under the runner."""

from __future__ import annotations

import resource

import pytest
import torch
from bitscale.hdp import HDPRunner, plan_batch
from bitscale.hdp.ring_attention import zigzag_ring_attention
from bitscale.hdp.runtime import IGNORE_INDEX, summed_cross_entropy
from bitscale.hdp.tiny_model import TinyTransformer

from bitscale.testing import run_on_ranks

TIMEOUT_S = 240
PEAK_LIMIT_BYTES = 1.5e9


def _ring_peak_memory(rank: int, world_size: int, tokens: int) -> int:
    torch.set_num_threads(1)
    c = tokens // (2 * world_size)
    gen = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(2 * c, 1, 64, generator=gen).requires_grad_() for _ in range(3))
    out = zigzag_ring_attention(
        q, k, v, ranks=list(range(world_size)), position=rank, item_id=0, chunk_sizes=[c]
    )
    out.sum().backward()
    assert q.grad is not None and q.grad.isfinite().all()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@pytest.mark.dist
@pytest.mark.slow
def test_a_32k_document_on_two_ranks_stays_under_1_5_gb_per_rank() -> None:
    """16K tokens per rank, one head: the old path's first ring step alone held the chunk's
    [1, 16K, 16K] float32 scores, probabilities and mask (2.25 GiB); tiles hold a few MiB."""
    peaks = run_on_ranks(_ring_peak_memory, 2, 32768, timeout=TIMEOUT_S)
    assert max(peaks) < PEAK_LIMIT_BYTES, [f"{p / 1e9:.2f} GB" for p in peaks]


MODEL = dict(vocab_size=64, dim=32, heads=4, kv_heads=2, layers=2, mlp_dim=64)
LENGTHS = [90, 7, 33, 64, 12, 50]
# bf16 autocast rounds every matmul's inputs and outputs to bf16 (2^-9 relative each), and
# the runner splits the batch into packed and ring blocks whose sums run in another order
# than one dense pass, so the roundings land differently: through two layers, gradients
# agree with the one-process autocast run to a few bf16 ulps of their largest value
# (measured: at most 1.4e-2, on the attention output projection).
BF16_TOLERANCE = 2e-2


def _batch() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, 64, (n,), generator=gen) for n in LENGTHS]


def _one_process_grads(autocast: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyTransformer(**MODEL)
    loss = torch.zeros(())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for tokens in _batch():
            labels = torch.cat([tokens[1:], torch.tensor([IGNORE_INDEX])])
            loss = loss + summed_cross_entropy(model(tokens, torch.arange(len(tokens))), labels)
    (loss / sum(n - 1 for n in LENGTHS)).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _runner_grads(rank: int, world_size: int) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyTransformer(**MODEL)
    runner = HDPRunner(model, autocast=torch.bfloat16)
    result = runner.step(_batch(), plan_batch(LENGTHS, world_size, 48))
    params = list(model.parameters())
    return {
        "rings": result.ring_kv_bytes,
        "param_dtypes": {str(p.dtype) for p in params},
        "grad_dtypes": {str(p.grad.dtype) for p in params},
        "grads": {n: p.grad.numpy() for n, p in model.named_parameters()},
    }


@pytest.mark.dist
def test_bf16_autocast_runner_matches_one_process_autocast() -> None:
    results = run_on_ranks(_runner_grads, 2, timeout=TIMEOUT_S)
    got = results[0]
    assert sum(got["rings"]) > 0  # the 90-token sequence ran on a ring
    assert got["param_dtypes"] == got["grad_dtypes"] == {"torch.float32"}
    want = _one_process_grads(autocast=True)
    fp32 = _one_process_grads(autocast=False)
    for name, ref in want.items():
        scale = ref.abs().max().item()
        error = (torch.from_numpy(got["grads"][name]) - ref).abs().max().item() / scale
        assert error <= BF16_TOLERANCE, (name, error)
    # The autocast reference is really bf16: it differs from float32 by more than float32 noise.
    assert max((want[n] - fp32[n]).abs().max().item() for n in want) > 1e-4


def test_runner_refuses_an_unsupported_autocast_dtype() -> None:
    with pytest.raises(ValueError, match=r"autocast must be torch\.bfloat16, torch\.float16"):
        HDPRunner(TinyTransformer(**MODEL), autocast=torch.float64)
