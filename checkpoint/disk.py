"""The disk tier: steps as folders of safetensors files under a root.

Crash safety is :mod:`bitscale.checkpoint.storage`'s commit protocol (fsync, atomic
renames, LATEST, retention); this module adapts it to the :class:`~bitscale.checkpoint.tier.Tier`
interface. Writing: one writer thread per data file index streams pieces into
``.tmp-step-<n>-<token>-<count>/`` (every rank into the same folder, so the count
advances on every rank for every save round, failed ones too), hashing (SHA-256) as
it goes, and fsyncs; rank 0 commits with the manifest, one rename, LATEST and
retention. Reading: which steps are committed, which one to load, and reads of a
step's files.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from bitscale.checkpoint.format import (
    MANIFEST_NAME,
    FileRecord,
    Manifest,
    TensorRecord,
    read_tensor,
    step_dir_name,
)
from bitscale.checkpoint.group import CommitGroup
from bitscale.checkpoint.job import SaveJob
from bitscale.checkpoint.plan import FilePlan
from bitscale.checkpoint.reshard import ChunkReader
from bitscale.checkpoint.storage import (
    CheckpointCorruptError,
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
from bitscale.checkpoint.tier import HostPiece, StepChoice

__all__ = ["DiskTier"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _DiskStep:
    """A committed step folder, read through :func:`read_tensor` and :class:`ChunkReader`."""

    step_dir: Path
    manifest: Manifest

    def read_tensor(self, record: TensorRecord) -> torch.Tensor:
        return read_tensor(self.step_dir, record)

    def chunk_reader(self, buffer_bytes: int) -> ChunkReader:
        return ChunkReader(self.step_dir, buffer_bytes=buffer_bytes)


@dataclass(eq=False)
class _OpenFile:
    """A data file being written: its writer and the hash of what was written so far."""

    plan: FilePlan
    writer: Any = None
    hasher: Any = None
    written: int = 0
    sha256: str = ""


@dataclass(eq=False)
class _DiskWrite:
    """This rank's data files of one step, written into the step's temporary folder."""

    tier: DiskTier
    job: SaveJob
    tmp_dir: Path
    files: dict[int, _OpenFile]
    """By :attr:`FilePlan.index`."""
    files_left: int
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self, file: FilePlan) -> None:
        self.tier._queues[file.index].put((self.tier._open, self, file))

    def write(self, file: FilePlan, piece: HostPiece) -> None:
        self.tier._queues[file.index].put((self.tier._write, self, file, piece))

    def close(self, file: FilePlan) -> None:
        self.tier._queues[file.index].put((self.tier._close, self, file))

    def abandon(self) -> None:
        self.done.set()

    def wait(self) -> list[FileRecord]:
        self.done.wait()
        return [
            FileRecord(name=f.plan.name, size=f.plan.size, sha256=f.sha256)
            for f in self.files.values()
        ]

    def file_finished(self) -> None:
        with self.lock:
            self.files_left -= 1
            last = self.files_left == 0
        if last:
            self.done.set()


class DiskTier:
    """Committed steps as ``step-<n>/`` folders under ``root``.

    Construction is collective over ``group``: rank 0 creates ``root`` and removes
    leftovers of interrupted saves, and every rank gets rank 0's token for temporary
    names. ``keep`` committed steps are kept (None: all).
    """

    def __init__(
        self,
        root: Path,
        *,
        storage: Storage,
        keep: int | None,
        writer_threads: int,
        group: CommitGroup,
    ) -> None:
        self.root = root
        self.keep = keep
        self._storage = storage
        if group.rank == 0:
            storage.makedirs(root)
            removed = clean_leftovers(root, storage)
            if removed:
                log.info("removed leftovers of interrupted saves in %s: %s", root, removed)
        self._token = group.broadcast(new_token() if group.rank == 0 else None)
        self._save_count = 0
        self._queues: list[queue.Queue[tuple | None]] = [
            queue.Queue() for _ in range(writer_threads)
        ]
        self._threads = [
            threading.Thread(
                target=self._writer_loop, args=(q,), name=f"ckpt-writer{i}", daemon=True
            )
            for i, q in enumerate(self._queues)
        ]
        for thread in self._threads:
            thread.start()

    # ------------------------------------------------------------------ write

    def begin(self, job: SaveJob) -> _DiskWrite:
        self._save_count += 1
        files = [] if job.plan is None else job.plan.files
        return _DiskWrite(
            tier=self,
            job=job,
            tmp_dir=self.root / temp_dir_name(job.step, f"{self._token}-{self._save_count}"),
            files={f.index: _OpenFile(f) for f in files},
            files_left=len(files),
        )

    @staticmethod
    def _writer_loop(commands: queue.Queue[tuple | None]) -> None:
        while (command := commands.get()) is not None:
            operation, *args = command
            operation(*args)

    def _open(self, write: _DiskWrite, plan: FilePlan) -> None:
        file = write.files[plan.index]
        if write.job.failed:
            return
        try:
            self._storage.makedirs(write.tmp_dir)
            file.writer = self._storage.open_writer(write.tmp_dir / plan.name)
            file.hasher = hashlib.sha256(plan.header)
            file.writer.write(memoryview(plan.header))
            file.written = len(plan.header)
        except BaseException as error:
            self._abort(file)
            write.job.fail(error, self._error_message(write, file, error))

    def _write(self, write: _DiskWrite, plan: FilePlan, piece: HostPiece) -> None:
        file = write.files[plan.index]
        try:
            if file.writer is None or write.job.failed:
                return
            data = piece.data()
            file.hasher.update(data)
            file.writer.write(data)
            file.written += piece.nbytes
        except BaseException as error:
            self._abort(file)
            write.job.fail(error, self._error_message(write, file, error))
        finally:
            piece.release()

    def _close(self, write: _DiskWrite, plan: FilePlan) -> None:
        file = write.files[plan.index]
        try:
            if file.writer is not None and not write.job.failed:
                assert file.written == plan.size, (file.written, plan.size)
                file.writer.close()
                file.writer = None
                file.sha256 = file.hasher.hexdigest()
            else:
                self._abort(file)
        except BaseException as error:
            self._abort(file)
            write.job.fail(error, self._error_message(write, file, error))
        finally:
            write.file_finished()

    @staticmethod
    def _abort(file: _OpenFile) -> None:
        if file.writer is not None:
            file.writer.abort()
            file.writer = None

    def _error_message(self, write: _DiskWrite, file: _OpenFile, error: BaseException) -> str:
        return (
            f"saving step {write.job.step} failed writing {file.plan.name} under {self.root}: "
            f"{error}. The step was not committed; committed steps are intact "
            f"(newest: {latest_step(self.root)})"
        )

    # ------------------------------------------------------------------ commit

    def commit(self, write: _DiskWrite, manifest: Manifest) -> None:
        self._storage.makedirs(write.tmp_dir)
        self._storage.write_atomic(write.tmp_dir / MANIFEST_NAME, manifest.to_bytes(), self._token)
        commit_step(self.root, write.tmp_dir, write.job.step, self._token, self._storage)
        if self.keep is not None:
            try:
                apply_retention(self.root, self.keep, self._token, self._storage)
            except OSError as error:  # the new step is committed; old ones just linger
                log.warning("retention under %s failed (%s); old steps remain", self.root, error)

    def discard(self, write: _DiskWrite) -> None:
        self._storage.remove_tree(write.tmp_dir)

    def close(self) -> None:
        for commands in self._queues:
            commands.put(None)
        for thread in self._threads:
            thread.join()

    # ------------------------------------------------------------------ read

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
