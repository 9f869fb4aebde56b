"""Save planning: what one rank writes for one step, decided on the training thread.

Pure logic, no threads and no I/O. :func:`plan_save` walks the user's state into
manifest entries (skeletons, :mod:`bitscale.checkpoint.format`), splits each tensor
into the chunks this rank owns (:mod:`bitscale.checkpoint.layout`), records each
chunk's ``_version`` for the lazy copy, clones the few tensors a forward pass may
change, spreads the chunks over data files balancing bytes, and precomputes every
file's safetensors header, so each file's size is known before any data exists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from bitscale.checkpoint.format import (
    EntryKind,
    data_file_name,
    dtype_name,
    encode_skeleton,
    safetensors_header,
)
from bitscale.checkpoint.layout import (
    has_layout,
    memory_key,
    module_param_names,
    optimizer_param_names,
    owned_chunks,
    shard_of,
)
from bitscale.checkpoint.reshard import Box
from torch import nn

__all__ = [
    "FilePlan",
    "SavePlan",
    "Shard",
    "TensorSpec",
    "local_tensor",
    "optimizer_by_name",
    "optimizer_tensor_keys",
    "plan_save",
    "tensor_key",
]


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's values of ``tensor``: a DTensor's local shard, else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "device_mesh") else tensor


def tensor_key(tensor: torch.Tensor) -> tuple[str, int]:
    """Identity of a tensor's memory, shared by a parameter and its detached aliases
    (for a DTensor, the memory of its local shard)."""
    local = local_tensor(tensor)
    return (str(local.device), local.data_ptr())


@dataclass(eq=False)
class Shard:
    """One chunk this rank writes: a whole tensor, or its part of a sharded one."""

    name: str
    """The chunk's safetensors key."""
    source: torch.Tensor
    guard: torch.Tensor | None
    """The live tensor whose ``_version`` must not move before the copy ends (None: a clone)."""
    version: int
    key: tuple[str, int]
    """:func:`tensor_key` of the tensor the chunk belongs to."""
    nbytes: int


@dataclass(eq=False)
class TensorSpec:
    """One logical tensor as this rank saw it, with the chunks this rank writes."""

    dtype: str
    global_shape: tuple[int, ...]
    layout: dict[str, Any] | None
    chunks: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
    """``(safetensors key, offsets, shape)`` of each chunk this rank writes."""


@dataclass(eq=False)
class FilePlan:
    """One safetensors data file of this rank: its chunks in order and its header."""

    index: int
    name: str
    shards: list[Shard]
    header: bytes = b""
    size: int = 0
    """Header plus data bytes: the size of the finished file."""


@dataclass(eq=False)
class SavePlan:
    """Everything one rank saves of one step, before any byte is copied."""

    step: int
    entries: dict[str, dict[str, Any]]
    """The manifest entries of this rank: ``{name: {"kind", "value"}}``."""
    tensors: dict[str, TensorSpec]
    files: list[FilePlan]
    copy_order: list[Shard]
    """The order the stager copies in: round robin over files, so every writer starts early."""

    @property
    def file_of(self) -> dict[str, str]:
        """The data file each chunk key is written to."""
        return {shard.name: f.name for f in self.files for shard in f.shards}


class _Registry:
    """Names, dedups and classifies the tensors of one save.

    Each tensor is split into the chunks this rank owns by its :class:`RankLayout`
    (:func:`~bitscale.checkpoint.layout.shard_of`): a DTensor's placements, an
    :func:`~bitscale.checkpoint.layout.annotate` d layout, or else replicated with
    rank 0 writing. A tensor met twice (tied weights) is stored once.
    """

    def __init__(self, rank: int, lazy_keys: set[tuple[str, int]]) -> None:
        self.rank = rank
        self.lazy_keys = lazy_keys
        self.tensors: dict[str, TensorSpec] = {}
        self.shards: list[Shard] = []
        self._by_memory: dict[tuple, str] = {}
        self._layouts: dict[str, Any] = {}
        self._aliases: dict[str, list[str]] = {}

    def _name(self, path: tuple[str, ...]) -> str:
        name = "/".join(path)
        if name in self.tensors:
            raise ValueError(
                f"two tensors of the state would both be stored as {name!r}; rename a key"
            )
        return name

    def tensor(
        self, path: tuple[str, ...], tensor: torch.Tensor, *, lazy: bool | None = None
    ) -> str:
        local = local_tensor(tensor)
        if type(local) is not torch.Tensor and not isinstance(local, nn.Parameter):
            raise TypeError(
                f"cannot checkpoint a {type(tensor).__qualname__} at {'/'.join(path)!r}: save "
                "plain tensors or DTensors, and annotate() a rank's part of any other sharded "
                "tensor with its RankLayout"
            )
        if local.device.type == "meta":
            raise TypeError(f"tensor at {'/'.join(path)!r} is on the meta device: it has no data")
        memory = memory_key(local)
        if local.numel() and memory in self._by_memory:
            name = self._by_memory[memory]
            self._aliases.setdefault(name, []).append("/".join(path))
            return name
        name = self._name(path)
        if local.numel():
            self._by_memory[memory] = name
        if lazy is None:
            lazy = tensor_key(tensor) in self.lazy_keys
        detached = local.detach()
        shard = shard_of(tensor, rank=self.rank)
        if has_layout(tensor):
            try:
                chunks = owned_chunks(name, detached, shard)
            except ValueError as error:
                raise ValueError(f"cannot save {name!r}: {error}") from None
        else:
            # Replicated: rank 0 writes it whole, under its own name, in any memory order.
            whole = Box.whole(tuple(local.shape))
            chunks = [(name, whole, detached)] if self.rank == 0 else []
        self._layouts[name] = shard.layout
        spec = TensorSpec(
            dtype=dtype_name(local.dtype), global_shape=shard.layout.shape, layout=None, chunks=[]
        )
        self.tensors[name] = spec
        for key, box, values in chunks:
            spec.chunks.append((key, box.offsets, box.shape))
            self.shards.append(
                Shard(
                    name=key,
                    # A clone is ours: nothing else changes it, so it needs no guard.
                    source=values if lazy else values.clone(),
                    guard=values if lazy else None,
                    version=values._version,
                    key=tensor_key(tensor),
                    nbytes=values.numel() * values.element_size(),
                )
            )
        return name

    def finish(self) -> None:
        """Record each tensor's layout, with the other names it was met under."""
        for name, spec in self.tensors.items():
            layout = self._layouts[name]
            aliases = tuple(self._aliases.get(name, ()))
            if aliases:
                layout = dataclasses.replace(layout, tied_aliases=aliases)
            spec.layout = layout.to_json()


