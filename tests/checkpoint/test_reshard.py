"""Overlap math of bitscale.checkpoint.reshard, checked against torch indexing, and the
byte-range reader against safetensors files."""

from __future__ import annotations

import itertools
import math
import tempfile
from pathlib import Path

import pytest
import torch
from bitscale.checkpoint.reshard import (
    Box,
    ChunkReader,
    byte_runs,
    check_tiling,
    flat_range_boxes,
    plan_reads,
    split_box,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

shapes = st.lists(st.integers(0, 6), min_size=0, max_size=4).map(tuple)
nonempty_shapes = st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple)


@st.composite
def shape_and_range(draw: st.DrawFn) -> tuple[tuple[int, ...], int, int]:
    shape = draw(shapes)
    total = math.prod(shape)
    start = draw(st.integers(0, total))
    stop = draw(st.integers(start, total))
    return shape, start, stop


@st.composite
def shape_and_box(draw: st.DrawFn) -> tuple[tuple[int, ...], Box]:
    shape = draw(nonempty_shapes)
    offsets, sizes = [], []
    for length in shape:
        start = draw(st.integers(0, length - 1))
        offsets.append(start)
        sizes.append(draw(st.integers(1, length - start)))
    return shape, Box(tuple(offsets), tuple(sizes))


def _cuts(draw: st.DrawFn, length: int, pieces: int) -> list[int]:
    inner = sorted(draw(st.lists(st.integers(0, length), min_size=pieces - 1, max_size=pieces - 1)))
    return [0, *inner, length]


@st.composite
def grid_tiling(draw: st.DrawFn, shape: tuple[int, ...]) -> list[Box]:
    """A random uneven grid over ``shape`` (empty cells dropped)."""
    per_dim = []
    for length in shape:
        cuts = _cuts(draw, length, draw(st.integers(1, 4)))
        per_dim.append([(a, b - a) for a, b in itertools.pairwise(cuts) if b > a])
    boxes = [Box((), ())]
    for spans in per_dim:
        boxes = [Box((*b.offsets, o), (*b.shape, s)) for b in boxes for o, s in spans]
    return boxes


@given(shape_and_range())
@settings(max_examples=300, deadline=None)
def test_flat_range_boxes_are_the_range_in_order(case: tuple[tuple[int, ...], int, int]) -> None:
    shape, start, stop = case
    flat = torch.arange(math.prod(shape)).view(shape)
    boxes = flat_range_boxes(shape, start, stop)
    assert len(boxes) <= max(1, 2 * len(shape) - 1)
    position = 0
    for offset, box in boxes:
        assert offset == position and box.numel > 0
        values = flat[box.slices()].reshape(-1)
        assert torch.equal(values, torch.arange(start + offset, start + offset + box.numel))
        position += box.numel
    assert position == stop - start


def test_flat_range_boxes_example() -> None:
    # Rows of 4: [3, 13) is the tail of row 0, rows 1-2 whole, the head of row 3.
    assert flat_range_boxes((5, 4), 3, 13) == [
        (0, Box((0, 3), (1, 1))),
        (1, Box((1, 0), (2, 4))),
        (9, Box((3, 0), (1, 1))),
    ]
    with pytest.raises(ValueError, match="outside a tensor of 20 elements"):
        flat_range_boxes((5, 4), 3, 21)


