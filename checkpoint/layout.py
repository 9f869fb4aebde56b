"""Per-tensor layout descriptors: how one rank's local tensor maps onto the logical tensor.

A checkpoint stores every parameter and optimizer state in its logical shape
(unsharded, unpadded, row-major). Training holds it sharded, in layers:

1. **Vocabulary padding**: the live tensor may be padded along a dim
   (``TensorLayout.padded_shape``); padding is never stored and is zero-filled on load.
2. **Tensor parallelism**: the padded tensor is split along ``tp_dim`` with explicit,
   possibly uneven, per-rank widths. A fused parameter (q/k/v with GQA widths, SwiGLU
   gate/up) is split part by part: TP rank ``r`` holds ``q_r | k_r | v_r``.
3. **Data parallelism** over the TP-local tensor: replicated (DDP; one replica writes),
   rows (FSDP2 ``Shard(0)``, uneven), or a flat fragment ``[start, start + numel)`` of the
   flattened tensor (ZeRO-1/2/3; uneven, and the fragment may run into alignment padding).

A :class:`RankLayout` says where one rank sits in these layers; :meth:`RankLayout.pieces`
turns that into :class:`Piece` s, each a box of the logical tensor and the place in the
local tensor that holds it. Saving writes each writer's pieces as chunks; loading fills
each piece from the overlapping chunks (:mod:`bitscale.checkpoint.reshard`). Descriptors
come from the live objects (DTensor placements, DeepSpeed fragment addresses, module
parameter identity), never from parameter-name patterns.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from bitscale.checkpoint.reshard import Box, ChunkReader, flat_range_boxes, plan_reads
from torch import nn

__all__ = [
    "DataParallel",
    "FusedPart",
    "Piece",
    "RankLayout",
    "StepWriter",
    "TensorLayout",
    "annotate",
    "check_against",
    "chunk_key",
    "dtensor_shard",
    "find_tied_parameters",
    "flatten_state",
    "holds_origin",
    "load_shard",
    "load_sharded",
    "memory_key",
    "module_param_names",
    "optimizer_by_name",
    "optimizer_param_names",
    "owned_chunks",
    "piece_view",
    "save_sharded",
    "shard_of",
    "state_shard",
    "torch_chunk_sizes",
]

LAYOUT_VERSION = 1


class DataParallel(StrEnum):
    """How the data-parallel ranks split one TP-local tensor."""

    REPLICATED = "replicated"
    """Every rank holds all of it (DDP); only the writer replica stores it."""
    ROWS = "rows"
    """Each rank holds rows ``[start, start + length)`` of dim 0 (FSDP2 ``Shard(0)``)."""
    FLAT = "flat"
    """Each rank holds elements ``[start, start + length)`` of the flattened tensor (ZeRO)."""

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, kw_only=True, slots=True)
class FusedPart:
    """One sub-parameter of a fused tensor, laid side by side along ``tp_dim``."""

    name: str
    """What the part is (``"q"``, ``"k"``, ``"v"``, ``"gate"``, ...)."""
    tp_sizes: tuple[int, ...]
    """Its width on each TP rank, in TP rank order; the part's logical width is the sum."""

    @property
    def width(self) -> int:
        return sum(self.tp_sizes)


