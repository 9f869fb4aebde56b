"""Overlap math for resharding: saved chunks against a target region, as byte-range reads.

Pure integer arithmetic over hyper-rectangles of a logical (unsharded, unpadded,
row-major) tensor; no torch, no files, no processes, so every rule here is tested
exhaustively without them. Only :class:`ChunkReader`, at the bottom, touches files:
it executes the planned byte runs with ``os.preadv``.

A checkpoint stores each logical tensor as disjoint chunks (:class:`Box` plus where
the bytes live). A loading rank owns some boxes of the same logical tensor. For each
owned box, :func:`plan_reads` lists which part of which chunk lands where, and
:func:`byte_runs` turns a part of a chunk into the few contiguous byte ranges of the
chunk's row-major data that hold it, so a reader never touches bytes it does not need.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Box",
    "ChunkReader",
    "Read",
    "byte_runs",
    "check_tiling",
    "flat_range_boxes",
    "plan_reads",
    "split_box",
]


@dataclass(frozen=True, slots=True)
class Box:
    """A hyper-rectangle ``[offsets, offsets + shape)`` of a row-major tensor."""

    offsets: tuple[int, ...]
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.offsets) != len(self.shape):
            raise ValueError(
                f"Box offsets {self.offsets} and shape {self.shape} have different ranks"
            )
        if any(o < 0 for o in self.offsets) or any(s < 0 for s in self.shape):
            raise ValueError(f"Box offsets {self.offsets} and shape {self.shape} must be >= 0")

    @classmethod
    def whole(cls, shape: Sequence[int]) -> Box:
        """The box covering a whole tensor of ``shape``."""
        return cls((0,) * len(shape), tuple(shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def stop(self) -> tuple[int, ...]:
        return tuple(o + s for o, s in zip(self.offsets, self.shape, strict=True))

    def slices(self) -> tuple[slice, ...]:
        """Index a tensor with this box: ``tensor[box.slices()]``."""
        return tuple(slice(o, o + s) for o, s in zip(self.offsets, self.shape, strict=True))

    def intersect(self, other: Box) -> Box | None:
        """The common box, or None when the boxes share no element."""
        if other.ndim != self.ndim:
            raise ValueError(f"cannot intersect boxes of rank {self.ndim} and {other.ndim}")
        start = tuple(max(a, b) for a, b in zip(self.offsets, other.offsets, strict=True))
        stop = tuple(min(a, b) for a, b in zip(self.stop, other.stop, strict=True))
        if any(e <= s for s, e in zip(start, stop, strict=True)):
            return None
        return Box(start, tuple(e - s for s, e in zip(start, stop, strict=True)))

    def relative_to(self, origin: Sequence[int]) -> Box:
        """This box in the coordinates of a frame whose corner is ``origin``."""
        return Box(tuple(o - p for o, p in zip(self.offsets, origin, strict=True)), self.shape)

    def translated(self, delta: Sequence[int]) -> Box:
        return Box(tuple(o + d for o, d in zip(self.offsets, delta, strict=True)), self.shape)

    def contains(self, other: Box) -> bool:
        return all(a <= b for a, b in zip(self.offsets, other.offsets, strict=True)) and all(
            a >= b for a, b in zip(self.stop, other.stop, strict=True)
        )


def _row_major_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides = [1] * len(shape)
    for dim in range(len(shape) - 2, -1, -1):
        strides[dim] = strides[dim + 1] * shape[dim + 1]
    return tuple(strides)


def flat_range_boxes(shape: Sequence[int], start: int, stop: int) -> list[tuple[int, Box]]:
    """Split the flat element range ``[start, stop)`` of a row-major tensor into boxes.

    Returns ``(flat_offset, box)`` pairs in order, where ``flat_offset`` is where the box
    begins inside the range. Each box is contiguous in the flat order, so a ZeRO-style
    flat fragment is exactly these boxes laid end to end: at most ``2 * ndim - 1`` of
    them (a partial row, whole rows, a partial row, recursively).
    """
    shape = tuple(shape)
    total = math.prod(shape)
    if not 0 <= start <= stop <= total:
        raise ValueError(f"flat range [{start}, {stop}) is outside a tensor of {total} elements")
    boxes: list[tuple[int, Box]] = []
    _split_flat(shape, start, stop, (), start, boxes)
    return boxes


def _split_flat(
    shape: tuple[int, ...],
    start: int,
    stop: int,
    prefix: tuple[int, ...],
    range_start: int,
    out: list[tuple[int, Box]],
) -> None:
    """Boxes of ``[start, stop)`` within a sub-tensor of ``shape`` whose position in the
    full tensor is fixed by ``prefix`` (one index per outer dim)."""
    if start >= stop:
        return
    if not shape:
        out.append((start - range_start, Box(prefix, ())))
        return
    rank_pad = (1,) * len(prefix)
    row = math.prod(shape[1:])
    first_full = -(-start // row)
    last_full = stop // row
    if first_full > last_full:
        # The range lies inside a single row.
        _split_flat(
            shape[1:],
            start - (first_full - 1) * row,
            stop - (first_full - 1) * row,
            (*prefix, first_full - 1),
            range_start - (first_full - 1) * row,
            out,
        )
        return
    if start % row:
        head_row = start // row
        _split_flat(
            shape[1:],
            start - head_row * row,
            row,
            (*prefix, head_row),
            range_start - head_row * row,
            out,
        )
    if last_full > first_full:
        out.append(
            (
                first_full * row - range_start,
                Box(
                    (*prefix, first_full) + (0,) * (len(shape) - 1),
                    (*rank_pad, last_full - first_full, *shape[1:]),
                ),
            )
        )
    if stop % row:
        _split_flat(
            shape[1:],
            0,
            stop - last_full * row,
            (*prefix, last_full),
            range_start - last_full * row,
            out,
        )


@dataclass(frozen=True, slots=True)
class Read:
    """Copy ``source`` (a box in the chunk's own coordinates) of saved chunk number
    ``chunk`` into ``target`` (a box in the coordinates of owned region number ``region``)."""

    chunk: int
    source: Box
    region: int
    target: Box


def plan_reads(chunks: Sequence[Box], regions: Sequence[Box]) -> list[Read]:
    """Every read that fills ``regions`` (owned boxes of a logical tensor) from ``chunks``
    (the saved boxes of the same tensor).

    Raises ``ValueError`` when a region is not fully covered by the chunks, since the
    checkpoint then lacks data the target owns. Chunks must be disjoint (see
    :func:`check_tiling`), so coverage is a matter of counting elements.
    """
    reads: list[Read] = []
    for region_index, region in enumerate(regions):
        covered = 0
        for chunk_index, chunk in enumerate(chunks):
            common = chunk.intersect(region)
            if common is None:
                continue
            covered += common.numel
            reads.append(
                Read(
                    chunk_index,
                    common.relative_to(chunk.offsets),
                    region_index,
                    common.relative_to(region.offsets),
                )
            )
        if covered != region.numel:
            raise ValueError(
                f"the saved chunks cover {covered} of the {region.numel} elements of region "
                f"{region.offsets}+{region.shape}; the checkpoint lacks part of this tensor"
            )
    return reads


def check_tiling(shape: Sequence[int], chunks: Sequence[Box]) -> None:
    """Raise ``ValueError`` unless ``chunks`` are disjoint, inside ``shape`` and cover it."""
    whole = Box.whole(shape)
    for index, chunk in enumerate(chunks):
        if not whole.contains(chunk):
            raise ValueError(f"chunk {index} {chunk} lies outside the logical shape {tuple(shape)}")
    for i in range(len(chunks)):
        for j in range(i + 1, len(chunks)):
            if chunks[i].numel and chunks[i].intersect(chunks[j]) is not None:
                raise ValueError(f"chunks {i} {chunks[i]} and {j} {chunks[j]} overlap")
    covered = sum(chunk.numel for chunk in chunks)
    if covered != whole.numel:
        raise ValueError(
            f"the chunks cover {covered} of the {whole.numel} elements of shape {tuple(shape)}"
        )


def byte_runs(chunk_shape: Sequence[int], part: Box, itemsize: int) -> list[tuple[int, int]]:
    """The ``(byte_offset, byte_length)`` runs of a row-major chunk of ``chunk_shape`` that
    hold ``part`` (a box in the chunk's coordinates), in order and merged where adjacent.

    Read back to back, the runs give ``part``'s elements in row-major order.
    """
    chunk_shape = tuple(chunk_shape)
    if not Box.whole(chunk_shape).contains(part):
        raise ValueError(f"{part} is not inside a chunk of shape {chunk_shape}")
    if part.numel == 0:
        return []
    if not chunk_shape:
        return [(0, itemsize)]
    strides = _row_major_strides(chunk_shape)
    # Trailing dims that the part covers whole are contiguous with the dim before them.
    inner = len(chunk_shape) - 1
    while inner > 0 and part.shape[inner] == chunk_shape[inner]:
        inner -= 1
    run_elements = part.shape[inner] * strides[inner]
    runs: list[tuple[int, int]] = []
    for outer in _index_product(part.offsets[:inner], part.shape[:inner]):
        start = (
            sum(i * s for i, s in zip(outer, strides[:inner], strict=True))
            + part.offsets[inner] * strides[inner]
        )
        if runs and runs[-1][0] + runs[-1][1] == start * itemsize:
            runs[-1] = (runs[-1][0], runs[-1][1] + run_elements * itemsize)
        else:
            runs.append((start * itemsize, run_elements * itemsize))
    return runs


def _index_product(offsets: Sequence[int], shape: Sequence[int]) -> Iterator[tuple[int, ...]]:
    if not shape:
        yield ()
        return
    for head in range(offsets[0], offsets[0] + shape[0]):
        for tail in _index_product(offsets[1:], shape[1:]):
            yield (head, *tail)


def split_box(box: Box, max_elements: int) -> list[Box]:
    """Split ``box`` along its leading dims into boxes of at most ``max_elements`` elements
    (at least one element each), so a read of any size goes through a bounded buffer."""
    if max_elements < 1:
        raise ValueError(f"max_elements must be >= 1, got {max_elements}")
    if box.numel <= max_elements or box.ndim == 0:
        return [box]
    inner = math.prod(box.shape[1:])
    if inner <= max_elements:
        rows_per_piece = max_elements // inner
        return [
            Box(
                (box.offsets[0] + row, *box.offsets[1:]),
                (min(rows_per_piece, box.shape[0] - row), *box.shape[1:]),
            )
            for row in range(0, box.shape[0], rows_per_piece)
        ]
    pieces: list[Box] = []
    for row in range(box.shape[0]):
        sub = Box(box.offsets[1:], box.shape[1:])
        for piece in split_box(sub, max_elements):
            pieces.append(Box((box.offsets[0] + row, *piece.offsets), (1, *piece.shape)))
    return pieces


# ----------------------------------------------------------------------------- reads
# The only I/O in this module: executing the reads planned above against the
# safetensors files of one step, with os.preadv straight into a bounded buffer.


class ChunkReader:
    """Reads parts of stored chunks from the safetensors files of one step directory.

    Each part is fetched as the byte runs of :func:`byte_runs` with ``os.preadv`` into
    a reusable buffer of at most ``buffer_bytes`` (larger parts go through in pieces,
    :func:`split_box`), so reading never holds more than that buffer besides the
    destination. Safetensors headers are parsed once per file. Use as a context manager.
    """

    def __init__(self, step_dir: str | os.PathLike[str], *, buffer_bytes: int = 64 << 20) -> None:
        if buffer_bytes < 16:
            raise ValueError(f"buffer_bytes must be >= 16, got {buffer_bytes}")
        self.step_dir = Path(step_dir)
        self.buffer_bytes = buffer_bytes
        self._files: dict[str, tuple[int, int, dict[str, Any]]] = {}
        self._buffer: Any = None

    def __enter__(self) -> ChunkReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for fd, _, _ in self._files.values():
            os.close(fd)
        self._files.clear()
        self._buffer = None

    def _open(self, file: str) -> tuple[int, int, dict[str, Any]]:
        if file not in self._files:
            path = self.step_dir / file
            fd = os.open(path, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                prefix = os.pread(fd, 8, 0)
                if len(prefix) < 8:
                    raise ValueError(f"{path} is not a safetensors file: shorter than 8 bytes")
                header_len = int.from_bytes(prefix, "little")
                if header_len > size - 8:
                    raise ValueError(
                        f"{path} is damaged: its header claims {header_len} bytes, the file "
                        f"has {size}"
                    )
                header = json.loads(os.pread(fd, header_len, 8))
            except BaseException:
                os.close(fd)
                raise
            self._files[file] = (fd, 8 + header_len, header)
        return self._files[file]

    def read(self, file: str, key: str, part: Box, out: Any) -> None:
        """Copy ``part`` (a box in the chunk's coordinates) of tensor ``key`` of ``file``
        into ``out``, a torch tensor (any strides) of ``part.shape``; the stored dtype
        is cast to ``out.dtype`` if they differ."""
        import torch

        fd, data_start, header = self._open(file)
        entry = header.get(key)
        if entry is None:
            raise ValueError(f"{self.step_dir / file} holds no tensor {key!r}")
        stored_dtype = _safetensors_dtype(entry["dtype"])
        chunk_shape = tuple(entry["shape"])
        itemsize = stored_dtype.itemsize
        begin = data_start + entry["data_offsets"][0]
        if self._buffer is None:
            self._buffer = torch.empty(self.buffer_bytes, dtype=torch.uint8)
        read_box = part
        if part.ndim > 1:
            rows = Box(
                (part.offsets[0], *(0,) * (part.ndim - 1)), (part.shape[0], *chunk_shape[1:])
            )
            # A narrow column slice is one short run per row: when the part fills at least a
            # quarter of its rows, reading whole rows and slicing in memory costs less than
            # a system call per run, and the buffer still bounds memory.
            if part.numel * 4 >= rows.numel:
                read_box = rows
        for sub in split_box(read_box, max(1, self.buffer_bytes // itemsize)):
            common = sub.intersect(part) if sub.numel else None
            if common is None:
                continue
            staging = self._buffer[: sub.numel * itemsize]
            view = memoryview(staging.numpy())
            position = 0
            for offset, length in byte_runs(chunk_shape, sub, itemsize):
                got = os.preadv(fd, [view[position : position + length]], begin + offset)
                if got != length:
                    raise ValueError(
                        f"{self.step_dir / file} is truncated: tensor {key!r} needs bytes up to "
                        f"{begin + offset + length}"
                    )
                position += length
            values = staging.view(stored_dtype).view(sub.shape)[
                common.relative_to(sub.offsets).slices()
            ]
            out[common.relative_to(part.offsets).slices()].copy_(values)


_SAFETENSORS_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "C64": "complex64",
}


def _safetensors_dtype(code: str) -> Any:
    """The torch dtype of a safetensors dtype code (``"BF16"`` -> ``torch.bfloat16``)."""
    import torch

    if code not in _SAFETENSORS_DTYPE_NAMES:
        raise ValueError(f"unsupported safetensors dtype {code!r}")
    return getattr(torch, _SAFETENSORS_DTYPE_NAMES[code])
