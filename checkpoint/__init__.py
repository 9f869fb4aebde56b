"""bitscale.checkpoint: lazy asynchronous checkpoints in a universal format.

- :class:`Checkpointer`: ``save(step, state)`` returns at once; copies run in the
  background and training blocks only in the optimizer pre-step hook
  (:meth:`Checkpointer.attach`), and only while the tensors that step changes
  are not copied yet (DataStates-LLM). ``load`` restores models, optimizers (by
  parameter name), schedulers, RNG states and user objects bitwise.
- On disk: one ``step-<n>/`` directory per step holding safetensors data files
  and a versioned JSON manifest (:mod:`bitscale.checkpoint.format`), committed
  by an atomic rename, with ``LATEST`` swapped atomically and sizes/hashes
  verified on load (:mod:`bitscale.checkpoint.storage`).
- :mod:`bitscale.checkpoint.deepspeed`: the same lazy saves as a DeepSpeed
  ``CheckpointEngine``.
"""

from __future__ import annotations

from bitscale.checkpoint.engine import (
    CheckpointDamagedWarning,
    Checkpointer,
    CheckpointSaveError,
    LocalShard,
    StateMutatedError,
)
from bitscale.checkpoint.format import FORMAT_VERSION, Manifest, read_manifest
from bitscale.checkpoint.storage import (
    CheckpointCorruptError,
    VerifyMode,
    latest_step,
    list_steps,
    verify,
)

__all__ = [
    "FORMAT_VERSION",
    "CheckpointCorruptError",
    "CheckpointDamagedWarning",
    "CheckpointSaveError",
    "Checkpointer",
    "LocalShard",
    "Manifest",
    "StateMutatedError",
    "VerifyMode",
    "latest_step",
    "list_steps",
    "read_manifest",
    "verify",
]
