"""Checkpointer: lazy saves, the pre-step hook, error reporting, bitwise round trips."""

from __future__ import annotations

import contextlib
import math
import os
import random
import threading
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from bitscale.checkpoint import (
    Box,
    CheckpointDamagedWarning,
    Checkpointer,
    CheckpointSaveError,
    DataParallel,
    FusedPart,
    RankLayout,
    StateMutatedError,
    TensorLayout,
    annotate,
    latest_step,
    list_steps,
    read_manifest,
    verify,
)
from bitscale.checkpoint.format import FORMAT_VERSION, LATEST_NAME
from bitscale.checkpoint.storage import TMP_PREFIX
from safetensors import safe_open
from torch import nn


class Position:
    """A data-loader position: a user object with state_dict/load_state_dict."""

    def __init__(self) -> None:
        self.epoch, self.index = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = model(torch.randn(5, 6, generator=generator)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _assert_state_dicts_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        a, b = got[key], want[key]
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), key
        elif isinstance(b, dict):
            _assert_state_dicts_equal(a, b)
        else:
            assert a == b, key


def _assert_optimizers_equal(got: torch.optim.Optimizer, want: torch.optim.Optimizer) -> None:
    a, b = got.state_dict(), want.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index in b["state"]:
        _assert_state_dicts_equal(a["state"][index], b["state"][index])


def test_round_trip_of_every_kind_of_entry_is_bitwise(tmp_path: Path) -> None:
    model = _model(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    _train(model, optimizer, 3)
    scheduler.step()
    position = Position()
    position.epoch, position.index = 2, 17
    ema = torch.randn(4, 3, dtype=torch.float64)
    half = torch.randn(5).to(torch.bfloat16)
    meta = {"name": "run", "shape": (3, 4), 7: [1.5, math.inf], "blob": b"\x00\xff", "none": None}
    state = {
        "model": model,
        "optim": optimizer,
        "sched": scheduler,
        "loader": position,
        "ema": ema,
        "half": half,
        "meta": meta,
    }
    with Checkpointer(tmp_path, verify="hash") as checkpointer:
        checkpointer.attach(optimizer)
        checkpointer.save(5, state)
        checkpointer.wait()

    manifest = read_manifest(tmp_path / "step-00000005")
    assert manifest.format_version == FORMAT_VERSION and manifest.step == 5
    assert manifest.tensors["model/0.weight"].shape == (10, 6)
    (chunk,) = manifest.tensors["model/0.weight"].chunks
    assert chunk.offsets == (0, 0) and chunk.shape == (10, 6)
    assert {f.name for f in manifest.files} == {
        n for n in os.listdir(tmp_path / "step-00000005") if n.endswith(".safetensors")
    }
    for record in manifest.files:
        with safe_open(str(tmp_path / "step-00000005" / record.name), framework="pt") as handle:
            assert list(handle.keys())
    assert (tmp_path / LATEST_NAME).read_text() == "step-00000005\n"

    model2 = _model(1)
    optimizer2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    scheduler2 = torch.optim.lr_scheduler.StepLR(optimizer2, step_size=9)
    position2 = Position()
    ema2, half2 = torch.zeros(4, 3, dtype=torch.float64), torch.zeros(5, dtype=torch.bfloat16)
    state2 = {
        "model": model2,
        "optim": optimizer2,
        "sched": scheduler2,
        "loader": position2,
        "ema": ema2,
        "half": half2,
        "meta": None,
    }
    with Checkpointer(tmp_path, verify="hash") as checkpointer:
        assert checkpointer.load(state2) == 5
    _assert_state_dicts_equal(model2.state_dict(), model.state_dict())
    _assert_optimizers_equal(optimizer2, optimizer)
    assert scheduler2.state_dict() == scheduler.state_dict()
    assert position2.state_dict() == {"epoch": 2, "index": 17}
    assert torch.equal(ema2, ema) and torch.equal(half2, half)
    assert state2["meta"] == meta and isinstance(state2["meta"]["shape"], tuple)


def test_optimizer_state_is_matched_by_parameter_name_not_position(tmp_path: Path) -> None:
    model = _model(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    _train(model, optimizer, 2)
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(1, {"model": model, "optim": optimizer})

    model2 = _model(1)
    # The same parameters registered in reverse order: positions differ, names match.
    optimizer2 = torch.optim.Adam(list(model2.parameters())[::-1], lr=0.01)
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.load({"model": model2, "optim": optimizer2})
    params2 = dict(model2.named_parameters())
    for name, param in model.named_parameters():
        for key, value in optimizer.state[param].items():
            assert torch.equal(optimizer2.state[params2[name]][key], value), (name, key)


def test_load_restores_rng_states(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(1, {"meta": 0})
        checkpointer.wait()
        draws = (random.random(), np.random.rand(), torch.rand(3))
        checkpointer.load({"meta": None})
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])


def test_tied_parameters_are_stored_once(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7, bias=False))
    model[1].weight = model[0].weight
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(1, {"model": model})
    manifest = read_manifest(tmp_path / "step-00000001")
    assert list(manifest.tensors) == ["model/0.weight"]
    model2 = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7, bias=False))
    model2[1].weight = model2[0].weight
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.load({"model": model2})
    assert torch.equal(model2[1].weight, model[0].weight)


