"""Bitwise resume: N steps straight == K steps, save, new process, load, N - K steps."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from bitscale.checkpoint import Checkpointer
from torch import nn

from bitscale.testing import run_on_ranks

TOTAL_STEPS, SAVE_AT = 8, 3


class Batches:
    """A data source whose sampling draws on Python and NumPy RNGs; its position is state."""

    def __init__(self) -> None:
        self.position = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.position += 1
        rows = random.randint(3, 6)
        x = torch.from_numpy(np.random.standard_normal((rows, 8))).float()
        return x, x.sum(dim=1, keepdim=True) * self.position

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def make_run(seed: int) -> dict:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.25), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)
    return {"model": model, "optim": optimizer, "sched": scheduler, "data": Batches()}


def run_steps(run: dict, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        x, y = run["data"].next()
        loss = nn.functional.mse_loss(run["model"](x), y)
        run["optim"].zero_grad()
        loss.backward()
        run["optim"].step()
        run["sched"].step()
        losses.append(loss.item())
    return losses


def snapshot(run: dict) -> dict:
    optimizer = run["optim"].state_dict()
    return {
        "model": {k: v.clone() for k, v in run["model"].state_dict().items()},
        "optim_state": {
            i: {k: v.clone() for k, v in s.items()} for i, s in optimizer["state"].items()
        },
        "param_groups": optimizer["param_groups"],
        "sched": run["sched"].state_dict(),
    }


def resume_in_new_process(rank: int, world_size: int, root: str, steps: int) -> dict:
    run = make_run(seed=12345)  # deliberately different: everything must come from disk
    with Checkpointer(root) as checkpointer:
        step = checkpointer.load(run)
    losses = run_steps(run, steps)
    # NumPy copies: torch tensors would travel through shared memory that vanishes
    # with this process before the parent reads them.
    return {"step": step, "losses": losses, "final": _to_numpy(snapshot(run))}


def _to_numpy(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return value.numpy().copy()
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_numpy(v) for v in value]
    return value


def _assert_snapshots_equal(got: dict, want: dict) -> None:
    for key, value in want["model"].items():
        assert torch.equal(torch.from_numpy(got["model"][key]), value), key
    assert got["optim_state"].keys() == want["optim_state"].keys()
    for index, state in want["optim_state"].items():
        for key, value in state.items():
            assert torch.equal(torch.from_numpy(got["optim_state"][index][key]), value), (
                index,
                key,
            )
    assert got["param_groups"] == want["param_groups"]
    assert got["sched"] == want["sched"]


@pytest.mark.dist
def test_resume_in_a_new_process_is_bitwise(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in run_on_ranks workers
    try:
        straight = make_run(seed=0)
        straight_losses = run_steps(straight, TOTAL_STEPS)
        want = snapshot(straight)

        first = make_run(seed=0)
        with Checkpointer(tmp_path) as checkpointer:
            checkpointer.attach(first["optim"])
            first_losses = run_steps(first, SAVE_AT)
            checkpointer.save(SAVE_AT, first)
            # Training goes on while the save is pending; the hook keeps step SAVE_AT intact.
            run_steps(first, 2)
    finally:
        torch.set_num_threads(threads)
    assert first_losses == straight_losses[:SAVE_AT]

    (resumed,) = run_on_ranks(
        resume_in_new_process, 1, str(tmp_path), TOTAL_STEPS - SAVE_AT, timeout=180
    )
    assert resumed["step"] == SAVE_AT
    assert resumed["losses"] == straight_losses[SAVE_AT:]
    _assert_snapshots_equal(resumed["final"], want)
