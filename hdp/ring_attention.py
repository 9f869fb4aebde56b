"""Causal attention for HDP work items: zigzag ring attention across ranks, block-diagonal
attention over packed documents on one rank, and a dense reference.

Shape legend (token-major, no batch dimension; packed documents are concatenated):
    T  tokens held by this rank        H  query heads      G  key/value heads (H % G == 0)
    D  head dim                         q_THD, k_TGD, v_TGD, out_THD, lse_HT

Zigzag layout of a multi-rank item (ring of d ranks, this rank at ring position r): every
document j of the item is padded at its tail to 2*d*c_j tokens and cut into 2*d chunks of
c_j tokens; this rank holds chunks r and 2d-1-r of every document, concatenated in that order,
documents one after the other (``chunk_sizes`` = (c_0, c_1, ...)). Causality then needs no
position ids: in ring step i this rank holds the K/V of ring position src = (r - i) mod d and

* i = 0: the local block is causal as it stands (chunk r precedes chunk 2d-1-r);
* src < r: only the first K/V chunk of src (chunk src < r) is visible, to every local query;
* src > r: both K/V chunks of src (src < 2d-1-src < 2d-1-r) are visible, to the second local
  chunk only, and nothing of src is visible to the first (chunk r < src).

So every step after the first costs exactly 2*c^2 query-key pairs per document on every rank
(the causal work is split evenly). Padding sits at each document's tail, after every real
token, so real queries never see padding keys, and padding queries (loss mask 0) get exactly
zero gradient.

Partial results are merged through their log-sum-exp in float32 (float64 when the inputs are
float64). In backward the K/V blocks travel the ring again and the dK/dV accumulators travel
with them; after d hops each accumulator is back at its owner.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F

from .attention_block import (
    TokenDocs,
    block_backward,
    block_forward,
    check_heads,
    compute_dtype,
    merge_partial,
    softmax_scale,
)
from .comm import (
    CommCategory,
    CommCounter,
    RingChannel,
    RingExchange,
    check_ring_position,
    ring_tag,
)

__all__ = [
    "causal_attention_reference",
    "packed_causal_attention",
    "zigzag_ring_attention",
]


def _check_shapes(q_THD: torch.Tensor, k_TGD: torch.Tensor, v_TGD: torch.Tensor) -> None:
    if q_THD.dim() != 3 or k_TGD.dim() != 3 or v_TGD.dim() != 3:
        raise ValueError(
            "attention expects token-major q [T, H, D], k and v [T, G, D] (no batch dimension); "
            f"got q {tuple(q_THD.shape)}, k {tuple(k_TGD.shape)}, v {tuple(v_TGD.shape)}"
        )
    if k_TGD.shape != v_TGD.shape or q_THD.shape[0] != k_TGD.shape[0]:
        raise ValueError(
            "k and v must have the same shape and as many tokens as q; got "
            f"q {tuple(q_THD.shape)}, k {tuple(k_TGD.shape)}, v {tuple(v_TGD.shape)}"
        )
    check_heads(q_THD, k_TGD)


def causal_attention_reference(
    q_THD: torch.Tensor, k_TGD: torch.Tensor, v_TGD: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Dense causal softmax attention over one sequence, in plain torch ops (the oracle the
    ring and packed paths are tested against). Differentiable by autograd."""
    _check_shapes(q_THD, k_TGD, v_TGD)
    num_tokens, num_heads, head_dim = q_THD.shape
    group = num_heads // k_TGD.shape[1]
    k_THD = k_TGD.repeat_interleave(group, dim=1)
    v_THD = v_TGD.repeat_interleave(group, dim=1)
    scores_HTT = torch.einsum("qhd,khd->hqk", q_THD, k_THD) * softmax_scale(head_dim, scale)
    future = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=q_THD.device).triu(1)
    probs_HTT = scores_HTT.masked_fill(future, float("-inf")).softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", probs_HTT, v_THD)


def _sdpa_causal(
    q_THD: torch.Tensor, k_TGD: torch.Tensor, v_TGD: torch.Tensor, scale: float
) -> torch.Tensor:
    # A batch dimension of 1: with 3-D inputs the CPU dispatcher takes the math path, which
    # materializes the [H, T, T] scores (8 GiB at 16K tokens and 8 heads); 4-D takes flash.
    out_1HTD = F.scaled_dot_product_attention(
        q_THD.transpose(0, 1).unsqueeze(0),
        k_TGD.transpose(0, 1).unsqueeze(0),
        v_TGD.transpose(0, 1).unsqueeze(0),
        is_causal=True,
        scale=scale,
        enable_gqa=True,
    )
    return out_1HTD.squeeze(0).transpose(0, 1)