def test_tiny_host_pool_applies_backpressure_and_stays_bitwise(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.randn(1000 + i, dtype=torch.float64) for i in range(5)}
    with Checkpointer(tmp_path, host_buffer_bytes=100, keep=None) as checkpointer:
        for step in range(3):
            checkpointer.save(step, {"w": {k: v + step for k, v in tensors.items()}})
        checkpointer.wait()
        assert checkpointer.list_steps() == [0, 1, 2]
        for step in range(3):
            state = {"w": None}
            checkpointer.load(state, step=step)
            for key, value in tensors.items():
                assert torch.equal(state["w"][key], value + step)


def test_hook_blocks_only_for_the_tensors_its_step_changes(tmp_path: Path, gated_storage) -> None:
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    opt_a = torch.optim.Adam(a.parameters(), lr=0.1)
    opt_b = torch.optim.Adam(b.parameters(), lr=0.1)
    for module, optimizer in ((a, opt_a), (b, opt_b)):
        module(torch.randn(2, 8)).sum().backward()
        optimizer.step()
    before_a = {k: v.clone() for k, v in a.state_dict().items()}
    a_bytes = sum(t.numel() * t.element_size() for t in a.state_dict().values())
    a_bytes += sum(t.numel() * t.element_size() for s in opt_a.state.values() for t in s.values())
    # One file, copied in state order; the pool holds exactly a and opt_a, and the
    # gated writer never frees it, so b's copies cannot start.
    checkpointer = Checkpointer(
        tmp_path, host_buffer_bytes=a_bytes, writer_threads=1, storage=gated_storage
    )
    checkpointer.attach(opt_a)
    checkpointer.attach(opt_b)
    checkpointer.save(1, {"a": a, "opt_a": opt_a, "b": b, "opt_b": opt_b})

    step_a = threading.Thread(target=opt_a.step)
    step_a.start()
    step_a.join(timeout=30)
    assert not step_a.is_alive(), "opt_a.step() waited although its tensors were copied"

    step_b = threading.Thread(target=opt_b.step)
    step_b.start()
    step_b.join(timeout=0.5)
    assert step_b.is_alive(), "opt_b.step() ran before its tensors were copied"
    gated_storage.gate.set()
    step_b.join(timeout=30)
    assert not step_b.is_alive()
    checkpointer.close()

    loaded = nn.Linear(8, 8)
    with Checkpointer(tmp_path) as reader:
        state = {"a": loaded, "opt_a": torch.optim.Adam(loaded.parameters()), "b": nn.Linear(8, 8)}
        state["opt_b"] = torch.optim.Adam(state["b"].parameters())
        reader.load(state)
    _assert_state_dicts_equal(loaded.state_dict(), before_a)


