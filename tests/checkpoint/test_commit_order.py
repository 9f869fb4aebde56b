"""Two saves in flight over 2 gloo ranks, the later one written first on one rank.

Every rank must commit steps in the order ``save`` was called. A committer that took
a step as soon as its files were written would commit the later step first on the
rank that finished it first and the earlier one first on the other rank, and the
commit gather would then pair one rank's part of one step with the other rank's part
of the other step in one manifest.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path
from unittest import mock

import pytest
import torch
from bitscale.checkpoint import (
    Box,
    Checkpointer,
    CheckpointSaveError,
    RankLayout,
    TensorLayout,
    annotate,
    list_steps,
)
from bitscale.checkpoint.commit import Committer
from bitscale.checkpoint.disk import DiskTier
from torch import nn

from bitscale.testing import run_on_ranks

FIRST, SECOND = 1, 2
ROWS_PER_RANK, COLS = 3, 4
# The rank whose first step finishes writing after its second step.
SLOW_RANK = 0
# run_on_ranks' deadline; the commit group and the held file wait no longer.
TIMEOUT_S = 120


def _table(step: int, rank: int) -> torch.Tensor:
    """This rank's rows of the step's full table, annotated with their place in it."""
    full = torch.arange(2 * ROWS_PER_RANK * COLS, dtype=torch.float32).reshape(-1, COLS)
    rows = (full * (1.5 if step == FIRST else -0.25))[rank * ROWS_PER_RANK :][:ROWS_PER_RANK]
    layout = RankLayout(
        layout=TensorLayout(shape=tuple(full.shape)),
        region=Box((rank * ROWS_PER_RANK, 0), (ROWS_PER_RANK, COLS)),
    )
    return annotate(rows.clone(), layout)


def _state(step: int, rank: int, model: nn.Module | None) -> dict:
    """FIRST holds a replicated model and a table, which rank 0 spreads over two data
    files (one per writer thread); SECOND only a table: one data file, on writer 0."""
    state = {"table": _table(step, rank), "meta": {"rank": rank, "step": step}}
    if model is not None:
        state["model"] = model
    return state


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    tensors = {"table": state["table"]}
    if "model" in state:
        tensors.update({f"model/{k}": v for k, v in state["model"].state_dict().items()})
    return tensors


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def save_two_steps_on_ranks(rank: int, world_size: int, root: str) -> dict:
    commit_rounds: list[int] = []
    writes_done: list[int] = []
    second_written = threading.Event()
    original_close, original_commit = DiskTier._close, Committer._commit

    def close(tier: DiskTier, write, plan) -> None:
        # On SLOW_RANK, FIRST's data file on writer 1 closes only once SECOND (on
        # writer 0 alone) is wholly written: SECOND finishes first, deterministically.
        if rank == SLOW_RANK and write.job.step == FIRST and plan.index == 1:
            second_written.wait(TIMEOUT_S)
        original_close(tier, write, plan)
        if write.done.is_set():
            writes_done.append(write.job.step)
            if write.job.step == SECOND:
                second_written.set()

    def commit(committer: Committer, job, tier, write) -> None:
        commit_rounds.append(job.step)
        original_commit(committer, job, tier, write)

    torch.manual_seed(0)
    model = nn.Linear(32, 16)  # replicated: only rank 0 writes it
    saved = {step: _state(step, rank, model if step == FIRST else None) for step in (FIRST, SECOND)}
    result: dict = {"rank": rank}
    with (
        mock.patch.object(DiskTier, "_close", close),
        mock.patch.object(Committer, "_commit", commit),
        Checkpointer(
            root,
            keep=None,
            writer_threads=2,
            verify="hash",
            timeout=timedelta(seconds=TIMEOUT_S),
        ) as checkpointer,
    ):
        checkpointer.save(FIRST, saved[FIRST])
        checkpointer.save(SECOND, saved[SECOND])
        try:
            checkpointer.wait()
            result["save_error"] = None
        except CheckpointSaveError as error:
            result["save_error"] = str(error)
        result["writes_done"] = writes_done
        result["commit_rounds"] = commit_rounds
        result["steps"] = list_steps(root)
        for step in (FIRST, SECOND) if result["save_error"] is None else ():
            fresh_model = nn.Linear(32, 16) if step == FIRST else None
            fresh = _state(step, rank, fresh_model)
            fresh["meta"] = None
            for tensor in _tensors(fresh).values():
                tensor.detach().zero_()
            assert checkpointer.load(fresh, step=step, rng=False) == step
            want = _tensors(saved[step])
            got = _tensors(fresh)
            result[step] = {
                "meta": fresh["meta"],
                "tensors": sorted(got),
                "differ": [name for name in want if not _same_bits(got[name], want[name])],
            }
    return result


@pytest.mark.dist
def test_steps_commit_in_save_order_when_a_later_step_is_written_first(tmp_path: Path) -> None:
    results = run_on_ranks(save_two_steps_on_ranks, 2, str(tmp_path), timeout=TIMEOUT_S)
    # The race was set up: on SLOW_RANK the second step finished writing first.
    assert results[SLOW_RANK]["writes_done"] == [SECOND, FIRST], results[SLOW_RANK]
    for result in results:
        rank = result["rank"]
        assert result["commit_rounds"] == [FIRST, SECOND], (
            f"rank {rank} committed steps in the order {result['commit_rounds']}, "
            f"saved in the order {[FIRST, SECOND]}"
        )
        assert result["save_error"] is None, f"rank {rank}: {result['save_error']}"
        assert result["steps"] == [FIRST, SECOND]
        for step in (FIRST, SECOND):
            loaded = result[step]
            assert loaded["meta"] == {"rank": rank, "step": step}, (rank, step, loaded["meta"])
            expected = ["model/bias", "model/weight", "table"] if step == FIRST else ["table"]
            assert loaded["tensors"] == expected, (rank, step, loaded["tensors"])
            assert loaded["differ"] == [], f"rank {rank}, step {step}: {loaded['differ']} differ"
