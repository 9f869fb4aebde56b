"""HDP's Triton attention block on packed documents against torch's fused attention (GPU only).

    .venv/bin/pytest bench/hdp/bench_attention_gpu.py --benchmark-only [--quick]

One micro-batch of Wikipedia documents (lengths drawn uniformly, seeded, from
/work/shared/data/wikipedia_lengths.txt; the last one cut so they fill 64K tokens, 16K with
``--quick``), 32 query heads, 8 K/V heads, head dim 128, bf16, causal within each document.
Each round runs forward + backward:

* bitscale: ``block_forward`` then ``block_backward`` of ``bitscale.hdp._attention_triton``
  (all documents in one launch per kernel; delta = rowsum(dout * out) in between, as the
  ring computes it);
* FlexAttention (``torch.compile``d) with a document-causal ``BlockMask`` built once outside
  the timing, GQA through ``enable_gqa``; forward and autograd backward;
* SDPA per document (``is_causal=True``, ``enable_gqa=True``), forward and autograd backward,
  one call per document as a user without a document mask would do.

Work is the causal FLOPs actually needed: forward 4 * H * D * sum_d L_d (L_d + 1) / 2 (QK^T
and PV over the visible pairs), backward 2.5x forward, so 3.5x in all; TFLOP/s and the ratio
to the bf16 tensor-core peak come from it. Before timing, the forward outputs of the three
are compared (bf16 inputs: within 2e-2).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

WIKIPEDIA = Path("/work/shared/data/wikipedia_lengths.txt")
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def _document_lengths(tokens: int, seed: int = 0) -> list[int]:
    pool = [int(x) for x in WIKIPEDIA.read_text().split()]
    rng = random.Random(seed)
    lengths: list[int] = []
    while sum(lengths) < tokens:
        lengths.append(min(rng.choice(pool), tokens - sum(lengths)))
    return lengths


def _causal_flops(lengths: list[int]) -> float:
    forward = sum(4 * HEADS * HEAD_DIM * n * (n + 1) / 2 for n in lengths)
    return 3.5 * forward


def _problem(tokens: int):
    lengths = _document_lengths(tokens)
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, dout = (
        torch.randn(tokens, heads, HEAD_DIM, device=device, generator=gen, dtype=torch.bfloat16)
        for heads in (HEADS, KV_HEADS, KV_HEADS, HEADS)
    )
    bounds = torch.tensor([0, *lengths], device=device).cumsum(0)
    doc = torch.repeat_interleave(
        torch.arange(len(lengths), device=device, dtype=torch.int32),
        torch.tensor(lengths, device=device),
    )
    pos = (torch.arange(tokens, device=device) - bounds[doc.long()]).to(torch.int32)
    return lengths, q, k, v, dout, doc, pos


def _bitscale(q, k, v, dout, doc, pos, scale) -> Callable[[], torch.Tensor]:
    from bitscale.hdp import _attention_triton

    def run() -> torch.Tensor:
        out, lse = _attention_triton.block_forward(
            q, k, v, doc, pos, doc, pos, causal=True, scale=scale
        )
        delta = (dout.float() * out).sum(-1).transpose(0, 1)
        _attention_triton.block_backward(
            q, k, v, dout, lse, delta, doc, pos, doc, pos, causal=True, scale=scale
        )
        return out

    return run


def _flex(q, k, v, dout, doc, scale) -> Callable[[], torch.Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    tokens = q.shape[0]

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

    mask = create_block_mask(document_causal, None, None, tokens, tokens, device=q.device)
    flex = torch.compile(flex_attention, dynamic=False)
    q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0).detach().requires_grad_() for x in (q, k, v))
    dout4 = dout.transpose(0, 1).unsqueeze(0)

    def run() -> torch.Tensor:
        out = flex(q4, k4, v4, block_mask=mask, scale=scale, enable_gqa=True)
        out.backward(dout4)
        return out.detach()[0].transpose(0, 1)

    return run


def _sdpa_per_document(q, k, v, dout, lengths, scale) -> Callable[[], torch.Tensor]:
    pieces = []
    for x in (q, k, v, dout):
        pieces.append([t.transpose(0, 1).unsqueeze(0) for t in x.split(lengths)])
    leaves = [[t.detach().requires_grad_() for t in group] for group in pieces[:3]]

    def run() -> torch.Tensor:
        outs = []
        for qd, kd, vd, dd in zip(*leaves, pieces[3], strict=True):
            out = F.scaled_dot_product_attention(
                qd, kd, vd, is_causal=True, scale=scale, enable_gqa=True
            )
            out.backward(dd)
            outs.append(out.detach()[0].transpose(0, 1))
        return torch.cat(outs)

    return run


@pytest.mark.gpu
@pytest.mark.benchmark(group="hdp-attention-gpu")
@pytest.mark.parametrize("baseline", ["flex_attention", "sdpa_per_document"])
def test_attention_block_vs_torch(
    bench_compare: Callable, limits, quick: bool, baseline: str
) -> None:
    tokens = 16_384 if quick else 65_536
    lengths, q, k, v, dout, doc, pos = _problem(tokens)
    scale = HEAD_DIM**-0.5
    bitscale = _bitscale(q, k, v, dout, doc, pos, scale)
    if baseline == "flex_attention":
        other = _flex(q, k, v, dout, doc, scale)
        name = "FlexAttention (compiled, document-causal BlockMask)"
    else:
        other = _sdpa_per_document(q, k, v, dout, lengths, scale)
        name = "SDPA per document"
    torch.testing.assert_close(bitscale().to(torch.bfloat16), other(), atol=2e-2, rtol=2e-2)
    torch.cuda.synchronize()
    bench_compare(
        bitscale,
        other,
        baseline_name=name,
        rounds=5 if quick else 20,
        warmup_rounds=2,
        sync=torch.cuda.synchronize,
        case=f"{tokens} tokens, {len(lengths)} Wikipedia docs, H{HEADS} G{KV_HEADS} D{HEAD_DIM} bf16 causal fwd+bwd",
        shape={"tokens": tokens, "docs": len(lengths), "H": HEADS, "G": KV_HEADS, "D": HEAD_DIM},
        series=baseline,
        work=_causal_flops(lengths),
        limit=limits.gpu_peak("bf16"),
    )