def test_in_place_change_during_pending_save_raises(tmp_path: Path, gated_storage) -> None:
    a, b = nn.Linear(4, 4), nn.Linear(64, 64)
    a_bytes = sum(t.numel() * t.element_size() for t in a.state_dict().values())
    checkpointer = Checkpointer(
        tmp_path, host_buffer_bytes=a_bytes, writer_threads=1, storage=gated_storage
    )
    checkpointer.save(1, {"a": a, "b": b})
    with torch.no_grad():
        b.weight.add_(1.0)  # b is not copied yet: the pool is full and the writer gated
    gated_storage.gate.set()
    with pytest.raises(StateMutatedError, match=r"'b/weight' changed in place"):
        checkpointer.wait()
    assert list_steps(tmp_path) == []
    checkpointer.save(2, {"a": a, "b": b})  # the error was reported once; saving goes on
    checkpointer.close()
    assert list_steps(tmp_path) == [2]


def test_disk_full_raises_clearly_and_keeps_earlier_steps(
    tmp_path: Path, full_disk_storage
) -> None:
    model = _model(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpointer = Checkpointer(tmp_path, storage=full_disk_storage)
    checkpointer.attach(optimizer)
    checkpointer.save(1, {"model": model})
    checkpointer.wait()
    full_disk_storage.budget = full_disk_storage.written + 100  # the next save will not fit
    _train(model, optimizer, 1)
    checkpointer.save(2, {"model": model})
    checkpointer.save(3, {"model": model})
    with pytest.raises(CheckpointSaveError, match=r"step 2 failed writing .*No space left"):
        checkpointer.wait()
    assert list_steps(tmp_path) == [1]
    assert verify(tmp_path, 1, mode="hash") == 1
    assert not [n for n in os.listdir(tmp_path) if n.startswith(TMP_PREFIX)]
    # Errors surface from the next hook call too, and training may go on.
    full_disk_storage.budget = None
    checkpointer.save(4, {"model": model})
    checkpointer.wait()
    assert latest_step(tmp_path) == 4
    checkpointer.close()


def test_background_error_is_raised_from_the_next_save_and_hook(
    tmp_path: Path, full_disk_storage
) -> None:
    model = nn.Linear(3, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    full_disk_storage.budget = 0
    with Checkpointer(tmp_path, storage=full_disk_storage) as checkpointer:
        checkpointer.attach(optimizer)
        checkpointer.save(1, {"model": model})
        with pytest.raises(CheckpointSaveError, match="step 1"):
            # Not yet failed when the hook runs: raise from whichever comes first.
            for _ in range(1000):
                model(torch.ones(1, 3)).sum().backward()
                optimizer.step()
                threading.Event().wait(0.01)
        optimizer.step()  # reported once
        checkpointer.save(2, {"model": model})
        with pytest.raises(CheckpointSaveError, match="step 2"):
            for step in range(3, 1000):
                checkpointer.save(step, {"model": model})
                threading.Event().wait(0.01)
        # The probing saves after step 2 failed too; drain them before closing.
        with contextlib.suppress(CheckpointSaveError):
            checkpointer.wait()
        assert list_steps(tmp_path) == []


def test_retention_keeps_the_newest_steps(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, keep=2) as checkpointer:
        for step in (1, 2, 3, 4):
            checkpointer.save(step, {"meta": step})
    assert list_steps(tmp_path) == [3, 4]
    assert (tmp_path / LATEST_NAME).read_text() == "step-00000004\n"


def test_a_step_below_a_committed_or_pending_one_is_refused(tmp_path: Path, gated_storage) -> None:
    fix = "holds a later run's steps: move or delete them, or save this run to another folder"
    with Checkpointer(tmp_path, keep=1) as checkpointer:
        checkpointer.save(5, {"meta": "first"})
        checkpointer.wait()
        with pytest.raises(
            ValueError, match=rf"cannot save step 3 under .*later steps \[5\].*{fix}"
        ):
            checkpointer.save(3, {"meta": "lower"})
        # The same step again is allowed: a step rewritten after a fallback.
        checkpointer.save(5, {"meta": "again"})
    # Steps committed by an earlier Checkpointer (another run) count too.
    with Checkpointer(tmp_path) as checkpointer:
        with pytest.raises(ValueError, match=r"cannot save step 4 .*later steps \[5\]"):
            checkpointer.save(4, {"meta": "lower"})
        state = {"meta": None}
        assert checkpointer.load(state) == 5 and state["meta"] == "again"
    assert list_steps(tmp_path) == [5]

    # A higher step still being written counts as well.
    checkpointer = Checkpointer(tmp_path / "pending", storage=gated_storage)
    try:
        checkpointer.save(10, {"w": torch.ones(4)})
        with pytest.raises(ValueError, match=r"cannot save step 7 .*later steps \[10\]"):
            checkpointer.save(7, {"w": torch.ones(4)})
    finally:
        gated_storage.gate.set()
        checkpointer.close()
    assert list_steps(tmp_path / "pending") == [10]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep": 0}, "keep must be a positive int"),
        ({"verify": "sometimes"}, "verify must be one of"),
        ({"host_buffer_bytes": 0}, "host_buffer_bytes must be"),
        ({"writer_threads": 0}, "writer_threads must be"),
        ({"keep": True}, r"keep must be a positive int or None \(keep all\), got True"),
        ({"writer_threads": True}, r"writer_threads must be an int >= 1, got True"),
        ({"writer_threads": 2.0}, r"writer_threads must be an int >= 1, got 2\.0"),
        ({"timeout": 30}, r"timeout must be a positive datetime\.timedelta, got 30; e\.g\."),
        ({"timeout": timedelta(0)}, "timeout must be a positive datetime.timedelta"),
    ],
)
def test_bad_constructor_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Checkpointer(tmp_path, **kwargs)


