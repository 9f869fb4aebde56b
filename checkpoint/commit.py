"""The committer: turns each rank's stored files of a step into a committed step.

One background thread takes saves in the order ``save`` was called (so every rank
runs the same commit rounds in the same order) and, for each tier in turn, waits
until this rank's files are stored there, gathers every rank's part on the commit
group, and has rank 0 merge the manifest (:mod:`bitscale.checkpoint.merge`) and
commit it in the tier, or discard the step when any rank failed. Rank 0 broadcasts
the outcome, so every rank fails a step that failed anywhere. A step is durable
(``SaveJob.durable``) once every tier has committed or refused it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence

from bitscale.checkpoint.errors import CheckpointSaveError
from bitscale.checkpoint.group import CommitGroup
from bitscale.checkpoint.job import SaveBoard, SaveJob
from bitscale.checkpoint.merge import merge_parts, rank_part
from bitscale.checkpoint.tier import StepWrite, Tier

__all__ = ["Committer"]


class Committer:
    """The committer thread of one Checkpointer."""

    def __init__(self, group: CommitGroup, tiers: Sequence[Tier], board: SaveBoard) -> None:
        self._group = group
        self._tiers = tuple(tiers)
        self._board = board
        self._queue: queue.Queue[SaveJob | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="ckpt-committer", daemon=True)
        self._thread.start()

    def submit(self, job: SaveJob) -> None:
        """Commit ``job`` after the jobs submitted before it."""
        self._queue.put(job)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                for tier, write in zip(self._tiers, job.writes, strict=True):
                    self._commit(job, tier, write)
            except BaseException as error:
                job.fail(error)
            finally:
                job.drop_tensors()
                self._board.remove(job)
                job.durable.set()

    def _commit(self, job: SaveJob, tier: Tier, write: StepWrite) -> None:
        files = write.wait()
        part = rank_part(self._group.rank, job.error, files, job.plan, job.record)
        parts = self._group.gather(part)
        outcome: str | None = None
        if self._group.rank == 0:
            assert parts is not None
            failed = [p for p in parts if p["error"] is not None]
            if failed:
                outcome = "; ".join(f"rank {p['rank']}: {p['error']}" for p in failed)
                tier.discard(write)
            else:
                try:
                    tier.commit(write, merge_parts(job.step, parts))
                except BaseException as error:
                    tier.discard(write)
                    job.fail(error)
                    outcome = str(job.error)
        outcome = self._group.broadcast(outcome)
        if outcome is not None and job.error is None:
            job.fail(
                CheckpointSaveError(f"saving step {job.step} failed on another rank: {outcome}")
            )