def optimizer_by_name(
    optimizer: torch.optim.Optimizer, module_names: Mapping[int, str]
) -> dict[str, Any]:
    """``optimizer.state_dict()`` with parameter ids replaced by parameter names."""
    state_dict = optimizer.state_dict()
    names = optimizer_param_names(optimizer, module_names)
    id_to_name: dict[int, str] = {}
    groups = []
    for group_names, group in zip(names, state_dict["param_groups"], strict=True):
        for name, param_id in zip(group_names, group["params"], strict=True):
            id_to_name[param_id] = name
        groups.append({**group, "params": list(group_names)})
    return {
        "state": {id_to_name[i]: s for i, s in state_dict["state"].items()},
        "param_groups": groups,
    }


def optimizer_tensor_keys(optimizer: torch.optim.Optimizer) -> set[tuple[str, int]]:
    """:func:`tensor_key` of every tensor ``optimizer.step()`` may change."""
    keys = {tensor_key(p) for group in optimizer.param_groups for p in group["params"]}
    for param_state in optimizer.state.values():
        keys.update(tensor_key(v) for v in param_state.values() if isinstance(v, torch.Tensor))
    return keys


def plan_save(step: int, state: Mapping[str, Any], *, rank: int, num_files: int) -> SavePlan:
    """Plan this rank's part of saving ``state`` as ``step`` into at most ``num_files``
    data files. Parameters and optimizer state are copied lazily (they change only in
    ``optimizer.step()``); every other tensor is cloned now."""
    module_names = module_param_names(state)
    lazy_keys = {
        tensor_key(param)
        for obj in state.values()
        if isinstance(obj, nn.Module)
        for param in obj.parameters()
    }
    for obj in state.values():
        if isinstance(obj, torch.optim.Optimizer):
            lazy_keys |= optimizer_tensor_keys(obj)
    registry = _Registry(rank, lazy_keys)
    entries: dict[str, dict[str, Any]] = {}
    for name, obj in state.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"state keys must be non-empty strings without '/', got {name!r}")
        if isinstance(obj, nn.Module):
            kind, value = EntryKind.MODULE, obj.state_dict()
        elif isinstance(obj, torch.optim.Optimizer):
            kind, value = EntryKind.OPTIMIZER, optimizer_by_name(obj, module_names)
        elif isinstance(obj, torch.Tensor):
            # A loose tensor may change in the next forward pass: snapshot it now
            # (only the chunks this rank owns of a sharded one).
            ref = registry.tensor((name,), obj, lazy=False)
            entries[name] = {"kind": EntryKind.TENSOR.value, "value": {"$tensor": ref}}
            continue
        elif callable(getattr(obj, "state_dict", None)) and callable(
            getattr(obj, "load_state_dict", None)
        ):
            kind, value = EntryKind.STATEFUL, obj.state_dict()
        else:
            kind, value = EntryKind.OBJECT, obj
        skeleton = encode_skeleton(value, registry.tensor, (name,))
        entries[name] = {"kind": kind.value, "value": skeleton}

    registry.finish()
    files = _assign_files(registry.shards, rank, num_files)
    for file in files:
        prefix, spans = safetensors_header(
            [(s.name, s.source.dtype, tuple(s.source.shape)) for s in file.shards],
            {"format": "pt", "step": str(step), "rank": str(rank)},
        )
        file.header = prefix
        file.size = len(prefix) + (spans[-1][1] if spans else 0)
    longest = max((len(f.shards) for f in files), default=0)
    copy_order = [f.shards[i] for i in range(longest) for f in files if i < len(f.shards)]
    return SavePlan(
        step=step, entries=entries, tensors=registry.tensors, files=files, copy_order=copy_order
    )


def _assign_files(shards: list[Shard], rank: int, num_files: int) -> list[FilePlan]:
    """Spread chunks over ``num_files`` files, balancing bytes (largest first)."""
    loads = [0] * num_files
    buckets: list[list[Shard]] = [[] for _ in range(num_files)]
    for shard in sorted(shards, key=lambda s: -s.nbytes):
        target = loads.index(min(loads))
        buckets[target].append(shard)
        loads[target] += shard.nbytes
    order = {id(shard): n for n, shard in enumerate(shards)}
    return [
        FilePlan(
            index=index,
            name=data_file_name(rank, index),
            shards=sorted(bucket, key=lambda s: order[id(s)]),
        )
        for index, bucket in enumerate(buckets)
        if bucket
    ]
