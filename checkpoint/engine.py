"""Checkpointer: lazy asynchronous saves that never lose a committed step.

A save runs as a pipeline of background threads (DataStates-LLM, adapted so it
also runs on CPU)::

    save(step, state)  main thread: walk the state, record each tensor's _version,
                       clone the few tensors a forward pass may change (module
                       buffers, loose tensors), capture RNG states; return.
    stager thread      copy each tensor into the reused host buffer pool (pinned on
                       CUDA, on a side stream), piece by piece; check _version.
    writer threads     stream the pieces into safetensors files (one file per
                       writer), hashing as they go; fsync.
    committer thread   (multi-rank: gather every rank's file list on a gloo group)
                       rank 0 writes the manifest, renames the directory into place,
                       swaps LATEST, applies retention (storage.py).

Sharded state (DTensors, tensors annotated with a ``RankLayout``) is split into the
chunks each rank owns (:mod:`bitscale.checkpoint.layout`); those chunks go through the
same pipeline, and :meth:`Checkpointer.load` fills sharded targets in place, each rank
reading only the byte ranges it owns (:class:`~bitscale.checkpoint.reshard.ChunkReader`).

Parameters and optimizer state change only in ``optimizer.step()``, so training
only has to wait in the optimizer pre-step hook that :meth:`Checkpointer.attach`
installs, and only for the copies of the tensors that step will change.
"""

from __future__ import annotations

import atexit
import base64
import dataclasses
import hashlib
import logging
import math
import queue
import random
import threading
import warnings
import weakref
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bitscale.checkpoint.format import (
    MANIFEST_NAME,
    ChunkRecord,
    EntryKind,
    FileRecord,
    Manifest,
    RankRecord,
    TensorRecord,
    data_file_name,
    decode_skeleton,
    dtype_name,
    encode_skeleton,
    read_tensor,
    safetensors_header,
    skeleton_tensor_names,
    step_dir_name,
    validate_manifest,
)
from bitscale.checkpoint.layout import (
    check_against,
    flatten_state,
    has_layout,
    load_shard,
    memory_key,
    module_param_names,
    needs_universal_path,
    optimizer_param_names,
    owned_chunks,
    shard_of,
)
from bitscale.checkpoint.reshard import Box, ChunkReader
from bitscale.checkpoint.staging import (
    HostBufferPool,
    PoolSlot,
    byte_view,
    contiguous_for_copy,
    max_piece_bytes,
)
from bitscale.checkpoint.storage import (
    CheckpointCorruptError,
    LocalStorage,
    Storage,
    VerifyMode,
    apply_retention,
    clean_leftovers,
    commit_step,
    find_problems,
    latest_step,
    list_steps,
    new_token,
    temp_dir_name,
    verify,
)
from torch import nn

__all__ = [
    "CheckpointDamagedWarning",
    "CheckpointSaveError",
    "Checkpointer",
    "StateMutatedError",
]

log = logging.getLogger(__name__)


class CheckpointSaveError(RuntimeError):
    """A background save failed; the step was not committed and earlier steps are intact."""


class StateMutatedError(CheckpointSaveError):
    """A tensor changed in place before its checkpoint copy finished."""


class CheckpointDamagedWarning(UserWarning):
    """The newest committed step failed verification; an older one is loaded instead."""


# ----------------------------------------------------------------------------- plan


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's values of ``tensor``: a DTensor's local shard, else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "device_mesh") else tensor


def _tensor_key(tensor: torch.Tensor) -> tuple[str, int]:
    """Identity of a tensor's memory, shared by a parameter and its detached aliases
    (for a DTensor, the memory of its local shard)."""
    local = _local(tensor)
    return (str(local.device), local.data_ptr())


@dataclass(eq=False)
class _Item:
    """One chunk this rank writes: a whole tensor, or its part of a sharded one."""

    name: str
    """The chunk's safetensors key."""
    source: torch.Tensor
    guard: torch.Tensor | None
    """The live tensor whose ``_version`` must not move before the copy ends (None: a clone)."""
    version: int
    key: tuple[str, int]
    nbytes: int
    copied: threading.Event = field(default_factory=threading.Event)
    cuda_event: Any = None


@dataclass(eq=False)
class _FileJob:
    name: str
    items: list[_Item]
    header: bytes = b""
    size: int = 0
    writer: Any = None
    hasher: Any = None
    written: int = 0
    sha256: str = ""


@dataclass(eq=False)
class _TensorSpec:
    """One logical tensor as this rank saw it, with the chunks this rank writes."""

    dtype: str
    global_shape: tuple[int, ...]
    layout: dict[str, Any] | None
    chunks: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
    """``(safetensors key, offsets, shape)`` of each chunk this rank writes."""


