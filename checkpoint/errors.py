"""The errors and warnings a Checkpointer raises to its user."""

from __future__ import annotations

__all__ = ["CheckpointDamagedWarning", "CheckpointSaveError", "StateMutatedError"]


class CheckpointSaveError(RuntimeError):
    """A background save failed; the step was not committed and earlier steps are intact."""


class StateMutatedError(CheckpointSaveError):
    """A tensor changed in place before its checkpoint copy finished."""


class CheckpointDamagedWarning(UserWarning):
    """The newest committed step failed verification; an older one is loaded instead."""
