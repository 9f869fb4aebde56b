from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from bitscale.testing import RankError, run_on_ranks

pytestmark = pytest.mark.dist


def _allreduce_sum(rank: int, world_size: int, scale: float) -> float:
    t = torch.tensor([scale * (rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom on rank one")
    dist.barrier()


def _hang_on_rank_zero(rank: int, world_size: int) -> None:
    if rank == 0:
        dist.barrier()  # rank 1 never joins


def test_results_come_back_in_rank_order() -> None:
    assert run_on_ranks(_allreduce_sum, 3, 2.0, timeout=60) == [12.0, 12.0, 12.0]


def test_failing_rank_traceback_is_raised() -> None:
    with pytest.raises(RankError, match="boom on rank one") as excinfo:
        run_on_ranks(_fail_on_rank_one, 2, timeout=60)
    assert excinfo.value.rank == 1


def test_hung_collective_times_out() -> None:
    with pytest.raises((TimeoutError, RankError)):
        run_on_ranks(_hang_on_rank_zero, 2, timeout=8)


def test_local_function_is_rejected() -> None:
    def local(rank: int, world_size: int) -> None: ...

    with pytest.raises(ValueError, match="module-level"):
        run_on_ranks(local, 2)
