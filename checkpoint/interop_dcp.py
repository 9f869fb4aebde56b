"""``torch.distributed.checkpoint`` (DCP) folders to and from bitscale checkpoints.

Reading goes through DCP's own ``FileSystemReader`` and ``load`` (so any DCP layout,
any saving world size, ``.distcp`` pickles or safetensors), one tensor at a time:
memory holds one logical tensor. The nesting of the saved state comes from the
metadata's ``planner_data`` (key -> path), so ``{"model": ..., "optim": ...}`` saved
with DCP becomes the entries ``model`` and ``optim``. An optimizer saved the
``get_state_dict`` way (state keyed by parameter FQN) becomes a bitscale optimizer
entry keyed by ``"<model entry>/<fqn>"``, which ``Checkpointer.load`` matches by name,
with its state tensors named as a native save names them
(``optim/state/model/<fqn>/exp_avg``), so sharded targets (FSDP2) load it too.

Writing builds the nested state (optimizer keyed by FQN again) and calls ``dcp.save``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from bitscale.checkpoint.format import (
    EntryKind,
    decode_skeleton,
    encode_skeleton,
    read_tensor,
)
from bitscale.checkpoint.layout import StepWriter

__all__ = ["export_dcp", "import_dcp"]


def _dcp_metadata(dcp_dir: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    if not (dcp_dir / ".metadata").is_file():
        raise ValueError(
            f"{dcp_dir} is not a torch.distributed.checkpoint folder: it has no .metadata file"
        )
    try:
        return FileSystemReader(str(dcp_dir)).read_metadata()
    except Exception as error:
        raise ValueError(
            f"{dcp_dir}/.metadata cannot be read ({error!r}); is it damaged?"
        ) from error


def _set_path(tree: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    """Place ``value`` at ``path`` (str keys are dict keys, ints list indices)."""
    node: Any = tree
    for key, following in itertools.pairwise(path):
        empty: Any = [] if isinstance(following, int) else {}
        if isinstance(node, list):
            while len(node) <= key:
                node.append(None)
            if node[key] is None:
                node[key] = empty
            node = node[key]
        else:
            node = node.setdefault(key, empty)
    last = path[-1]
    if isinstance(node, list):
        while len(node) <= last:
            node.append(None)
    node[last] = value


def import_dcp(
    dcp_dir: str | os.PathLike[str],
    root: str | os.PathLike[str],
    step: int,
    *,
    model_entry: str = "model",
    optimizer_entry: str = "optim",
    progress: Any = None,
) -> Path:
    """Write the DCP checkpoint in ``dcp_dir`` as bitscale step ``step`` under ``root``.

    Returns the committed step directory. ``progress(done, total)`` is called after
    each tensor. Raises ``ValueError`` for a folder that is not a readable DCP
    checkpoint; nothing is committed then.
    """
    import torch.distributed.checkpoint as dcp

    dcp_dir = Path(dcp_dir)
    metadata = _dcp_metadata(dcp_dir)
    paths = metadata.planner_data or {}
    items = [
        (key, tuple(paths.get(key, (key,))), item)
        for key, item in sorted(metadata.state_dict_metadata.items())
    ]
    tensors = [(key, path, item) for key, path, item in items if _is_tensor(item)]
    tree: dict[str, Any] = {}
    with StepWriter(root, step) as writer:
        # Everything but tensors first: the optimizer's param_groups say whether it is
        # keyed by parameter FQN, which decides the names its state tensors are stored under.
        done = 0
        for key, path, item in items:
            if _is_tensor(item):
                _set_path(tree, path, None)
                continue
            holder: dict[str, Any] = {key: None}
            dcp.load(holder, storage_reader=dcp.FileSystemReader(str(dcp_dir)), no_dist=True)
            _set_path(tree, path, encode_skeleton(holder[key], _no_tensors, path[:1]))
            done += 1
            if progress is not None:
                progress(done, len(items))
        fqn_optimizer = _is_fqn_optimizer(tree.get(optimizer_entry))
        for key, path, item in tensors:
            name = _tensor_name(path, model_entry, optimizer_entry if fqn_optimizer else None)
            value = torch.empty(item.size, dtype=item.properties.dtype)
            dcp.load({key: value}, storage_reader=dcp.FileSystemReader(str(dcp_dir)), no_dist=True)
            writer.add(name, value)
            _set_path(tree, path, {"$tensor": name})
            done += 1
            if progress is not None:
                progress(done, len(items))
        entries = {}
        for entry, value in tree.items():
            kind = EntryKind.OBJECT
            if entry == model_entry and _all_tensor_refs(value):
                kind = EntryKind.MODULE
            elif entry == optimizer_entry and fqn_optimizer:
                kind, value = EntryKind.OPTIMIZER, _prefix_optimizer(value, f"{model_entry}/")
            entries[entry] = {"kind": str(kind), "value": value}
        return writer.commit(entries)


def _is_tensor(item: Any) -> bool:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return isinstance(item, TensorStorageMetadata)


def _tensor_name(path: tuple[Any, ...], model_entry: str, fqn_optimizer: str | None) -> str:
    """The bitscale name of the DCP tensor at ``path``: its ``/``-joined path, except that
    the state of an optimizer keyed by FQN (``fqn_optimizer``: its entry) is named like a
    native save's, after the parameter's name in the model entry
    (``optim/state/<model entry>/<fqn>/exp_avg``), so sharded loads find it."""
    if fqn_optimizer is not None and path[:2] == (fqn_optimizer, "state") and len(path) > 2:
        path = (*path[:2], f"{model_entry}/{path[2]}", *path[3:])
    return "/".join(str(p) for p in path)


def _no_tensors(path: tuple[str, ...], tensor: torch.Tensor) -> str:
    raise TypeError(f"a pickled tensor at {'/'.join(path)!r} in a DCP bytes entry")


def _all_tensor_refs(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(v, dict) and set(v) == {"$tensor"} for v in value.values()
    )


def _is_fqn_optimizer(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("state"), dict)
        and isinstance(value.get("param_groups"), list)
        and all(isinstance(p, str) for g in value["param_groups"] for p in g.get("params", [None]))
    )


def _prefix_optimizer(value: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {
        **value,
        "state": {prefix + name: state for name, state in value["state"].items()},
        "param_groups": [
            {**group, "params": [prefix + p for p in group["params"]]}
            for group in value["param_groups"]
        ],
    }


def export_dcp(
    root: str | os.PathLike[str],
    dcp_dir: str | os.PathLike[str],
    *,
    step: int | None = None,
    model_entry: str = "model",
) -> int:
    """Write bitscale step ``step`` (default: the newest) as a DCP checkpoint in ``dcp_dir``.

    Optimizer entries are keyed by parameter FQN (``get_state_dict`` style), so
    ``set_state_dict`` restores them. Returns the step written. ``dcp_dir`` appears only
    complete: DCP writes into a sibling temporary folder that is renamed into place.
    """
    import torch.distributed.checkpoint as dcp
    from bitscale.checkpoint.storage import (
        LocalStorage,
        fsync_dir,
        new_token,
        read_step_manifest,
    )

    step, step_dir, manifest = read_step_manifest(root, step)
    record = manifest.ranks[0]
    if model_entry not in record.entries:
        raise ValueError(
            f"step {step} has no entry {model_entry!r}; its entries are "
            f"{sorted(record.entries)}; pass model_entry=<one of them>"
        )
    dcp_dir = Path(dcp_dir)
    if dcp_dir.exists() and any(dcp_dir.iterdir()):
        raise ValueError(f"{dcp_dir} is not empty; choose a new folder for the DCP checkpoint")
    state: dict[str, Any] = {}
    for entry, saved in record.entries.items():
        value = decode_skeleton(
            saved["value"], lambda name: read_tensor(step_dir, manifest.tensors[name])
        )
        if saved["kind"] == str(EntryKind.OPTIMIZER):
            value = _strip_optimizer(value, f"{model_entry}/")
        state[entry] = value
    storage = LocalStorage()
    storage.makedirs(dcp_dir.parent)
    tmp_dir = dcp_dir.parent / f".tmp-{dcp_dir.name}-{new_token()}"
    try:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp_dir)), no_dist=True)
        # DCP fsyncs its files (sync_files=True) but not the folder that names them.
        fsync_dir(tmp_dir)
        storage.rename(tmp_dir, dcp_dir)
    except BaseException:
        storage.remove_tree(tmp_dir)
        raise
    return step


def _strip_optimizer(value: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    def strip(name: str) -> str:
        return name[len(prefix) :] if name.startswith(prefix) else name

    return {
        **value,
        "state": {strip(name): state for name, state in value["state"].items()},
        "param_groups": [
            {**group, "params": [strip(p) for p in group["params"]]}
            for group in value["param_groups"]
        ],
    }
