"""Counted communication for the HDP runtime.

Every payload the runtime sends goes through this module so that measured traffic can be
compared with the planner's estimate (``Plan.stats``). Bytes are *payload* bytes handed to
torch.distributed by this rank (what one rank sends), not the wire bytes of the collective's
algorithm: for a ring step that is the size of the block sent to the next rank; for an
all-reduce it is the size of the reduced buffer.

Ring traffic is point-to-point on the world group (never a process group per item): with
gloo any subset of ranks can exchange messages on the world group, and with NCCL it is legal
after one collective over the world group (``HDPRunner`` runs one when it is built). NCCL
ignores tags; there the pairing rests on both ends posting their messages in the same order,
which the global item order and the fixed exchange order inside a ring step guarantee.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum

import torch
import torch.distributed as dist

__all__ = [
    "CommCategory",
    "CommCounter",
    "RingChannel",
    "RingExchange",
    "check_ring_position",
    "ring_tag",
]


class CommCategory(StrEnum):
    """What a counted payload is for."""

    RING_KV = "ring_kv"
    """K and V blocks passed around an attention ring (forward, and again in backward)."""
    RING_DKV = "ring_dkv"
    """dK and dV accumulators that travel with the K/V blocks in backward."""
    GRAD_SYNC = "grad_sync"
    """The one gradient all-reduce per step (with FSDP2: the reduce-scatters' input)."""
    PARAM_GATHER = "param_gather"
    """With FSDP2: the parameters all-gathered once per step (full size)."""
    METRICS = "metrics"
    """The small all-reduce of loss sum, loss-token count and per-rank busy time."""


@dataclass
class CommCounter:
    """Bytes sent by this rank, by category, and the number of messages."""

    bytes: dict[CommCategory, int] = field(default_factory=lambda: dict.fromkeys(CommCategory, 0))
    messages: dict[CommCategory, int] = field(
        default_factory=lambda: dict.fromkeys(CommCategory, 0)
    )

    def add(self, category: CommCategory, num_bytes: int) -> None:
        self.bytes[category] += num_bytes
        self.messages[category] += 1

    def as_dict(self) -> dict[str, int]:
        return {category.value: self.bytes[category] for category in CommCategory}


class RingChannel(int, Enum):
    """Sub-channel of one item's tag, so that two message streams between the same pair of
    ranks (d = 2 sends K/V and dK/dV to the same neighbour) can never be matched with each
    other, whatever order the transport delivers them in."""

    KV_FORWARD = 0
    KV_BACKWARD = 1
    DKV = 2


_CHANNELS = len(RingChannel)


def ring_tag(item_id: int, channel: RingChannel) -> int:
    """The point-to-point tag of ``channel`` for work item ``item_id``."""
    return item_id * _CHANNELS + int(channel)


def check_ring_position(ranks: Sequence[int], position: int) -> None:
    """Raise ``ValueError`` unless this process is ``ranks[position]`` of a ring of at least
    2 ranks (global ranks in ring order)."""
    if len(ranks) < 2 or not 0 <= position < len(ranks):
        raise ValueError(
            f"a ring needs at least 2 ranks and a position indexing them, got ranks "
            f"{list(ranks)} and position {position}"
        )
    rank = dist.get_rank()
    if ranks[position] != rank:
        where = f"{list(ranks).index(rank)}" if rank in ranks else "none: ranks lacks it"
        raise ValueError(
            f"ranks[{position}] is {ranks[position]} but this process is rank {rank}: position "
            f"must be this rank's index in ranks {list(ranks)} ({where})"
        )


class RingExchange:
    """One ring step: send a block to the next rank of the ring and receive the previous
    rank's block of the same shape, without blocking until :meth:`wait`.

    ``ranks`` are global ranks in ring order; this rank sits at ``position``.
    """

    def __init__(
        self,
        ranks: Sequence[int],
        position: int,
        tag: int,
        category: CommCategory,
        counter: CommCounter | None,
        send: torch.Tensor,
    ) -> None:
        check_ring_position(ranks, position)
        send = send.contiguous()
        self._recv = torch.empty_like(send)
        ring_size = len(ranks)
        ops = [
            dist.P2POp(dist.isend, send, ranks[(position + 1) % ring_size], tag=tag),
            dist.P2POp(dist.irecv, self._recv, ranks[(position - 1) % ring_size], tag=tag),
        ]
        # Keep the send buffer alive until the transfer completes.
        self._send = send
        self._requests = dist.batch_isend_irecv(ops)
        if counter is not None:
            counter.add(category, send.numel() * send.element_size())

    def wait(self) -> torch.Tensor:
        for request in self._requests:
            request.wait()
        self._send = None
        return self._recv
