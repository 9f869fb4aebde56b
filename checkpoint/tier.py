"""Tiers: where the bytes of a step live, behind one small interface.

A step is the same whatever holds it: the safetensors data files each rank
planned (:mod:`bitscale.checkpoint.plan`) and the manifest rank 0 merged
(:mod:`bitscale.checkpoint.merge`). Every save round, every rank asks each tier to
:meth:`Tier.begin` a :class:`StepWrite`, which the stager feeds piece by piece from
the host pool (:class:`HostPiece`, shared by all tiers). The committer waits for each
tier's write, gathers the ranks' parts and has rank 0 :meth:`Tier.commit` the merged
manifest, or :meth:`Tier.discard` the step. :class:`~bitscale.checkpoint.disk.DiskTier`
(a folder, crash-safe by atomic renames) is the first tier. The load path reads a
step through :class:`StoredStep` only, so it never knows which tier holds the bytes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from bitscale.checkpoint.format import FileRecord, Manifest, TensorRecord
from bitscale.checkpoint.plan import FilePlan
from bitscale.checkpoint.staging import PoolSlot
from bitscale.checkpoint.storage import VerifyMode

if TYPE_CHECKING:
    from bitscale.checkpoint.job import SaveJob

__all__ = ["HostPiece", "StepChoice", "StepWrite", "StoredStep", "Tier"]


class HostPiece:
    """Up to 64 MiB of one chunk in the host pool, shared by the tiers until each releases it."""

    def __init__(
        self, slot: PoolSlot, cuda_event: Any, release: Callable[[PoolSlot], None], holders: int
    ) -> None:
        self.slot = slot
        self.nbytes = slot.nbytes
        self._cuda_event = cuda_event
        self._release = release
        self._holders = holders
        self._lock = threading.Lock()

    def data(self) -> memoryview:
        """The bytes, once the device-to-host copy into the pool has finished."""
        if self._cuda_event is not None:
            self._cuda_event.synchronize()
        return memoryview(self.slot.buffer.numpy())

    def release(self) -> None:
        """This holder is done with the bytes; the last one frees the pool slot."""
        with self._lock:
            self._holders -= 1
            last = self._holders == 0
        if last:
            self._release(self.slot)


class StepWrite(Protocol):
    """One tier receiving this rank's data files of one step.

    The stager calls ``open`` for every file, then ``write`` for every piece in file
    order, then ``close`` for every file, or ``abandon`` alone when it sends no file.
    These calls only hand work over: they never block on storage and never raise; a
    failure goes into the job (:meth:`SaveJob.fail`).
    """

    def open(self, file: FilePlan) -> None: ...

    def write(self, file: FilePlan, piece: HostPiece) -> None:
        """Store ``piece``, the next bytes of ``file``, then ``piece.release()``."""

    def close(self, file: FilePlan) -> None: ...

    def abandon(self) -> None:
        """No file is coming: finish now."""

    def wait(self) -> list[FileRecord]:
        """Block until every file is stored (or dropped after a failure); their records."""


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

    def begin(self, job: SaveJob) -> StepWrite:
        """Start storing this rank's files of ``job``. Called by every rank for every
        save round, failed ones too, in the same order."""

    def commit(self, write: StepWrite, manifest: Manifest) -> None:
        """Make the step loadable from this tier with ``manifest`` (rank 0, once every
        rank's write succeeded). Atomic: on a crash or an error the step is not
        committed and earlier steps are intact."""

    def discard(self, write: StepWrite) -> None:
        """Drop what every rank stored of a step that will not be committed (rank 0)."""

    def close(self) -> None:
        """Stop background work; every write has finished."""

    def steps(self) -> list[int]:
        """Committed steps, oldest first (not verified)."""

    def choose_step(self, step: int | None, mode: VerifyMode) -> StepChoice | BaseException:
        """``step`` (default: the newest committed step passing ``mode``), or the error
        that loading it would raise. Called on rank 0 only."""

    def open_step(self, step: int) -> StoredStep:
        """Read access to committed ``step``."""
