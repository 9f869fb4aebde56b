"""The stager: copies each planned chunk into the host pool and hands the pieces to the tiers.

One background thread takes saves in order. It copies every chunk (on CUDA: on a
side stream, after the point ``save`` was called) into the reused host buffer pool
(:mod:`bitscale.checkpoint.staging`) in pieces of at most 64 MiB, giving each piece
to every tier's :class:`~bitscale.checkpoint.tier.StepWrite` as soon as it is copied,
and checks that the chunk's ``_version`` did not move. :func:`wait_for_copies` is the
lazy rule of the optimizer pre-step hook: wait only for the copies of the tensors
that step changes (DataStates-LLM).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable

import torch
from bitscale.checkpoint.errors import StateMutatedError
from bitscale.checkpoint.job import SaveJob
from bitscale.checkpoint.staging import (
    HostBufferPool,
    byte_view,
    contiguous_for_copy,
    max_piece_bytes,
)
from bitscale.checkpoint.tier import HostPiece

__all__ = ["Stager", "wait_for_copies"]


class Stager:
    """The stager thread and the host buffer pool it fills.

    ``host_buffer_bytes`` sizes the pool; None sizes it to the largest save so far.
    """

    def __init__(self, host_buffer_bytes: int | None) -> None:
        self._host_buffer_bytes = host_buffer_bytes
        self.pool: HostBufferPool | None = None
        self._copy_stream: torch.cuda.Stream | None = None
        self._queue: queue.Queue[SaveJob | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="ckpt-stager", daemon=True)
        self._thread.start()

    def submit(self, job: SaveJob) -> None:
        self._queue.put(job)

    def close(self) -> None:
        """Stop the thread and close the pool; every save has finished."""
        self._queue.put(None)
        self._thread.join()
        if self.pool is not None:
            self.pool.close()

    def _ensure_pool(self, nbytes: int) -> HostBufferPool:
        wanted = self._host_buffer_bytes or max(nbytes, 1)
        if self.pool is None or (self._host_buffer_bytes is None and self.pool.capacity < wanted):
            if self.pool is not None:
                self.pool.wait_idle()
            self.pool = HostBufferPool(wanted, pin=torch.cuda.is_available())
        return self.pool

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            self._stage(job)

    def _stage(self, job: SaveJob) -> None:
        assert job.plan is not None
        try:
            pool = self._ensure_pool(sum(copy.shard.nbytes for copy in job.copies))
        except BaseException as error:
            job.fail(error)
        if job.failed or not job.plan.files:
            for copy in job.copies:
                copy.copied.set()
            for write in job.writes:
                write.abandon()
            return
        piece_bytes = max_piece_bytes(pool.capacity)
        file_of = {id(shard): file for file in job.plan.files for shard in file.shards}
        for file in job.plan.files:
            for write in job.writes:
                write.open(file)
        use_cuda = job.save_event is not None
        if use_cuda and self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream()
        if use_cuda:
            self._copy_stream.wait_event(job.save_event)
        for copy in job.copies:
            shard = copy.shard
            file = file_of[id(shard)]
            try:
                if job.failed:
                    continue
                source = contiguous_for_copy(shard.source, self._copy_stream)
                flat = byte_view(source)
                for start in range(0, shard.nbytes, piece_bytes):
                    stop = min(start + piece_bytes, shard.nbytes)
                    slot = pool.allocate(stop - start)
                    event = None
                    if source.is_cuda:
                        with torch.cuda.stream(self._copy_stream):
                            slot.buffer.copy_(flat[start:stop], non_blocking=True)
                            event = torch.cuda.Event()
                            event.record(self._copy_stream)
                    else:
                        slot.buffer.copy_(flat[start:stop])
                    copy.cuda_event = event
                    piece = HostPiece(slot, event, pool.release, holders=len(job.writes))
                    for write in job.writes:
                        write.write(file, piece)
                if copy.cuda_event is not None and shard.guard is not None:
                    # A change issued on another stream may run concurrently with the
                    # copy; only a change issued after the copy ended is harmless. So the
                    # version is read once the copy is done (a change racing it raises).
                    copy.cuda_event.synchronize()
                if shard.guard is not None and shard.guard._version != shard.version:
                    job.fail(
                        StateMutatedError(
                            f"tensor {shard.name!r} changed in place (version {shard.version} -> "
                            f"{shard.guard._version}) before its checkpoint copy finished, so "
                            f"step {job.step} was not saved. Change parameters only in the "
                            "step of an optimizer passed to Checkpointer.attach(), or call "
                            "Checkpointer.wait() before changing them."
                        )
                    )
            except BaseException as error:
                job.fail(error)
            finally:
                copy.copied.set()
        for file in job.plan.files:
            for write in job.writes:
                write.close(file)


def wait_for_copies(jobs: Iterable[SaveJob], keys: set[tuple[str, int]]) -> None:
    """Block until every pending copy of a tensor in ``keys`` (the tensors an optimizer
    step is about to change) has left it; on CUDA, order the current stream after it.
    Clones (no guard) are the save's own and never waited for."""
    for job in jobs:
        for copy in job.copies:
            if copy.shard.guard is not None and copy.shard.key in keys:
                copy.copied.wait()
                if copy.cuda_event is not None:
                    torch.cuda.current_stream(copy.shard.source.device).wait_event(copy.cuda_event)
