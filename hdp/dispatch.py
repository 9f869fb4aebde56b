"""The one seam between a model and the HDP runtime: :func:`attention`.

A model that runs under :class:`bitscale.hdp.HDPRunner` calls ``attention(q, k, v)`` where it
would call causal softmax attention, with token-major tensors (no batch dimension):

    q [T, H, D], k [T, G, D], v [T, G, D]  ->  out [T, H, D]     (H % G == 0: GQA)

What T means is decided by the runner for the micro-batch in flight:

* a single-rank micro-batch packs whole documents: block-diagonal causal attention over them
  (``cu_seqlens``), no communication;
* a multi-rank micro-batch holds this rank's zigzag shard of one document (or of several, on
  the static mesh): zigzag ring attention with the other ranks of the item.

Outside a runner (plain single-process use, evaluation, the reference run of the tests)
``attention`` is dense causal attention over all T tokens, i.e. T is one sequence.

Everything else in the model must be token-wise (embeddings, norms, MLPs, the LM head) and
take the runner's global ``position_ids`` for positional encodings; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from .attention_block import softmax_scale
from .comm import CommCounter
from .ring_attention import (
    _check_shapes,
    _sdpa_causal,
    packed_causal_attention,
    zigzag_ring_attention,
)

__all__ = ["PackedDocuments", "RingShard", "attention", "attention_layout"]


@dataclass(frozen=True)
class PackedDocuments:
    """Whole documents packed on this rank: document i is ``cu_seqlens[i]:cu_seqlens[i+1]``."""

    cu_seqlens: tuple[int, ...]


@dataclass(frozen=True)
class RingShard:
    """This rank's zigzag shard of the documents of one ring micro-batch."""

    ranks: tuple[int, ...]
    """Global ranks in ring order."""
    position: int
    """This rank's index in ``ranks``."""
    item_id: int
    """Tag base for the ring messages (unique per micro-batch within a step)."""
    chunk_sizes: tuple[int, ...]
    """Zigzag chunk length of each document; the rank holds sum(2 * c) tokens."""
    counter: CommCounter | None = None


_LAYOUT: ContextVar[PackedDocuments | RingShard | None] = ContextVar(
    "bitscale_hdp_attention_layout", default=None
)


@contextmanager
def attention_layout(layout: PackedDocuments | RingShard | None) -> Iterator[None]:
    """Make :func:`attention` follow ``layout`` inside the block (the runner does this for
    every micro-batch; use it directly to run packed documents outside a runner)."""
    token = _LAYOUT.set(layout)
    try:
        yield
    finally:
        _LAYOUT.reset(token)


def attention(
    q_THD: torch.Tensor, k_TGD: torch.Tensor, v_TGD: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """Causal self-attention of the tokens this rank holds (see the module docstring).

    ``scale`` defaults to ``1 / sqrt(D)``.
    """
    layout = _LAYOUT.get()
    if layout is None:
        _check_shapes(q_THD, k_TGD, v_TGD)
        return _sdpa_causal(q_THD, k_TGD, v_TGD, softmax_scale(q_THD.shape[2], scale))
    if isinstance(layout, PackedDocuments):
        return packed_causal_attention(q_THD, k_TGD, v_TGD, layout.cu_seqlens, scale)
    return zigzag_ring_attention(
        q_THD,
        k_TGD,
        v_TGD,
        ranks=layout.ranks,
        position=layout.position,
        item_id=layout.item_id,
        chunk_sizes=layout.chunk_sizes,
        scale=scale,
        counter=layout.counter,
    )
