"""Saves over 2 gloo ranks: each rank writes its own files, rank 0 commits."""

from __future__ import annotations

import errno
import os
from datetime import timedelta
from pathlib import Path

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
    read_manifest,
    verify,
)
from bitscale.checkpoint.storage import TMP_PREFIX, FileWriter, LocalStorage
from torch import nn

from bitscale.testing import run_on_ranks

ROWS_PER_RANK, COLS = 3, 4
# run_on_ranks' deadline; the commit group waits no longer (gloo's default is 30 minutes).
TIMEOUT_S = 180


def _full_table() -> torch.Tensor:
    return torch.arange(2 * ROWS_PER_RANK * COLS, dtype=torch.float32).reshape(-1, COLS) * 1.5


def _rows(tensor: torch.Tensor, first_row: int) -> torch.Tensor:
    """``tensor`` annotated as rows ``first_row...`` of the full table."""
    region = Box((first_row, 0), tuple(tensor.shape))
    shard = RankLayout(layout=TensorLayout(shape=tuple(_full_table().shape)), region=region)
    return annotate(tensor, shard)


class _NoSpaceStorage(LocalStorage):
    def open_writer(self, path: Path) -> FileWriter:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def save_and_load_on_ranks(rank: int, world_size: int, root: str) -> dict:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)  # replicated: only rank 0 writes it
    rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    shard = _rows(_full_table()[rows].clone(), rank * ROWS_PER_RANK)
    result: dict = {}
    with Checkpointer(root, keep=2, timeout=timedelta(seconds=TIMEOUT_S)) as checkpointer:
        # torch has no public getter for a group's timeout.
        result["commit_timeout"] = checkpointer._group.process_group._get_backend(
            torch.device("cpu")
        ).options._timeout
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        checkpointer.attach(optimizer)
        for step in (1, 2, 3):
            checkpointer.save(
                step, {"model": model, "table": shard, "meta": {"rank": rank, "step": step}}
            )
        checkpointer.wait()
        result["steps"] = list_steps(root)

        torch.manual_seed(99)
        fresh = nn.Linear(4, 3)
        fresh_shard = _rows(torch.zeros(ROWS_PER_RANK, COLS), rank * ROWS_PER_RANK)
        state = {"model": fresh, "table": fresh_shard, "meta": None}
        result["loaded"] = checkpointer.load(state)
        result["model_equal"] = all(
            torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters(), strict=True)
        )
        result["shard_equal"] = torch.equal(fresh_shard, shard)
        result["meta"] = state["meta"]

    # A save that fails on rank 1 only: both ranks hear of it, nothing is committed.
    storage = _NoSpaceStorage() if rank == 1 else LocalStorage()
    with Checkpointer(root, keep=2, storage=storage) as checkpointer:
        checkpointer.save(4, {"model": model, "table": shard})
        try:
            checkpointer.wait()
            result["failure"] = None
        except CheckpointSaveError as error:
            result["failure"] = str(error)
        result["steps_after_failure"] = list_steps(root)
    return result


@pytest.mark.dist
@pytest.mark.slow
def test_two_rank_save_commit_load_and_failure(tmp_path: Path) -> None:
    results = run_on_ranks(save_and_load_on_ranks, 2, str(tmp_path), timeout=TIMEOUT_S)
    for rank, result in enumerate(results):
        assert result["commit_timeout"] == timedelta(seconds=TIMEOUT_S)
        assert result["steps"] == [2, 3], result
        assert result["loaded"] == 3
        assert result["model_equal"] and result["shard_equal"], result
        assert result["meta"] == {"rank": rank, "step": 3}
        assert result["failure"] is not None and "No space left" in result["failure"], result
        assert "rank 1" in result["failure"] or rank == 1
        assert result["steps_after_failure"] == [2, 3]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(TMP_PREFIX)]

    manifest = read_manifest(tmp_path / "step-00000003")
    assert manifest.world_size == 2 and [r.rank for r in manifest.ranks] == [0, 1]
    assert {f.name.split("-")[0] for f in manifest.files} == {"rank00000", "rank00001"}
    table = manifest.tensors["table"]
    assert table.shape == (2 * ROWS_PER_RANK, COLS)
    assert sorted((c.offsets, c.file.split("-")[0]) for c in table.chunks) == [
        ((0, 0), "rank00000"),
        ((ROWS_PER_RANK, 0), "rank00001"),
    ]
    assert all(c.file.startswith("rank00000") for c in manifest.tensors["model/weight"].chunks)
    verify(tmp_path, 3, mode="hash")

    # One process reads the whole table back from both ranks' files.
    state = {"table": torch.zeros(2 * ROWS_PER_RANK, COLS), "meta": None}
    with Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.load(state) == 3
    assert torch.equal(state["table"], _full_table())
    assert state["meta"] == {"rank": 0, "step": 3}