class _PackedAttention(torch.autograd.Function):
    """All documents of a packed chunk as one attention block (one launch on CUDA)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        q_THD: torch.Tensor,
        k_TGD: torch.Tensor,
        v_TGD: torch.Tensor,
        docs: TokenDocs,
        scale: float,
    ) -> torch.Tensor:
        out_THD, lse_HT = block_forward(q_THD, k_TGD, v_TGD, docs, docs, scale=scale)
        ctx.save_for_backward(q_THD, k_TGD, v_TGD, out_THD, lse_HT)
        ctx.docs, ctx.scale = docs, scale
        return out_THD.to(q_THD.dtype)

    @staticmethod
    def backward(ctx, dout_THD: torch.Tensor):  # type: ignore[override]
        q_THD, k_TGD, v_TGD, out_THD, lse_HT = ctx.saved_tensors
        delta_HT = (dout_THD.to(out_THD.dtype) * out_THD).sum(dim=-1).transpose(0, 1)
        dq, dk, dv = block_backward(
            q_THD, k_TGD, v_TGD, dout_THD, lse_HT, delta_HT, ctx.docs, ctx.docs, scale=ctx.scale
        )
        return dq.to(q_THD.dtype), dk.to(k_TGD.dtype), dv.to(v_TGD.dtype), None, None


def packed_causal_attention(
    q_THD: torch.Tensor,
    k_TGD: torch.Tensor,
    v_TGD: torch.Tensor,
    cu_seqlens: Sequence[int],
    scale: float | None = None,
) -> torch.Tensor:
    """Block-diagonal causal attention over documents packed along T: document i holds
    tokens ``cu_seqlens[i]:cu_seqlens[i+1]`` and attends only to itself. No communication;
    all documents in one attention block. Differentiable by autograd."""
    _check_shapes(q_THD, k_TGD, v_TGD)
    bounds = tuple(int(b) for b in cu_seqlens)
    if (
        len(bounds) < 2
        or bounds[0] != 0
        or bounds[-1] != q_THD.shape[0]
        or any(b >= e for b, e in pairwise(bounds))
    ):
        raise ValueError(
            "cu_seqlens must start at 0, increase strictly and end at the token count "
            f"{q_THD.shape[0]}; got {list(bounds)}"
        )
    docs = TokenDocs.packed(bounds, q_THD.device)
    return _PackedAttention.apply(q_THD, k_TGD, v_TGD, docs, softmax_scale(q_THD.shape[2], scale))


class _ZigzagRingAttention(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        q_THD: torch.Tensor,
        k_TGD: torch.Tensor,
        v_TGD: torch.Tensor,
        ranks: tuple[int, ...],
        position: int,
        item_id: int,
        chunk_sizes: tuple[int, ...],
        scale: float,
        counter: CommCounter | None,
    ) -> torch.Tensor:
        compute = compute_dtype(q_THD.dtype)
        ring_size = len(ranks)
        device = q_THD.device
        q_docs = TokenDocs.zigzag(chunk_sizes, ring_size, position, device)
        kv_numel = k_TGD.numel()
        kv_block = torch.cat([k_TGD.reshape(-1), v_TGD.reshape(-1)])
        out_THD = torch.zeros(q_THD.shape, dtype=compute, device=device)
        lse_HT = torch.full(
            (q_THD.shape[1], q_THD.shape[0]), -math.inf, dtype=compute, device=device
        )
        tag = ring_tag(item_id, RingChannel.KV_FORWARD)
        for step in range(ring_size):
            exchange = None
            if step + 1 < ring_size:
                exchange = RingExchange(
                    ranks, position, tag, CommCategory.RING_KV, counter, kv_block
                )
            src = (position - step) % ring_size
            k_docs = TokenDocs.zigzag(chunk_sizes, ring_size, src, device)
            block_out, block_lse = block_forward(
                q_THD,
                kv_block[:kv_numel].view(k_TGD.shape),
                kv_block[kv_numel:].view(v_TGD.shape),
                q_docs,
                k_docs,
                scale=scale,
            )
            merge_partial(out_THD, lse_HT, block_out, block_lse)
            if exchange is not None:
                kv_block = exchange.wait()
        ctx.save_for_backward(q_THD, k_TGD, v_TGD, out_THD, lse_HT)
        ctx.ring = (ranks, position, item_id, chunk_sizes, scale, counter)
        return out_THD.to(q_THD.dtype)

    @staticmethod
    def backward(ctx, dout_THD: torch.Tensor):  # type: ignore[override]
        q_THD, k_TGD, v_TGD, out_THD, lse_HT = ctx.saved_tensors
        ranks, position, item_id, chunk_sizes, scale, counter = ctx.ring
        compute = out_THD.dtype
        ring_size = len(ranks)
        device = q_THD.device
        q_docs = TokenDocs.zigzag(chunk_sizes, ring_size, position, device)
        delta_HT = (dout_THD.to(compute) * out_THD).sum(dim=-1).transpose(0, 1)
        kv_numel = k_TGD.numel()
        kv_block = torch.cat([k_TGD.reshape(-1), v_TGD.reshape(-1)])
        dq_THD = torch.zeros(q_THD.shape, dtype=compute, device=device)
        received_dkv = None
        kv_tag = ring_tag(item_id, RingChannel.KV_BACKWARD)
        dkv_tag = ring_tag(item_id, RingChannel.DKV)
        for step in range(ring_size):
            exchange = None
            if step + 1 < ring_size:
                exchange = RingExchange(
                    ranks, position, kv_tag, CommCategory.RING_KV, counter, kv_block
                )
            src = (position - step) % ring_size
            k_docs = TokenDocs.zigzag(chunk_sizes, ring_size, src, device)
            dq, dk, dv = block_backward(
                q_THD,
                kv_block[:kv_numel].view(k_TGD.shape),
                kv_block[kv_numel:].view(v_TGD.shape),
                dout_THD,
                lse_HT,
                delta_HT,
                q_docs,
                k_docs,
                scale=scale,
            )
            dq_THD += dq
            dkv_block = torch.cat([dk.reshape(-1), dv.reshape(-1)])
            if received_dkv is not None:
                dkv_block += received_dkv
            # The accumulator for src's block moves on with src's K/V; after ring_size hops
            # (the last one from position - 1) this rank receives its own finished dK/dV.
            dkv_exchange = RingExchange(
                ranks, position, dkv_tag, CommCategory.RING_DKV, counter, dkv_block
            )
            if exchange is not None:
                kv_block = exchange.wait()
            received_dkv = dkv_exchange.wait()
        assert received_dkv is not None
        dk_TGD = received_dkv[:kv_numel].view(k_TGD.shape).to(k_TGD.dtype)
        dv_TGD = received_dkv[kv_numel:].view(v_TGD.shape).to(v_TGD.dtype)
        return dq_THD.to(q_THD.dtype), dk_TGD, dv_TGD, None, None, None, None, None, None


def zigzag_ring_attention(
    q_THD: torch.Tensor,
    k_TGD: torch.Tensor,
    v_TGD: torch.Tensor,
    *,
    ranks: Sequence[int],
    position: int,
    item_id: int,
    chunk_sizes: Sequence[int],
    scale: float | None = None,
    counter: CommCounter | None = None,
) -> torch.Tensor:
    """Causal attention of a sequence (or several documents) zigzag-sharded over ``ranks``.

    Call it on every rank of ``ranks`` (global ranks in ring order; this rank is
    ``ranks[position]``) with that rank's local q/k/v in the zigzag layout of the module
    docstring; ``chunk_sizes`` holds the chunk length c_j of each document (the local tensors
    hold sum(2*c_j) tokens). Messages are point-to-point on the world group with tags derived
    from ``item_id``, so several rings may run at once on disjoint or overlapping rank sets as
    long as every rank runs its items in one global order. Bytes sent are added to ``counter``:
    per call and rank, forward sends K/V (d-1) times; backward sends K/V (d-1) times and
    dK/dV d times (in the compute dtype: float32, or float64 for float64 inputs).
    """
    _check_shapes(q_THD, k_TGD, v_TGD)
    ranks = tuple(int(r) for r in ranks)
    chunk_sizes = tuple(int(c) for c in chunk_sizes)
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"ranks must list distinct ranks in ring order, got {ranks}")
    if any(c < 1 for c in chunk_sizes) or 2 * sum(chunk_sizes) != q_THD.shape[0]:
        raise ValueError(
            f"chunk_sizes {chunk_sizes} must be positive and 2*sum(chunk_sizes) must equal the "
            f"local token count {q_THD.shape[0]}"
        )
    check_ring_position(ranks, position)  # last: it asks torch.distributed for this rank
    return _ZigzagRingAttention.apply(
        q_THD,
        k_TGD,
        v_TGD,
        ranks,
        position,
        item_id,
        chunk_sizes,
        softmax_scale(q_THD.shape[2], scale),
        counter,
    )
