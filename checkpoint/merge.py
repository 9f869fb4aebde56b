"""Manifest merging: one step's manifest from every rank's part.

Pure logic, no threads and no I/O. Each rank describes what it wrote as a part (a
dict, so it crosses ranks with ``gather_object``); rank 0 merges the parts into the
:class:`~bitscale.checkpoint.format.Manifest` that commits the step, refusing parts
that disagree about a tensor or leave a non-empty tensor without any chunk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import torch
from bitscale.checkpoint.errors import CheckpointSaveError
from bitscale.checkpoint.format import (
    ChunkRecord,
    FileRecord,
    Manifest,
    RankRecord,
    TensorRecord,
    validate_manifest,
)
from bitscale.checkpoint.plan import SavePlan

__all__ = ["merge_parts", "rank_part"]


def rank_part(
    rank: int,
    error: BaseException | None,
    files: Sequence[FileRecord],
    plan: SavePlan | None,
    record: RankRecord,
) -> dict[str, Any]:
    """What ``rank`` contributes to a step's manifest: its data files, the file of each
    chunk it wrote, its tensors and its entries (``plan`` is None for a save that failed
    before it was planned), or the error that failed its save."""
    return {
        "rank": rank,
        "error": None if error is None else str(error),
        "files": list(files),
        "file_of": {} if plan is None else plan.file_of,
        "tensors": {} if plan is None else plan.tensors,
        "record": record,
    }


def merge_parts(step: int, parts: list[dict[str, Any]]) -> Manifest:
    """Rank 0's view: one manifest from every rank's files, chunks and records."""
    import bitscale

    tensors: dict[str, dict[str, Any]] = {}
    files: list[FileRecord] = []
    for part in parts:
        rank = part["rank"]
        files.extend(part["files"])
        for name, spec in part["tensors"].items():
            entry = tensors.setdefault(
                name,
                {
                    "dtype": spec.dtype,
                    "shape": spec.global_shape,
                    "layout": spec.layout,
                    "chunks": [],
                },
            )
            if (entry["dtype"], entry["shape"]) != (spec.dtype, spec.global_shape):
                raise CheckpointSaveError(
                    f"tensor {name!r}: rank {rank} has {spec.dtype}{list(spec.global_shape)}, "
                    f"another rank {entry['dtype']}{list(entry['shape'])}"
                )
            for key, offsets, shape in spec.chunks:
                entry["chunks"].append(
                    ChunkRecord(file=part["file_of"][key], key=key, offsets=offsets, shape=shape)
                )
    unwritten = [
        name
        for name, entry in tensors.items()
        if not entry["chunks"] and math.prod(entry["shape"]) > 0
    ]
    if unwritten:
        raise CheckpointSaveError(
            f"tensors {unwritten} were given by other ranks but not by rank 0: plain tensors "
            "count as replicated and rank 0 writes them; annotate() rank-local tensors with "
            "their RankLayout"
        )
    manifest = Manifest(
        step=step,
        world_size=len(parts),
        files=tuple(files),
        tensors={
            name: TensorRecord(
                dtype=e["dtype"],
                shape=tuple(e["shape"]),
                chunks=tuple(e["chunks"]),
                layout=e["layout"],
            )
            for name, e in tensors.items()
        },
        ranks=tuple(sorted((p["record"] for p in parts), key=lambda r: r.rank)),
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        writer={"bitscale": bitscale.__version__, "torch": torch.__version__},
    )
    validate_manifest(manifest)
    return manifest
