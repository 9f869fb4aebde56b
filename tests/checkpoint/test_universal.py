"""Universal checkpoints end to end: save sharded on N ranks, load on M, bitwise.

One 4-process gloo run saves (lazily, through ``Checkpointer.save``) the same logical
state at N = 1, 2 and 4 (subgroups of the 4 processes) with every layout kind (vocabulary-parallel with padding, tied head,
fused GQA q/k/v with uneven TP widths, row-parallel uneven, ZeRO flat fragments with
padding, FSDP-style uneven rows, replicated, scalar), then loads each into M = 1, 2,
3, 4 and 8 target ranks spread over the 4 processes. Local tensors are built by an
oracle (narrow / cat / flatten, as the frameworks do), independently of the layout
code, and compared bitwise. DTensors on a 2x2 mesh (replicated and sharded axes) go
through the same path via their placements. A save that fails on one rank before
the commit gather surfaces at once on every rank, for ``Checkpointer`` and
``save_sharded`` alike.
"""

from __future__ import annotations

import ctypes
import math
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from bitscale.checkpoint import Checkpointer, CheckpointSaveError
from bitscale.checkpoint.format import read_manifest
from bitscale.checkpoint.layout import (
    DataParallel,
    FusedPart,
    RankLayout,
    TensorLayout,
    annotate,
    load_shard,
    load_sharded,
    save_sharded,
    torch_chunk_sizes,
)
from bitscale.checkpoint.reshard import Box, ChunkReader
from torch import nn

from bitscale.testing import run_on_ranks

HEAD_DIM = 2
Q_HEADS, KV_HEADS = 6, 2
VOCAB, HIDDEN = 11, 6


