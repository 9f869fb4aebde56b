"""bitscale.checkpoint: lazy asynchronous checkpoints in a universal format.

- :class:`Checkpointer`: ``save(step, state)`` returns at once; copies run in the
  background and training blocks only in the optimizer pre-step hook
  (:meth:`Checkpointer.attach`), and only while the tensors that step changes
  are not copied yet (DataStates-LLM). ``load`` restores models, optimizers (by
  parameter name), schedulers, RNG states and user objects bitwise.
- Universal: each tensor is stored in its logical (unsharded, unpadded) shape as
  the chunks its owners wrote. ``save`` takes sharded state as it lives in
  training: DTensors (FSDP2 ``fully_shard``, tensor parallel) describe themselves;
  any other sharding (TP widths, fused q/k/v, vocabulary padding, ZeRO flat
  fragments) is declared with :func:`annotate` and a :class:`RankLayout`. Each
  rank writes only what it owns (replicated and tied tensors once, padding never),
  and ``load`` on any number of ranks reads only the byte ranges each rank owns.
- On disk: one ``step-<n>/`` directory per step holding safetensors data files
  and a versioned JSON manifest (:mod:`bitscale.checkpoint.format`), committed
  by an atomic rename, with ``LATEST`` swapped atomically and sizes/hashes
  verified on load (:mod:`bitscale.checkpoint.storage`).
- Interop: :func:`export_hf` (Hugging Face safetensors shards),
  :func:`import_deepspeed` / :func:`export_deepspeed_universal` (DeepSpeed ZeRO and
  universal folders), :func:`import_dcp` / :func:`export_dcp`
  (``torch.distributed.checkpoint``); ``bitscale ckpt ...`` on the command line.
- :mod:`bitscale.checkpoint.deepspeed`: the same lazy saves as a DeepSpeed
  ``CheckpointEngine``.
"""

from __future__ import annotations

from bitscale.checkpoint.engine import Checkpointer
from bitscale.checkpoint.errors import (
    CheckpointDamagedWarning,
    CheckpointSaveError,
    StateMutatedError,
)
from bitscale.checkpoint.format import FORMAT_VERSION, Manifest, read_manifest
from bitscale.checkpoint.interop_dcp import export_dcp, import_dcp
from bitscale.checkpoint.interop_deepspeed import export_deepspeed_universal, import_deepspeed
from bitscale.checkpoint.interop_hf import export_hf
from bitscale.checkpoint.layout import DataParallel, FusedPart, RankLayout, TensorLayout, annotate
from bitscale.checkpoint.reshard import Box
from bitscale.checkpoint.storage import (
    CheckpointCorruptError,
    VerifyMode,
    latest_step,
    list_steps,
    verify,
)

__all__ = [
    "FORMAT_VERSION",
    "Box",
    "CheckpointCorruptError",
    "CheckpointDamagedWarning",
    "CheckpointSaveError",
    "Checkpointer",
    "DataParallel",
    "FusedPart",
    "Manifest",
    "RankLayout",
    "StateMutatedError",
    "TensorLayout",
    "VerifyMode",
    "annotate",
    "export_dcp",
    "export_deepspeed_universal",
    "export_hf",
    "import_dcp",
    "import_deepspeed",
    "latest_step",
    "list_steps",
    "read_manifest",
    "verify",
]
