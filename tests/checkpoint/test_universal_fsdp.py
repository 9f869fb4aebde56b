"""An FSDP2 (``fully_shard``) model + AdamW saved at world 4 resumes at worlds 2 and 3.

One 4-process gloo run: train 2 steps at world 4 (uneven ``Shard(0)`` rows: 7 rows over
4 ranks), save with ``Checkpointer.save``; then resume with ``Checkpointer.load`` into
fresh models and optimizers on sub-meshes of 2 and 3 ranks and train 5 more steps.
The save is lazy: it returns, and training takes a step, while the writers are still
held back, so nothing is durable yet; the committed step holds the state of the save.
Resumed parameters and Adam moments equal the saved ones bitwise, and the 5 losses and
final weights match a plain single-process run of the same 7 steps (rtol 1e-5: the
data-parallel reduction order differs). The same state saved with
``torch.distributed.checkpoint`` by the 4 ranks imports into a bitscale checkpoint exactly.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from bitscale.checkpoint import Checkpointer, import_dcp, latest_step, read_manifest
from bitscale.checkpoint.format import read_tensor
from bitscale.checkpoint.storage import FileWriter, LocalStorage
from torch import nn

from bitscale.testing import run_on_ranks

TIMEOUT_S = 240
GLOBAL_BATCH = 12  # divisible by 4, 3 and 2: every world sees the same global mean
STEPS_BEFORE, STEPS_AFTER = 2, 5


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 5, generator=generator, dtype=torch.float64)
    return x, torch.randn(GLOBAL_BATCH, 1, generator=generator, dtype=torch.float64)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, step: int, rank: int, world: int
) -> float:
    x, y = batch(step)
    local = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    loss = ((model(x[local]) - y[local]) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    value = loss.detach().clone()
    dist.all_reduce(value, group=model_group(model))
    return value.item() / world


def model_group(model: nn.Module) -> dist.ProcessGroup:
    return next(model.parameters()).device_mesh.get_group()


class GatedStorage(LocalStorage):
    """Data files open only once ``gate`` is set: nothing can become durable before."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def open_writer(self, path: Path) -> FileWriter:
        self.gate.wait()
        return super().open_writer(path)


def sharded_model(mesh: object) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = build_model().double()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, list]:
    """Unsharded parameters and Adam moments, as nested lists (picklable)."""
    out = {}
    for name, param in model.named_parameters():
        out[name] = param.full_tensor().tolist()
        state = optimizer.state[param]
        out[name + ".exp_avg"] = state["exp_avg"].full_tensor().tolist()
        out[name + ".exp_avg_sq"] = state["exp_avg_sq"].full_tensor().tolist()
        out[name + ".step"] = state["step"].item()
    return out


