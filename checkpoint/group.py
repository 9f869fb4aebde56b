"""The commit group: the gloo group a Checkpointer's background commits talk on."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

__all__ = ["CommitGroup"]


class CommitGroup:
    """This rank's place among the ranks that save together, and their collectives.

    Commit traffic runs in a background thread: on its own gloo group it can never
    interleave with (and deadlock against) training collectives. One rank alone has
    no group (``process_group`` is None) and its collectives are local.
    """

    def __init__(self, process_group: Any, timeout: timedelta) -> None:
        import torch.distributed as dist

        self.process_group: Any = None
        self.rank, self.world_size = 0, 1
        if not (dist.is_available() and dist.is_initialized()):
            if process_group is not None:
                raise ValueError("process_group given but torch.distributed is not initialized")
            return
        group = process_group or dist.group.WORLD
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        # Made even for a one-rank group, as new_group must be called alike by every rank.
        ranks = dist.get_process_group_ranks(group)
        commit_group = dist.new_group(ranks=ranks, backend="gloo", timeout=timeout)
        if world > 1:
            self.process_group, self.rank, self.world_size = commit_group, rank, world

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if self.process_group is None:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(
            box, src=dist.get_global_rank(self.process_group, 0), group=self.process_group
        )
        return box[0]

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value``, in rank order, on rank 0; None on the other ranks."""
        if self.process_group is None:
            return [value]
        import torch.distributed as dist

        values = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(
            value, values, dst=dist.get_global_rank(self.process_group, 0), group=self.process_group
        )
        return values
