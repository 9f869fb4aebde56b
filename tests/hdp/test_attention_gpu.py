"""HDP attention on a GPU: the Triton block in bf16 against the float64 torch block, packed
documents in one call, and a 128K-token document on one GPU."""

from __future__ import annotations

import pytest
import torch
from bitscale.hdp.attention_block import TokenDocs, block_backward, block_forward
from bitscale.hdp.ring_attention import packed_causal_attention

pytestmark = pytest.mark.gpu

# bf16 inputs are exact in both paths; the Triton kernels round the probabilities to bf16
# before the P @ V and dS products (tensor cores take bf16 operands), 2^-9 relative each, and
# sum in float32: outputs and gradients land within a few bf16 ulps of the float64 block's,
# relative to their largest value.
BF16_TOLERANCE = 2e-2


def _case(lengths: list[int], heads: int, kv_heads: int, dim: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    tokens = sum(lengths)
    q = torch.randn(tokens, heads, dim, generator=gen).to(torch.bfloat16)
    k = torch.randn(tokens, kv_heads, dim, generator=gen).to(torch.bfloat16)
    v = torch.randn(tokens, kv_heads, dim, generator=gen).to(torch.bfloat16)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return q, k, v, tuple(bounds)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double().cpu() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(8, 2, 128), (4, 4, 64), (8, 1, 96)])
def test_gpu_block_in_bf16_matches_the_float64_block(heads: int, kv_heads: int, dim: int) -> None:
    q, k, v, bounds = _case([1, 700, 37, 2000, 129, 1], heads, kv_heads, dim, seed=dim)
    docs_cpu = TokenDocs.packed(bounds, torch.device("cpu"))
    docs = TokenDocs.packed(bounds, torch.device("cuda"))
    q64, k64, v64 = (t.double() for t in (q, k, v))
    want_out, want_lse = block_forward(q64, k64, v64, docs_cpu, docs_cpu)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    delta64 = (dout.double() * want_out).sum(-1).transpose(0, 1)
    want_grads = block_backward(q64, k64, v64, dout.double(), want_lse, delta64, docs_cpu, docs_cpu)

    qc, kc, vc, doutc = (t.cuda() for t in (q, k, v, dout))
    runs = []
    for _ in range(2):
        out, lse = block_forward(qc, kc, vc, docs, docs)
        delta = (doutc.float() * out).sum(-1).transpose(0, 1)
        grads = block_backward(qc, kc, vc, doutc, lse, delta, docs, docs)
        runs.append((out, lse, *grads))
    assert _relative(runs[0][0], want_out) <= BF16_TOLERANCE
    assert (runs[0][1].double().cpu() - want_lse).abs().max() <= BF16_TOLERANCE
    for got, want in zip(runs[0][2:], want_grads, strict=True):
        assert _relative(got, want) <= BF16_TOLERANCE
    # No atomics: a second run is bitwise the first.
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_gpu_packed_attention_autograd_returns_input_dtype_gradients() -> None:
    q, k, v, bounds = _case([300, 5, 900], 8, 2, 64, seed=3)
    qc, kc, vc = (t.cuda().requires_grad_() for t in (q, k, v))
    out = packed_causal_attention(qc, kc, vc, bounds)
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16
    assert qc.grad.dtype == kc.grad.dtype == vc.grad.dtype == torch.bfloat16
    assert all(t.grad.isfinite().all() for t in (qc, kc, vc))


def test_gpu_a_128k_token_document_fits_one_gpu() -> None:
    """32 heads, 8 K/V heads, head dim 128, bf16: forward and backward of one 131,072-token
    document; memory stays linear in tokens (the score matrix alone would be 1 TiB)."""
    tokens = 131072
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(tokens, 32, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(tokens, 8, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(tokens, 8, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.cuda.reset_peak_memory_stats()
    out = packed_causal_attention(q, k, v, (0, tokens))
    out.float().sum().backward()
    torch.cuda.synchronize()
    inputs = 3 * q.numel() * 2  # q, k, v and as much again for their gradients, roughly
    assert torch.cuda.max_memory_allocated() < 8 * inputs
    assert q.grad.isfinite().all()
