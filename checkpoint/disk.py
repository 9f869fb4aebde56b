"""The disk tier: steps as folders of safetensors files under a root.

Crash safety is :mod:`bitscale.checkpoint.storage`'s commit protocol (fsync, atomic
renames, LATEST, retention); this module adapts it to the :class:`~bitscale.checkpoint.tier.Tier`
interface: which steps are committed, which one to load, and reads of a step's files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from bitscale.checkpoint.format import (
    MANIFEST_NAME,
    Manifest,
    TensorRecord,
    read_tensor,
    step_dir_name,
)
from bitscale.checkpoint.reshard import ChunkReader
from bitscale.checkpoint.storage import (
    CheckpointCorruptError,
    VerifyMode,
    find_problems,
    list_steps,
    verify,
)
from bitscale.checkpoint.tier import StepChoice

__all__ = ["DiskTier"]


@dataclass(eq=False)
class _DiskStep:
    """A committed step folder, read through :func:`read_tensor` and :class:`ChunkReader`."""

    step_dir: Path
    manifest: Manifest

    def read_tensor(self, record: TensorRecord) -> torch.Tensor:
        return read_tensor(self.step_dir, record)

    def chunk_reader(self, buffer_bytes: int) -> ChunkReader:
        return ChunkReader(self.step_dir, buffer_bytes=buffer_bytes)


class DiskTier:
    """Committed steps as ``step-<n>/`` folders under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def steps(self) -> list[int]:
        return list_steps(self.root)

    def choose_step(self, step: int | None, mode: VerifyMode) -> StepChoice | BaseException:
        if step is not None:
            try:
                return StepChoice(verify(self.root, step, mode=mode))
            except (FileNotFoundError, CheckpointCorruptError) as error:
                return error
        damaged: list[str] = []
        for candidate in sorted(self.steps(), reverse=True):
            problems = find_problems(self.root / step_dir_name(candidate), mode)
            if not problems:
                return StepChoice(candidate, tuple(damaged))
            damaged.append(
                f"checkpoint step {candidate} under {self.root} is damaged ({', '.join(problems)})"
            )
        if damaged:
            return CheckpointCorruptError(self.root, damaged)
        return FileNotFoundError(f"no committed checkpoint under {self.root}")

    def open_step(self, step: int) -> _DiskStep:
        step_dir = self.root / step_dir_name(step)
        return _DiskStep(step_dir, Manifest.from_bytes((step_dir / MANIFEST_NAME).read_bytes()))
