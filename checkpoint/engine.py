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
import hashlib
import logging
import queue
import threading
import warnings
import weakref
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from bitscale.checkpoint.disk import DiskTier
from bitscale.checkpoint.errors import (
    CheckpointDamagedWarning,
    CheckpointSaveError,
    StateMutatedError,
)
from bitscale.checkpoint.format import (
    MANIFEST_NAME,
    FileRecord,
    RankRecord,
)
from bitscale.checkpoint.load import restore_state
from bitscale.checkpoint.merge import merge_parts, rank_part
from bitscale.checkpoint.plan import (
    FilePlan,
    SavePlan,
    Shard,
    optimizer_tensor_keys,
    plan_save,
)
from bitscale.checkpoint.rng import capture_rng, restore_rng
from bitscale.checkpoint.staging import (
    HostBufferPool,
    PoolSlot,
    byte_view,
    contiguous_for_copy,
    max_piece_bytes,
)
from bitscale.checkpoint.storage import (
    LocalStorage,
    Storage,
    VerifyMode,
    apply_retention,
    clean_leftovers,
    commit_step,
    latest_step,
    list_steps,
    new_token,
    temp_dir_name,
    verify,
)

__all__ = ["Checkpointer"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Copy:
    """The lazy copy of one planned chunk into the host pool."""

    shard: Shard
    copied: threading.Event = field(default_factory=threading.Event)
    cuda_event: Any = None


@dataclass(eq=False)
class _FileJob:
    plan: FilePlan
    writer: Any = None
    hasher: Any = None
    written: int = 0
    sha256: str = ""


@dataclass(eq=False)
class _SaveJob:
    step: int
    tmp_dir: Path
    plan: SavePlan | None
    files: list[_FileJob]
    copy_order: list[_Copy]
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
        self._disk = DiskTier(self.root)
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
            plan=None,
            files=[],
            copy_order=[],
            record=RankRecord(rank=self.rank, entries={}),
            # The caller gets the error raised; it is not pending a second time.
            on_error=lambda _: None,
        )
        job.fail(error, f"rank {self.rank} could not start saving step {step}: {error!r}")
        with self._lock:
            self._inflight.append(job)
        self._commit_queue.put(job)

    def _plan(self, step: int, state: Mapping[str, Any]) -> _SaveJob:
        plan = plan_save(step, state, rank=self.rank, num_files=self._num_writers)
        job = _SaveJob(
            step=step,
            tmp_dir=self._next_tmp_dir(step),
            plan=plan,
            files=[_FileJob(plan=f) for f in plan.files],
            copy_order=[_Copy(shard) for shard in plan.copy_order],
            record=RankRecord(rank=self.rank, entries=plan.entries, rng=capture_rng()),
            on_error=self._push_error,
            files_left=len(plan.files),
        )
        if any(shard.source.is_cuda for shard in plan.copy_order):
            job.save_event = torch.cuda.Event()
            job.save_event.record()
        return job

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
            pool = self._ensure_pool(sum(c.shard.nbytes for c in job.copy_order))
        except BaseException as error:
            job.fail(error)
        if job.failed or not job.files:
            for copy in job.copy_order:
                copy.copied.set()
            self._commit_queue.put(job)
            return
        piece_bytes = max_piece_bytes(pool.capacity)
        file_of = {id(shard): n for n, f in enumerate(job.files) for shard in f.plan.shards}
        for n, file_job in enumerate(job.files):
            self._writer_queues[n].put(("open", job, file_job))
        use_cuda = job.save_event is not None
        if use_cuda and self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream()
        if use_cuda:
            self._copy_stream.wait_event(job.save_event)
        for copy in job.copy_order:
            item = copy.shard
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
                    copy.cuda_event = event
                    writer_queue.put(("piece", job, job.files[file_of[id(item)]], slot, event))
                if copy.cuda_event is not None and item.guard is not None:
                    # A change issued on another stream may run concurrently with the
                    # copy; only a change issued after the copy ended is harmless. So the
                    # version is read once the copy is done (a change racing it raises).
                    copy.cuda_event.synchronize()
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
                copy.copied.set()
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
            file_job.writer = self._storage.open_writer(job.tmp_dir / file_job.plan.name)
            file_job.hasher = hashlib.sha256(file_job.plan.header)
            file_job.writer.write(memoryview(file_job.plan.header))
            file_job.written = len(file_job.plan.header)
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
                assert file_job.written == file_job.plan.size, (
                    file_job.written,
                    file_job.plan.size,
                )
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
            f"saving step {job.step} failed writing {file_job.plan.name} under {self.root}: {error}. "
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
                    file_job.plan.shards.clear()
                with self._lock:
                    self._inflight.remove(job)
                job.durable.set()

    def _part(self, job: _SaveJob) -> dict[str, Any]:
        files = [FileRecord(name=f.plan.name, size=f.plan.size, sha256=f.sha256) for f in job.files]
        return rank_part(self.rank, job.error, files, job.plan, job.record)

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
        manifest = merge_parts(job.step, parts)
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
            keys = optimizer_tensor_keys(optimizer)
            for job in jobs:
                for copy in job.copy_order:
                    if copy.shard.guard is not None and copy.shard.key in keys:
                        copy.copied.wait()
                        if copy.cuda_event is not None:
                            torch.cuda.current_stream(copy.shard.source.device).wait_event(
                                copy.cuda_event
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
        stored = self._disk.open_step(chosen)
        restore_state(
            state,
            stored,
            step=chosen,
            where=self.root,
            rank=self.rank,
            read_buffer_bytes=self._read_buffer_bytes,
        )
        manifest = stored.manifest
        if rng:
            own = manifest.rank_record(self.rank)
            if own is not None and own.rng is not None:
                restore_rng(own.rng)
            else:
                warnings.warn(
                    f"step {chosen} holds no RNG state for rank {self.rank} (saved by "
                    f"{manifest.world_size} ranks): RNG states not restored",
                    stacklevel=2,
                )
        return chosen

    def _choose_step(self, step: int | None) -> int | BaseException:
        choice = self._disk.choose_step(step, self.verify_mode)
        if isinstance(choice, BaseException):
            return choice
        if choice.damaged:
            warnings.warn(
                f"{'; '.join(choice.damaged)}; loading step {choice.step} instead",
                CheckpointDamagedWarning,
                stacklevel=4,
            )
        return choice.step


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