@given(shape_and_box(), st.sampled_from([1, 2, 4, 8]))
@settings(max_examples=300, deadline=None)
def test_byte_runs_read_the_box_in_row_major_order(
    case: tuple[tuple[int, ...], Box], itemsize: int
) -> None:
    shape, box = case
    data = bytes(range(256)) * (math.prod(shape) * itemsize // 256 + 1)
    data = data[: math.prod(shape) * itemsize]
    elements = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(*shape, itemsize)
    expected = elements[box.slices()].contiguous().reshape(-1)
    runs = byte_runs(shape, box, itemsize)
    got = b"".join(data[offset : offset + length] for offset, length in runs)
    assert got == bytes(expected.tolist())
    for (a, la), (b, _) in itertools.pairwise(runs):
        assert a + la < b, "adjacent runs must be merged"


def test_byte_runs_whole_rows_are_one_run() -> None:
    assert byte_runs((6, 5), Box((2, 0), (3, 5)), 4) == [(40, 60)]
    assert byte_runs((6, 5), Box((2, 1), (2, 2)), 4) == [(44, 8), (64, 8)]
    with pytest.raises(ValueError, match="not inside a chunk"):
        byte_runs((6, 5), Box((5, 0), (2, 5)), 4)


@given(st.data(), nonempty_shapes)
@settings(max_examples=200, deadline=None)
def test_any_saved_tiling_fills_any_target_tiling(data: st.DataObject, shape: tuple) -> None:
    source = torch.randn(shape, dtype=torch.float64)
    saved = data.draw(grid_tiling(shape))
    check_tiling(shape, saved)
    stored = [source[box.slices()].clone() for box in saved]
    targets = data.draw(grid_tiling(shape))
    filled = [torch.full(box.shape, float("nan"), dtype=torch.float64) for box in targets]
    for read in plan_reads(saved, targets):
        filled[read.region][read.target.slices()] = stored[read.chunk][read.source.slices()]
    for box, values in zip(targets, filled, strict=True):
        assert torch.equal(values, source[box.slices()])


def test_plan_reads_reports_missing_data() -> None:
    saved = [Box((0, 0), (2, 4))]
    with pytest.raises(ValueError, match="cover 8 of the 16 elements"):
        plan_reads(saved, [Box((0, 0), (4, 4))])


def test_check_tiling_rejects_overlap_gap_and_outside() -> None:
    with pytest.raises(ValueError, match="overlap"):
        check_tiling((4,), [Box((0,), (3,)), Box((2,), (2,))])
    with pytest.raises(ValueError, match="cover 3 of the 4"):
        check_tiling((4,), [Box((0,), (3,))])
    with pytest.raises(ValueError, match="outside the logical shape"):
        check_tiling((4,), [Box((0,), (5,))])


@given(shape_and_box(), st.integers(1, 40))
@settings(max_examples=200, deadline=None)
def test_split_box_tiles_with_bounded_pieces(case: tuple[tuple[int, ...], Box], limit: int) -> None:
    _shape, box = case
    pieces = split_box(box, limit)
    assert all(0 < piece.numel <= limit for piece in pieces)
    check_tiling(box.shape, [piece.relative_to(box.offsets) for piece in pieces])


def test_box_validates() -> None:
    with pytest.raises(ValueError, match="different ranks"):
        Box((0,), (1, 2))
    with pytest.raises(ValueError, match=">= 0"):
        Box((-1,), (2,))
    assert Box((0, 0), (2, 2)).intersect(Box((2, 0), (1, 2))) is None


@given(
    shape_and_box(),
    st.sampled_from([torch.float32, torch.bfloat16, torch.int64]),
    st.integers(16, 200),
)
@settings(max_examples=150, deadline=None)
def test_chunk_reader_reads_any_box_through_any_buffer(
    case: tuple[tuple[int, ...], Box], dtype: torch.dtype, buffer_bytes: int
) -> None:
    shape, box = case
    values = (torch.arange(math.prod(shape)) * 7 - 11).to(dtype).view(shape)
    with tempfile.TemporaryDirectory() as folder:
        save_file({"other": torch.ones(3), "chunk": values}, f"{folder}/data.safetensors")
        out = torch.full((*box.shape, 2), -1.0, dtype=torch.float64)[..., 0]
        with ChunkReader(folder, buffer_bytes=buffer_bytes) as reader:
            reader.read("data.safetensors", "chunk", box, out)
    assert torch.equal(out, values[box.slices()].to(torch.float64))


def test_chunk_reader_errors_name_the_file(tmp_path: Path) -> None:
    save_file({"chunk": torch.ones(4, 4)}, tmp_path / "data.safetensors")
    with ChunkReader(tmp_path) as reader, pytest.raises(ValueError, match="no tensor 'missing'"):
        reader.read("data.safetensors", "missing", Box((0,), (1,)), torch.empty(1))
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with ChunkReader(tmp_path) as reader, pytest.raises(ValueError, match="shorter than 8"):
        reader.read("short.safetensors", "chunk", Box((0,), (1,)), torch.empty(1))
    (tmp_path / "bad.safetensors").write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with ChunkReader(tmp_path) as reader, pytest.raises(ValueError, match="damaged"):
        reader.read("bad.safetensors", "chunk", Box((0,), (1,)), torch.empty(1))