def test_bad_save_and_load_arguments(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as checkpointer:
        with pytest.raises(ValueError, match="step must be a non-negative int"):
            checkpointer.save(-1, {"meta": 1})
        with pytest.raises(ValueError, match="non-empty mapping"):
            checkpointer.save(1, {})
        with pytest.raises(ValueError, match="without '/'"):
            checkpointer.save(1, {"a/b": 1})
        with pytest.raises(TypeError, match=r"cannot checkpoint object at 'meta/x'"):
            checkpointer.save(1, {"meta": {"x": object()}})
        with pytest.raises(FileNotFoundError, match="no committed checkpoint"):
            checkpointer.load({"meta": None})
        checkpointer.save(1, {"meta": 1, "model": nn.Linear(2, 2)})
        with pytest.raises(ValueError, match=r"no entries \['other'\]"):
            checkpointer.load({"other": None})
        with pytest.raises(FileNotFoundError, match="step 9 is not committed"):
            checkpointer.load({"meta": None}, step=9)
        with pytest.raises(TypeError, match="saved from a module"):
            checkpointer.load({"model": torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1)})
        model = nn.Linear(2, 2)
        wrong = torch.optim.SGD([*model.parameters(), nn.Parameter(torch.ones(1))], lr=1.0)
        checkpointer.save(2, {"model": model, "optim": wrong})
        fresh = nn.Linear(2, 2)
        with pytest.raises(ValueError, match="parameters differ from the checkpoint"):
            checkpointer.load({"model": fresh, "optim": torch.optim.SGD(fresh.parameters(), lr=1)})


def test_annotated_shard_must_fit_its_tensor() -> None:
    shard = RankLayout(layout=TensorLayout(shape=(4, 3)), region=Box((2, 0), (2, 3)))
    with pytest.raises(ValueError, match=r"local shape is \(2, 3\)"):
        annotate(torch.zeros(3, 3), shard)
    with pytest.raises(ValueError, match="lies outside the tensor shape"):
        RankLayout(layout=TensorLayout(shape=(4, 3)), region=Box((3, 0), (2, 3)))