def _dims(what: str, shape: Sequence[Any]) -> tuple[int, ...]:
    """``shape`` as a tuple of ints; ``ValueError`` for a negative or non-integer dim.
    Zero is allowed: torch tensors may be empty, and they save and load today."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise ValueError(f"{what} must be a sequence of ints such as (4, 3), got {shape!r}")
    dims = []
    for dim in shape:
        try:
            size = operator.index(dim)
        except TypeError:
            size = None
        if size is None or isinstance(dim, bool) or size < 0:
            raise ValueError(
                f"{what} {tuple(shape)!r} has the dim {dim!r}; every dim must be an int >= 0"
            )
        dims.append(size)
    return tuple(dims)


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorLayout:
    """The global layout of one logical tensor: the same on every rank, stored in the index."""

    shape: tuple[int, ...]
    """Logical shape: unsharded, without vocabulary padding. This is what is stored."""
    padded_shape: tuple[int, ...] | None = None
    """Shape of the full live tensor when it is padded (vocabulary rows); None if not."""
    tp_dim: int | None = None
    """The dim tensor parallelism splits, or None when the tensor is not TP-split."""
    parts: tuple[FusedPart, ...] = ()
    """TP widths. One part for a plain TP split; several for a fused parameter."""
    tied_aliases: tuple[str, ...] = ()
    """Other names of this tensor in the saved state (tied weights, e.g. an ``lm_head``
    sharing the embedding); the tensor is stored once, under its own name."""
    source: str = ""
    """Where the layout came from (``"dtensor (Shard(0),)"``, ``"deepspeed zero-2"``, ...)."""
    version: int = LAYOUT_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", _dims("shape", self.shape))
        if self.padded_shape is not None:
            padded = _dims("padded_shape", self.padded_shape)
            object.__setattr__(self, "padded_shape", padded)
            if len(padded) != len(self.shape) or any(
                p < s for p, s in zip(padded, self.shape, strict=True)
            ):
                raise ValueError(
                    f"padded_shape {padded} must have the rank of shape {self.shape} and be at "
                    "least as large in every dim"
                )
        full = self.full_shape
        if self.tp_dim is None:
            if self.parts:
                raise ValueError("parts (TP widths) given without tp_dim; set tp_dim")
            return
        if not 0 <= self.tp_dim < len(full):
            raise ValueError(f"tp_dim {self.tp_dim} is not a dim of shape {full}")
        if not self.parts:
            raise ValueError(f"tp_dim={self.tp_dim} needs parts with per-rank widths")
        ranks = {len(part.tp_sizes) for part in self.parts}
        if len(ranks) != 1:
            raise ValueError(
                f"every fused part needs one width per TP rank; got counts {sorted(ranks)}"
            )
        if any(size < 0 for part in self.parts for size in part.tp_sizes):
            raise ValueError("TP widths must be >= 0")
        width = sum(part.width for part in self.parts)
        if width != full[self.tp_dim]:
            raise ValueError(
                f"TP widths sum to {width} but dim {self.tp_dim} of the "
                f"{'padded ' if self.padded_shape else ''}tensor is {full[self.tp_dim]}"
            )

    @property
    def full_shape(self) -> tuple[int, ...]:
        """The live tensor's shape before any sharding (padding included)."""
        return self.padded_shape if self.padded_shape is not None else self.shape

    @property
    def tp_size(self) -> int:
        return len(self.parts[0].tp_sizes) if self.parts else 1

    def tp_local_shape(self, tp_rank: int) -> tuple[int, ...]:
        """Shape of the tensor TP rank ``tp_rank`` holds before data parallelism."""
        full = list(self.full_shape)
        if self.tp_dim is not None:
            full[self.tp_dim] = sum(part.tp_sizes[tp_rank] for part in self.parts)
        return tuple(full)

    def tp_pieces(self, tp_rank: int) -> list[tuple[Box, Box]]:
        """``(logical box, box in the TP-local tensor)`` pairs, padding removed."""
        if not 0 <= tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {tp_rank} is outside a TP group of size {self.tp_size}")
        full = self.full_shape
        local_shape = self.tp_local_shape(tp_rank)
        if self.tp_dim is None:
            pairs = [(Box.whole(full), Box.whole(local_shape))]
        else:
            pairs = []
            logical_start = 0
            local_start = 0
            for part in self.parts:
                width = part.tp_sizes[tp_rank]
                offset = logical_start + sum(part.tp_sizes[:tp_rank])
                logical_offsets = [0] * len(full)
                logical_offsets[self.tp_dim] = offset
                local_offsets = [0] * len(full)
                local_offsets[self.tp_dim] = local_start
                box_shape = list(full)
                box_shape[self.tp_dim] = width
                pairs.append(
                    (
                        Box(tuple(logical_offsets), tuple(box_shape)),
                        Box(tuple(local_offsets), tuple(box_shape)),
                    )
                )
                logical_start += part.width
                local_start += width
        unpadded = Box.whole(self.shape)
        clipped = []
        for logical, local in pairs:
            kept = logical.intersect(unpadded)
            if kept is None:
                continue
            clipped.append((kept, kept.relative_to(logical.offsets).translated(local.offsets)))
        return clipped

    def describe(self) -> str:
        """One line for humans: ``"tp dim 0 (q, k, v); padded to (12, 6); tied: model/head"``."""
        parts = [self.source] if self.source else []
        if self.tp_dim is not None:
            names = ", ".join(part.name for part in self.parts)
            parts.append(f"tp dim {self.tp_dim} over {self.tp_size} ({names})")
        if self.padded_shape is not None:
            parts.append(f"padded to {self.padded_shape}")
        if self.tied_aliases:
            parts.append(f"tied: {', '.join(self.tied_aliases)}")
        return "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"version": self.version, "shape": list(self.shape)}
        if self.padded_shape is not None:
            record["padded_shape"] = list(self.padded_shape)
        if self.tp_dim is not None:
            record["tp_dim"] = self.tp_dim
            record["parts"] = [
                {"name": part.name, "tp_sizes": list(part.tp_sizes)} for part in self.parts
            ]
        if self.tied_aliases:
            record["tied_aliases"] = list(self.tied_aliases)
        if self.source:
            record["source"] = self.source
        return record

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> TensorLayout:
        if record.get("version", LAYOUT_VERSION) > LAYOUT_VERSION:
            raise ValueError(
                f"layout version {record['version']} is newer than this bitscale reads "
                f"({LAYOUT_VERSION}); upgrade bitscale"
            )
        return cls(
            shape=tuple(record["shape"]),
            padded_shape=tuple(record["padded_shape"]) if "padded_shape" in record else None,
            tp_dim=record.get("tp_dim"),
            parts=tuple(
                FusedPart(name=part["name"], tp_sizes=tuple(part["tp_sizes"]))
                for part in record.get("parts", ())
            ),
            tied_aliases=tuple(record.get("tied_aliases", ())),
            source=record.get("source", ""),
        )


@dataclass(frozen=True, slots=True)
class Piece:
    """A box of the logical tensor and where one rank's local tensor holds it.

    The local place is ``local.reshape(-1)[local_start : local_start + prod(local_view)]``
    viewed as ``local_view``, then indexed by ``local_box`` (see :func:`piece_view`).
    ``local_box.shape == logical.shape`` always.
    """

    logical: Box
    local_start: int
    local_view: tuple[int, ...]
    local_box: Box


