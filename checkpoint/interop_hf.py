"""Streaming export of a checkpoint's model weights to the Hugging Face layout.

Writes ``model-0000x-of-0000y.safetensors`` files plus ``model.safetensors.index.json``
(``{"metadata": {"total_size"}, "weight_map": {name: file}}``), the layout
``transformers``' ``from_pretrained`` reads. Every file header is computed before any
data from the manifest's shapes, then tensors are streamed in one at a time (read by
byte ranges, optionally cast, written, dropped): memory holds one tensor plus a read
buffer, however large the model. The folder appears by an atomic rename once every
file is written and fsynced, so an interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bitscale.checkpoint.format import (
    EntryKind,
    safetensors_header,
    skeleton_tensor_names,
)
from bitscale.checkpoint.reshard import Box, ChunkReader

__all__ = ["HF_INDEX_NAME", "export_hf"]

HF_INDEX_NAME = "model.safetensors.index.json"


def _weights(entry_value: Any) -> dict[str, str]:
    """HF name -> checkpoint tensor name, tied aliases left out (HF stores them once)."""
    weights: dict[str, str] = {}
    seen: set[str] = set()
    if not isinstance(entry_value, dict):
        raise ValueError("the model entry's skeleton is not a state_dict")
    for key, ref in entry_value.items():
        names = list(skeleton_tensor_names(ref))
        if len(names) != 1 or ref != {"$tensor": names[0]}:
            continue
        if names[0] in seen:
            continue
        seen.add(names[0])
        weights[key] = names[0]
    return weights


def export_hf(
    root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    step: int | None = None,
    entry: str = "model",
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 10**9,
    buffer_bytes: int = 16 << 20,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Export the module entry ``entry`` of ``step`` (default: newest) to ``out_dir``.

    ``dtype`` (e.g. ``torch.bfloat16``) casts floating-point tensors; others keep their
    dtype. Returns ``out_dir``. Raises ``ValueError`` when the checkpoint has no such
    module entry or ``out_dir`` exists and is not empty; nothing is written then.
    """
    from bitscale.checkpoint.storage import LocalStorage, new_token, read_step_manifest

    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        # Casting to an integer dtype would truncate weights to zeros without a warning.
        raise ValueError(
            f"dtype must be None or a floating torch.dtype such as torch.bfloat16, got {dtype!r}"
        )
    out_dir = Path(out_dir)
    step, step_dir, manifest = read_step_manifest(root, step)
    entries = manifest.ranks[0].entries
    if entry not in entries or entries[entry]["kind"] != str(EntryKind.MODULE):
        modules = sorted(n for n, e in entries.items() if e["kind"] == str(EntryKind.MODULE))
        raise ValueError(
            f"step {step} has no module entry {entry!r}; its module entries are {modules}; "
            "pass entry=<one of them>"
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists and is not empty; choose a new folder")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")

    weights = _weights(entries[entry]["value"])

    def out_dtype(name: str) -> torch.dtype:
        stored = manifest.tensors[name].torch_dtype
        return dtype if dtype is not None and stored.is_floating_point else stored

    # Greedy packing in state_dict order, as transformers' save_pretrained does.
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for key, name in weights.items():
        record = manifest.tensors[name]
        nbytes = math.prod(record.shape) * out_dtype(name).itemsize
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(key)
        shard_bytes += nbytes
    count = len(shards)
    storage = LocalStorage()
    token = new_token()
    tmp_dir = out_dir.parent / f".tmp-{out_dir.name}-{token}"
    storage.makedirs(tmp_dir)
    weight_map: dict[str, str] = {}
    total_size = 0
    done = 0
    try:
        with ChunkReader(step_dir, buffer_bytes=buffer_bytes) as reader:
            for index, keys in enumerate(shards, 1):
                file_name = f"model-{index:05d}-of-{count:05d}.safetensors"
                specs = [
                    (key, out_dtype(weights[key]), manifest.tensors[weights[key]].shape)
                    for key in keys
                ]
                prefix, _ = safetensors_header(specs, {"format": "pt"})
                writer = storage.open_writer(tmp_dir / file_name)
                try:
                    writer.write(memoryview(prefix))
                    for key, target_dtype, _ in specs:
                        tensor = _read_whole(reader, manifest.tensors[weights[key]])
                        if tensor.dtype != target_dtype:
                            tensor = tensor.to(target_dtype)
                        writer.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
                        total_size += tensor.numel() * tensor.element_size()
                        weight_map[key] = file_name
                        del tensor
                        done += 1
                        if progress is not None:
                            progress(done, len(weights))
                except BaseException:
                    writer.abort()
                    raise
                writer.close()
        index_json = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        storage.write_atomic(
            tmp_dir / HF_INDEX_NAME, (json.dumps(index_json, indent=2) + "\n").encode(), token
        )
        if out_dir.exists():
            out_dir.rmdir()
        storage.rename(tmp_dir, out_dir)
    except BaseException:
        storage.remove_tree(tmp_dir)
        raise
    return out_dir


def _read_whole(reader: ChunkReader, record: Any) -> torch.Tensor:
    """The logical tensor of ``record``, assembled chunk by chunk through ``reader``."""
    out = torch.empty(record.shape, dtype=record.torch_dtype)
    for chunk in record.chunks:
        box = Box(tuple(chunk.offsets), tuple(chunk.shape))
        reader.read(chunk.file, chunk.key, Box.whole(box.shape), out[box.slices()])
    return out
