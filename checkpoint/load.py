"""The load path: fill a training state in place from one committed step.

Given a step as some tier holds it (:class:`~bitscale.checkpoint.tier.StoredStep`),
:func:`restore_state` restores modules, optimizers (matched by parameter name, not
id), schedulers, tensors and plain values. Sharded targets (DTensors, annotated
tensors) are filled in place, this rank reading only the byte ranges it owns,
whatever world size and sharding saved the step. Everything is checked before
anything is written. Choosing the step and restoring RNG states are the caller's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
from bitscale.checkpoint.format import (
    EntryKind,
    Manifest,
    TensorRecord,
    decode_skeleton,
    skeleton_tensor_names,
)
from bitscale.checkpoint.layout import (
    check_against,
    flatten_state,
    has_layout,
    load_shard,
    module_param_names,
    needs_universal_path,
    optimizer_param_names,
    shard_of,
)
from bitscale.checkpoint.plan import local_tensor
from bitscale.checkpoint.tier import StoredStep
from torch import nn

__all__ = ["restore_state"]


def restore_state(
    state: MutableMapping[str, Any],
    stored: StoredStep,
    *,
    step: int,
    where: Any,
    rank: int,
    read_buffer_bytes: int,
) -> None:
    """Restore ``state`` in place from ``stored`` (step ``step``, held under ``where``):
    this rank's entries, or rank 0's when this rank saved none."""
    manifest = stored.manifest
    record = manifest.rank_record(rank) or manifest.rank_record(0)
    assert record is not None
    missing = [name for name in state if name not in record.entries]
    if missing:
        raise ValueError(
            f"step {step} under {where} has no entries {missing}; it holds {sorted(record.entries)}"
        )
    module_names = module_param_names(state)
    if needs_universal_path(state):
        _load_in_place(
            state, record.entries, manifest, stored, module_names, rank, read_buffer_bytes
        )
    else:
        for name in list(state):
            _restore(state, name, record.entries[name], manifest, stored, module_names)


def _load_in_place(
    state: MutableMapping[str, Any],
    entries: Mapping[str, Any],
    manifest: Manifest,
    stored: StoredStep,
    module_names: Mapping[int, str],
    rank: int,
    read_buffer_bytes: int,
) -> None:
    """Sharded targets: fill every tensor of ``state`` in place, this rank reading only
    the byte ranges of the stored chunks that overlap what it owns (whatever world
    size and sharding saved them). Everything is checked before anything is written."""
    optimizer_values: dict[str, dict[str, Any]] = {}
    for name, target in state.items():
        kind = EntryKind(entries[name]["kind"])
        expected = {
            EntryKind.MODULE: nn.Module,
            EntryKind.OPTIMIZER: torch.optim.Optimizer,
        }.get(kind)
        if expected is not None and not isinstance(target, expected):
            raise TypeError(
                f"entry {name!r} was saved from {'a module' if kind is EntryKind.MODULE else 'an optimizer'}; "
                f"got {type(target).__qualname__}"
            )
        if kind is EntryKind.OPTIMIZER:
            saved = decode_skeleton(entries[name]["value"], lambda _: _STORED_TENSOR)
            # Checks that the parameters match by name before anything changes.
            optimizer_values[name] = _optimizer_by_id(name, target, saved, module_names)
    created = [
        (optimizer, param)
        for name, optimizer in state.items()
        if name in optimizer_values
        for param in _create_optimizer_state(
            name, optimizer, entries[name]["value"], manifest, module_names
        )
    ]
    _, tensors = flatten_state(state)
    plan = [(name, local_tensor(t), shard_of(t, rank=rank)) for name, t in tensors.items()]
    try:
        check_against(
            manifest, {name: shard.layout.shape for name, _, shard in plan}, within=set(state)
        )
    except ValueError:
        for optimizer, param in created:
            del optimizer.state[param]
        raise
    with stored.chunk_reader(read_buffer_bytes) as reader, torch.no_grad():
        for name, local, shard in plan:
            load_shard(reader, name, manifest.tensors[name], local, shard)

    def stored(tensor_name: str) -> torch.Tensor:
        if tensor_name in tensors:
            return tensors[tensor_name]
        return stored.read_tensor(manifest.tensors[tensor_name])

    for name, target in list(state.items()):
        entry = entries[name]
        kind = EntryKind(entry["kind"])
        if kind is EntryKind.MODULE:
            continue  # every module tensor was filled in place
        if kind is EntryKind.OPTIMIZER:
            _restore_optimizer_values(target, optimizer_values[name])
        elif kind is EntryKind.TENSOR:
            if not isinstance(target, torch.Tensor):
                state[name] = decode_skeleton(entry["value"], stored)
        elif kind is EntryKind.STATEFUL:
            target.load_state_dict(decode_skeleton(entry["value"], stored))
        else:
            state[name] = decode_skeleton(entry["value"], stored)


def _restore(
    state: MutableMapping[str, Any],
    name: str,
    entry: Mapping[str, Any],
    manifest: Manifest,
    stored: StoredStep,
    module_names: Mapping[int, str],
) -> None:
    kind = EntryKind(entry["kind"])
    target = state[name]
    cache: dict[str, torch.Tensor] = {}

    def tensor(tensor_name: str) -> torch.Tensor:
        if tensor_name not in cache:
            cache[tensor_name] = stored.read_tensor(manifest.tensors[tensor_name])
        return cache[tensor_name]

    if kind is EntryKind.MODULE:
        if not isinstance(target, nn.Module):
            raise TypeError(
                f"entry {name!r} was saved from a module; got {type(target).__qualname__}"
            )
        target.load_state_dict(decode_skeleton(entry["value"], tensor))
    elif kind is EntryKind.OPTIMIZER:
        if not isinstance(target, torch.optim.Optimizer):
            raise TypeError(
                f"entry {name!r} was saved from an optimizer; got {type(target).__qualname__}"
            )
        saved = decode_skeleton(entry["value"], tensor)
        target.load_state_dict(_optimizer_by_id(name, target, saved, module_names))
    elif kind is EntryKind.TENSOR:
        (tensor_name,) = skeleton_tensor_names(entry["value"])
        record = manifest.tensors[tensor_name]
        if isinstance(target, torch.Tensor):
            if tuple(target.shape) != record.shape:
                raise ValueError(
                    f"tensor {name!r} has shape {tuple(target.shape)}; the checkpoint holds {record.shape}"
                )
            with torch.no_grad():
                target.copy_(stored.read_tensor(record))
        else:
            state[name] = stored.read_tensor(record)
    elif kind is EntryKind.STATEFUL:
        target.load_state_dict(decode_skeleton(entry["value"], tensor))
    else:
        state[name] = decode_skeleton(entry["value"], tensor)


def _optimizer_by_id(
    entry: str,
    optimizer: torch.optim.Optimizer,
    saved: Mapping[str, Any],
    module_names: Mapping[int, str],
) -> dict[str, Any]:
    """A torch optimizer state dict for ``optimizer`` built from a by-name saved one."""
    names = optimizer_param_names(optimizer, module_names)
    saved_groups = saved["param_groups"]
    if len(saved_groups) != len(names):
        raise ValueError(
            f"optimizer {entry!r} has {len(names)} parameter groups; the checkpoint has "
            f"{len(saved_groups)}"
        )
    state: dict[int, Any] = {}
    groups = []
    param_id = 0
    for index, (group_names, saved_group) in enumerate(zip(names, saved_groups, strict=True)):
        missing = sorted(set(saved_group["params"]) - set(group_names))
        unexpected = sorted(set(group_names) - set(saved_group["params"]))
        if missing or unexpected:
            raise ValueError(
                f"optimizer {entry!r} group {index}: parameters differ from the checkpoint "
                f"(missing here: {missing}, not in checkpoint: {unexpected}); put the same "
                "modules in the loaded state as in the saved one so parameters match by name"
            )
        ids = []
        for pname in group_names:
            if pname in saved["state"]:
                state[param_id] = saved["state"][pname]
            ids.append(param_id)
            param_id += 1
        groups.append({**saved_group, "params": ids})
    return {"state": state, "param_groups": groups}


_STORED_TENSOR = object()
"""Stands for a tensor of a decoded skeleton whose values were already loaded in place."""


def _create_optimizer_state(
    entry: str,
    optimizer: torch.optim.Optimizer,
    skeleton: Any,
    manifest: Manifest,
    module_names: Mapping[int, str],
) -> list[Any]:
    """Give each parameter of a fresh optimizer the state tensors it had when saved, so
    a sharded load can fill them in place: shaped and sharded like the parameter (Adam
    moments) or a plain scalar (``step``). Returns the parameters given state."""
    from bitscale.checkpoint.layout import annotate, state_shard

    saved_state = decode_skeleton(skeleton, lambda n: manifest.tensors[n])["state"]
    names = optimizer_param_names(optimizer, module_names)
    pairs = [
        (param, pname)
        for group, group_names in zip(optimizer.param_groups, names, strict=True)
        for param, pname in zip(group["params"], group_names, strict=True)
    ]
    given = []
    for param, pname in pairs:
        if optimizer.state.get(param) or pname not in saved_state:
            continue
        shard = shard_of(param)
        created: dict[str, Any] = {}
        for key, record in saved_state[pname].items():
            if not isinstance(record, TensorRecord):
                continue
            if tuple(record.shape) == shard.layout.shape:
                value = torch.zeros_like(param.detach(), dtype=record.torch_dtype)
                if not hasattr(value, "device_mesh") and has_layout(param):
                    value = annotate(value, state_shard(shard, value))
            elif math.prod(record.shape) == 1:
                value = torch.zeros(record.shape, dtype=record.torch_dtype)
            else:
                raise ValueError(
                    f"optimizer {entry!r}: saved state {key!r} of {pname!r} has shape "
                    f"{tuple(record.shape)}, neither the parameter's {shard.layout.shape} nor a "
                    "scalar; take one optimizer step before loading so the state exists"
                )
            created[key] = value
        optimizer.state[param] = created
        given.append(param)
    return given


def _restore_optimizer_values(optimizer: torch.optim.Optimizer, by_id: Mapping[str, Any]) -> None:
    """Hyperparameters and non-tensor per-parameter state from ``by_id`` (a torch state
    dict whose tensors stand for values already loaded in place)."""
    for group, saved_group in zip(optimizer.param_groups, by_id["param_groups"], strict=True):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
        for param, param_id in zip(group["params"], saved_group["params"], strict=True):
            for key, value in by_id["state"].get(param_id, {}).items():
                if value is not _STORED_TENSOR:
                    optimizer.state[param][key] = value