@dataclass(frozen=True, kw_only=True, slots=True)
class RankLayout:
    """Where one rank's local tensor sits in a :class:`TensorLayout`."""

    layout: TensorLayout
    tp_rank: int = 0
    dp: DataParallel = DataParallel.REPLICATED
    dp_start: int = 0
    """First row (ROWS) or first flat element (FLAT) this rank holds."""
    dp_length: int | None = None
    """Rows (ROWS) or elements (FLAT) this rank holds; may run past the end (padding)."""
    region: Box | None = None
    """Instead of TP widths: the local tensor is exactly this box of the logical tensor
    (a DTensor shard over any mesh). Excludes ``tp_dim`` and data parallelism."""
    writer: bool = True
    """Whether this rank stores its pieces: False on every replica but one."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "dp", DataParallel(self.dp))
        if self.region is not None:
            if self.layout.tp_dim is not None or self.dp is not DataParallel.REPLICATED:
                raise ValueError("a region shard cannot also have TP widths or DP sharding")
            if not Box.whole(self.layout.full_shape).contains(self.region):
                raise ValueError(
                    f"region {self.region} lies outside the tensor shape {self.layout.full_shape}"
                )
            return
        if self.dp is not DataParallel.REPLICATED and (
            self.dp_length is None or self.dp_length < 0 or self.dp_start < 0
        ):
            raise ValueError(f"dp={self.dp} needs dp_start >= 0 and dp_length >= 0")
        if not 0 <= self.tp_rank < self.layout.tp_size:
            raise ValueError(
                f"tp_rank {self.tp_rank} is outside a TP group of size {self.layout.tp_size}"
            )

    @property
    def local_shape(self) -> tuple[int, ...]:
        """The shape the rank's live local tensor must have."""
        if self.region is not None:
            return self.region.shape
        tp_shape = self.layout.tp_local_shape(self.tp_rank)
        if self.dp is DataParallel.REPLICATED:
            return tp_shape
        assert self.dp_length is not None
        if self.dp is DataParallel.ROWS:
            return (self.dp_length, *tp_shape[1:])
        return (self.dp_length,)

    def pieces(self) -> list[Piece]:
        """This rank's pieces of the logical tensor: disjoint, empty ones left out."""
        if self.region is not None:
            kept = self.region.intersect(Box.whole(self.layout.shape))
            if kept is None:
                return []
            local = kept.relative_to(self.region.offsets)
            return [Piece(kept, 0, self.region.shape, local)]
        tp_shape = self.layout.tp_local_shape(self.tp_rank)
        tp_pairs = self.layout.tp_pieces(self.tp_rank)
        pieces: list[Piece] = []
        if self.dp is DataParallel.REPLICATED:
            for logical, local in tp_pairs:
                if logical.numel:
                    pieces.append(Piece(logical, 0, tp_shape, local))
            return pieces
        assert self.dp_length is not None
        if self.dp is DataParallel.ROWS:
            if not tp_shape:
                raise ValueError("a 0-dim tensor cannot be split by rows; use dp=FLAT")
            rows = Box(
                (self.dp_start, *(0,) * (len(tp_shape) - 1)),
                (self.dp_length, *tp_shape[1:]),
            )
            return _pieces_within(tp_pairs, 0, rows)
        total = math.prod(tp_shape)
        start = min(self.dp_start, total)
        stop = min(self.dp_start + self.dp_length, total)
        for flat_offset, run in flat_range_boxes(tp_shape, start, stop):
            pieces.extend(_pieces_within(tp_pairs, flat_offset, run))
        return pieces


def _pieces_within(tp_pairs: Sequence[tuple[Box, Box]], flat_offset: int, held: Box) -> list[Piece]:
    """The non-empty pieces of the box ``held`` of the TP-local tensor that a rank holds
    from its flat element ``flat_offset`` on, viewed as ``held.shape``, one for each
    ``(logical box, TP-local box)`` pair of ``tp_pairs`` it meets."""
    pieces = []
    for logical, local in tp_pairs:
        common = local.intersect(held)
        if common is None or not common.numel:
            continue
        pieces.append(
            Piece(
                common.relative_to(local.offsets).translated(logical.offsets),
                flat_offset,
                held.shape,
                common.relative_to(held.offsets),
            )
        )
    return pieces


def chunk_key(name: str, box: Box) -> str:
    """The safetensors key of the chunk of ``name`` that starts at ``box.offsets``.

    Saved chunks of one tensor are disjoint and non-empty, so their corners differ.
    """
    return f"{name}@{','.join(str(o) for o in box.offsets)}"