def logical_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float64)

    return {
        "embed": rand(VOCAB, HIDDEN),
        "qkv": rand((Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, 5),
        "mlp": rand(4, 13),
        "flat": rand(7, 5),
        "fsdp": rand(9, 3),
        "norm": rand(HIDDEN),
        "step": torch.tensor(17.0, dtype=torch.float64),
    }


def layouts(world: int, rank: int) -> dict[str, RankLayout]:
    """Every layout kind, sized for ``world`` ranks; the shards of ``rank``."""
    padded_vocab = -(-VOCAB // world) * world if world > 1 else VOCAB + 1
    vocab = TensorLayout(
        shape=(VOCAB, HIDDEN),
        padded_shape=(padded_vocab, HIDDEN),
        tp_dim=0,
        parts=(FusedPart(name="vocab", tp_sizes=torch_chunk_sizes(padded_vocab, world)),),
    )
    qkv = TensorLayout(
        shape=((Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, 5),
        tp_dim=0,
        parts=tuple(
            FusedPart(
                name=name,
                tp_sizes=tuple(h * HEAD_DIM for h in torch_chunk_sizes(heads, world)),
            )
            for name, heads in (("q", Q_HEADS), ("k", KV_HEADS), ("v", KV_HEADS))
        ),
    )
    mlp = TensorLayout(
        shape=(4, 13), tp_dim=1, parts=(FusedPart(name="w", tp_sizes=torch_chunk_sizes(13, world)),)
    )
    per_rank = -(-35 // world)  # ZeRO: equal partitions, the last one padded
    rows = torch_chunk_sizes(9, world)
    return {
        "embed": RankLayout(layout=vocab, tp_rank=rank),
        "qkv": RankLayout(layout=qkv, tp_rank=rank),
        "mlp": RankLayout(layout=mlp, tp_rank=rank),
        "flat": RankLayout(
            layout=TensorLayout(shape=(7, 5)),
            dp=DataParallel.FLAT,
            dp_start=rank * per_rank,
            dp_length=per_rank,
        ),
        "fsdp": RankLayout(
            layout=TensorLayout(shape=(9, 3)),
            dp=DataParallel.ROWS,
            dp_start=sum(rows[:rank]),
            dp_length=rows[rank],
        ),
        "norm": RankLayout(layout=TensorLayout(shape=(HIDDEN,)), writer=rank == 0),
        "step": RankLayout(layout=TensorLayout(shape=()), writer=rank == 0),
    }


def live_local(logical: torch.Tensor, shard: RankLayout) -> torch.Tensor:
    """The oracle: what a rank holds, built by narrowing / concatenating / flattening."""
    layout = shard.layout
    full = torch.zeros(layout.full_shape, dtype=logical.dtype)
    full[Box.whole(layout.shape).slices()] = logical
    tp_local = full
    if layout.tp_dim is not None:
        pieces, start = [], 0
        for part in layout.parts:
            offset = start + sum(part.tp_sizes[: shard.tp_rank])
            pieces.append(full.narrow(layout.tp_dim, offset, part.tp_sizes[shard.tp_rank]))
            start += part.width
        tp_local = torch.cat(pieces, dim=layout.tp_dim)
    if shard.dp is DataParallel.REPLICATED:
        return tp_local.clone()
    if shard.dp is DataParallel.ROWS:
        return tp_local[shard.dp_start : shard.dp_start + shard.dp_length].clone()
    flat = torch.cat([tp_local.reshape(-1), torch.zeros(shard.dp_length, dtype=full.dtype)])
    return flat[shard.dp_start : shard.dp_start + shard.dp_length].clone()


def model_state(world: int, rank: int, *, empty: bool) -> dict[str, dict[str, torch.Tensor]]:
    """This rank's live state: the tied ``head`` is the same tensor object as ``embed``."""
    logical = logical_tensors()
    params = {}
    for name, shard in layouts(world, rank).items():
        local = live_local(logical[name], shard)
        if empty:
            local = torch.full_like(local, float("nan"))
        params[name] = annotate(local, shard)
    params["head"] = params["embed"]
    return {"model": params}


SAVE_WORLDS = (1, 2, 4)
LOAD_WORLDS = (1, 2, 3, 4, 8)
# run_on_ranks' deadline; subgroups wait no longer (gloo's default would be 30 minutes).
TIMEOUT_S = 180


def save_then_load_everywhere(rank: int, world_size: int, root: str) -> dict:
    """Save at N in SAVE_WORLDS (subgroups), then load every (N, M, target rank) pair
    whose target rank maps to this process."""
    for saved_world in SAVE_WORLDS:
        # new_group is collective over the default group: every process calls it.
        timeout = timedelta(seconds=TIMEOUT_S)
        group = dist.new_group(list(range(saved_world)), timeout=timeout)
        if rank >= saved_world:
            # Only the group saves; its Checkpointer's commit group is made by new_group.
            dist.new_group(list(range(saved_world)), backend="gloo", timeout=timeout)
            continue
        folder = Path(root) / f"n{saved_world}"
        with Checkpointer(
            folder, process_group=group, writer_threads=1, timeout=timeout
        ) as checkpointer:
            checkpointer.save(100 + saved_world, model_state(saved_world, rank, empty=False))
    dist.barrier()
    loaded = {}
    for saved_world in SAVE_WORLDS:
        for target_world in LOAD_WORLDS:
            for target_rank in range(rank, target_world, world_size):
                state = model_state(target_world, target_rank, empty=True)
                step = load_sharded(Path(root) / f"n{saved_world}", state)
                assert step == 100 + saved_world
                model = state["model"]
                # numpy, not tensors: torch sends tensors through shared memory that
                # vanishes when this process exits.
                loaded[(saved_world, target_world, target_rank)] = {
                    "head_is_embed": model["head"] is model["embed"],
                    **{name: t.numpy().copy() for name, t in model.items() if name != "head"},
                }
    loaded["dtensor"] = dtensor_round_trips(root)
    # Ranks that disagree on the tensors to save: rank 0 refuses to commit, and every
    # rank hears about it instead of hanging.
    try:
        save_sharded(Path(root) / "mismatch", 1, {"x": {f"rank{rank}": torch.ones(1)}})
        loaded["mismatch"] = "saved"
    except (ValueError, RuntimeError) as error:
        loaded["mismatch"] = f"{type(error).__name__}: {error}"
    loaded["early_failure"] = fail_on_rank_1_before_gather(root, rank)
    return loaded


def fail_on_rank_1_before_gather(root: str, rank: int) -> dict[str, tuple[str, float]]:
    """Rank 1 cannot even plan its part (an object that is not checkpointable): every
    rank must learn so within seconds, not after the process group's 30-minute timeout."""
    state = {"x": torch.ones(2), "y": object() if rank == 1 else 0}
    outcomes: dict[str, tuple[str, float]] = {}
    started = time.monotonic()
    try:
        save_sharded(Path(root) / "early", 1, state)
        outcomes["save_sharded"] = ("saved", time.monotonic() - started)
    except (TypeError, RuntimeError) as error:
        outcomes["save_sharded"] = (f"{type(error).__name__}: {error}", time.monotonic() - started)
    timeout = timedelta(seconds=TIMEOUT_S)
    with Checkpointer(Path(root) / "early_lazy", keep=None, timeout=timeout) as checkpointer:
        started = time.monotonic()
        try:
            checkpointer.save(1, state)
            checkpointer.wait()
            outcomes["checkpointer"] = ("saved", time.monotonic() - started)
        except (TypeError, CheckpointSaveError) as error:
            outcomes["checkpointer"] = (
                f"{type(error).__name__}: {error}",
                time.monotonic() - started,
            )
        # Every rank still takes part in the same commits: the next save works.
        checkpointer.save(2, {"x": torch.ones(2)})
        checkpointer.wait()
        outcomes["steps_after"] = (str(checkpointer.list_steps()), 0.0)
    return outcomes


def dtensor_round_trips(root: str) -> list[bool]:
    """DTensors over a 2x2 mesh (replicated on one axis, sharded on the other, and sharded
    on both) saved, then loaded into differently placed DTensors: exact full tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh_2d = init_device_mesh("cpu", (2, 2))
    mesh_1d = init_device_mesh("cpu", (4,))
    logical = torch.randn(9, 7, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    exact = []
    for index, placements in enumerate(([Replicate(), Shard(1)], [Shard(0), Shard(1)])):
        folder = Path(root) / f"dtensor{index}"
        save_sharded(folder, 1, {"w": distribute_tensor(logical, mesh_2d, placements)})
        for mesh, target in ((mesh_1d, [Shard(0)]), (mesh_2d, [Shard(1), Replicate()])):
            loaded = distribute_tensor(torch.zeros(9, 7, dtype=torch.float64), mesh, target)
            load_sharded(folder, {"w": loaded})
            exact.append(torch.equal(loaded.full_tensor(), logical))
    return exact


@pytest.mark.dist
def test_save_n_load_m_bitwise_every_layout(tmp_path: Path) -> None:
    results = run_on_ranks(save_then_load_everywhere, 4, str(tmp_path), timeout=TIMEOUT_S)
    for rank, per_rank in enumerate(results):
        assert per_rank.pop("dtensor") == [True] * 4
        early = per_rank.pop("early_failure")
        assert early["steps_after"][0] == "[2]"
        for api in ("save_sharded", "checkpointer"):
            message, seconds = early[api]
            assert seconds < 30, (api, seconds)
            assert "cannot checkpoint object at 'y'" in message, (api, message)
            if rank == 1:
                assert message.startswith("TypeError"), message
            else:
                assert "rank 1" in message, message
        mismatch = per_rank.pop("mismatch")
        assert "every rank must save the same names" in mismatch, mismatch
        assert mismatch.startswith("ValueError" if rank == 0 else "RuntimeError: rank 0 could not")
    assert list((tmp_path / "mismatch").iterdir()) == [], "a refused save leaves nothing"
    assert list((tmp_path / "early").iterdir()) == []
    loaded = {key: value for per_rank in results for key, value in per_rank.items()}
    expected_keys = {(n, m, r) for n in SAVE_WORLDS for m in LOAD_WORLDS for r in range(m)}
    assert set(loaded) == expected_keys
    logical = logical_tensors()
    for (saved_world, target_world, target_rank), tensors in loaded.items():
        # The tie survives the load: head is still the very tensor embed was loaded into.
        assert tensors.pop("head_is_embed"), (saved_world, target_world, target_rank)
        shards = layouts(target_world, target_rank)
        for name, shard in shards.items():
            expected = live_local(logical[name], shard)
            got = torch.from_numpy(tensors[name])
            assert torch.equal(got, expected), (saved_world, target_world, target_rank, name)

    for saved_world in SAVE_WORLDS:
        (step_dir,) = (tmp_path / f"n{saved_world}").glob("step-*")
        manifest = read_manifest(step_dir)
        # The tied head is stored once (under embed); padding is never stored.
        assert set(manifest.tensors) == {f"model/{name}" for name in logical}
        for name, values in logical.items():
            record = manifest.tensors[f"model/{name}"]
            assert record.shape == tuple(values.shape)
            assert sum(math.prod(c.shape) for c in record.chunks) == values.numel()
        stored = sum(f.size for f in manifest.files)
        logical_bytes = sum(t.numel() * t.element_size() for t in logical.values())
        # Data files hold the logical bytes once plus safetensors headers, nothing more.
        assert logical_bytes <= stored < logical_bytes + 4096 * len(manifest.files)
        assert len(manifest.files) == saved_world
        skeleton = manifest.ranks[0].entries["model"]["value"]
        assert skeleton["head"] == {"$tensor": "model/embed"}
        embed_layout = manifest.tensors["model/embed"].layout
        assert embed_layout["tied_aliases"] == ["model/head"]
        assert embed_layout["padded_shape"][0] > VOCAB
        assert [p["name"] for p in manifest.tensors["model/qkv"].layout["parts"]] == ["q", "k", "v"]


def test_wrong_model_lists_keys_by_name_and_writes_nothing(tmp_path: Path) -> None:
    save_sharded(tmp_path, 3, {"model": {"a": torch.ones(2, 3), "b": torch.ones(4)}})
    target = {"model": {"a": torch.zeros(3, 3), "c": torch.zeros(1)}}
    with pytest.raises(ValueError) as error:
        load_sharded(tmp_path, target)
    message = str(error.value)
    assert "missing from the checkpoint: model/c" in message
    assert "in the checkpoint but not in the model: model/b" in message
    assert "model/a: checkpoint (2, 3), model (3, 3)" in message
    assert torch.equal(target["model"]["a"], torch.zeros(3, 3)), "nothing may be written"
    with pytest.raises(FileNotFoundError, match="no committed bitscale checkpoint"):
        load_sharded(tmp_path / "elsewhere", target)


def test_failed_save_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="cannot checkpoint"):
        save_sharded(tmp_path, 1, {"model": {"a": torch.ones(2)}, "bad": object()})
    assert list(tmp_path.iterdir()) == []
    save_sharded(tmp_path, 1, {"model": {"a": torch.ones(2)}})
    (data_file,) = (tmp_path / "step-00000001").glob("*.safetensors")
    with open(data_file, "r+b") as handle:
        handle.truncate(data_file.stat().st_size - 4)
    with pytest.raises(ValueError, match="truncated"):
        load_sharded(tmp_path, {"model": {"a": torch.zeros(2)}})


def test_a_committed_step_is_never_replaced_nor_gone_below(tmp_path: Path) -> None:
    save_sharded(tmp_path, 3, {"model": {"a": torch.ones(2)}})
    before = sorted(os.listdir(tmp_path))
    for step in (3, 2):
        with pytest.raises(
            ValueError,
            match=rf"cannot write step {step} under .*: it already holds committed steps \[3\];"
            r".*Pass a step above 3 \(--step N for bitscale ckpt from-dcp/from-deepspeed\) or "
            "write to another folder",
        ):
            save_sharded(tmp_path, step, {"model": {"a": torch.zeros(2)}})
    assert sorted(os.listdir(tmp_path)) == before, "nothing may be written"
    target = {"model": {"a": torch.zeros(2)}}
    assert load_sharded(tmp_path, target) == 3 and torch.equal(target["model"]["a"], torch.ones(2))
    save_sharded(tmp_path, 4, {"model": {"a": torch.zeros(2)}})


def test_lr_scheduler_round_trips(tmp_path: Path) -> None:
    def make() -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        model = nn.Linear(2, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 2, gamma=0.5)

    model, optimizer, scheduler = make()
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    save_sharded(tmp_path, 5, {"model": model, "optim": optimizer, "sched": scheduler})
    fresh_model, fresh_optimizer, fresh_scheduler = make()
    load_sharded(
        tmp_path, {"model": fresh_model, "optim": fresh_optimizer, "sched": fresh_scheduler}
    )
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    assert fresh_scheduler.last_epoch == 5
    fresh_optimizer.step()
    fresh_scheduler.step()
    assert fresh_optimizer.param_groups[0]["lr"] == 0.125  # decays at epoch 6, as saved


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} not in /proc/self/status")


def _peak_extra_bytes(fn) -> int:
    """Peak resident memory ``fn`` adds, from the kernel's high-water mark (VmHWM),
    which writing 5 to /proc/self/clear_refs resets to the current RSS."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_bytes("VmRSS")
    fn()
    return _rss_bytes("VmHWM") - before


FRAGMENT_BYTES, BUFFER_BYTES = 2 << 20, 1 << 20


def measure_load_memory(rank: int, world_size: int, root: str) -> tuple[int, int]:
    """In a fresh process, so the heap holds no free blocks that earlier work touched:
    with glibc's mmap threshold fixed at 128 KiB (M_MMAP_THRESHOLD = -3) every large
    block is mapped on allocation and unmapped on free, and RSS measures live memory."""
    ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10)
    rows, cols = 4 * 1024, 1024  # 16 MiB of float32 saved whole
    values = torch.arange(rows * cols, dtype=torch.float32).view(rows, cols)
    save_sharded(root, 1, {"w": values})
    del values
    step_dir = Path(root) / "step-00000001"
    record = read_manifest(step_dir).tensors["w"]
    # Target: rank 1 of an 8-way ZeRO split, i.e. a 2 MiB flat fragment.
    fragment = rows * cols // 8
    assert fragment * 4 == FRAGMENT_BYTES
    shard = RankLayout(
        layout=TensorLayout(shape=(rows, cols)),
        dp=DataParallel.FLAT,
        dp_start=fragment,
        dp_length=fragment,
    )
    local = torch.ones(fragment, dtype=torch.float32)  # every page touched before measuring

    def load() -> None:
        with ChunkReader(step_dir, buffer_bytes=BUFFER_BYTES) as reader:
            load_shard(reader, "w", record, local, shard)

    extra = _peak_extra_bytes(load)
    assert torch.equal(local, torch.arange(fragment, 2 * fragment, dtype=torch.float32))

    def load_whole() -> None:
        whole = torch.empty(rows, cols)
        with ChunkReader(step_dir, buffer_bytes=BUFFER_BYTES) as reader:
            reader.read(record.chunks[0].file, record.chunks[0].key, Box.whole((rows, cols)), whole)
        local.copy_(whole.view(-1)[fragment : 2 * fragment])

    return extra, _peak_extra_bytes(load_whole)


@pytest.mark.dist
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux procfs")
def test_load_memory_is_bounded_by_owned_fragment(tmp_path: Path) -> None:
    ((extra, control),) = run_on_ranks(measure_load_memory, 1, str(tmp_path))
    assert extra <= 2 * FRAGMENT_BYTES + BUFFER_BYTES, extra
    # The measurement is sensitive: materializing the whole tensor (what a loader that
    # reads full parameters does) exceeds the same bound.
    assert control > 2 * FRAGMENT_BYTES + BUFFER_BYTES, control
    print(
        f"peak extra load memory: {extra / 2**20:.2f} MiB (fragment 2 MiB, buffer 1 MiB); "
        f"whole-tensor control {control / 2**20:.2f} MiB"
    )


def _trained_model_and_adam(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01 * (seed + 1))
    for _ in range(2):
        model(torch.randn(5, 4)).sum().backward()
        optimizer.step()
    return model, optimizer


def _same_state(a: tuple, b: tuple) -> None:
    (model_a, opt_a), (model_b, opt_b) = a, b
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q), name
        for key, value in opt_a.state[p].items():
            assert torch.equal(value, opt_b.state[q][key]), (name, key)
    assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"]


def test_interchangeable_with_the_lazy_checkpointer(tmp_path: Path) -> None:
    from bitscale.checkpoint.engine import Checkpointer

    source = _trained_model_and_adam(0)
    save_sharded(tmp_path / "sharded", 5, {"model": source[0], "optim": source[1]})
    target = _trained_model_and_adam(1)
    with Checkpointer(tmp_path / "sharded") as checkpointer:
        assert checkpointer.load({"model": target[0], "optim": target[1]}, rng=False) == 5
    _same_state(source, target)

    with Checkpointer(tmp_path / "lazy") as checkpointer:
        checkpointer.save(7, {"model": source[0], "optim": source[1]})
        checkpointer.wait()
    target = _trained_model_and_adam(2)
    assert load_sharded(tmp_path / "lazy", {"model": target[0], "optim": target[1]}) == 7
    _same_state(source, target)
