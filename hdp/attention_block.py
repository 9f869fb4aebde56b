"""The attention block: queries of one chunk against the keys and values of another, with
documents packed inside both chunks, as one fused computation.

Every attention HDP runs is made of such blocks: a single-rank micro-batch is one block (its
packed documents against themselves), and each step of a zigzag ring is one block (this
rank's queries against the K/V chunk that step holds). Which key a query sees is decided by
where the tokens sit, not by which call they are in:

    key j is visible to query i  iff  doc(i) == doc(j)  and  (not causal or pos(j) <= pos(i))

with ``pos`` the token's position in its (padded) document. Along each chunk, document ids
never decrease and positions strictly increase within a document (packed documents and
zigzag shards are both laid out that way), so the keys sorted by (doc, pos) are the chunk
itself, and the keys any tile of queries can see are one contiguous range found by binary
search (:func:`key_ranges`, and :func:`query_ranges` for the queries of a key tile). Back ends visit only those ranges: no back end materializes a
``[H, Tq, Tk]`` score matrix, so memory is linear in tokens.

``block_forward`` returns the block's normalized output and its log-sum-exp (float32, or
float64 for float64 inputs); ``block_backward`` returns the block's exact share of the
gradients given the *final* log-sum-exp over all blocks and ``delta = rowsum(dout * out)``
(the flash / ring-flash recipe), so partial results of several blocks merge through their
log-sum-exp (:func:`merge_partial`) and their gradients simply add.

Back ends, chosen in one place (:func:`_backend`):

* CUDA, 16/32-bit floats: the Triton kernels of ``_attention_triton`` (GQA without copying
  K/V heads, all documents in one launch). torch's fused SDPA kernels take no document mask
  and FlexAttention's autograd cannot take the ring's final log-sum-exp in backward, so
  neither can serve as a ring block; FlexAttention is the baseline they are measured against
  in ``bench/hdp``.
* Everything else (CPU, float64 anywhere): tiles of queries and keys in torch with an online
  softmax, in float32 (float64 for float64 inputs, the exact path the tests' dense oracle is
  compared with).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType

import torch

__all__ = [
    "TokenDocs",
    "block_backward",
    "block_forward",
    "check_heads",
    "compute_dtype",
    "key_ranges",
    "merge_partial",
    "query_ranges",
    "softmax_scale",
]

_DOC_STRIDE = 2**32
"""(doc, pos) sorts as the int64 ``doc * 2^32 + pos`` (int32 positions)."""


@dataclass(frozen=True)
class TokenDocs:
    """Where each token of a chunk sits: its document and its position in that document.

    ``doc`` and ``pos`` are int32 ``[T]`` tensors on the chunk's device; ``doc`` never
    decreases along T and ``pos`` strictly increases within a document.
    """

    doc: torch.Tensor
    pos: torch.Tensor

    @staticmethod
    def packed(cu_seqlens: tuple[int, ...], device: torch.device) -> TokenDocs:
        """Whole documents one after the other: document i is ``cu_seqlens[i]:cu_seqlens[i+1]``."""
        bounds = torch.tensor(cu_seqlens)
        lengths = bounds.diff()
        doc = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), lengths)
        starts = torch.repeat_interleave(bounds[:-1], lengths)
        pos = (torch.arange(cu_seqlens[-1]) - starts).to(torch.int32)
        return TokenDocs(doc.to(device), pos.to(device))

    @staticmethod
    def zigzag(
        chunk_sizes: tuple[int, ...], ring_size: int, position: int, device: torch.device
    ) -> TokenDocs:
        """The zigzag shard of ring position ``position``: chunks ``position`` and
        ``2 * ring_size - 1 - position`` of every document (chunk length ``chunk_sizes[j]``)."""
        docs, positions = [], []
        for j, c in enumerate(chunk_sizes):
            for chunk in (position, 2 * ring_size - 1 - position):
                positions.append(torch.arange(chunk * c, (chunk + 1) * c, dtype=torch.int32))
            docs.append(torch.full((2 * c,), j, dtype=torch.int32))
        return TokenDocs(torch.cat(docs).to(device), torch.cat(positions).to(device))

    def __len__(self) -> int:
        return self.doc.shape[0]

    def sort_keys(self) -> torch.Tensor:
        """int64 (doc, pos) keys, ascending along T."""
        return self.doc.to(torch.int64) * _DOC_STRIDE + self.pos.to(torch.int64)


def key_ranges(
    q_docs: TokenDocs, k_docs: TokenDocs, block_m: int, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each tile of ``block_m`` queries, the int32 range ``[start, end)`` of the keys any
    of its queries can see (on the chunk's device, computed without a host sync).

    The tile's first query sees nothing before its document's first key; its last query sees
    nothing past its own (doc, pos) (causal) or past its document's last key (full). Queries
    are sorted by (doc, pos) too, so every query of the tile lies between those bounds.
    """
    first = torch.arange(0, len(q_docs), block_m, device=q_docs.doc.device)
    last = torch.clamp(first + block_m, max=len(q_docs)) - 1
    start = torch.searchsorted(k_docs.doc, q_docs.doc[first], out_int32=True)
    if causal:
        end = torch.searchsorted(
            k_docs.sort_keys(), q_docs.sort_keys()[last], right=True, out_int32=True
        )
    else:
        end = torch.searchsorted(k_docs.doc, q_docs.doc[last], right=True, out_int32=True)
    return start, end


