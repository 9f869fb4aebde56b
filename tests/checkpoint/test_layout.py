"""Layout descriptors: any N-way sharding saved, any M-way sharding loaded, bitwise.

The live local tensors are built here independently of ``RankLayout.pieces`` (by
narrowing and concatenating the full tensor the way TP / FSDP / ZeRO do), so the
pieces are checked against an oracle, not against themselves.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
import torch
from bitscale.checkpoint.layout import (
    DataParallel,
    FusedPart,
    RankLayout,
    TensorLayout,
    annotate,
    chunk_key,
    find_tied_parameters,
    needs_universal_path,
    piece_view,
    torch_chunk_sizes,
)
from bitscale.checkpoint.reshard import Box, check_tiling, plan_reads
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn


@dataclass(frozen=True)
class Sharding:
    """A whole sharding of one tensor: the layout plus every rank's RankLayout."""

    layout: TensorLayout
    shards: tuple[RankLayout, ...]


def _split(draw: st.DrawFn, total: int, parts: int) -> tuple[int, ...]:
    cuts = sorted(draw(st.lists(st.integers(0, total), min_size=parts - 1, max_size=parts - 1)))
    edges = [0, *cuts, total]
    return tuple(b - a for a, b in itertools.pairwise(edges))


@st.composite
def shardings(draw: st.DrawFn, shape: tuple[int, ...]) -> Sharding:
    ndim = len(shape)
    padded = None
    if ndim and draw(st.booleans()):
        padded = (shape[0] + draw(st.integers(1, 3)), *shape[1:])
    full = padded or shape
    tp_dim = draw(st.sampled_from([None, *range(ndim)])) if ndim else None
    tp_size = 1
    parts: tuple[FusedPart, ...] = ()
    if tp_dim is not None:
        tp_size = draw(st.integers(1, 3))
        num_parts = draw(st.integers(1, 3))
        widths = _split(draw, full[tp_dim], num_parts)
        parts = tuple(
            FusedPart(name=f"p{i}", tp_sizes=_split(draw, width, tp_size))
            for i, width in enumerate(widths)
        )
    layout = TensorLayout(shape=shape, padded_shape=padded, tp_dim=tp_dim, parts=parts)
    dp_kind = draw(st.sampled_from(list(DataParallel)))
    if dp_kind is DataParallel.ROWS and ndim == 0:
        dp_kind = DataParallel.FLAT
    dp_size = draw(st.integers(1, 3))
    shards = []
    for tp_rank in range(tp_size):
        tp_shape = layout.tp_local_shape(tp_rank)
        if dp_kind is DataParallel.REPLICATED:
            for dp_rank in range(dp_size):
                shards.append(RankLayout(layout=layout, tp_rank=tp_rank, writer=dp_rank == 0))
            continue
        total = tp_shape[0] if dp_kind is DataParallel.ROWS else math.prod(tp_shape)
        lengths = list(_split(draw, total, dp_size))
        if dp_kind is DataParallel.FLAT:
            # ZeRO pads the flat buffer so every rank holds the same number of elements.
            lengths[-1] += draw(st.integers(0, 3))
        start = 0
        for length in lengths:
            shards.append(
                RankLayout(
                    layout=layout, tp_rank=tp_rank, dp=dp_kind, dp_start=start, dp_length=length
                )
            )
            start += length
    return Sharding(layout, tuple(shards))


def live_local(full: torch.Tensor, shard: RankLayout) -> torch.Tensor:
    """What a rank holds, built the way the training frameworks build it."""
    layout = shard.layout
    tp_local = full
    if layout.tp_dim is not None:
        pieces, start = [], 0
        for part in layout.parts:
            offset = start + sum(part.tp_sizes[: shard.tp_rank])
            pieces.append(full.narrow(layout.tp_dim, offset, part.tp_sizes[shard.tp_rank]))
            start += part.width
        tp_local = torch.cat(pieces, dim=layout.tp_dim)
    if shard.dp is DataParallel.REPLICATED:
        return tp_local.clone()
    if shard.dp is DataParallel.ROWS:
        return tp_local[shard.dp_start : shard.dp_start + shard.dp_length].clone()
    flat = torch.cat([tp_local.reshape(-1), torch.zeros(shard.dp_length, dtype=full.dtype)])
    return flat[shard.dp_start : shard.dp_start + shard.dp_length].clone()


def padded_source(shape: tuple[int, ...], layout: TensorLayout, seed: int) -> torch.Tensor:
    """The full live tensor: random logical values, zero padding (what a load restores)."""
    generator = torch.Generator().manual_seed(seed)
    full = torch.zeros(layout.full_shape, dtype=torch.float64)
    full[Box.whole(shape).slices()] = torch.randn(shape, generator=generator, dtype=torch.float64)
    return full


shapes = st.lists(st.integers(1, 7), min_size=0, max_size=3).map(tuple)