def save_at_4_resume_at_2_and_3(rank: int, world_size: int, root: str) -> dict:
    from torch.distributed.device_mesh import DeviceMesh

    results: dict = {}
    mesh4 = DeviceMesh("cpu", list(range(4)))
    model = sharded_model(mesh4)
    optimizer = make_optimizer(model)
    for step in range(STEPS_BEFORE):
        train_step(model, optimizer, step, rank, 4)
    results["saved"] = full_state(model, optimizer)
    # The same sharded state through torch.distributed.checkpoint, for the import test.
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": model.state_dict()}, checkpoint_id=str(Path(root) / "dcp4"))
    storage = GatedStorage()
    timeout = timedelta(seconds=TIMEOUT_S)
    with Checkpointer(root, keep=1, storage=storage, timeout=timeout) as checkpointer:
        checkpointer.attach(optimizer)
        checkpointer.save(1, {"model": model, "optim": optimizer})
        storage.gate.set()
        checkpointer.wait()
        storage.gate = threading.Event()
        started = time.perf_counter()
        checkpointer.save(STEPS_BEFORE, {"model": model, "optim": optimizer})
        results["save_seconds"] = time.perf_counter() - started
        results["durable_after_save"] = latest_step(root) == STEPS_BEFORE
        # Training goes on while the step is being written: the pre-step hook lets the
        # optimizer change only tensors whose copies are done.
        train_step(model, optimizer, STEPS_BEFORE, rank, 4)
        results["durable_after_training_step"] = latest_step(root) == STEPS_BEFORE
        storage.gate.set()
        checkpointer.wait()
        results["steps"] = checkpointer.list_steps()
    for world in (2, 3):
        # Every process builds the sub-mesh (new_group is collective); only members use it.
        mesh = DeviceMesh("cpu", list(range(world)))
        if rank >= world:
            # The Checkpointer's commit group is made by new_group, collective over all.
            dist.new_group(ranks=list(range(world)), backend="gloo", timeout=timeout)
            continue
        model = sharded_model(mesh)
        optimizer = make_optimizer(model)  # no state yet: load creates it
        with Checkpointer(root, process_group=mesh.get_group(), timeout=timeout) as checkpointer:
            step = checkpointer.load({"model": model, "optim": optimizer})
        assert step == STEPS_BEFORE
        loaded = full_state(model, optimizer)
        losses = [
            train_step(model, optimizer, step, rank, world)
            for step in range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER)
        ]
        results[world] = {"loaded": loaded, "losses": losses, "final": full_state(model, optimizer)}
    return results


def reference_run() -> tuple[list[float], dict[str, torch.Tensor]]:
    model = build_model().double()
    optimizer = make_optimizer(model)
    losses = []
    for step in range(STEPS_BEFORE + STEPS_AFTER):
        x, y = batch(step)
        loss = ((model(x) - y) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses[STEPS_BEFORE:], {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.dist
@pytest.mark.slow
def test_fsdp2_adamw_saved_at_4_resumes_at_2_and_3(tmp_path: Path) -> None:
    results = run_on_ranks(save_at_4_resume_at_2_and_3, 4, str(tmp_path), timeout=TIMEOUT_S)
    saved = results[0]["saved"]
    for result in results:
        assert not result["durable_after_save"] and not result["durable_after_training_step"]
        assert result["steps"] == [STEPS_BEFORE], "keep=1 removed step 1"
    manifest = read_manifest(tmp_path / f"step-{STEPS_BEFORE:08d}")
    weight = manifest.tensors["model/0.weight"]
    # 7 rows over 4 ranks: torch.chunk gives 2, 2, 2, 1; each rank wrote its own rows.
    assert sorted((c.offsets, c.shape, c.file[:9]) for c in weight.chunks) == [
        ((2 * r, 0), (2 if r < 3 else 1, 5), f"rank{r:05d}") for r in range(4)
    ]
    assert weight.layout["source"].startswith("dtensor")
    # Adam's step counter is a plain tensor on every rank: rank 0 stores it once.
    (step_chunk,) = manifest.tensors["optim/state/model/0.weight/step"].chunks
    assert step_chunk.file.startswith("rank00000")
    reference_losses, reference_params = reference_run()
    for world in (2, 3):
        resumed = results[0][world]
        # Bitwise: every parameter, both Adam moments and the step counter.
        assert resumed["loaded"] == saved, world
        assert resumed["losses"] == pytest.approx(reference_losses, rel=1e-5, abs=0)
        for name, values in reference_params.items():
            torch.testing.assert_close(
                torch.tensor(resumed["final"][name], dtype=torch.float64),
                values,
                rtol=1e-5,
                atol=0,
            )
        for rank in range(1, world):
            assert results[rank][world]["losses"] == resumed["losses"]

    # A DCP checkpoint written by 4 FSDP ranks (uneven Shard(0)) imports exactly.
    step_dir = import_dcp(tmp_path / "dcp4", tmp_path / "from_dcp", 9)
    manifest = read_manifest(step_dir)
    for name in reference_params:
        got = read_tensor(step_dir, manifest.tensors[f"model/{name}"])
        assert torch.equal(got, torch.tensor(saved[name], dtype=torch.float64)), name
