"""Lazy saves of CUDA tensors: side-stream copies into a pinned pool, bitwise on load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bitscale.checkpoint import Checkpointer, StateMutatedError, list_steps
from torch import nn


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).cuda()


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        loss = model(torch.randn(128, 64, device="cuda")).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.gpu
def test_lazy_cuda_save_keeps_the_state_of_its_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, optimizer, 2)
    want = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    want_optim = {
        (i, k): v.detach().cpu().clone()
        for i, s in optimizer.state_dict()["state"].items()
        for k, v in s.items()
    }
    with Checkpointer(tmp_path, host_buffer_bytes=64 << 10) as checkpointer:
        checkpointer.attach(optimizer)
        checkpointer.save(2, {"model": model, "optim": optimizer})
        _train(model, optimizer, 3)  # the hook orders each step after the pending copies
        assert checkpointer._stager.pool is not None and checkpointer._stager.pool.pinned

    torch.manual_seed(1)
    loaded = _model()
    loaded_optimizer = torch.optim.Adam(loaded.parameters(), lr=1e-2)
    with Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.load({"model": loaded, "optim": loaded_optimizer}) == 2
    for key, value in loaded.state_dict().items():
        assert value.is_cuda and torch.equal(value.cpu(), want[key]), key
    for (i, k), value in want_optim.items():
        assert torch.equal(loaded_optimizer.state_dict()["state"][i][k].cpu(), value), (i, k)


@pytest.mark.gpu
def test_non_contiguous_cuda_tensor_is_copied_after_its_contiguous_copy(tmp_path: Path) -> None:
    torch.manual_seed(0)
    values = torch.randn(1024, 512, device="cuda")
    want = values.cpu().t()  # made on the host: no device block left holding the answer
    # A busy main stream before the save, and again while the stager runs: the transposed
    # copy must be made on the stream the host copy runs on, or that reads it unwritten.
    torch.cuda._sleep(200_000_000)
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(1, {"w": values.t()})
        torch.cuda._sleep(200_000_000)
    loaded = {"w": None}
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.load(loaded)
    assert torch.equal(loaded["w"], want)


@pytest.mark.gpu
def test_in_place_change_of_a_cuda_tensor_before_its_copy_raises(tmp_path: Path) -> None:
    small, big = _model(), nn.Linear(2048, 2048).cuda()
    small_bytes = sum(t.numel() * t.element_size() for t in small.state_dict().values())
    checkpointer = Checkpointer(tmp_path, host_buffer_bytes=small_bytes, writer_threads=1)
    torch.cuda.synchronize()
    # The stager cannot reach `big` before the writer frees the pool; change it first.
    checkpointer.save(1, {"small": small, "big": big})
    with torch.no_grad():
        big.weight.mul_(2)
    try:
        checkpointer.wait()
    except StateMutatedError:
        assert list_steps(tmp_path) == []
    else:
        # The copies won the race: then the saved step must hold the unchanged weight.
        reader = {"small": _model(), "big": nn.Linear(2048, 2048).cuda()}
        with Checkpointer(tmp_path) as loader:
            loader.load(reader)
        assert torch.equal(reader["big"].weight, big.weight / 2)
    finally:
        checkpointer.close()
