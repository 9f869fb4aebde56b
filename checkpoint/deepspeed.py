"""Lazy asynchronous saves of DeepSpeed's own checkpoint files.

:class:`LazyCheckpointEngine` is a DeepSpeed ``CheckpointEngine``. Swap it in
after ``deepspeed.initialize``::

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    engine.checkpoint_engine = LazyCheckpointEngine()
    engine.save_checkpoint(save_dir)   # returns once tensors are recorded, not written

``save(state_dict, path)`` records the tensors (and their ``_version``) and
returns; a background thread copies them through a reused host buffer pool
(pinned on CUDA) and writes ``path`` as a safetensors file (via a temporary name,
fsync, atomic rename). The engine is *decoupled*: DeepSpeed calls ``commit`` at
the next gradient-accumulation boundary, before the optimizer step, and only
then writes ``latest``; ``commit`` returns once every file of the tag is durable,
so ``latest`` never names a tag whose files could be lost. Older DeepSpeed
(< 0.17.1) calls ``create(tag)``/``commit(tag)`` right after the saves; both
signatures are accepted.

Each file opens with ``safetensors.safe_open``. Its ``__metadata__`` holds the
nesting of DeepSpeed's state dict as a skeleton (see :mod:`bitscale.checkpoint.format`);
values that are not JSON types (``torch.Size``, DeepSpeed's loss-scaler objects,
``argparse.Namespace``) are pickled into it, as ``torch.save`` would pickle them.
``load`` also reads files written by DeepSpeed's default engine (``torch.load``).
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from bitscale.checkpoint.errors import CheckpointSaveError, StateMutatedError
from bitscale.checkpoint.format import decode_skeleton, encode_skeleton, safetensors_header
from bitscale.checkpoint.staging import (
    HostBufferPool,
    byte_view,
    contiguous_for_copy,
    max_piece_bytes,
)
from bitscale.checkpoint.storage import TMP_PREFIX, LocalStorage, Storage, new_token
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

__all__ = ["LazyCheckpointEngine"]

ENGINE_NAME = "BitscaleLazyCheckpointEngine"
_SKELETON_KEY = "bitscale_skeleton"


@dataclass(eq=False)
class _Tensor:
    key: str
    tensor: torch.Tensor
    version: int


@dataclass(eq=False)
class _FileSave:
    path: Path
    header: bytes
    tensors: list[_Tensor]
    ready: Any = None
    """CUDA event recorded at save(): copies start after the work that produced the tensors."""
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


def _pickle_object(path: tuple[str, ...], value: Any) -> str:
    return base64.b64encode(pickle.dumps(value)).decode()


def _unpickle_object(payload: str) -> Any:
    # The same trust as torch.load(weights_only=False), which DeepSpeed uses.
    return pickle.loads(base64.b64decode(payload))


def _tag_of(info: Any) -> str:
    return info if isinstance(info, str) else info.tag


class LazyCheckpointEngine(CheckpointEngine):
    """A decoupled DeepSpeed checkpoint engine with lazy background copies and writes.

    Args:
        config_params: DeepSpeed passes its config here; unused.
        host_buffer_bytes: size of the reused host staging pool (default: the
            largest file so far).
        storage: file operations (tests inject failures here).
    """

    def __init__(
        self,
        config_params: Any = None,
        *,
        host_buffer_bytes: int | None = None,
        storage: Storage | None = None,
    ) -> None:
        super().__init__(config_params)
        if host_buffer_bytes is not None and host_buffer_bytes < 1:
            raise ValueError(f"host_buffer_bytes must be >= 1 or None, got {host_buffer_bytes}")
        self.name = ENGINE_NAME
        self._host_buffer_bytes = host_buffer_bytes
        self._storage = storage or LocalStorage()
        self._token = new_token()
        self._pool: HostBufferPool | None = None
        self._copy_stream: Any = None
        self._commit_info: Any = None
        self._pending: list[_FileSave] = []
        self._queue: queue.Queue[_FileSave | None] = queue.Queue()
        self._thread = threading.Thread(target=self._worker, name="ds-ckpt-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ protocol

    def create(self, info: Any) -> None:
        """Start a tag: ``CheckpointCommitInfo`` (DeepSpeed >= 0.17.1) or a tag string."""
        if self._commit_info is not None and self._commit_info != info:
            # A new save before the previous one was committed: make that one durable first.
            self.commit(self._commit_info)
        self._commit_info = info

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict: Any, path: str) -> None:
        """Record ``state_dict``'s tensors and return; the file is written in the background."""
        tensors: list[_Tensor] = []
        seen: dict[tuple, str] = {}

        def on_tensor(key_path: tuple[str, ...], tensor: torch.Tensor) -> str:
            memory = (
                str(tensor.device),
                tensor.data_ptr(),
                tuple(tensor.shape),
                tensor.stride(),
                tensor.dtype,
            )
            if tensor.numel() and memory in seen:
                return seen[memory]
            key = "/".join(key_path) or "<root>"
            seen[memory] = key
            tensors.append(_Tensor(key, tensor.detach(), tensor._version))
            return key

        skeleton = encode_skeleton(state_dict, on_tensor, (), on_object=_pickle_object)
        header, _ = safetensors_header(
            [(t.key, t.tensor.dtype, tuple(t.tensor.shape)) for t in tensors],
            {"format": "pt", _SKELETON_KEY: json.dumps(skeleton, allow_nan=False)},
        )
        job = _FileSave(path=Path(path), header=header, tensors=tensors)
        if any(t.tensor.is_cuda for t in tensors):
            if self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream()
            job.ready = torch.cuda.Event()
            job.ready.record()
        self._pending.append(job)
        self._queue.put(job)

    def commit(self, info: Any) -> bool | None:
        """Block until every file saved since the last commit is durable; raise if one failed."""
        if info is None:
            return None
        tag = _tag_of(info)
        pending, self._pending = self._pending, []
        for job in pending:
            job.done.wait()
        if self._commit_info is not None and _tag_of(self._commit_info) == tag:
            self._commit_info = None
        failed = [job for job in pending if job.error is not None]
        if failed:
            first = failed[0].error
            if isinstance(first, CheckpointSaveError):
                raise first
            raise CheckpointSaveError(
                f"checkpoint tag {tag!r}: writing {failed[0].path} failed: {first}; "
                f"{len(failed)} of {len(pending)} files were not saved"
            ) from first
        return True

    def load(self, path: str, map_location: Any = None) -> Any:
        """Read a file written by this engine, or by ``torch.save`` (DeepSpeed's default)."""
        from safetensors import SafetensorError, safe_open

        self._wait_for(Path(path))
        try:
            handle = safe_open(path, framework="pt")
        except SafetensorError:
            return torch.load(path, map_location=map_location, weights_only=False)
        with handle:
            metadata = handle.metadata() or {}
            if _SKELETON_KEY not in metadata:
                raise ValueError(f"{path} is a safetensors file without a bitscale skeleton")
            device = map_location if isinstance(map_location, (str, torch.device)) else None

            def tensor(key: str) -> torch.Tensor:
                value = handle.get_tensor(key)
                return value.to(device) if device is not None else value

            return decode_skeleton(json.loads(metadata[_SKELETON_KEY]), tensor, _unpickle_object)

    def is_decoupled(self) -> bool:
        return True

    def preserves_storage_sharing(self) -> bool:
        return False

    def set_commit_info(self, info: Any) -> None:
        self._commit_info = info

    def get_commit_info(self) -> Any:
        return self._commit_info

    def cleanup(self) -> None:
        """Make pending files durable and stop the background thread."""
        try:
            if self._pending:
                self.commit(self._commit_info or "<cleanup>")
        finally:
            if self._thread.is_alive():
                self._queue.put(None)
                self._thread.join()

    # ------------------------------------------------------------------ background

    def _wait_for(self, path: Path) -> None:
        for job in list(self._pending):
            if job.path == path:
                job.done.wait()

    def _ensure_pool(self, nbytes: int) -> HostBufferPool:
        wanted = self._host_buffer_bytes or max(nbytes, 1)
        if self._pool is None or (self._host_buffer_bytes is None and self._pool.capacity < wanted):
            self._pool = HostBufferPool(wanted, pin=torch.cuda.is_available())
        return self._pool

    def _worker(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                self._write(job)
            except BaseException as error:
                job.error = error
            finally:
                job.tensors.clear()
                job.done.set()

    def _write(self, job: _FileSave) -> None:
        pool = self._ensure_pool(
            sum(t.tensor.numel() * t.tensor.element_size() for t in job.tensors)
        )
        piece_bytes = max_piece_bytes(pool.capacity)
        tmp = job.path.with_name(f"{TMP_PREFIX}{job.path.name}-{self._token}")
        writer = self._storage.open_writer(tmp)
        try:
            writer.write(memoryview(job.header))
            for entry in job.tensors:
                if entry.tensor.is_cuda:
                    assert self._copy_stream is not None
                    self._copy_stream.wait_event(job.ready)
                source = contiguous_for_copy(entry.tensor, self._copy_stream)
                flat = byte_view(source)
                for start in range(0, flat.numel(), piece_bytes):
                    stop = min(start + piece_bytes, flat.numel())
                    slot = pool.allocate(stop - start)
                    try:
                        if source.is_cuda:
                            with torch.cuda.stream(self._copy_stream):
                                slot.buffer.copy_(flat[start:stop], non_blocking=True)
                            self._copy_stream.synchronize()
                        else:
                            slot.buffer.copy_(flat[start:stop])
                        writer.write(memoryview(slot.buffer.numpy()))
                    finally:
                        pool.release(slot)
                if entry.tensor._version != entry.version:
                    raise StateMutatedError(
                        f"tensor {entry.key!r} of {job.path.name} changed in place (version "
                        f"{entry.version} -> {entry.tensor._version}) before its checkpoint copy "
                        "finished; DeepSpeed commits before the optimizer step, so something "
                        "else changed it during forward/backward"
                    )
        except BaseException:
            writer.abort()
            self._storage.remove_tree(tmp)
            raise
        writer.close()
        self._storage.rename(tmp, job.path)  # fsyncs the directory too