@given(st.data(), shapes, st.integers(0, 2**31 - 1))
@settings(max_examples=300, deadline=None)
def test_n_way_save_m_way_load_is_bitwise(data: st.DataObject, shape: tuple, seed: int) -> None:
    saved = data.draw(shardings(shape), label="saved")
    full = padded_source(shape, saved.layout, seed)
    logical = full[Box.whole(shape).slices()]

    # Save: every writer stores its pieces; together they tile the logical tensor once.
    chunks: list[tuple[Box, torch.Tensor]] = []
    for shard in saved.shards:
        local = live_local(full, shard)
        assert tuple(local.shape) == shard.local_shape
        if shard.writer:
            for piece in shard.pieces():
                chunks.append((piece.logical, piece_view(local, piece).clone()))
    boxes = [box for box, _ in chunks]
    check_tiling(shape, boxes)
    keys = {chunk_key("w", box) for box in boxes}
    assert len(keys) == len(boxes)
    for box, values in chunks:
        assert torch.equal(values, logical[box.slices()])

    # Load under an unrelated sharding (padding comes back as zeros).
    target = data.draw(shardings(shape), label="target")
    target_full = padded_source(shape, target.layout, seed)
    for shard in target.shards:
        local = torch.zeros(shard.local_shape, dtype=torch.float64)
        pieces = shard.pieces()
        for read in plan_reads(boxes, [piece.logical for piece in pieces]):
            view = piece_view(local, pieces[read.region])
            view[read.target.slices()] = chunks[read.chunk][1][read.source.slices()]
        assert torch.equal(local, live_local(target_full, shard))


def test_gqa_fused_qkv_uneven_tp_example() -> None:
    # 4 query heads and 2 KV heads of width 2, TP=2 with uneven head counts (3+1, 1+1).
    head = 2
    q = FusedPart(name="q", tp_sizes=(3 * head, 1 * head))
    k = FusedPart(name="k", tp_sizes=(1 * head, 1 * head))
    v = FusedPart(name="v", tp_sizes=(1 * head, 1 * head))
    layout = TensorLayout(shape=(16, 5), tp_dim=0, parts=(q, k, v))
    rank1 = RankLayout(layout=layout, tp_rank=1)
    assert rank1.local_shape == (6, 5)
    # Logical rows are [q: 0-7 | k: 8-11 | v: 12-15]; rank 1 holds q 6-7, k 10-11, v 14-15.
    logical_rows = [(p.logical.offsets[0], p.logical.shape[0]) for p in rank1.pieces()]
    local_rows = [(p.local_box.offsets[0], p.local_box.shape[0]) for p in rank1.pieces()]
    assert logical_rows == [(6, 2), (10, 2), (14, 2)]
    assert local_rows == [(0, 2), (2, 2), (4, 2)]


def test_vocab_padding_is_never_stored() -> None:
    layout = TensorLayout(
        shape=(10, 3),
        padded_shape=(12, 3),
        tp_dim=0,
        parts=(FusedPart(name="vocab", tp_sizes=(6, 6)),),
    )
    last = RankLayout(layout=layout, tp_rank=1)
    (piece,) = last.pieces()
    assert piece.logical == Box((6, 0), (4, 3))
    assert piece.local_box == Box((0, 0), (4, 3))
    assert layout.to_json()["padded_shape"] == [12, 3]
    assert layout.describe() == "tp dim 0 over 2 (vocab); padded to (12, 3)"
    assert TensorLayout.from_json(layout.to_json()) == layout


def test_layout_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="TP widths sum to 5 but dim 0"):
        TensorLayout(shape=(6, 2), tp_dim=0, parts=(FusedPart(name="w", tp_sizes=(3, 2)),))
    with pytest.raises(ValueError, match="one width per TP rank"):
        TensorLayout(
            shape=(6,),
            tp_dim=0,
            parts=(FusedPart(name="a", tp_sizes=(3,)), FusedPart(name="b", tp_sizes=(1, 2))),
        )
    with pytest.raises(ValueError, match="padded_shape"):
        TensorLayout(shape=(6, 2), padded_shape=(5, 2))
    for bad_shape in ((-1, 3), (2.0, 3), (True, 3), ("4",), "43"):
        with pytest.raises(
            ValueError, match=r"shape must be a sequence of ints|every dim must be an int >= 0"
        ):
            TensorLayout(shape=bad_shape)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"padded_shape \(8, -2\) has the dim -2"):
        TensorLayout(shape=(6, 2), padded_shape=(8, -2))
    assert TensorLayout(shape=torch.Size([0, 3])).shape == (0, 3), "empty tensors are legal"
    with pytest.raises(ValueError, match="needs dp_start"):
        RankLayout(layout=TensorLayout(shape=(4,)), dp=DataParallel.FLAT)
    with pytest.raises(ValueError, match="newer than this bitscale"):
        TensorLayout.from_json({"version": 99, "shape": [1]})
    with pytest.raises(ValueError, match="contiguous"):
        shard = RankLayout(layout=TensorLayout(shape=(2, 3)))
        piece_view(torch.zeros(3, 2).t(), shard.pieces()[0])


def test_torch_chunk_sizes_match_torch_chunk() -> None:
    for length in range(0, 12):
        for parts in range(1, 6):
            got = torch_chunk_sizes(length, parts)
            chunks = [c.numel() for c in torch.arange(length).chunk(parts)] if length else []
            assert list(got) == chunks + [0] * (parts - len(chunks))


def test_find_tied_parameters() -> None:
    embed = nn.Embedding(10, 4)
    model = nn.ModuleDict({"embed": embed, "head": nn.Linear(4, 10, bias=False)})
    model["head"].weight = embed.weight
    assert find_tied_parameters(model) == {"head.weight": "embed.weight"}


def test_needs_universal_path_spots_annotated_tensors() -> None:
    model = nn.Linear(3, 2)
    assert not needs_universal_path({"model": model, "step": 3})
    annotate(model.weight, RankLayout(layout=TensorLayout(shape=(2, 3))))
    assert needs_universal_path({"model": model})
    with pytest.raises(ValueError, match="cannot carry a shard"):
        annotate(model.bias, RankLayout(layout=TensorLayout(shape=(3,))))
