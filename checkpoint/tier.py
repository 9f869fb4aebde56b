"""Tiers: where the bytes of a step live, behind one small interface.

A step is the same whatever holds it: the safetensors data files each rank
planned (:mod:`bitscale.checkpoint.plan`) and the manifest rank 0 merged
(:mod:`bitscale.checkpoint.merge`). A :class:`Tier` stores those files and makes a
step loadable once its manifest is committed; :class:`~bitscale.checkpoint.disk.DiskTier`
(a folder, crash-safe by atomic renames) is the first. The load path reads a step
through :class:`StoredStep` only, so it never knows which tier holds the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from bitscale.checkpoint.format import Manifest, TensorRecord
from bitscale.checkpoint.storage import VerifyMode

__all__ = ["StepChoice", "StoredStep", "Tier"]


class ChunkSource(Protocol):
    """Reads parts of stored chunks (what :func:`~bitscale.checkpoint.layout.load_shard` needs)."""

    def read(self, file: str, key: str, part: Any, out: torch.Tensor) -> None:
        """Copy box ``part`` of chunk ``key`` of data file ``file`` into ``out``."""

    def __enter__(self) -> ChunkSource: ...

    def __exit__(self, *exc_info: object) -> None: ...


class StoredStep(Protocol):
    """One committed step as a tier holds it."""

    manifest: Manifest

    def read_tensor(self, record: TensorRecord) -> torch.Tensor:
        """The whole logical tensor ``record`` describes, assembled from its chunks."""

    def chunk_reader(self, buffer_bytes: int) -> ChunkSource:
        """A reader of byte ranges of chunks holding at most ``buffer_bytes`` of read data."""


@dataclass(frozen=True)
class StepChoice:
    """The step a tier would load, and why it passed over newer ones."""

    step: int
    damaged: tuple[str, ...] = ()
    """One line per newer committed step that failed verification."""


class Tier(Protocol):
    """A place that holds committed steps."""

    def steps(self) -> list[int]:
        """Committed steps, oldest first (not verified)."""

    def choose_step(self, step: int | None, mode: VerifyMode) -> StepChoice | BaseException:
        """``step`` (default: the newest committed step passing ``mode``), or the error
        that loading it would raise. Called on rank 0 only."""

    def open_step(self, step: int) -> StoredStep:
        """Read access to committed ``step``."""
