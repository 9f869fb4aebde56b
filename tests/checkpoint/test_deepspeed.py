"""LazyCheckpointEngine: the CheckpointEngine protocol, and real DeepSpeed ZeRO-1/2/3 on CPU."""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("deepspeed")

from bitscale.checkpoint import CheckpointSaveError, StateMutatedError
from bitscale.checkpoint.deepspeed import LazyCheckpointEngine

from bitscale.testing import run_on_ranks


class Scaler:
    """Stands in for DeepSpeed's loss-scaler objects: not JSON, pickled."""

    def __init__(self, scale: float) -> None:
        self.scale = scale


def _same(a: object, b: object, where: str = "") -> None:
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(b, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(b, dict):
        assert list(a) == list(b), where
        for key in b:
            _same(a[key], b[key], f"{where}/{key}")
    elif isinstance(b, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}/{i}")
    elif hasattr(b, "__dict__") and not isinstance(b, type):
        _same(vars(a), vars(b), where)
    else:
        assert a == b, where


def _state() -> dict:
    weight = torch.randn(6, 4)
    return {
        "module": {"w": weight, "w_view": weight[:, 1], "b": torch.arange(3)},
        "param_shapes": [{"w": torch.Size([6, 4])}],
        "ds_version": "0.19.8",
        "args": argparse.Namespace(lr=0.1, name="x"),
        "scaler": Scaler(2.0**16),
        "global_steps": 7,
        "flags": (True, None, 1.5),
    }


@pytest.mark.parametrize("new_signature", [True, False], ids=["CommitInfo", "tag"])
def test_engine_protocol_round_trips_deepspeed_like_state(
    tmp_path: Path, new_signature: bool
) -> None:
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo

    engine = LazyCheckpointEngine()
    info = CheckpointCommitInfo("tag1", str(tmp_path), True) if new_signature else "tag1"
    engine.create(info)
    assert engine.is_decoupled() and not engine.preserves_storage_sharing()
    assert engine.get_commit_info() == info
    engine.makedirs(str(tmp_path / "tag1"), exist_ok=True)
    states = {name: _state() for name in ("model_states.pt", "optim_states.pt")}
    for name, state in states.items():
        engine.save(state, str(tmp_path / "tag1" / name))
    assert engine.commit(info) is True
    assert engine.get_commit_info() is None
    assert sorted(os.listdir(tmp_path / "tag1")) == sorted(states)  # no temporaries left
    from safetensors import safe_open

    for name, state in states.items():
        path = str(tmp_path / "tag1" / name)
        with safe_open(path, framework="pt") as handle:
            assert "module/w" in handle.keys()  # noqa: SIM118 (safe_open has no __contains__)
        _same(engine.load(path, map_location=torch.device("cpu")), state)
    engine.cleanup()


def test_engine_reads_files_of_deepspeeds_default_engine(tmp_path: Path) -> None:
    state = _state()
    torch.save(state, tmp_path / "old.pt")
    engine = LazyCheckpointEngine()
    _same(
        engine.load(str(tmp_path / "old.pt")), torch.load(tmp_path / "old.pt", weights_only=False)
    )
    engine.cleanup()


def test_engine_commit_raises_on_disk_full_and_on_in_place_change(
    tmp_path: Path, full_disk_storage, gated_storage
) -> None:
    full_disk_storage.budget = 10
    engine = LazyCheckpointEngine(storage=full_disk_storage)
    engine.create("t")
    engine.save(_state(), str(tmp_path / "a.pt"))
    with pytest.raises(CheckpointSaveError, match=r"'t': writing .*a.pt failed: .*No space left"):
        engine.commit("t")
    assert not os.listdir(tmp_path)  # the temporary file is gone, nothing half-written
    engine.cleanup()

    engine = LazyCheckpointEngine(storage=gated_storage)
    state = _state()
    engine.create("u")
    engine.save(state, str(tmp_path / "b.pt"))
    state["module"]["b"].add_(1)  # before the (gated) background copy
    gated_storage.gate.set()
    with pytest.raises(StateMutatedError, match=r"'module/b' of b\.pt changed in place"):
        engine.commit("u")
    engine.cleanup()


def _batch(step: int) -> torch.Tensor:
    return torch.randn(2, 8, generator=torch.Generator().manual_seed(step))


def _train(engine, steps: range) -> list[float]:
    losses = []
    for step in steps:
        loss = engine(_batch(step)).square().mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def deepspeed_zero_stages(rank: int, world_size: int, root: str) -> dict:
    import deepspeed
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    # DeepSpeed's optional shared-memory allreduce is a C++ op compiled on first
    # use (tens of seconds on a fresh machine, and a hang behind the lock file of a
    # killed build); gloo does the same job here. The module, not the attribute:
    # deepspeed.comm.torch is the torch package (deepspeed/comm imports it).
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    results = {}
    for stage in (1, 2, 3):

        def build(seed: int, stage: int = stage):
            torch.manual_seed(seed)
            model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
            # A client torch optimizer: DeepSpeed compiles no C++ op for it.
            optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
            config = {
                "train_micro_batch_size_per_gpu": 2,
                "zero_optimization": {"stage": stage},
                "steps_per_print": 10**6,
            }
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
            return engine

        engine = build(seed=0)
        _train(engine, range(0, 2))
        reference_dir, lazy_dir = f"{root}/ref{stage}", f"{root}/lazy{stage}"
        engine.checkpoint_engine = TorchCheckpointEngine()
        engine.save_checkpoint(reference_dir, tag="t2")
        engine.checkpoint_engine = LazyCheckpointEngine()
        engine.save_checkpoint(lazy_dir, tag="t2")
        latest_before_step = os.path.exists(f"{lazy_dir}/latest")
        losses = _train(engine, range(2, 5))  # the first step commits, then writes latest
        with open(f"{lazy_dir}/latest") as handle:
            latest = handle.read()
        engine.destroy()

        resumed = build(seed=1)
        resumed.checkpoint_engine = LazyCheckpointEngine()
        resumed.load_checkpoint(lazy_dir, tag="t2")
        resumed_losses = _train(resumed, range(2, 5))
        files = sorted(os.listdir(f"{lazy_dir}/t2"))
        same_files = files == sorted(os.listdir(f"{reference_dir}/t2"))
        for name in files:
            _same(
                resumed.checkpoint_engine.load(f"{lazy_dir}/t2/{name}"),
                torch.load(f"{reference_dir}/t2/{name}", weights_only=False),
                f"stage {stage} {name}",
            )
        resumed.destroy()
        results[stage] = {
            "latest_before_step": latest_before_step,
            "latest": latest,
            "same_files": same_files,
            "files": files,
            "losses": losses,
            "resumed_losses": resumed_losses,
        }
    return results


@pytest.mark.dist
@pytest.mark.slow
def test_real_deepspeed_zero_1_2_3_on_two_cpu_ranks(tmp_path: Path) -> None:
    per_rank = run_on_ranks(deepspeed_zero_stages, 2, str(tmp_path), timeout=280)
    for rank, results in enumerate(per_rank):
        for stage, result in results.items():
            context = f"rank {rank} ZeRO-{stage}: {result}"
            assert not result["latest_before_step"], context  # decoupled: latest after commit
            assert result["latest"] == "t2", context
            assert result["same_files"] and any("optim_states" in f for f in result["files"])
            assert result["resumed_losses"] == result["losses"], context
