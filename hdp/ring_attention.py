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
    if q_THD.shape[2] != k_TGD.shape[2] or q_THD.shape[1] % k_TGD.shape[1] != 0:
        raise ValueError(
            "q heads must be a multiple of k/v heads (GQA) with equal head dims; got "
            f"q {tuple(q_THD.shape)}, k {tuple(k_TGD.shape)}"
        )


def _scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else scale


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    scores_HTT = torch.einsum("qhd,khd->hqk", q_THD, k_THD) * _scale(head_dim, scale)
    future = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=q_THD.device).triu(1)
    probs_HTT = scores_HTT.masked_fill(future, float("-inf")).softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", probs_HTT, v_THD)


def _sdpa_causal(
    q_THD: torch.Tensor, k_TGD: torch.Tensor, v_TGD: torch.Tensor, scale: float
) -> torch.Tensor:
    group = q_THD.shape[1] // k_TGD.shape[1]
    out_HTD = F.scaled_dot_product_attention(
        q_THD.transpose(0, 1),
        k_TGD.repeat_interleave(group, dim=1).transpose(0, 1),
        v_TGD.repeat_interleave(group, dim=1).transpose(0, 1),
        is_causal=True,
        scale=scale,
    )
    return out_HTD.transpose(0, 1)


def packed_causal_attention(
    q_THD: torch.Tensor,
    k_TGD: torch.Tensor,
    v_TGD: torch.Tensor,
    cu_seqlens: Sequence[int],
    scale: float | None = None,
) -> torch.Tensor:
    """Block-diagonal causal attention over documents packed along T: document i holds
    tokens ``cu_seqlens[i]:cu_seqlens[i+1]`` and attends only to itself. No communication.
    Differentiable by autograd."""
    _check_shapes(q_THD, k_TGD, v_TGD)
    bounds = [int(b) for b in cu_seqlens]
    if (
        len(bounds) < 2
        or bounds[0] != 0
        or bounds[-1] != q_THD.shape[0]
        or any(b >= e for b, e in pairwise(bounds))
    ):
        raise ValueError(
            "cu_seqlens must start at 0, increase strictly and end at the token count "
            f"{q_THD.shape[0]}; got {bounds}"
        )
    scale = _scale(q_THD.shape[2], scale)
    outs = [_sdpa_causal(q_THD[b:e], k_TGD[b:e], v_TGD[b:e], scale) for b, e in pairwise(bounds)]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _block_scores(
    q_THD: torch.Tensor, k_TGD: torch.Tensor, scale: float, causal: bool
) -> torch.Tensor:
    group = q_THD.shape[1] // k_TGD.shape[1]
    scores_HQK = torch.einsum("qhd,khd->hqk", q_THD, k_TGD.repeat_interleave(group, dim=1))
    scores_HQK = scores_HQK * scale
    if causal:
        future = torch.ones(
            q_THD.shape[0], k_TGD.shape[0], dtype=torch.bool, device=q_THD.device
        ).triu(1)
        scores_HQK = scores_HQK.masked_fill(future, float("-inf"))
    return scores_HQK


