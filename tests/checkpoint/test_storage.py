"""Commit, LATEST, leftovers, verification and fallback to the previous committed step."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from bitscale.checkpoint import (
    CheckpointCorruptError,
    CheckpointDamagedWarning,
    Checkpointer,
    latest_step,
    list_steps,
    verify,
)
from bitscale.checkpoint.format import LATEST_NAME, MANIFEST_NAME, step_dir_name
from bitscale.checkpoint.storage import TMP_PREFIX, find_problems, read_latest_pointer


def _save_steps(root: Path, steps: list[int], **kwargs) -> dict[int, torch.Tensor]:
    saved = {}
    with Checkpointer(root, keep=None, **kwargs) as checkpointer:
        for step in steps:
            saved[step] = torch.randn(64, dtype=torch.float64)
            checkpointer.save(step, {"w": saved[step], "meta": {"step": step}})
    return saved


def _data_file(root: Path, step: int) -> Path:
    step_dir = root / step_dir_name(step)
    return next(step_dir / n for n in sorted(os.listdir(step_dir)) if n.endswith(".safetensors"))


def _load(root: Path, **kwargs) -> tuple[int, torch.Tensor]:
    state = {"w": torch.zeros(64, dtype=torch.float64), "meta": None}
    with Checkpointer(root, **kwargs) as checkpointer:
        step = checkpointer.load(state)
    assert state["meta"] == {"step": step}
    return step, state["w"]


def test_leftovers_are_ignored_and_cleaned(tmp_path: Path) -> None:
    saved = _save_steps(tmp_path, [1])
    half_done = tmp_path / f"{TMP_PREFIX}{step_dir_name(2)}-deadbeef-1"
    half_done.mkdir()
    (half_done / "rank00000-00.safetensors").write_bytes(b"torn")
    no_manifest = tmp_path / step_dir_name(3)  # never committed (no manifest): not a step
    no_manifest.mkdir()
    (tmp_path / f"{TMP_PREFIX}LATEST-abc").write_text("step-00000002\n")
    assert list_steps(tmp_path) == [1] and latest_step(tmp_path) == 1
    step, w = _load(tmp_path)
    assert step == 1 and torch.equal(w, saved[1])
    assert not [n for n in os.listdir(tmp_path) if n.startswith(TMP_PREFIX)]


def test_latest_points_to_the_newest_committed_step(tmp_path: Path) -> None:
    _save_steps(tmp_path, [3, 7])
    assert read_latest_pointer(tmp_path) == 7
    assert (tmp_path / LATEST_NAME).read_text() == "step-00000007\n"


def test_flipped_byte_is_found_by_hash_and_load_falls_back(tmp_path: Path) -> None:
    saved = _save_steps(tmp_path, [1, 2])
    victim = _data_file(tmp_path, 2)
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0x10
    victim.write_bytes(bytes(data))
    assert find_problems(tmp_path / step_dir_name(2), "size") == []  # same size: needs a hash
    with pytest.raises(CheckpointCorruptError, match=f"{victim.name}: SHA-256 differs"):
        verify(tmp_path, 2, mode="hash")
    with pytest.warns(
        CheckpointDamagedWarning, match=r"step 2 .* damaged .*SHA-256.*loading step 1"
    ):
        step, w = _load(tmp_path, verify="hash")
    assert step == 1 and torch.equal(w, saved[1])


def test_truncated_file_is_found_by_size_and_load_falls_back(tmp_path: Path) -> None:
    saved = _save_steps(tmp_path, [1, 2])
    victim = _data_file(tmp_path, 2)
    victim.write_bytes(victim.read_bytes()[:-3])
    with pytest.warns(CheckpointDamagedWarning, match=rf"{victim.name}: \d+ bytes, manifest says"):
        step, w = _load(tmp_path)
    assert step == 1 and torch.equal(w, saved[1])
    # Asked for explicitly, a damaged step is an error, not a silent fallback.
    with Checkpointer(tmp_path) as checkpointer, pytest.raises(CheckpointCorruptError):
        checkpointer.load({"w": torch.zeros(64, dtype=torch.float64)}, step=2)


def test_missing_file_and_broken_manifest_fall_back(tmp_path: Path) -> None:
    saved = _save_steps(tmp_path, [1, 2, 3])
    _data_file(tmp_path, 3).unlink()
    (tmp_path / step_dir_name(2) / MANIFEST_NAME).write_text("{not json")
    with pytest.warns(CheckpointDamagedWarning) as warned:
        step, w = _load(tmp_path)
    assert step == 1 and torch.equal(w, saved[1])
    message = str(warned[0].message)
    assert "step 3" in message and "missing" in message and "step 2" in message


def test_every_step_damaged_raises(tmp_path: Path) -> None:
    _save_steps(tmp_path, [1])
    _data_file(tmp_path, 1).write_bytes(b"")
    with (
        Checkpointer(tmp_path) as checkpointer,
        pytest.raises(CheckpointCorruptError, match="step 1"),
    ):
        checkpointer.load({"w": None})


def test_unknown_format_version_says_what_to_do(tmp_path: Path) -> None:
    _save_steps(tmp_path, [1])
    path = tmp_path / step_dir_name(1) / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["format_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(
        CheckpointCorruptError, match=r"format_version 99 is not supported.*upgrade"
    ):
        verify(tmp_path, 1)


def test_damaged_step_can_be_saved_again_after_fallback(tmp_path: Path) -> None:
    _save_steps(tmp_path, [1, 2])
    _data_file(tmp_path, 2).write_bytes(b"x")
    with pytest.warns(CheckpointDamagedWarning):
        assert _load(tmp_path)[0] == 1
    saved = _save_steps(tmp_path, [2])
    # The replaced copy is deleted by the save itself, not left for the next Checkpointer.
    assert sorted(os.listdir(tmp_path)) == [LATEST_NAME, step_dir_name(1), step_dir_name(2)]
    step, w = _load(tmp_path, verify="hash")
    assert step == 2 and torch.equal(w, saved[2])
    assert list_steps(tmp_path) == [1, 2]


def test_read_step_manifest_names_the_committed_steps(tmp_path: Path) -> None:
    from bitscale.checkpoint.storage import read_step_manifest

    _save_steps(tmp_path, [3])
    assert read_step_manifest(tmp_path)[0] == 3
    with pytest.raises(ValueError, match=r"no committed step 5; its committed steps are \[3\]"):
        read_step_manifest(tmp_path, 5)
    with pytest.raises(ValueError, match="no committed bitscale checkpoint"):
        read_step_manifest(tmp_path / "empty")
