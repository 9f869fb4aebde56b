"""Host staging: a reused host buffer pool and the device->host copy of one piece.

DataStates-LLM keeps one pre-allocated (pinned, on CUDA) host region for all
checkpoint copies and reuses it across saves; a copy waits for room when the
region is full (backpressure) instead of allocating. :class:`HostBufferPool` is
that region, managed as a ring: allocations are carved in order, may be
released in any order, and space is reclaimed from the oldest allocation on.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import torch

__all__ = [
    "HostBufferPool",
    "PoolClosedError",
    "PoolSlot",
    "byte_view",
    "contiguous_for_copy",
    "max_piece_bytes",
]

# Pieces of at most 64 MiB: writers start on a tensor's first bytes while the
# rest is still copying, and a pool far smaller than one tensor still works.
_MAX_PIECE_BYTES = 64 << 20


class PoolClosedError(RuntimeError):
    """The pool was closed while a caller waited for room."""


@dataclass(eq=False)
class PoolSlot:
    """``nbytes`` bytes of the pool starting at ``start``."""

    start: int
    nbytes: int
    buffer: torch.Tensor
    released: bool = field(default=False)


class HostBufferPool:
    """A fixed host byte region handed out as a ring of slots.

    Pinned (page-locked) when ``pin`` is true, so CUDA device->host copies into
    it run asynchronously at full PCIe bandwidth.
    """

    def __init__(self, capacity: int, *, pin: bool = False) -> None:
        if capacity < 1:
            raise ValueError(f"host buffer capacity must be >= 1 byte, got {capacity}")
        self.capacity = capacity
        self.pinned = pin
        self._storage = torch.empty(capacity, dtype=torch.uint8, pin_memory=pin)
        self._live: deque[PoolSlot] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def _place(self, nbytes: int) -> int | None:
        if not self._live:
            return 0
        head = self._live[0].start
        tail = self._live[-1].start + self._live[-1].nbytes
        if tail > head:  # one used run [head, tail): room after it, or before head
            if tail + nbytes <= self.capacity:
                return tail
            return 0 if nbytes <= head else None
        return tail if tail + nbytes <= head else None  # wrapped: room is [tail, head)

    def allocate(self, nbytes: int) -> PoolSlot:
        """A slot of ``nbytes``; blocks until that much room is free."""
        if not 0 < nbytes <= self.capacity:
            raise ValueError(f"cannot allocate {nbytes} bytes from a {self.capacity}-byte pool")
        with self._cond:
            while True:
                if self._closed:
                    raise PoolClosedError("host buffer pool closed")
                start = self._place(nbytes)
                if start is not None:
                    slot = PoolSlot(start, nbytes, self._storage[start : start + nbytes])
                    self._live.append(slot)
                    return slot
                self._cond.wait()

    def release(self, slot: PoolSlot) -> None:
        with self._cond:
            slot.released = True
            while self._live and self._live[0].released:
                self._live.popleft()
            self._cond.notify_all()

    def wait_idle(self) -> None:
        """Block until every slot is released."""
        with self._cond:
            while self._live and not self._closed:
                self._cond.wait()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def max_piece_bytes(pool_capacity: int) -> int:
    """Largest piece a tensor is split into for a pool of this size."""
    return max(1, min(_MAX_PIECE_BYTES, pool_capacity))


def contiguous_for_copy(
    tensor: torch.Tensor, copy_stream: torch.cuda.Stream | None
) -> torch.Tensor:
    """``tensor``, contiguous, for device-to-host copies on ``copy_stream``. A CUDA
    tensor's contiguous copy is made on that stream (which already waited for the save
    point), so the one stream orders the host copies after it, and the temporary's memory
    is reused only by later work on that stream."""
    if tensor.is_contiguous():
        return tensor
    if tensor.is_cuda:
        with torch.cuda.stream(copy_stream):
            return tensor.contiguous()
    return tensor.contiguous()


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor as a flat uint8 tensor (no copy)."""
    assert tensor.is_contiguous()
    return tensor.detach().reshape(-1).view(torch.uint8)