@dataclass(eq=False)
class _SaveJob:
    step: int
    tmp_dir: Path
    files: list[_FileJob]
    copy_order: list[_Item]
    tensors: dict[str, _TensorSpec]
    record: RankRecord
    on_error: Callable[[CheckpointSaveError], None]
    save_event: Any = None
    error: CheckpointSaveError | None = None
    files_left: int = 0
    durable: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def failed(self) -> bool:
        return self.error is not None

    def fail(self, error: BaseException, message: str | None = None) -> None:
        with self.lock:
            if self.error is not None:
                return
            if isinstance(error, CheckpointSaveError):
                wrapped = error
            else:
                wrapped = CheckpointSaveError(
                    message
                    or f"saving step {self.step} failed: {error!r}; the step was not "
                    "committed and earlier committed steps are intact"
                )
                wrapped.__cause__ = error
            self.error = wrapped
        self.on_error(wrapped)

    def file_finished(self) -> bool:
        with self.lock:
            self.files_left -= 1
            return self.files_left == 0


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
        self.tensors: dict[str, _TensorSpec] = {}
        self.items: list[_Item] = []
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
        local = _local(tensor)
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
            lazy = _tensor_key(tensor) in self.lazy_keys
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
        spec = _TensorSpec(
            dtype=dtype_name(local.dtype), global_shape=shard.layout.shape, layout=None, chunks=[]
        )
        self.tensors[name] = spec
        for key, box, values in chunks:
            spec.chunks.append((key, box.offsets, box.shape))
            self.items.append(
                _Item(
                    name=key,
                    # A clone is ours: nothing else changes it, so it needs no guard.
                    source=values if lazy else values.clone(),
                    guard=values if lazy else None,
                    version=values._version,
                    key=_tensor_key(tensor),
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


def _optimizer_by_name(
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


def _optimizer_tensor_keys(optimizer: torch.optim.Optimizer) -> set[tuple[str, int]]:
    keys = {_tensor_key(p) for group in optimizer.param_groups for p in group["params"]}
    for param_state in optimizer.state.values():
        keys.update(_tensor_key(v) for v in param_state.values() if isinstance(v, torch.Tensor))
    return keys


# ----------------------------------------------------------------------------- RNG


def _capture_rng() -> dict[str, Any]:
    version, mt_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    rng: dict[str, Any] = {
        "python": [version, list(mt_state), gauss],
        "numpy": [np_kind, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = [
            base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()
        ]
    return rng


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _restore_rng(rng: Mapping[str, Any]) -> None:
    version, mt_state, gauss = rng["python"]
    random.setstate((version, tuple(mt_state), gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = rng["numpy"]
    np.random.set_state(
        (np_kind, np.array(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss)
    )
    torch.set_rng_state(_bytes_tensor(rng["torch"]))
    if "cuda" in rng and torch.cuda.is_available():
        states = [_bytes_tensor(s) for s in rng["cuda"]]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        else:
            warnings.warn(
                f"checkpoint holds CUDA RNG states of {len(states)} devices, this process sees "
                f"{torch.cuda.device_count()}: CUDA RNG states not restored",
                stacklevel=3,
            )


# ----------------------------------------------------------------------------- checkpointer


class Checkpointer:
    """Lazy asynchronous checkpoints of a training state under ``root``.

    Args:
        root: directory holding ``step-*`` subdirectories (created if missing).
        keep: committed steps to keep; older ones are deleted once a newer step is
            durable. ``None`` keeps all.
        host_buffer_bytes: size of the reused host staging pool. ``None`` sizes it to
            the largest save so far (no backpressure); smaller pools make copies wait
            for the writers (tensors larger than the pool are copied in pieces).
        verify: how :meth:`load` checks a step before trusting it (``"none"``,
            ``"size"``, ``"hash"``).
        process_group: ranks that save together (default: all ranks, when
            torch.distributed is initialized). Construction is collective over all
            ranks of the default group (it creates the gloo group commits run on with
            ``new_group``, which every rank must call): a rank outside
            ``process_group`` calls ``torch.distributed.new_group(ranks, backend="gloo")``
            with the group's ranks instead.
        writer_threads: data files (and writer threads) per rank. Each thread hashes
            (SHA-256) what it writes, and one hash stream ran at only 0.4-0.5 GiB/s on
            a CI core, so several threads keep hashing from setting the flush rate.
        read_buffer_bytes: the staging buffer of a sharded load: besides the tensors
            it fills, a rank holds at most this many bytes of read data.
        timeout: how long a collective of the commit group waits for the other ranks
            before it fails (and the save with it). A commit waits until the slowest
            rank has written its files, so allow for the largest save.
        storage: file operations (tests inject failures here).

    ``save``, ``wait``, ``load`` and ``close`` are collective over the group when
    it has more than one rank: every rank calls them in the same order. Opening a
    Checkpointer removes leftovers of interrupted saves under ``root``, so use one
    Checkpointer (per group) per root at a time.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        keep: int | None = 3,
        host_buffer_bytes: int | None = None,
        verify: VerifyMode | str = VerifyMode.SIZE,
        process_group: Any = None,
        writer_threads: int = 4,
        read_buffer_bytes: int = 64 << 20,
        timeout: timedelta = timedelta(minutes=30),
        storage: Storage | None = None,
    ) -> None:
        # bool is an int subclass: keep=True would silently mean keep=1.
        if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 1):
            raise ValueError(f"keep must be a positive int or None (keep all), got {keep!r}")
        if host_buffer_bytes is not None and host_buffer_bytes < 1:
            raise ValueError(f"host_buffer_bytes must be >= 1 or None, got {host_buffer_bytes}")
        if (
            not isinstance(writer_threads, int)
            or isinstance(writer_threads, bool)
            or writer_threads < 1
        ):
            raise ValueError(f"writer_threads must be an int >= 1, got {writer_threads!r}")
        if not isinstance(timeout, timedelta) or timeout <= timedelta(0):
            raise ValueError(
                f"timeout must be a positive datetime.timedelta, got {timeout!r}; e.g. "
                "timeout=timedelta(minutes=30)"
            )
        try:
            self.verify_mode = VerifyMode(verify)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in VerifyMode)
            raise ValueError(f"verify must be one of {choices}, got {verify!r}") from None
        self.root = Path(root)
        self.keep = keep
        self._storage: Storage = storage or LocalStorage()
        self._host_buffer_bytes = host_buffer_bytes
        self._num_writers = writer_threads
        self._read_buffer_bytes = read_buffer_bytes
        self._group, self.rank, self.world_size = self._make_group(process_group, timeout)

        if self.rank == 0:
            self._storage.makedirs(self.root)
            removed = clean_leftovers(self.root, self._storage)
            if removed:
                log.info("removed leftovers of interrupted saves in %s: %s", self.root, removed)
        self._token = self._broadcast(new_token() if self.rank == 0 else None)
        self._save_count = 0

        self._pool: HostBufferPool | None = None
        self._copy_stream: Any = None
        self._errors: list[CheckpointSaveError] = []
        self._inflight: list[_SaveJob] = []
        self._lock = threading.Lock()
        self._closed = False
        self._stage_queue: queue.Queue[_SaveJob | None] = queue.Queue()
        self._commit_queue: queue.Queue[_SaveJob | None] = queue.Queue()
        self._writer_queues: list[queue.Queue[tuple | None]] = [
            queue.Queue() for _ in range(writer_threads)
        ]
        self._threads = [
            threading.Thread(target=self._stager_loop, name="ckpt-stager", daemon=True),
            threading.Thread(target=self._committer_loop, name="ckpt-committer", daemon=True),
        ] + [
            threading.Thread(
                target=self._writer_loop, args=(q,), name=f"ckpt-writer{i}", daemon=True
            )
            for i, q in enumerate(self._writer_queues)
        ]
        for thread in self._threads:
            thread.start()
        # Background threads are daemons; finish in-flight saves at interpreter exit.
        self._atexit = _close_at_exit(self)
        atexit.register(self._atexit)

    # ------------------------------------------------------------------ group

    @staticmethod
    def _make_group(process_group: Any, timeout: timedelta) -> tuple[Any, int, int]:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            if process_group is not None:
                raise ValueError("process_group given but torch.distributed is not initialized")
            return None, 0, 1
        group = process_group or dist.group.WORLD
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        # Commit traffic runs in a background thread: on its own gloo group it can
        # never interleave with (and deadlock against) training collectives. Made even
        # for a one-rank group, as new_group must be called alike by every rank.
        ranks = dist.get_process_group_ranks(group)
        commit_group = dist.new_group(ranks=ranks, backend="gloo", timeout=timeout)
        if world == 1:
            return None, 0, 1
        return commit_group, rank, world

    def _broadcast(self, value: Any) -> Any:
        if self._group is None:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self._group, 0), group=self._group)
        return box[0]

    # ------------------------------------------------------------------ errors

    def _push_error(self, error: CheckpointSaveError) -> None:
        with self._lock:
            self._errors.append(error)

    def _raise_pending(self) -> None:
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            if len(errors) > 1:
                for later in errors[1:]:
                    log.error("a later checkpoint save failed too: %s", later)
            raise errors[0]

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Checkpointer is closed")

    # ------------------------------------------------------------------ save

    def save(self, step: int, state: Mapping[str, Any]) -> None:
        """Start saving ``state`` as ``step`` and return at once.

        ``state`` maps names to modules, optimizers, LR schedulers, anything with
        ``state_dict()``/``load_state_dict()``, tensors, or JSON-able values.

        Sharded state is saved as it lives: each rank writes only the chunks it owns
        of every tensor, in the tensor's logical shape. DTensors (FSDP2
        ``fully_shard`` models and their optimizers, tensor parallel) describe their
        sharding; other shardings are declared with
        :func:`~bitscale.checkpoint.layout.annotate`. Plain tensors count as
        replicated (rank 0 writes them), tied tensors are stored once, padding never.

        Collective: every rank of the group calls it for the same steps. A rank that
        cannot start the save raises here and the other ranks get the failure from
        their next ``save``/``wait``/hook call. Raises the error of an earlier failed
        save, if any, and ``ValueError`` for a step below one already committed under
        ``root`` or being saved (saving the same step again replaces it).
        """
        self._check_open()
        try:
            self._raise_pending()
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ValueError(f"step must be a non-negative int, got {step!r}")
            if not isinstance(state, Mapping) or not state:
                raise ValueError("state must be a non-empty mapping of names to objects")
            self._check_no_later_steps(step)
            job = self._plan(step, state)
        except BaseException as error:
            # Every save is one commit round on every rank of the group: a rank that
            # fails here still takes part, failed, so the others hear of it at once
            # instead of waiting in the commit gather until the group times out.
            self._commit_queue_failed(step, error)
            raise
        with self._lock:
            self._inflight.append(job)
        self._stage_queue.put(job)

    def _check_no_later_steps(self, step: int) -> None:
        """Refuse a step below one already committed or being saved: resuming loads the
        highest step and retention keeps the highest ones, so this run's steps would be
        ignored and then deleted. The same step again is fine (a step rewritten after a
        fallback to an older one)."""
        with self._lock:
            saving = {job.step for job in self._inflight if not job.failed}
        later = sorted({s for s in (*list_steps(self.root), *saving) if s > step})
        if later:
            raise ValueError(
                f"cannot save step {step} under {self.root}: it already holds later steps "
                f"{later} (committed or being saved), which resuming would load instead and "
                "for which retention would delete this one. This folder holds a later run's "
                "steps: move or delete them, or save this run to another folder"
            )

    def _next_tmp_dir(self, step: int) -> Path:
        self._save_count += 1
        return self.root / temp_dir_name(step, f"{self._token}-{self._save_count}")

    def _commit_queue_failed(self, step: Any, error: BaseException) -> None:
        if self._group is None:
            return
        number = step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else 0
        job = _SaveJob(
            step=number,
            tmp_dir=self._next_tmp_dir(number),
            files=[],
            copy_order=[],
            tensors={},
            record=RankRecord(rank=self.rank, entries={}),
            # The caller gets the error raised; it is not pending a second time.
            on_error=lambda _: None,
        )
        job.fail(error, f"rank {self.rank} could not start saving step {step}: {error!r}")
        with self._lock:
            self._inflight.append(job)
        self._commit_queue.put(job)

    def _plan(self, step: int, state: Mapping[str, Any]) -> _SaveJob:
        module_names = module_param_names(state)
        lazy_keys = {
            _tensor_key(param)
            for obj in state.values()
            if isinstance(obj, nn.Module)
            for param in obj.parameters()
        }
        for obj in state.values():
            if isinstance(obj, torch.optim.Optimizer):
                lazy_keys |= _optimizer_tensor_keys(obj)
        registry = _Registry(self.rank, lazy_keys)
        entries: dict[str, dict[str, Any]] = {}
        for name, obj in state.items():
            if not isinstance(name, str) or not name or "/" in name:
                raise ValueError(f"state keys must be non-empty strings without '/', got {name!r}")
            if isinstance(obj, nn.Module):
                kind, value = EntryKind.MODULE, obj.state_dict()
            elif isinstance(obj, torch.optim.Optimizer):
                kind, value = EntryKind.OPTIMIZER, _optimizer_by_name(obj, module_names)
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
        files = self._assign_files(registry.items)
        for file_job in files:
            prefix, spans = safetensors_header(
                [(i.name, i.source.dtype, tuple(i.source.shape)) for i in file_job.items],
                {"format": "pt", "step": str(step), "rank": str(self.rank)},
            )
            file_job.header = prefix
            file_job.size = len(prefix) + (spans[-1][1] if spans else 0)
        longest = max((len(f.items) for f in files), default=0)
        copy_order = [f.items[i] for i in range(longest) for f in files if i < len(f.items)]
        job = _SaveJob(
            step=step,
            tmp_dir=self._next_tmp_dir(step),
            files=files,
            copy_order=copy_order,
            tensors=registry.tensors,
            record=RankRecord(rank=self.rank, entries=entries, rng=_capture_rng()),
            on_error=self._push_error,
            files_left=len(files),
        )
        if any(item.source.is_cuda for item in copy_order):
            job.save_event = torch.cuda.Event()
            job.save_event.record()
        return job

    def _assign_files(self, items: list[_Item]) -> list[_FileJob]:
        """Spread tensors over ``writer_threads`` files, balancing bytes (largest first)."""
        loads = [0] * self._num_writers
        buckets: list[list[_Item]] = [[] for _ in range(self._num_writers)]
        for item in sorted(items, key=lambda i: -i.nbytes):
            target = loads.index(min(loads))
            buckets[target].append(item)
            loads[target] += item.nbytes
        order = {id(item): n for n, item in enumerate(items)}
        return [
            _FileJob(
                name=data_file_name(self.rank, index),
                items=sorted(bucket, key=lambda i: order[id(i)]),
            )
            for index, bucket in enumerate(buckets)
            if bucket
        ]

    # ------------------------------------------------------------------ stager

    def _ensure_pool(self, nbytes: int) -> HostBufferPool:
        wanted = self._host_buffer_bytes or max(nbytes, 1)
        if self._pool is None or (self._host_buffer_bytes is None and self._pool.capacity < wanted):
            if self._pool is not None:
                self._pool.wait_idle()
            self._pool = HostBufferPool(wanted, pin=torch.cuda.is_available())
        return self._pool

    def _stager_loop(self) -> None:
        while (job := self._stage_queue.get()) is not None:
            self._stage(job)

    def _stage(self, job: _SaveJob) -> None:
        try:
            pool = self._ensure_pool(sum(item.nbytes for item in job.copy_order))
        except BaseException as error:
            job.fail(error)
        if job.failed or not job.files:
            for item in job.copy_order:
                item.copied.set()
            self._commit_queue.put(job)
            return
        piece_bytes = max_piece_bytes(pool.capacity)
        file_of = {id(item): n for n, f in enumerate(job.files) for item in f.items}
        for n, file_job in enumerate(job.files):
            self._writer_queues[n].put(("open", job, file_job))
        use_cuda = job.save_event is not None
        if use_cuda and self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream()
        if use_cuda:
            self._copy_stream.wait_event(job.save_event)
        for item in job.copy_order:
            writer_queue = self._writer_queues[file_of[id(item)]]
            try:
                if job.failed:
                    continue
                source = contiguous_for_copy(item.source, self._copy_stream)
                flat = byte_view(source)
                for start in range(0, item.nbytes, piece_bytes):
                    stop = min(start + piece_bytes, item.nbytes)
                    slot = pool.allocate(stop - start)
                    event = None
                    if source.is_cuda:
                        with torch.cuda.stream(self._copy_stream):
                            slot.buffer.copy_(flat[start:stop], non_blocking=True)
                            event = torch.cuda.Event()
                            event.record(self._copy_stream)
                    else:
                        slot.buffer.copy_(flat[start:stop])
                    item.cuda_event = event
                    writer_queue.put(("piece", job, job.files[file_of[id(item)]], slot, event))
                if item.cuda_event is not None and item.guard is not None:
                    # A change issued on another stream may run concurrently with the
                    # copy; only a change issued after the copy ended is harmless. So the
                    # version is read once the copy is done (a change racing it raises).
                    item.cuda_event.synchronize()
                if item.guard is not None and item.guard._version != item.version:
                    job.fail(
                        StateMutatedError(
                            f"tensor {item.name!r} changed in place (version {item.version} -> "
                            f"{item.guard._version}) before its checkpoint copy finished, so "
                            f"step {job.step} was not saved. Change parameters only in the "
                            "step of an optimizer passed to Checkpointer.attach(), or call "
                            "Checkpointer.wait() before changing them."
                        )
                    )
            except BaseException as error:
                job.fail(error)
            finally:
                item.copied.set()
        for n, file_job in enumerate(job.files):
            self._writer_queues[n].put(("close", job, file_job))

    # ------------------------------------------------------------------ writers

    def _writer_loop(self, commands: queue.Queue[tuple | None]) -> None:
        while (command := commands.get()) is not None:
            kind, job, file_job = command[:3]
            if kind == "open":
                self._open_file(job, file_job)
            elif kind == "piece":
                self._write_piece(job, file_job, command[3], command[4])
            else:
                self._close_file(job, file_job)

    def _open_file(self, job: _SaveJob, file_job: _FileJob) -> None:
        if job.failed:
            return
        try:
            self._storage.makedirs(job.tmp_dir)
            file_job.writer = self._storage.open_writer(job.tmp_dir / file_job.name)
            file_job.hasher = hashlib.sha256(file_job.header)
            file_job.writer.write(memoryview(file_job.header))
            file_job.written = len(file_job.header)
        except BaseException as error:
            self._abort_file(file_job)
            job.fail(error, self._write_error_message(job, file_job, error))

    def _write_piece(self, job: _SaveJob, file_job: _FileJob, slot: PoolSlot, event: Any) -> None:
        try:
            if file_job.writer is None or job.failed:
                return
            if event is not None:
                event.synchronize()
            data = memoryview(slot.buffer.numpy())
            file_job.hasher.update(data)
            file_job.writer.write(data)
            file_job.written += slot.nbytes
        except BaseException as error:
            self._abort_file(file_job)
            job.fail(error, self._write_error_message(job, file_job, error))
        finally:
            assert self._pool is not None
            self._pool.release(slot)

    def _close_file(self, job: _SaveJob, file_job: _FileJob) -> None:
        try:
            if file_job.writer is not None and not job.failed:
                assert file_job.written == file_job.size, (file_job.written, file_job.size)
                file_job.writer.close()
                file_job.writer = None
                file_job.sha256 = file_job.hasher.hexdigest()
            else:
                self._abort_file(file_job)
        except BaseException as error:
            self._abort_file(file_job)
            job.fail(error, self._write_error_message(job, file_job, error))
        finally:
            if job.file_finished():
                self._commit_queue.put(job)

    @staticmethod
    def _abort_file(file_job: _FileJob) -> None:
        if file_job.writer is not None:
            file_job.writer.abort()
            file_job.writer = None

    def _write_error_message(self, job: _SaveJob, file_job: _FileJob, error: BaseException) -> str:
        return (
            f"saving step {job.step} failed writing {file_job.name} under {self.root}: {error}. "
            f"The step was not committed; committed steps are intact "
            f"(newest: {latest_step(self.root)})"
        )

    # ------------------------------------------------------------------ commit

    def _committer_loop(self) -> None:
        while (job := self._commit_queue.get()) is not None:
            try:
                self._commit(job)
            except BaseException as error:
                job.fail(error)
            finally:
                job.copy_order.clear()
                for file_job in job.files:
                    file_job.items.clear()
                with self._lock:
                    self._inflight.remove(job)
                job.durable.set()

    def _part(self, job: _SaveJob) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "error": None if job.error is None else str(job.error),
            "files": [FileRecord(name=f.name, size=f.size, sha256=f.sha256) for f in job.files],
            "file_of": {item.name: f.name for f in job.files for item in f.items},
            "tensors": job.tensors,
            "record": job.record,
        }

    def _commit(self, job: _SaveJob) -> None:
        part = self._part(job)
        if self._group is None:
            parts = [part]
        else:
            import torch.distributed as dist

            parts = [None] * self.world_size if self.rank == 0 else None
            dist.gather_object(
                part, parts, dst=dist.get_global_rank(self._group, 0), group=self._group
            )
        outcome: str | None = None
        if self.rank == 0:
            assert parts is not None
            failed = [p for p in parts if p["error"] is not None]
            if failed:
                outcome = "; ".join(f"rank {p['rank']}: {p['error']}" for p in failed)
                self._storage.remove_tree(job.tmp_dir)
            else:
                try:
                    self._publish(job, parts)
                except BaseException as error:
                    self._storage.remove_tree(job.tmp_dir)
                    job.fail(error)
                    outcome = str(job.error)
        outcome = self._broadcast(outcome)
        if outcome is not None and job.error is None:
            job.fail(
                CheckpointSaveError(f"saving step {job.step} failed on another rank: {outcome}")
            )

    def _publish(self, job: _SaveJob, parts: list[dict[str, Any]]) -> None:
        manifest = _merge_parts(job.step, parts)
        self._storage.makedirs(job.tmp_dir)
        self._storage.write_atomic(job.tmp_dir / MANIFEST_NAME, manifest.to_bytes(), self._token)
        commit_step(self.root, job.tmp_dir, job.step, self._token, self._storage)
        if self.keep is not None:
            try:
                apply_retention(self.root, self.keep, self._token, self._storage)
            except OSError as error:  # the new step is committed; old ones just linger
                log.warning("retention under %s failed (%s); old steps remain", self.root, error)

    # ------------------------------------------------------------------ hook, wait

    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Install the pre-step hook that keeps ``optimizer.step()`` from overwriting
        tensors whose checkpoint copy is still pending. Returns the hook handle."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"attach() needs a torch.optim.Optimizer, got {type(optimizer).__qualname__}"
            )
        hook_owner = weakref.ref(self)

        def before_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            owner = hook_owner()
            if owner is not None:
                owner._before_step(opt)

        return optimizer.register_step_pre_hook(before_step)

    def _before_step(self, optimizer: torch.optim.Optimizer) -> None:
        with self._lock:
            jobs = list(self._inflight)
        if jobs:
            keys = _optimizer_tensor_keys(optimizer)
            for job in jobs:
                for item in job.copy_order:
                    if item.guard is not None and item.key in keys:
                        item.copied.wait()
                        if item.cuda_event is not None:
                            torch.cuda.current_stream(item.source.device).wait_event(
                                item.cuda_event
                            )
        self._raise_pending()

    def wait(self) -> None:
        """Block until every save so far is durable (or failed); raise the first failure."""
        with self._lock:
            jobs = list(self._inflight)
        for job in jobs:
            job.durable.wait()
        self._raise_pending()

    def close(self) -> None:
        """Finish in-flight saves, stop the background threads; raise a pending failure."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            atexit.unregister(self._atexit)
            self._stage_queue.put(None)
            self._commit_queue.put(None)
            for writer_queue in self._writer_queues:
                writer_queue.put(None)
            for thread in self._threads:
                thread.join()
            if self._pool is not None:
                self._pool.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except CheckpointSaveError as error:
            log.error("checkpoint save failed while handling another exception: %s", error)

    # ------------------------------------------------------------------ queries

    def list_steps(self) -> list[int]:
        return list_steps(self.root)

    def latest_step(self) -> int | None:
        return latest_step(self.root)

    def verify(self, step: int | None = None, *, mode: VerifyMode | str = VerifyMode.HASH) -> int:
        return verify(self.root, step, mode=mode)

    # ------------------------------------------------------------------ load

    def load(
        self, state: MutableMapping[str, Any], step: int | None = None, *, rng: bool = True
    ) -> int:
        """Restore ``state`` in place from ``step`` (default: the newest loadable step).

        Modules, optimizers (matched by parameter name), schedulers and other
        stateful objects load in place; tensors are copied into; plain values
        are replaced in ``state``. With ``rng`` the Python, NumPy, torch and CUDA
        RNG states of this rank are restored too. When ``state`` holds sharded
        tensors (DTensors, annotated tensors), every tensor is filled in place and
        each rank reads only the byte ranges of the chunks overlapping what it owns,
        whatever world size and sharding saved the step; optimizer state tensors a
        fresh optimizer lacks are created first (shaped like their parameter, or
        scalars). Missing, unexpected and mis-shaped tensors are listed by name in a
        ``ValueError`` before anything is written. When the newest step fails
        verification, a :class:`CheckpointDamagedWarning` says why and the
        previous committed step is loaded. Returns the step loaded.
        """
        self._check_open()
        self.wait()
        chosen = self._broadcast(self._choose_step(step) if self.rank == 0 else None)
        if isinstance(chosen, BaseException):
            raise chosen
        step_dir = self.root / step_dir_name(chosen)
        manifest = Manifest.from_bytes((step_dir / MANIFEST_NAME).read_bytes())
        record = manifest.rank_record(self.rank) or manifest.rank_record(0)
        assert record is not None
        missing = [name for name in state if name not in record.entries]
        if missing:
            raise ValueError(
                f"step {chosen} under {self.root} has no entries {missing}; it holds "
                f"{sorted(record.entries)}"
            )
        module_names = module_param_names(state)
        if needs_universal_path(state):
            self._load_in_place(state, record.entries, manifest, step_dir, module_names)
        else:
            for name in list(state):
                self._restore(state, name, record.entries[name], manifest, step_dir, module_names)
        if rng:
            own = manifest.rank_record(self.rank)
            if own is not None and own.rng is not None:
                _restore_rng(own.rng)
            else:
                warnings.warn(
                    f"step {chosen} holds no RNG state for rank {self.rank} (saved by "
                    f"{manifest.world_size} ranks): RNG states not restored",
                    stacklevel=2,
                )
        return chosen

    def _choose_step(self, step: int | None) -> int | BaseException:
        if step is not None:
            try:
                return verify(self.root, step, mode=self.verify_mode)
            except (FileNotFoundError, CheckpointCorruptError) as error:
                return error
        candidates = sorted(list_steps(self.root), reverse=True)
        damaged: list[str] = []
        for candidate in candidates:
            problems = find_problems(self.root / step_dir_name(candidate), self.verify_mode)
            if not problems:
                if damaged:
                    warnings.warn(
                        f"{'; '.join(damaged)}; loading step {candidate} instead",
                        CheckpointDamagedWarning,
                        stacklevel=4,
                    )
                return candidate
            damaged.append(
                f"checkpoint step {candidate} under {self.root} is damaged ({', '.join(problems)})"
            )
        if damaged:
            return CheckpointCorruptError(self.root, damaged)
        return FileNotFoundError(f"no committed checkpoint under {self.root}")

    def _load_in_place(
        self,
        state: MutableMapping[str, Any],
        entries: Mapping[str, Any],
        manifest: Manifest,
        step_dir: Path,
        module_names: Mapping[int, str],
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
        plan = [(name, _local(t), shard_of(t, rank=self.rank)) for name, t in tensors.items()]
        try:
            check_against(
                manifest, {name: shard.layout.shape for name, _, shard in plan}, within=set(state)
            )
        except ValueError:
            for optimizer, param in created:
                del optimizer.state[param]
            raise
        with ChunkReader(step_dir, buffer_bytes=self._read_buffer_bytes) as reader, torch.no_grad():
            for name, local, shard in plan:
                load_shard(reader, name, manifest.tensors[name], local, shard)

        def stored(tensor_name: str) -> torch.Tensor:
            if tensor_name in tensors:
                return tensors[tensor_name]
            return read_tensor(step_dir, manifest.tensors[tensor_name])

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
        self,
        state: MutableMapping[str, Any],
        name: str,
        entry: Mapping[str, Any],
        manifest: Manifest,
        step_dir: Path,
        module_names: Mapping[int, str],
    ) -> None:
        kind = EntryKind(entry["kind"])
        target = state[name]
        cache: dict[str, torch.Tensor] = {}

        def tensor(tensor_name: str) -> torch.Tensor:
            if tensor_name not in cache:
                cache[tensor_name] = read_tensor(step_dir, manifest.tensors[tensor_name])
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
                    target.copy_(read_tensor(step_dir, record))
            else:
                state[name] = read_tensor(step_dir, record)
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


def _merge_parts(step: int, parts: list[dict[str, Any]]) -> Manifest:
    """Rank 0's view: one manifest from every rank's files, chunks and records."""
    import bitscale

    tensors: dict[str, dict[str, Any]] = {}
    files: list[FileRecord] = []
    for part in parts:
        rank = part["rank"]
        files.extend(part["files"])
        for name, spec in part["tensors"].items():
            entry = tensors.setdefault(
                name,
                {
                    "dtype": spec.dtype,
                    "shape": spec.global_shape,
                    "layout": spec.layout,
                    "chunks": [],
                },
            )
            if (entry["dtype"], entry["shape"]) != (spec.dtype, spec.global_shape):
                raise CheckpointSaveError(
                    f"tensor {name!r}: rank {rank} has {spec.dtype}{list(spec.global_shape)}, "
                    f"another rank {entry['dtype']}{list(entry['shape'])}"
                )
            for key, offsets, shape in spec.chunks:
                entry["chunks"].append(
                    ChunkRecord(file=part["file_of"][key], key=key, offsets=offsets, shape=shape)
                )
    unwritten = [
        name
        for name, entry in tensors.items()
        if not entry["chunks"] and math.prod(entry["shape"]) > 0
    ]
    if unwritten:
        raise CheckpointSaveError(
            f"tensors {unwritten} were given by other ranks but not by rank 0: plain tensors "
            "count as replicated and rank 0 writes them; annotate() rank-local tensors with "
            "their RankLayout"
        )
    manifest = Manifest(
        step=step,
        world_size=len(parts),
        files=tuple(files),
        tensors={
            name: TensorRecord(
                dtype=e["dtype"],
                shape=tuple(e["shape"]),
                chunks=tuple(e["chunks"]),
                layout=e["layout"],
            )
            for name, e in tensors.items()
        },
        ranks=tuple(sorted((p["record"] for p in parts), key=lambda r: r.rank)),
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        writer={"bitscale": bitscale.__version__, "torch": torch.__version__},
    )
    validate_manifest(manifest)
    return manifest


def _close_at_exit(checkpointer: Checkpointer) -> Callable[[], None]:
    ref = weakref.ref(checkpointer)

    def close() -> None:
        owner = ref()
        if owner is not None:
            try:
                owner.close()
            except CheckpointSaveError as error:
                log.error("checkpoint save failed at exit: %s", error)

    return close