def test_plain_tensors_given_only_by_other_ranks_are_refused() -> None:
    from bitscale.checkpoint.format import RankRecord
    from bitscale.checkpoint.merge import merge_parts
    from bitscale.checkpoint.plan import TensorSpec

    spec = TensorSpec(dtype="float32", global_shape=(2,), layout=None, chunks=[])
    parts = [
        {
            "rank": r,
            "files": [],
            "file_of": {},
            "tensors": {"w": spec},
            "record": RankRecord(rank=r, entries={}),
        }
        for r in (0, 1)
    ]
    with pytest.raises(CheckpointSaveError, match="annotate"):
        merge_parts(1, parts)


def _zero_fragment(values: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """A ZeRO-style flat fragment of ``values``, padded past the end, annotated."""
    padded = torch.cat([values.reshape(-1), torch.zeros(length, dtype=values.dtype)])
    shard = RankLayout(
        layout=TensorLayout(shape=tuple(values.shape)),
        dp=DataParallel.FLAT,
        dp_start=start,
        dp_length=length,
    )
    return annotate(padded[start : start + length].clone(), shard)


def test_annotated_shards_save_lazily_and_reload_resharded_with_fallback(
    tmp_path: Path,
) -> None:
    """One process saves the whole of a padded vocabulary table and a flat fragment set;
    loads into other shardings read only their parts, and a damaged newest step falls
    back to the previous one for sharded targets too."""
    vocab = TensorLayout(
        shape=(5, 3),
        padded_shape=(6, 3),
        tp_dim=0,
        parts=(FusedPart(name="vocab", tp_sizes=(6,)),),
    )
    values = {step: torch.arange(15, dtype=torch.float64).reshape(5, 3) * step for step in (1, 2)}
    with Checkpointer(tmp_path, keep=None) as checkpointer:
        for step, table in values.items():
            padded = torch.cat([table, torch.full((1, 3), float("nan"), dtype=table.dtype)])
            state = {
                "table": annotate(padded, RankLayout(layout=vocab)),
                "flat": _zero_fragment(table + 0.5, 0, 16),
            }
            checkpointer.save(step, state)
        checkpointer.wait()
    manifest = read_manifest(tmp_path / "step-00000002")
    assert manifest.tensors["table"].shape == (5, 3), "vocabulary padding is never stored"
    assert manifest.tensors["table"].layout["padded_shape"] == [6, 3]

    # Corrupt step 2: the load warns and restores step 1 into a new sharding.
    data_file = next((tmp_path / "step-00000002").glob("*.safetensors"))
    with open(data_file, "r+b") as handle:
        handle.truncate(data_file.stat().st_size - 8)
    split = TensorLayout(
        shape=(5, 3),
        padded_shape=(6, 3),
        tp_dim=0,
        parts=(FusedPart(name="vocab", tp_sizes=(3, 3)),),
    )
    target = {
        "table": annotate(
            torch.full((3, 3), -1.0, dtype=torch.float64), RankLayout(layout=split, tp_rank=1)
        ),
        "flat": _zero_fragment(torch.zeros(5, 3, dtype=torch.float64), 8, 8),
    }
    with (
        Checkpointer(tmp_path) as checkpointer,
        pytest.warns(CheckpointDamagedWarning, match="step 2 .* is damaged"),
    ):
        assert checkpointer.load(target) == 1
    expected_rows = torch.cat([values[1][3:], torch.zeros(1, 3, dtype=torch.float64)])
    assert torch.equal(target["table"], expected_rows), "padding row is zero-filled"
    expected_flat = torch.cat(
        [(values[1] + 0.5).reshape(-1)[8:], torch.zeros(1, dtype=torch.float64)]
    )
    assert torch.equal(target["flat"], expected_flat)