def query_ranges(
    q_docs: TokenDocs, k_docs: TokenDocs, block_n: int, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each tile of ``block_n`` keys, the int32 range ``[start, end)`` of the queries that
    can see any of its keys: from the first query at or after the tile's first key (causal)
    or the first query of its document (full), to the last query of its last key's document.
    """
    first = torch.arange(0, len(k_docs), block_n, device=k_docs.doc.device)
    last = torch.clamp(first + block_n, max=len(k_docs)) - 1
    if causal:
        start = torch.searchsorted(q_docs.sort_keys(), k_docs.sort_keys()[first], out_int32=True)
    else:
        start = torch.searchsorted(q_docs.doc, k_docs.doc[first], out_int32=True)
    end = torch.searchsorted(q_docs.doc, k_docs.doc[last], right=True, out_int32=True)
    return start, end


def check_heads(q_THD: torch.Tensor, k_TGD: torch.Tensor) -> None:
    """Query heads in whole groups per K/V head (GQA), one head dim."""
    if q_THD.shape[2] != k_TGD.shape[2] or q_THD.shape[1] % k_TGD.shape[1] != 0:
        raise ValueError(
            "q heads must be a multiple of k/v heads (GQA) with equal head dims; got "
            f"q {tuple(q_THD.shape)}, k {tuple(k_TGD.shape)}"
        )


def _check_block(
    q_THD: torch.Tensor,
    k_TGD: torch.Tensor,
    v_TGD: torch.Tensor,
    q_docs: TokenDocs,
    k_docs: TokenDocs,
) -> None:
    if q_THD.dim() != 3 or k_TGD.dim() != 3 or k_TGD.shape != v_TGD.shape:
        raise ValueError(
            "an attention block takes q [Tq, H, D] and k, v [Tk, G, D]; got "
            f"q {tuple(q_THD.shape)}, k {tuple(k_TGD.shape)}, v {tuple(v_TGD.shape)}"
        )
    check_heads(q_THD, k_TGD)
    if len(q_docs) != q_THD.shape[0] or len(k_docs) != k_TGD.shape[0]:
        raise ValueError(
            f"the token documents cover {len(q_docs)} queries and {len(k_docs)} keys, but q has "
            f"{q_THD.shape[0]} and k {k_TGD.shape[0]} tokens; describe every token once"
        )
    if not (q_THD.dtype == k_TGD.dtype == v_TGD.dtype) or not q_THD.dtype.is_floating_point:
        raise ValueError(
            f"q, k and v must share one floating dtype; got {q_THD.dtype}, {k_TGD.dtype}, "
            f"{v_TGD.dtype}"
        )
    if not (q_THD.device == k_TGD.device == v_TGD.device):
        raise ValueError(
            f"q, k and v must be on one device; got {q_THD.device}, {k_TGD.device}, {v_TGD.device}"
        )


def softmax_scale(head_dim: int, scale: float | None) -> float:
    """``scale``, or ``1 / sqrt(head_dim)`` when None."""
    return 1.0 / math.sqrt(head_dim) if scale is None else scale


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics, merges and gradient accumulators: float64 for float64 inputs,
    else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _backend(q_THD: torch.Tensor) -> ModuleType:
    """The one place that knows the hardware: Triton on CUDA, tiled torch elsewhere."""
    if q_THD.device.type == "cuda" and q_THD.dtype != torch.float64:
        from . import _attention_triton

        return _attention_triton
    from . import _attention_torch

    return _attention_torch


def block_forward(
    q_THD: torch.Tensor,
    k_TGD: torch.Tensor,
    v_TGD: torch.Tensor,
    q_docs: TokenDocs,
    k_docs: TokenDocs,
    *,
    causal: bool = True,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out_THD, lse_HT)`` of the block in the compute dtype (see :func:`compute_dtype`).

    Queries that see no key of the block get ``out = 0`` and ``lse = -inf``.
    """
    _check_block(q_THD, k_TGD, v_TGD, q_docs, k_docs)
    scale = softmax_scale(q_THD.shape[2], scale)
    # Under torch.autocast the back end's float32 math must stay float32.
    with torch.autocast(q_THD.device.type, enabled=False):
        return _backend(q_THD).block_forward(
            q_THD,
            k_TGD,
            v_TGD,
            q_docs.doc,
            q_docs.pos,
            k_docs.doc,
            k_docs.pos,
            causal=causal,
            scale=scale,
        )


def block_backward(
    q_THD: torch.Tensor,
    k_TGD: torch.Tensor,
    v_TGD: torch.Tensor,
    dout_THD: torch.Tensor,
    lse_HT: torch.Tensor,
    delta_HT: torch.Tensor,
    q_docs: TokenDocs,
    k_docs: TokenDocs,
    *,
    causal: bool = True,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq_THD, dk_TGD, dv_TGD)`` of the block in the compute dtype, given the final
    ``lse_HT`` over all blocks and ``delta_HT = rowsum(dout * out)`` of the final output."""
    _check_block(q_THD, k_TGD, v_TGD, q_docs, k_docs)
    scale = softmax_scale(q_THD.shape[2], scale)
    with torch.autocast(q_THD.device.type, enabled=False):
        return _backend(q_THD).block_backward(
            q_THD,
            k_TGD,
            v_TGD,
            dout_THD,
            lse_HT,
            delta_HT,
            q_docs.doc,
            q_docs.pos,
            k_docs.doc,
            k_docs.pos,
            causal=causal,
            scale=scale,
        )


def merge_partial(
    out_THD: torch.Tensor,
    lse_HT: torch.Tensor,
    block_out_THD: torch.Tensor,
    block_lse_HT: torch.Tensor,
) -> None:
    """In place: ``(out, lse)`` <- the softmax-weighted union of ``(out, lse)`` and a block's.

    Rows that neither side has seen a key for stay ``(0, -inf)`` (no NaN from -inf - -inf).
    """
    new_lse_HT = torch.logaddexp(lse_HT, block_lse_HT)
    base_HT = new_lse_HT.masked_fill(new_lse_HT == -math.inf, 0.0)
    keep_TH1 = torch.exp(lse_HT - base_HT).transpose(0, 1).unsqueeze(-1)
    take_TH1 = torch.exp(block_lse_HT - base_HT).transpose(0, 1).unsqueeze(-1)
    out_THD.mul_(keep_TH1).add_(take_TH1 * block_out_THD)
    lse_HT.copy_(new_lse_HT)