def piece_view(local: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The view of ``local`` holding ``piece``, shaped like ``piece.logical``.

    Writing into the returned tensor writes into ``local``.
    """
    if not local.is_contiguous():
        raise ValueError(
            "a sharded tensor must be contiguous to be saved or loaded in place; "
            "call .contiguous() on it first"
        )
    run = local.reshape(-1).narrow(0, piece.local_start, math.prod(piece.local_view))
    view = run.view(piece.local_view)[piece.local_box.slices()]
    if view.shape != piece.logical.shape:
        view = view.view(piece.logical.shape)
    return view


def torch_chunk_sizes(length: int, parts: int) -> tuple[int, ...]:
    """Per-rank lengths of ``torch.chunk(length, parts)``, as DTensor ``Shard`` and FSDP2
    split a dim: ``ceil(length / parts)`` each, the tail shorter, trailing ranks empty."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    step = -(-length // parts) if length else 0
    return tuple(max(0, min(step, length - rank * step)) for rank in range(parts))


def dtensor_shard(tensor: Any, *, layout_source: str | None = None) -> RankLayout:
    """The :class:`RankLayout` of a live ``DTensor`` (FSDP2, TP or both), from its mesh and
    placements. The local tensor is ``tensor.to_local()``.

    The writer is the rank at coordinate 0 of every mesh dim the tensor is replicated on.
    """
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh = tensor.device_mesh
    placements = tuple(tensor.placements)
    for placement in placements:
        if isinstance(placement, Partial):
            raise ValueError(
                "cannot checkpoint a DTensor with a Partial placement: its local values are "
                "not the tensor's; call .redistribute() to Replicate or Shard first"
            )
        if not isinstance(placement, Replicate | Shard):
            raise ValueError(f"unsupported DTensor placement {placement!r}")
    local_shape, global_offset = compute_local_shape_and_global_offset(
        tensor.shape, mesh, placements
    )
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ValueError("this rank is not part of the DTensor's device mesh")
    writer = all(
        coordinate[dim] == 0
        for dim, placement in enumerate(placements)
        if isinstance(placement, Replicate)
    )
    layout = TensorLayout(
        shape=tuple(tensor.shape),
        source=layout_source or f"dtensor {placements}",
    )
    return RankLayout(
        layout=layout,
        region=Box(tuple(global_offset), tuple(local_shape)),
        writer=writer,
    )


def find_tied_parameters(module: nn.Module) -> dict[str, str]:
    """``{alias: canonical}`` for parameters that are the same object under two names
    (an ``lm_head`` tied to the embedding); the canonical name is the first one
    ``named_parameters`` yields. Aliases are stored once, under the canonical name."""
    first_name: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        canonical = first_name.setdefault(id(param), name)
        if canonical != name:
            tied[name] = canonical
    return tied


# ----------------------------------------------------------------------------- live tensors

_SHARD_ATTRIBUTE = "_bitscale_shard"


def annotate(tensor: torch.Tensor, shard: RankLayout) -> torch.Tensor:
    """Declare how ``tensor`` (a rank's local tensor) is sharded; returns ``tensor``.

    For shardings that live tensors do not describe themselves: explicit TP widths,
    fused parameters, vocabulary padding, ZeRO flat fragments. DTensors need no
    annotation.
    """
    if tuple(tensor.shape) != shard.local_shape:
        raise ValueError(
            f"tensor of shape {tuple(tensor.shape)} cannot carry a shard whose local shape is "
            f"{shard.local_shape}"
        )
    setattr(tensor, _SHARD_ATTRIBUTE, shard)
    return tensor


def shard_of(tensor: torch.Tensor, *, rank: int = 0) -> RankLayout:
    """The :class:`RankLayout` of a live tensor: its annotation, its DTensor placements,
    or else replicated on every rank with ``rank`` 0 as the writer (DDP)."""
    shard = getattr(tensor, _SHARD_ATTRIBUTE, None)
    if shard is not None:
        return shard
    if hasattr(tensor, "device_mesh") and hasattr(tensor, "placements"):
        return dtensor_shard(tensor)
    return RankLayout(
        layout=TensorLayout(shape=tuple(tensor.shape), source="replicated"), writer=rank == 0
    )


def has_layout(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` says how it is sharded (an annotation or DTensor placements)."""
    return getattr(tensor, _SHARD_ATTRIBUTE, None) is not None or (
        hasattr(tensor, "device_mesh") and hasattr(tensor, "placements")
    )


def needs_universal_path(state: Mapping[str, Any]) -> bool:
    """Whether any tensor of ``state`` is sharded (annotated or a DTensor), so it must be
    loaded in place (``Checkpointer.load``, :func:`load_sharded`) rather than through
    ``load_state_dict``."""
    _, tensors = flatten_state(state)
    return any(has_layout(tensor) for tensor in tensors.values())


def holds_origin(shard: RankLayout) -> bool:
    """Whether this rank writes the logical tensor's first element: exactly one rank of a
    sharding does, so it is the writer of per-tensor scalars such as Adam's ``step``."""
    return shard.writer and any(
        all(o == 0 for o in piece.logical.offsets) for piece in shard.pieces()
    )


def state_shard(param_shard: RankLayout, state: torch.Tensor) -> RankLayout:
    """The shard of an optimizer state of a parameter sharded as ``param_shard``:
    the same layout for a state shaped like the local parameter (Adam moments), and a
    single writer for a scalar (``step``)."""
    if tuple(state.shape) == param_shard.local_shape:
        return param_shard
    if state.numel() == 1:
        return RankLayout(
            layout=TensorLayout(shape=tuple(state.shape)), writer=holds_origin(param_shard)
        )
    raise ValueError(
        f"an optimizer state of shape {tuple(state.shape)} matches neither its parameter's "
        f"local shape {param_shard.local_shape} nor a scalar; annotate it explicitly"
    )


def owned_chunks(
    name: str, local: torch.Tensor, shard: RankLayout
) -> list[tuple[str, Box, torch.Tensor]]:
    """What this rank stores of tensor ``name``: ``(key, logical box, values)`` per chunk.

    ``values`` are views of ``local`` (copy them before the tensor changes). A rank
    that is not the writer of a replicated tensor stores nothing; padding is never
    stored.
    """
    if tuple(local.shape) != shard.local_shape:
        raise ValueError(
            f"tensor {name!r} has local shape {tuple(local.shape)} but its shard expects "
            f"{shard.local_shape}"
        )
    if not shard.writer:
        return []
    return [
        (chunk_key(name, piece.logical), piece.logical, piece_view(local, piece))
        for piece in shard.pieces()
    ]


def load_shard(
    reader: ChunkReader, name: str, record: Any, local: torch.Tensor, shard: RankLayout
) -> None:
    """Fill ``local`` (this rank's tensor, sharded as ``shard``) from the stored chunks of
    ``record`` (a ``format.TensorRecord``), reading only the overlapping byte ranges.

    Padding (vocabulary rows, ZeRO alignment) is set to zero. Raises ``ValueError``
    naming the tensor when the checkpoint's logical shape differs from the model's.
    """
    if tuple(record.shape) != shard.layout.shape:
        raise ValueError(
            f"tensor {name!r}: the checkpoint holds shape {tuple(record.shape)}, the model "
            f"expects {shard.layout.shape}"
        )
    if tuple(local.shape) != shard.local_shape:
        raise ValueError(
            f"tensor {name!r} has local shape {tuple(local.shape)} but its shard expects "
            f"{shard.local_shape}"
        )
    pieces = shard.pieces()
    if sum(piece.logical.numel for piece in pieces) < local.numel():
        local.zero_()
    chunks = [Box(tuple(c.offsets), tuple(c.shape)) for c in record.chunks]
    try:
        reads = plan_reads(chunks, [piece.logical for piece in pieces])
    except ValueError as error:
        raise ValueError(f"tensor {name!r}: {error}") from None
    for read in reads:
        chunk = record.chunks[read.chunk]
        target = piece_view(local, pieces[read.region])[read.target.slices()]
        reader.read(chunk.file, chunk.key, read.source, target)


# ----------------------------------------------------------------------------- sharded save/load
# A synchronous driver of the universal path: every rank writes only the chunks it
# owns, rank 0 commits one manifest; any rank count loads it back by byte ranges.
# The lazy Checkpointer (engine.py) uses the same pieces (owned_chunks, load_shard).


class StepWriter:
    """Writes one step of a bitscale checkpoint from a single process, tensor by tensor.

    Tensors are buffered into safetensors data files of at most ``file_bytes``; a full
    file is written and fsynced before the next one starts, so memory stays bounded by
    one file however large the checkpoint. :meth:`commit` writes the manifest and
    publishes the step atomically; leaving the context without ``commit`` (an error)
    removes everything written. Raises ``ValueError`` when ``root`` already holds
    ``step`` or a later committed step, before writing anything: a committed step is
    never replaced, and one below the newest would be ignored on resume.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        step: int,
        *,
        rank: int = 0,
        file_bytes: int = 1 << 30,
        tmp_dir: Path | None = None,
        token: str | None = None,
    ) -> None:
        from bitscale.checkpoint import storage

        self.root = Path(root)
        committed = storage.list_steps(self.root)
        held = [s for s in committed if s >= step]
        if held:
            raise ValueError(
                f"cannot write step {step} under {self.root}: it already holds committed steps "
                f"{held}; a committed step is never replaced, and resuming would load the newest "
                f"instead of this one. Pass a step above {committed[-1]} (--step N for "
                "bitscale ckpt from-dcp/from-deepspeed) or write to another folder"
            )
        self.step = step
        self.rank = rank
        self.file_bytes = file_bytes
        self.token = token or storage.new_token()
        self.tmp_dir = tmp_dir or self.root / storage.temp_dir_name(step, self.token)
        self._storage = storage.LocalStorage()
        self._storage.makedirs(self.tmp_dir)
        self._pending: list[tuple[str, torch.Tensor]] = []
        self._pending_bytes = 0
        self._file_index = 0
        self.files: list[Any] = []
        self.tensors: dict[str, dict[str, Any]] = {}
        self._committed = False

    def __enter__(self) -> StepWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if not self._committed:
            self.discard()

    def discard(self) -> None:
        """Remove everything written so far; the step is not committed."""
        self._storage.remove_tree(self.tmp_dir)

    def add_chunk(
        self,
        name: str,
        tensor: torch.Tensor,
        box: Box,
        *,
        logical_shape: tuple[int, ...],
        layout: TensorLayout | None = None,
    ) -> None:
        """Store ``tensor`` as the chunk ``box`` of logical tensor ``name`` (copied now)."""
        from bitscale.checkpoint.format import ChunkRecord, data_file_name, dtype_name

        if tuple(tensor.shape) != box.shape:
            raise ValueError(f"chunk of {name!r} has shape {tuple(tensor.shape)}, box {box}")
        entry = self.tensors.setdefault(
            name,
            {
                "dtype": dtype_name(tensor.dtype),
                "shape": tuple(logical_shape),
                "chunks": [],
                "layout": None if layout is None else layout.to_json(),
            },
        )
        if entry["dtype"] != dtype_name(tensor.dtype):
            raise ValueError(f"chunks of {name!r} disagree on dtype")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.file_bytes:
            self._flush()
        key = chunk_key(name, box)
        entry["chunks"].append(
            ChunkRecord(
                file=data_file_name(self.rank, self._file_index),
                key=key,
                offsets=box.offsets,
                shape=box.shape,
            )
        )
        self._pending.append((key, tensor.detach().to("cpu", copy=True).contiguous()))
        self._pending_bytes += nbytes

    def add(self, name: str, tensor: torch.Tensor, *, layout: TensorLayout | None = None) -> None:
        """Store a whole (unsharded) tensor."""
        self.add_chunk(
            name,
            tensor,
            Box.whole(tuple(tensor.shape)),
            logical_shape=tuple(tensor.shape),
            layout=layout,
        )

    def _flush(self) -> None:
        import hashlib

        from bitscale.checkpoint.format import FileRecord, data_file_name, safetensors_header

        name = data_file_name(self.rank, self._file_index)
        prefix, _ = safetensors_header(
            [(key, t.dtype, tuple(t.shape)) for key, t in self._pending],
            {"step": str(self.step)},
        )
        digest = hashlib.sha256(prefix)
        writer = self._storage.open_writer(self.tmp_dir / name)
        try:
            writer.write(memoryview(prefix))
            size = len(prefix)
            for _, tensor in self._pending:
                data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
                digest.update(data)
                writer.write(data)
                size += len(data)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        self.files.append(FileRecord(name=name, size=size, sha256=digest.hexdigest()))
        self._pending = []
        self._pending_bytes = 0
        self._file_index += 1

    def finish_files(self) -> None:
        """Write out the buffered tensors (a multi-rank save calls this on every rank)."""
        if self._pending:
            self._flush()

    def commit(
        self,
        entries: Mapping[str, dict[str, Any]],
        *,
        world_size: int = 1,
        files: Sequence[Any] | None = None,
        tensors: Mapping[str, dict[str, Any]] | None = None,
    ) -> Path:
        """Write the manifest (``entries``: name -> ``{"kind", "value"}`` skeleton) and
        publish the step; returns the committed step directory."""
        from bitscale.checkpoint import storage
        from bitscale.checkpoint.format import (
            MANIFEST_NAME,
            Manifest,
            RankRecord,
            TensorRecord,
            validate_manifest,
        )

        self.finish_files()
        records = {
            name: TensorRecord(
                dtype=entry["dtype"],
                shape=tuple(entry["shape"]),
                chunks=tuple(entry["chunks"]),
                layout=entry["layout"],
            )
            for name, entry in (self.tensors if tensors is None else tensors).items()
        }
        manifest = Manifest(
            step=self.step,
            world_size=world_size,
            files=tuple(self.files if files is None else files),
            tensors=records,
            ranks=(RankRecord(rank=0, entries=dict(entries)),),
            created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            writer={"bitscale": _bitscale_version(), "torch": _torch_version()},
        )
        validate_manifest(manifest)
        self._storage.write_atomic(self.tmp_dir / MANIFEST_NAME, manifest.to_bytes(), self.token)
        storage.commit_step(self.root, self.tmp_dir, self.step, self.token, self._storage)
        self._committed = True
        return self.root / _step_dir(self.step)


def _step_dir(step: int) -> str:
    from bitscale.checkpoint.format import step_dir_name

    return step_dir_name(step)


def _bitscale_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("bitscale")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _torch_version() -> str:
    return str(torch.__version__)


def flatten_state(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``state`` as skeletons (``{entry: {"kind", "value"}}``) plus its tensors by name,
    with the naming of the lazy ``Checkpointer``, so either can load what the other saved.

    Names are the ``/``-joined paths (``"model/layer.weight"``). Modules give their
    ``state_dict``; optimizers are keyed by parameter name (``"model/layer.weight"``, or
    ``"#<group>.<index>"`` for a parameter of no module in ``state``). A tensor met twice
    (tied weights) is named once; its second place refers to the first. The tensors are
    the live ones (parameters, optimizer states), so loading into them restores in place.
    """
    entries, tensors, _ = _flatten(state)
    return entries, tensors


def _flatten(
    state: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, tuple[str, ...]]]:
    """:func:`flatten_state` plus the aliases of each tied tensor (name -> other names)."""
    from bitscale.checkpoint.format import EntryKind, encode_skeleton

    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    aliases: dict[str, tuple[str, ...]] = {}

    def on_tensor(path: tuple[str, ...], tensor: torch.Tensor) -> str:
        name = seen.setdefault(memory_key(tensor), "/".join(path))
        tensors.setdefault(name, tensor)
        if name != "/".join(path):
            aliases[name] = (*aliases.get(name, ()), "/".join(path))
        return name

    param_names = module_param_names(state)
    entries = {}
    for entry, value in state.items():
        if isinstance(value, nn.Module):
            kind, value = EntryKind.MODULE, value.state_dict(keep_vars=True)
        elif isinstance(value, torch.optim.Optimizer):
            kind, value = EntryKind.OPTIMIZER, optimizer_by_name(value, param_names)
        elif isinstance(value, torch.Tensor):
            kind = EntryKind.TENSOR
        elif callable(getattr(value, "state_dict", None)):
            kind, value = EntryKind.STATEFUL, value.state_dict()
        else:
            kind = EntryKind.OBJECT
        entries[entry] = {"kind": str(kind), "value": encode_skeleton(value, on_tensor, (entry,))}
    return entries, tensors, aliases


def module_param_names(state: Mapping[str, Any]) -> dict[int, str]:
    """``id(param) -> "entry/param.name"`` over the modules of ``state``. By identity, not
    memory: every empty shard (a rank that owns no rows of a DTensor) has address 0."""
    names: dict[int, str] = {}
    for entry, value in state.items():
        if isinstance(value, nn.Module):
            for pname, param in value.named_parameters(remove_duplicate=False):
                names.setdefault(id(param), f"{entry}/{pname}")
    return names


def optimizer_param_names(
    optimizer: torch.optim.Optimizer, param_names: Mapping[int, str]
) -> list[list[str]]:
    """The name of each parameter of each of ``optimizer``'s groups (``param_names``:
    ``id(param)`` -> name, see :func:`module_param_names`); a parameter of no module is
    ``"#group.index"``."""
    return [
        [param_names.get(id(p), f"#{g}.{j}") for j, p in enumerate(group["params"])]
        for g, group in enumerate(optimizer.param_groups)
    ]


def optimizer_by_name(
    optimizer: torch.optim.Optimizer, param_names: Mapping[int, str]
) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name (``param_names``: ``id(param)`` ->
    name) with its live state tensors: ``{"state": {name: {...}}, "param_groups": [...]}``."""
    state: dict[str, Any] = {}
    groups = []
    all_names = optimizer_param_names(optimizer, param_names)
    for group, names in zip(optimizer.param_groups, all_names, strict=True):
        for param, name in zip(group["params"], names, strict=True):
            if param in optimizer.state:
                state[name] = dict(optimizer.state[param])
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": names})
    return {"state": state, "param_groups": groups}


def memory_key(tensor: torch.Tensor) -> tuple:
    """What makes two tensors the same values in memory (for a DTensor, its local shard's):
    device, storage address, offset, shape, strides and dtype. An empty tensor is only
    itself: every empty one has address 0."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    if not local.numel():
        return ("empty", id(tensor))
    return (
        str(local.device),
        local.untyped_storage().data_ptr(),
        local.storage_offset(),
        tuple(local.shape),
        local.stride(),
        local.dtype,
    )


def save_sharded(
    root: str | os.PathLike[str],
    step: int,
    state: Mapping[str, Any],
    *,
    shards: Mapping[str, RankLayout] | None = None,
    kinds: Mapping[str, Any] | None = None,
    process_group: Any = None,
    file_bytes: int = 1 << 30,
) -> Path:
    """Save ``state`` (entry name -> module, tensor, or nested dict/list of tensors and
    JSON values) as step ``step`` under ``root``; collective over ``process_group``.

    Each rank writes only the chunks it owns: a tensor's shard is ``shards[name]``, its
    annotation, its DTensor placements, or (plain tensors) replicated with rank 0
    writing. All ranks must hold the same tensor names. ``kinds`` overrides an entry's
    kind (a dict of tensors saved as ``EntryKind.MODULE`` loads into a module). Returns
    the step directory.
    """
    import torch.distributed as dist
    from bitscale.checkpoint import storage

    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(process_group) if distributed else 0
    world = dist.get_world_size(process_group) if distributed else 1
    token = [storage.new_token() if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(token, src=_global_rank(0, process_group), group=process_group)
    writer = StepWriter(root, step, rank=rank, file_bytes=file_bytes, token=token[0])
    entries: dict[str, Any] = {}
    report: Any = None
    local_failure: BaseException | None = None
    try:
        entries, tensors, aliases = _flatten(state)
        for entry, kind in (kinds or {}).items():
            entries[entry]["kind"] = str(kind)
        shards = dict(shards or {})
        for name, tensor in tensors.items():
            shard = shards.get(name) or shard_of(tensor, rank=rank)
            layout = dataclasses.replace(shard.layout, tied_aliases=aliases.get(name, ()))
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            for _, box, values in owned_chunks(name, local.detach(), shard):
                writer.add_chunk(name, values, box, logical_shape=layout.shape, layout=layout)
            if name not in writer.tensors:
                writer.tensors[name] = {
                    "dtype": _dtype_name(local),
                    "shape": layout.shape,
                    "chunks": [],
                    "layout": layout.to_json(),
                }
        writer.finish_files()
        report = (sorted(tensors), writer.files, writer.tensors)
    except BaseException as error:
        local_failure = error
        if world == 1:
            writer.discard()
            raise
        # A rank that fails still joins the gather below (reporting its error) so that
        # every rank hears of it at once instead of waiting until the group times out.
        report = f"rank {rank}: {type(error).__name__}: {error}"
    try:
        reports: list[Any] | None = [None] * world if rank == 0 else None
        if world > 1:
            dist.gather_object(
                report, reports, dst=_global_rank(0, process_group), group=process_group
            )
        else:
            reports = [report]
        failure: Exception | None = None
        if rank == 0:
            assert reports is not None
            failed = [r for r in reports if isinstance(r, str)]
            try:
                if failed:
                    raise RuntimeError(
                        f"saving step {step} failed, nothing was committed: {'; '.join(failed)}"
                    )
                _commit_reports(writer, entries, reports, world)
            except Exception as error:
                failure = error
        if world > 1:
            # Every rank learns whether the commit happened, instead of waiting on a
            # barrier that a failed rank 0 never reaches.
            outcome = [None if failure is None else f"{type(failure).__name__}: {failure}"]
            dist.broadcast_object_list(
                outcome, src=_global_rank(0, process_group), group=process_group
            )
            if local_failure is not None:
                raise local_failure
            if rank != 0 and outcome[0] is not None:
                raise RuntimeError(f"rank 0 could not commit step {step}: {outcome[0]}")
        if failure is not None:
            raise failure
        return Path(root) / _step_dir(step)
    except BaseException:
        # Rank 0 owns the shared temporary directory; a failed save leaves nothing behind.
        if rank == 0:
            writer.discard()
        raise


def _commit_reports(
    writer: StepWriter, entries: dict[str, Any], reports: Sequence[Any], world: int
) -> Path:
    """Rank 0: merge every rank's files and chunks into one manifest and commit it."""
    merged_files: list[Any] = []
    merged: dict[str, dict[str, Any]] = {}
    for source_rank, (names, files, records) in enumerate(reports):
        if names != reports[0][0]:
            raise ValueError(
                f"rank {source_rank} saves tensors {sorted(set(names) ^ set(reports[0][0]))} "
                "that rank 0 does not (or the reverse); every rank must save the same names"
            )
        merged_files.extend(files)
        for name, record in records.items():
            target = merged.setdefault(name, {**record, "chunks": []})
            target["chunks"].extend(record["chunks"])
    return writer.commit(entries, world_size=world, files=merged_files, tensors=merged)


def _dtype_name(tensor: torch.Tensor) -> str:
    from bitscale.checkpoint.format import dtype_name

    return dtype_name(tensor.dtype)


def _global_rank(group_rank: int, process_group: Any) -> int:
    import torch.distributed as dist

    if process_group is None:
        return group_rank
    return dist.get_global_rank(process_group, group_rank)


def load_sharded(
    root: str | os.PathLike[str],
    state: Mapping[str, Any],
    *,
    step: int | None = None,
    shards: Mapping[str, RankLayout] | None = None,
    process_group: Any = None,
    buffer_bytes: int = 64 << 20,
    strict: bool = True,
) -> int:
    """Fill every tensor of ``state`` in place from a checkpoint saved at any world size
    and sharding, reading only the byte ranges this rank owns; returns the step.

    ``state`` has the structure given to :func:`save_sharded` (modules, tensors, nested
    dicts). Before anything is written, the checkpoint is checked against ``state``:
    missing, unexpected (with ``strict``) and mis-shaped tensors are listed by name
    in one ``ValueError``.
    """
    import torch.distributed as dist
    from bitscale.checkpoint import storage
    from bitscale.checkpoint.format import read_manifest

    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(process_group) if distributed else 0
    root = Path(root)
    if step is None:
        step = storage.latest_step(root)
        if step is None:
            raise FileNotFoundError(f"no committed bitscale checkpoint under {root}")
    step_dir = root / _step_dir(step)
    if not step_dir.is_dir():
        raise FileNotFoundError(
            f"step {step} is not committed under {root}; committed: {storage.list_steps(root)}"
        )
    manifest = read_manifest(step_dir)
    _, tensors = flatten_state(state)
    shards = dict(shards or {})
    plan = []
    for name, tensor in tensors.items():
        shard = shards.get(name) or shard_of(tensor, rank=rank)
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        plan.append((name, local, shard))
    check_against(manifest, {name: shard.layout.shape for name, _, shard in plan}, strict=strict)
    saved_entries = manifest.ranks[0].entries
    absent = sorted(set(state) - set(saved_entries))
    if absent:
        raise ValueError(
            f"step {step} under {root} has no entries {absent}; it holds {sorted(saved_entries)}"
        )
    with ChunkReader(step_dir, buffer_bytes=buffer_bytes) as reader:
        for name, local, shard in plan:
            with torch.no_grad():
                load_shard(reader, name, manifest.tensors[name], local, shard)
    names = module_param_names(state)
    for entry, target in list(state.items()):
        _restore_values(state, entry, target, saved_entries[entry], names, tensors)
    return step


def _restore_values(
    state: Any,
    entry: str,
    target: Any,
    saved: Mapping[str, Any],
    param_names: Mapping[int, str],
    tensors: Mapping[str, torch.Tensor],
) -> None:
    """Restore what is not a tensor: optimizer hyperparameters and non-tensor per-parameter
    states, stateful objects (LR schedulers: ``load_state_dict``), and plain values
    (replaced in ``state``). Tensors were filled in place."""
    from bitscale.checkpoint.format import EntryKind, decode_skeleton

    kind = EntryKind(saved["kind"])
    # Tensors were loaded in place: decoding refers to the live ones.
    values = decode_skeleton(saved["value"], tensors.get)
    if kind is EntryKind.OPTIMIZER and isinstance(target, torch.optim.Optimizer):
        groups = values["param_groups"]
        if len(groups) != len(target.param_groups):
            raise ValueError(
                f"optimizer {entry!r} has {len(target.param_groups)} parameter groups; the "
                f"checkpoint has {len(groups)}"
            )
        names = optimizer_param_names(target, param_names)
        for group, saved_group, group_names in zip(target.param_groups, groups, names, strict=True):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
            for param, name in zip(group["params"], group_names, strict=True):
                saved_state = values["state"].get(name, {})
                for key, value in saved_state.items():
                    if not isinstance(value, torch.Tensor):
                        target.state[param][key] = value
    elif kind is EntryKind.STATEFUL:
        target.load_state_dict(values)
    elif kind is EntryKind.OBJECT and isinstance(state, dict):
        state[entry] = values


def check_against(
    manifest: Any,
    expected: Mapping[str, tuple[int, ...]],
    *,
    strict: bool = True,
    within: Collection[str] | None = None,
) -> None:
    """Raise one ``ValueError`` listing, by name, the tensors ``expected`` (name -> logical
    shape) lacks in ``manifest``, those it has in excess (``strict``; only under the
    entries ``within`` when given), and mis-shaped ones."""
    missing = sorted(set(expected) - set(manifest.tensors))
    unexpected = (
        sorted(
            name
            for name in set(manifest.tensors) - set(expected)
            if within is None or name.split("/", 1)[0] in within
        )
        if strict
        else []
    )
    misshaped = [
        f"{name}: checkpoint {tuple(manifest.tensors[name].shape)}, model {tuple(shape)}"
        for name, shape in expected.items()
        if name in manifest.tensors and tuple(manifest.tensors[name].shape) != tuple(shape)
    ]
    if missing or unexpected or misshaped:
        lines = []
        if missing:
            lines.append(f"missing from the checkpoint: {', '.join(missing)}")
        if unexpected:
            lines.append(f"in the checkpoint but not in the model: {', '.join(unexpected)}")
        if misshaped:
            lines.append("shape mismatch: " + "; ".join(misshaped))
        raise ValueError(
            f"checkpoint step {manifest.step} does not match the state to load (is it from a "
            "different model?):\n  " + "\n  ".join(lines)
        )
