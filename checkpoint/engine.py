"""Checkpointer: lazy asynchronous saves that never lose a committed step.

The Checkpointer is a thin facade over a pipeline of stages (DataStates-LLM,
adapted so it also runs on CPU), each in its own module::

    save(step, state)  main thread: plan.py walks the state, records each tensor's
                       _version, clones the few tensors a forward pass may change
                       (module buffers, loose tensors); rng.py captures RNG states.
    stager thread      stage.py: copy each chunk into the reused host buffer pool
                       (pinned on CUDA, on a side stream), piece by piece; check
                       _version; hand each piece to every tier.
    tiers              tier.py: where the bytes go. disk.py: writer threads stream the
                       pieces into safetensors files (one file per writer), hashing
                       as they go; fsync.
    committer thread   commit.py: for each tier, gather every rank's part on a gloo
                       group (group.py); rank 0 merges the manifest (merge.py) and the
                       tier commits it (disk: rename into place, LATEST, retention).
    load(state)        load.py: restore a step a tier holds, in place.

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
import logging
import warnings
import weakref
from collections.abc import Callable, Mapping, MutableMapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from bitscale.checkpoint.commit import Committer
from bitscale.checkpoint.disk import DiskTier
from bitscale.checkpoint.errors import CheckpointDamagedWarning, CheckpointSaveError
from bitscale.checkpoint.format import RankRecord
from bitscale.checkpoint.group import CommitGroup
from bitscale.checkpoint.job import PendingCopy, SaveBoard, SaveJob
from bitscale.checkpoint.load import restore_state
from bitscale.checkpoint.plan import optimizer_tensor_keys, plan_save
from bitscale.checkpoint.rng import capture_rng, restore_rng
from bitscale.checkpoint.stage import Stager, wait_for_copies
from bitscale.checkpoint.storage import (
    LocalStorage,
    Storage,
    VerifyMode,
    latest_step,
    list_steps,
    verify,
)

__all__ = ["Checkpointer"]

log = logging.getLogger(__name__)


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
        self._num_writers = writer_threads
        self._read_buffer_bytes = read_buffer_bytes
        self._group = CommitGroup(process_group, timeout)
        self.rank, self.world_size = self._group.rank, self._group.world_size
        self._disk = DiskTier(
            self.root,
            storage=storage or LocalStorage(),
            keep=keep,
            writer_threads=writer_threads,
            group=self._group,
        )
        self._tiers = (self._disk,)
        self._board = SaveBoard()
        self._closed = False
        self._stager = Stager(host_buffer_bytes)
        self._committer = Committer(self._group, self._tiers, self._board)
        # Background threads are daemons; finish in-flight saves at interpreter exit.
        self._atexit = _close_at_exit(self)
        atexit.register(self._atexit)

    # ------------------------------------------------------------------ save

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Checkpointer is closed")

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
            self._board.raise_pending()
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
            self._start_failed(step, error)
            raise
        self._board.add(job)
        self._stager.submit(job)
        self._committer.submit(job)

    def _check_no_later_steps(self, step: int) -> None:
        """Refuse a step below one already committed or being saved: resuming loads the
        highest step and retention keeps the highest ones, so this run's steps would be
        ignored and then deleted. The same step again is fine (a step rewritten after a
        fallback to an older one)."""
        saving = self._board.saving_steps()
        committed = [s for tier in self._tiers for s in tier.steps()]
        later = sorted({s for s in (*committed, *saving) if s > step})
        if later:
            raise ValueError(
                f"cannot save step {step} under {self.root}: it already holds later steps "
                f"{later} (committed or being saved), which resuming would load instead and "
                "for which retention would delete this one. This folder holds a later run's "
                "steps: move or delete them, or save this run to another folder"
            )

    def _start_failed(self, step: Any, error: BaseException) -> None:
        if self._group.process_group is None:
            return
        number = step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else 0
        job = SaveJob(
            step=number,
            plan=None,
            record=RankRecord(rank=self.rank, entries={}),
            # The caller gets the error raised; it is not pending a second time.
            on_error=lambda _: None,
        )
        job.writes = [tier.begin(job) for tier in self._tiers]
        job.fail(error, f"rank {self.rank} could not start saving step {step}: {error!r}")
        for write in job.writes:
            write.abandon()
        self._board.add(job)
        self._committer.submit(job)

    def _plan(self, step: int, state: Mapping[str, Any]) -> SaveJob:
        plan = plan_save(step, state, rank=self.rank, num_files=self._num_writers)
        job = SaveJob(
            step=step,
            plan=plan,
            record=RankRecord(rank=self.rank, entries=plan.entries, rng=capture_rng()),
            on_error=self._board.push_error,
            copies=[PendingCopy(shard) for shard in plan.copy_order],
        )
        job.writes = [tier.begin(job) for tier in self._tiers]
        if any(shard.source.is_cuda for shard in plan.copy_order):
            job.save_event = torch.cuda.Event()
            job.save_event.record()
        return job

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
        jobs = self._board.jobs()
        if jobs:
            wait_for_copies(jobs, optimizer_tensor_keys(optimizer))
        self._board.raise_pending()

    def wait(self) -> None:
        """Block until every save so far is durable (or failed); raise the first failure."""
        for job in self._board.jobs():
            job.durable.wait()
        self._board.raise_pending()

    def close(self) -> None:
        """Finish in-flight saves, stop the background threads; raise a pending failure."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            atexit.unregister(self._atexit)
            self._committer.close()
            for tier in self._tiers:
                tier.close()
            self._stager.close()

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
        chosen = self._group.broadcast(self._choose_step(step) if self.rank == 0 else None)
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
