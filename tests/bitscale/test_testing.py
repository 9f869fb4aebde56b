from __future__ import annotations

import time

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
        dist.barrier()  # rank 1 never joins: it is still sleeping when the deadline passes
    else:
        time.sleep(120)


def test_results_come_back_in_rank_order() -> None:
    assert run_on_ranks(_allreduce_sum, 3, 2.0, timeout=60) == [12.0, 12.0, 12.0]


def test_failing_rank_traceback_is_raised() -> None:
    with pytest.raises(RankError, match="boom on rank one") as excinfo:
        run_on_ranks(_fail_on_rank_one, 2, timeout=60)
    assert excinfo.value.rank == 1


def test_hung_collective_times_out() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] did not finish within 6 s"):
        run_on_ranks(_hang_on_rank_zero, 2, timeout=6)
    # Every process was killed at the deadline, not left to the 120 s sleep.
    assert time.monotonic() - started < 30


def test_local_function_is_rejected() -> None:
    def local(rank: int, world_size: int) -> None: ...

    with pytest.raises(ValueError, match="module-level"):
        run_on_ranks(local, 2)
