"""The tiled torch back end of the attention block (CPU, and float64 anywhere).

Queries go in tiles of ``_CPU_BLOCK_M``; each tile visits only the keys of its range
(:func:`~bitscale.hdp.attention_block.key_ranges`) in tiles of ``_CPU_BLOCK_N``, with an
online softmax in forward and the final log-sum-exp in backward, so the largest temporary is
one ``[G, H/G, BLOCK_M, BLOCK_N]`` score tile. Query heads are viewed as ``[G, H/G]`` so every
group of query heads meets its K/V head by broadcasting: K/V heads are never copied.

Tiles run in a fixed order, so results are deterministic run to run. Ranges and tile corners
are read to the host (``tolist``): cheap on the CPU, a sync per call on CUDA, where this path
only serves float64.
"""

from __future__ import annotations

import math

import torch

from .attention_block import TokenDocs, compute_dtype, key_ranges

# 256 queries x 512 keys of 8 heads is 4 MiB of float32 scores, small next to a chunk.
_CPU_BLOCK_M = 256
_CPU_BLOCK_N = 512


def _heads_first(x_THD: torch.Tensor, kv_heads: int, compute: torch.dtype) -> torch.Tensor:
    """[T, H, D] -> [G, H/G, T, D] in the compute dtype (one copy)."""
    tokens, heads, dim = x_THD.shape
    grouped = x_THD.reshape(tokens, kv_heads, heads // kv_heads, dim).permute(1, 2, 0, 3)
    return grouped.to(compute).contiguous()


def _tokens_first(x_GRTD: torch.Tensor) -> torch.Tensor:
    """[G, H/G, T, D] -> [T, H, D]."""
    kv_heads, group, tokens, dim = x_GRTD.shape
    return x_GRTD.permute(2, 0, 1, 3).reshape(tokens, kv_heads * group, dim)


def _tiles(
    q_doc: torch.Tensor,
    q_pos: torch.Tensor,
    k_doc: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
):
    """(query rows, key rows, visible mask [BM, BN] or None when every pair is visible) of
    every tile pair that can see a key."""
    starts, ends = key_ranges(
        TokenDocs(q_doc, q_pos), TokenDocs(k_doc, k_pos), _CPU_BLOCK_M, causal
    )
    num_queries = q_doc.shape[0]
    # Tile corners on the host, to skip the mask of tiles inside one document's visible part
    # (most tiles of a long document: half the elementwise work there).
    q_doc_list, q_pos_list = q_doc.tolist(), q_pos.tolist()
    k_doc_list, k_pos_list = k_doc.tolist(), k_pos.tolist()
    for m0, start, end in zip(
        range(0, num_queries, _CPU_BLOCK_M), starts.tolist(), ends.tolist(), strict=True
    ):
        m1 = min(m0 + _CPU_BLOCK_M, num_queries)
        rows = slice(m0, m1)
        for n0 in range(start, end, _CPU_BLOCK_N):
            n1 = min(n0 + _CPU_BLOCK_N, end)
            cols = slice(n0, n1)
            one_document = (
                q_doc_list[m0] == q_doc_list[m1 - 1] == k_doc_list[n0] == k_doc_list[n1 - 1]
            )
            if one_document and (not causal or k_pos_list[n1 - 1] <= q_pos_list[m0]):
                yield rows, cols, None
                continue
            visible = q_doc[rows, None] == k_doc[None, cols]
            if causal:
                visible &= k_pos[None, cols] <= q_pos[rows, None]
            yield rows, cols, visible


def block_forward(
    q_THD: torch.Tensor,
    k_TGD: torch.Tensor,
    v_TGD: torch.Tensor,
    q_doc: torch.Tensor,
    q_pos: torch.Tensor,
    k_doc: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    compute = compute_dtype(q_THD.dtype)
    kv_heads = k_TGD.shape[1]
    q = _heads_first(q_THD, kv_heads, compute)
    k = k_TGD.to(compute).permute(1, 0, 2).unsqueeze(1)  # [G, 1, Tk, D]
    v = v_TGD.to(compute).permute(1, 0, 2).unsqueeze(1)
    stat_shape = q.shape[:-1]
    row_max = torch.full(stat_shape, -math.inf, dtype=compute, device=q.device)
    row_sum = torch.zeros(stat_shape, dtype=compute, device=q.device)
    acc = torch.zeros_like(q)
    for rows, cols, visible in _tiles(q_doc, q_pos, k_doc, k_pos, causal):
        scores = torch.matmul(q[:, :, rows], k[:, :, cols].transpose(-1, -2)).mul_(scale)
        if visible is not None:
            scores.masked_fill_(~visible, -math.inf)
        tile_max = torch.maximum(row_max[:, :, rows], scores.amax(dim=-1))
        # Rows that have seen no key yet keep max -inf; subtract 0 there (exp(-inf) = 0).
        base = tile_max.masked_fill(tile_max == -math.inf, 0.0)
        probs = torch.exp(scores.sub_(base.unsqueeze(-1)))
        rescale = torch.exp(row_max[:, :, rows] - base)
        row_sum[:, :, rows] = row_sum[:, :, rows] * rescale + probs.sum(dim=-1)
        acc[:, :, rows] = acc[:, :, rows] * rescale.unsqueeze(-1) + torch.matmul(
            probs, v[:, :, cols]
        )
        row_max[:, :, rows] = tile_max
    seen = row_sum > 0
    out = acc / torch.where(seen, row_sum, 1.0).unsqueeze(-1)
    lse = torch.where(seen, row_max + torch.log(row_sum), -math.inf)
    return _tokens_first(out), lse.flatten(0, 1)


def block_backward(
    q_THD: torch.Tensor,
    k_TGD: torch.Tensor,
    v_TGD: torch.Tensor,
    dout_THD: torch.Tensor,
    lse_HT: torch.Tensor,
    delta_HT: torch.Tensor,
    q_doc: torch.Tensor,
    q_pos: torch.Tensor,
    k_doc: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    compute = compute_dtype(q_THD.dtype)
    kv_heads = k_TGD.shape[1]
    q = _heads_first(q_THD, kv_heads, compute)
    dout = _heads_first(dout_THD, kv_heads, compute)
    k = k_TGD.to(compute).permute(1, 0, 2).unsqueeze(1)  # [G, 1, Tk, D]
    v = v_TGD.to(compute).permute(1, 0, 2).unsqueeze(1)
    stat_shape = q.shape[:-1]
    lse = lse_HT.to(compute).reshape(stat_shape)
    # Queries that see no key at all have lse -inf; every score of theirs is -inf too.
    lse = lse.masked_fill(lse == -math.inf, 0.0)
    delta = delta_HT.to(compute).reshape(stat_shape)
    dq = torch.zeros_like(q)
    dk = torch.zeros(k_TGD.shape[1], k_TGD.shape[0], k_TGD.shape[2], dtype=compute, device=q.device)
    dv = torch.zeros_like(dk)
    for rows, cols, visible in _tiles(q_doc, q_pos, k_doc, k_pos, causal):
        scores = torch.matmul(q[:, :, rows], k[:, :, cols].transpose(-1, -2)).mul_(scale)
        if visible is not None:
            scores.masked_fill_(~visible, -math.inf)
        probs = torch.exp(scores.sub_(lse[:, :, rows].unsqueeze(-1)))
        dout_tile = dout[:, :, rows]
        # Sums over the query heads of a group and over the tile's queries: [G, BN, D].
        dv[:, cols] += torch.matmul(probs.transpose(-1, -2), dout_tile).sum(dim=1)
        dprobs = torch.matmul(dout_tile, v[:, :, cols].transpose(-1, -2))
        dscores = probs.mul_(dprobs.sub_(delta[:, :, rows].unsqueeze(-1))).mul_(scale)
        dq[:, :, rows] += torch.matmul(dscores, k[:, :, cols])
        dk[:, cols] += torch.matmul(dscores.transpose(-1, -2), q[:, :, rows]).sum(dim=1)
    return _tokens_first(dq), dk.permute(1, 0, 2), dv.permute(1, 0, 2)
