"""Activation offloading and the attention seam, in one process."""

from __future__ import annotations

import pytest
import torch
from bitscale.hdp import attention
from bitscale.hdp.dispatch import PackedDocuments, attention_layout
from bitscale.hdp.offload import ActivationOffload, OffloadStats
from bitscale.hdp.ring_attention import causal_attention_reference
from bitscale.hdp.tiny_model import TinyTransformer


def _grads_and_loss(ratio: float | None, stats: OffloadStats) -> tuple[float, dict]:
    torch.manual_seed(0)
    model = TinyTransformer().double()
    tokens = torch.randint(0, 64, (90,), generator=torch.Generator().manual_seed(1))
    offload = ActivationOffload(keep=model.parameters(), stats=stats)
    with offload.offloading(ratio or 0.0):
        loss = model(tokens, torch.arange(90)).logsumexp(-1).sum()
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("ratio", [0.25, 0.5, 1.0])
def test_offloading_is_bitwise_exact_and_moves_the_ratio(ratio: float) -> None:
    plain_stats, stats = OffloadStats(), OffloadStats()
    plain_loss, plain = _grads_and_loss(None, plain_stats)
    loss, grads = _grads_and_loss(ratio, stats)
    assert loss == plain_loss
    assert all(torch.equal(grads[n], plain[n]) for n in plain)
    assert plain_stats.offloaded_bytes == 0 and plain_stats.micro_batches == 0
    moved, kept = stats.offloaded_bytes, stats.kept_bytes
    assert stats.reloaded_bytes == moved > 0 and stats.micro_batches == 1
    # Greedy in save order: the moved share never exceeds the ratio, and misses it by less
    # than the largest saved tensor (here < 10 % of the saved bytes).
    assert moved / (moved + kept) <= ratio
    assert moved / (moved + kept) > ratio - 0.1
    assert stats.peak_kept_bytes == kept < plain_stats.peak_kept_bytes


def test_offload_ratio_out_of_range_raises() -> None:
    with (
        pytest.raises(ValueError, match=r"offload ratio must be in \[0, 1\]"),
        ActivationOffload().offloading(1.5),
    ):
        pass


def test_attention_outside_a_runner_is_dense_causal_and_follows_a_packed_layout() -> None:
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(20, 4, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(20, 2, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(20, 2, 8, generator=gen, dtype=torch.float64)
    dense = causal_attention_reference(q, k, v)
    assert (attention(q, k, v) - dense).abs().max() <= 1e-12
    with attention_layout(PackedDocuments((0, 12, 20))):
        packed = attention(q, k, v)
    assert (packed[:12] - dense[:12]).abs().max() <= 1e-12
    second = causal_attention_reference(q[12:], k[12:], v[12:])
    assert (packed[12:] - second).abs().max() <= 1e-12
    assert (packed[12:] - dense[12:]).abs().max() > 1e-3  # the documents really are separate


_LAYOUTS: list[tuple[tuple[int, ...], tuple[int, ...], int]] = []


class _RecordSavedLayout(torch.autograd.Function):
    """Saves a transposed view 72 bytes into its storage; records how it left and came back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        view = x[1:, 2:].t()
        ctx.save_for_backward(view)
        _LAYOUTS.append(_layout(view))
        return x * 2

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (view,) = ctx.saved_tensors
        _LAYOUTS.append(_layout(view))
        return grad * 2


def _layout(tensor: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    return tuple(tensor.shape), tuple(tensor.stride()), tensor.data_ptr() % 64


def test_reloaded_tensors_keep_strides_and_alignment() -> None:
    """Kernels choose their path by strides and alignment, so an offloaded tensor must come
    back as it left: a contiguous or re-aligned copy breaks bitwise equality on some CPUs."""
    x = torch.randn(9, 7, dtype=torch.float64, requires_grad=True)
    stats = OffloadStats()
    _LAYOUTS.clear()
    with ActivationOffload(stats=stats).offloading(1.0):
        y = _RecordSavedLayout.apply(x)
    y.sum().backward()
    assert stats.offloaded_bytes == 5 * 8 * 8
    saved, reloaded = _LAYOUTS
    assert saved == reloaded
    assert saved[1] == (1, 7) and saved[2] == (x.data_ptr() + 72) % 64 != 0


def test_broadcast_views_are_kept_not_copied() -> None:
    """A copy with a broadcast view's strides would write one element several times."""
    x = torch.randn(5, 1, dtype=torch.float64, requires_grad=True)
    stats = OffloadStats()
    with ActivationOffload(stats=stats).offloading(1.0):
        y = (x.expand(5, 4) * torch.ones(5, 4, dtype=torch.float64)).sum()
    y.backward()
    assert torch.equal(x.grad, torch.full((5, 1), 4.0, dtype=torch.float64))
