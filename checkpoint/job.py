"""A save in flight: its pending copies, its first failure, and the board of all of them.

A :class:`SaveJob` is one step being saved by this rank; every stage (stager, tiers,
committer) reports a failure into it, the first one wins, and it reaches the user
through :class:`SaveBoard`, which raises it from the next ``save``, ``wait`` or
optimizer hook.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bitscale.checkpoint.errors import CheckpointSaveError
from bitscale.checkpoint.format import RankRecord
from bitscale.checkpoint.plan import SavePlan, Shard

if TYPE_CHECKING:
    from bitscale.checkpoint.tier import StepWrite

__all__ = ["PendingCopy", "SaveBoard", "SaveJob"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class PendingCopy:
    """The lazy copy of one planned chunk into the host pool."""

    shard: Shard
    copied: threading.Event = field(default_factory=threading.Event)
    cuda_event: Any = None
    """Recorded on the copy stream after the chunk's last piece (CUDA sources only)."""


@dataclass(eq=False)
class SaveJob:
    """One step being saved by this rank."""

    step: int
    plan: SavePlan | None
    """None for a save that failed before it was planned."""
    record: RankRecord
    on_error: Callable[[CheckpointSaveError], None]
    copies: list[PendingCopy] = field(default_factory=list)
    writes: list[StepWrite] = field(default_factory=list)
    """One per tier, in the order of the tiers."""
    save_event: Any = None
    """Recorded on the current CUDA stream at ``save`` (CUDA sources only)."""
    error: CheckpointSaveError | None = None
    durable: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def failed(self) -> bool:
        return self.error is not None

    def fail(self, error: BaseException, message: str | None = None) -> None:
        with self.lock:
            if self.error is not None:
                return
            if isinstance(error, CheckpointSaveError):
                wrapped = error
            else:
                wrapped = CheckpointSaveError(
                    message
                    or f"saving step {self.step} failed: {error!r}; the step was not "
                    "committed and earlier committed steps are intact"
                )
                wrapped.__cause__ = error
            self.error = wrapped
        self.on_error(wrapped)

    def drop_tensors(self) -> None:
        """Let go of the saved tensors once the step is committed or failed."""
        self.copies.clear()
        if self.plan is not None:
            self.plan.copy_order.clear()
            for file in self.plan.files:
                file.shards.clear()


class SaveBoard:
    """The saves in flight and the failures not yet raised to the user."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: list[SaveJob] = []
        self._errors: list[CheckpointSaveError] = []

    def add(self, job: SaveJob) -> None:
        with self._lock:
            self._jobs.append(job)

    def remove(self, job: SaveJob) -> None:
        with self._lock:
            self._jobs.remove(job)

    def jobs(self) -> list[SaveJob]:
        with self._lock:
            return list(self._jobs)

    def saving_steps(self) -> set[int]:
        """Steps being saved and not failed so far."""
        with self._lock:
            return {job.step for job in self._jobs if not job.failed}

    def push_error(self, error: CheckpointSaveError) -> None:
        with self._lock:
            self._errors.append(error)

    def raise_pending(self) -> None:
        """Raise the first failure not raised yet; log the later ones."""
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            if len(errors) > 1:
                for later in errors[1:]:
                    log.error("a later checkpoint save failed too: %s", later)
            raise errors[0]