def _block_forward(
    q_THD: torch.Tensor, k_TGD: torch.Tensor, v_TGD: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q to one K/V block: (normalized out_THD, lse_HT), in the compute dtype."""
    scores_HQK = _block_scores(q_THD, k_TGD, scale, causal)
    lse_HT = torch.logsumexp(scores_HQK, dim=-1)
    probs_HQK = torch.exp(scores_HQK - lse_HT.unsqueeze(-1))
    group = q_THD.shape[1] // k_TGD.shape[1]
    out_THD = torch.einsum("hqk,khd->qhd", probs_HQK, v_TGD.repeat_interleave(group, dim=1))
    return out_THD, lse_HT


def _block_backward(
    q_THD: torch.Tensor,
    k_TGD: torch.Tensor,
    v_TGD: torch.Tensor,
    dout_THD: torch.Tensor,
    lse_HT: torch.Tensor,
    delta_HT: torch.Tensor,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the *final* lse and delta = rowsum(dout * out)."""
    num_kv_heads = k_TGD.shape[1]
    group = q_THD.shape[1] // num_kv_heads
    scores_HQK = _block_scores(q_THD, k_TGD, scale, causal)
    probs_HQK = torch.exp(scores_HQK - lse_HT.unsqueeze(-1))
    k_THD = k_TGD.repeat_interleave(group, dim=1)
    v_THD = v_TGD.repeat_interleave(group, dim=1)
    dv_THD = torch.einsum("hqk,qhd->khd", probs_HQK, dout_THD)
    dprobs_HQK = torch.einsum("qhd,khd->hqk", dout_THD, v_THD)
    dscores_HQK = probs_HQK * (dprobs_HQK - delta_HT.unsqueeze(-1)) * scale
    dq_THD = torch.einsum("hqk,khd->qhd", dscores_HQK, k_THD)
    dk_THD = torch.einsum("hqk,qhd->khd", dscores_HQK, q_THD)
    num_keys, _, head_dim = k_TGD.shape
    dk_TGD = dk_THD.reshape(num_keys, num_kv_heads, group, head_dim).sum(dim=2)
    dv_TGD = dv_THD.reshape(num_keys, num_kv_heads, group, head_dim).sum(dim=2)
    return dq_THD, dk_TGD, dv_TGD


def _merge(
    out_THD: torch.Tensor,
    lse_HT: torch.Tensor,
    block_out_THD: torch.Tensor,
    block_lse_HT: torch.Tensor,
) -> None:
    """In place: out, lse <- softmax-weighted union of (out, lse) and the block's."""
    new_lse_HT = torch.logaddexp(lse_HT, block_lse_HT)
    keep_TH1 = torch.exp(lse_HT - new_lse_HT).transpose(0, 1).unsqueeze(-1)
    take_TH1 = torch.exp(block_lse_HT - new_lse_HT).transpose(0, 1).unsqueeze(-1)
    out_THD.copy_(keep_TH1 * out_THD + take_TH1 * block_out_THD)
    lse_HT.copy_(new_lse_HT)


def _documents(chunk_sizes: Sequence[int]) -> list[tuple[int, int]]:
    """(offset, c) of every document in the local zigzag layout."""
    docs, offset = [], 0
    for c in chunk_sizes:
        docs.append((offset, c))
        offset += 2 * c
    return docs


def _visible(position: int, src: int, offset: int, c: int) -> tuple[slice, slice, bool]:
    """(query rows, key rows, causal) of one document for ring position ``position`` holding
    the K/V of ring position ``src``: the zigzag rules of the module docstring."""
    if src == position:
        return slice(offset, offset + 2 * c), slice(offset, offset + 2 * c), True
    if src < position:
        return slice(offset, offset + 2 * c), slice(offset, offset + c), False
    return slice(offset + c, offset + 2 * c), slice(offset, offset + 2 * c), False


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
        compute = _compute_dtype(q_THD.dtype)
        q_c = q_THD.to(compute)
        ring_size = len(ranks)
        docs = _documents(chunk_sizes)
        num_kv_tokens, num_kv_heads, head_dim = k_TGD.shape
        kv_numel = num_kv_tokens * num_kv_heads * head_dim
        kv_block = torch.cat([k_TGD.reshape(-1), v_TGD.reshape(-1)])
        out_THD = torch.zeros(q_THD.shape, dtype=compute, device=q_THD.device)
        lse_HT = torch.full(
            (q_THD.shape[1], q_THD.shape[0]), float("-inf"), dtype=compute, device=q_THD.device
        )
        tag = ring_tag(item_id, RingChannel.KV_FORWARD)
        for step in range(ring_size):
            exchange = None
            if step + 1 < ring_size:
                exchange = RingExchange(
                    ranks, position, tag, CommCategory.RING_KV, counter, kv_block
                )
            src = (position - step) % ring_size
            k_c = kv_block[:kv_numel].view(k_TGD.shape).to(compute)
            v_c = kv_block[kv_numel:].view(v_TGD.shape).to(compute)
            for offset, c in docs:
                rows, cols, causal = _visible(position, src, offset, c)
                block_out, block_lse = _block_forward(
                    q_c[rows], k_c[cols], v_c[cols], scale, causal
                )
                _merge(out_THD[rows], lse_HT[:, rows], block_out, block_lse)
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
        docs = _documents(chunk_sizes)
        q_c = q_THD.to(compute)
        dout_c = dout_THD.to(compute)
        delta_HT = (dout_c * out_THD).sum(dim=-1).transpose(0, 1)
        kv_numel = k_TGD.numel()
        kv_block = torch.cat([k_TGD.reshape(-1), v_TGD.reshape(-1)])
        dq_THD = torch.zeros_like(q_c)
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
            k_c = kv_block[:kv_numel].view(k_TGD.shape).to(compute)
            v_c = kv_block[kv_numel:].view(v_TGD.shape).to(compute)
            dkv_block = (
                torch.zeros(2 * kv_numel, dtype=compute, device=q_THD.device)
                if received_dkv is None
                else received_dkv
            )
            dk_c = dkv_block[:kv_numel].view(k_TGD.shape)
            dv_c = dkv_block[kv_numel:].view(v_TGD.shape)
            for offset, c in docs:
                rows, cols, causal = _visible(position, src, offset, c)
                dq, dk, dv = _block_backward(
                    q_c[rows],
                    k_c[cols],
                    v_c[cols],
                    dout_c[rows],
                    lse_HT[:, rows],
                    delta_HT[:, rows],
                    scale,
                    causal,
                )
                dq_THD[rows] += dq
                dk_c[cols] += dk
                dv_c[cols] += dv
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
        _scale(q_THD.shape[2], scale),
        counter,
    )
