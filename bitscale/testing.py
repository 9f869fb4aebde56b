"""Run a function on N local processes joined in a torch.distributed group.

The shared helper for multi-process tests (and for users who want to try
bitscale's distributed pieces without torchrun)::

    def check_allreduce(rank: int, world_size: int, value: float) -> float:
        t = torch.tensor([value * (rank + 1)])
        dist.all_reduce(t)
        return t.item()

    results = run_on_ranks(check_allreduce, 4, 1.0)   # [10.0, 10.0, 10.0, 10.0]

``fn`` must be a module-level function; it is called as
``fn(rank, world_size, *args, **kwargs)`` in each process with the process group
already initialized. Processes are loaded by source file, not by module name,
so test files work under any pytest import mode. A hard timeout kills every
process, so a hung collective fails instead of hanging CI; the first failing
rank's traceback is raised in the caller.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

__all__ = ["RankError", "run_on_ranks"]


class RankError(RuntimeError):
    """A function raised on one rank; the message holds that rank's traceback."""

    def __init__(self, rank: int, remote_traceback: str) -> None:
        super().__init__(f"rank {rank} failed:\n{remote_traceback}")
        self.rank = rank
        self.remote_traceback = remote_traceback


def _load_function(module_name: str, source_file: str | None, qualname: str) -> Callable:
    if source_file is None:
        module = importlib.import_module(module_name)
    else:
        spec = importlib.util.spec_from_file_location(f"_bitscale_ranks_{module_name}", source_file)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    target: Any = module
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def _worker(
    rank: int,
    world_size: int,
    init_file: str,
    backend: str,
    timeout_s: float,
    location: tuple[str, str | None, str],
    args: tuple,
    kwargs: dict,
    results: Any,
) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    # N processes share 2 cores here; more intra-op threads only oversubscribe.
    torch.set_num_threads(1)
    failed_at = None
    try:
        fn = _load_function(*location)
        dist.init_process_group(
            backend,
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            # Longer than run_on_ranks' own deadline, so a hang is reported (and every
            # process killed) by the parent, naming the ranks that never finished.
            timeout=timedelta(seconds=timeout_s + 60),
        )
        try:
            value = fn(rank, world_size, *args, **kwargs)
            # No rank tears its gloo connections down under a peer still using them (that
            # peer aborted in C++, "terminate called without an active exception").
            dist.barrier()
        except BaseException:
            # Taken before destroy_process_group breaks the peers' connections,
            # so the root failure is older than the failures it causes.
            failed_at = time.time()
            raise
        finally:
            dist.destroy_process_group()
        results.put((rank, True, value))
    except BaseException:
        results.put((rank, False, (failed_at or time.time(), traceback.format_exc())))


def _function_location(fn: Callable) -> tuple[str, str | None, str]:
    qualname = fn.__qualname__
    if "<locals>" in qualname or fn.__name__ == "<lambda>":
        raise ValueError(
            f"run_on_ranks needs a module-level function, got {qualname!r}; "
            "move it to the top level of its module"
        )
    module_name = fn.__module__
    # Installed modules load by name; anything else (test files under pytest's
    # importlib mode, scripts) loads from its source file.
    if module_name == "bitscale" or module_name.startswith("bitscale."):
        return module_name, None, qualname
    module = sys.modules.get(module_name)
    source_file = inspect.getsourcefile(module) if module is not None else None
    if source_file is None:
        raise ValueError(
            f"cannot locate the source file of {qualname!r} to load it in child processes"
        )
    return module_name, source_file, qualname


def _first_failure(rank: int, failure: tuple[float, str], results: Any) -> RankError:
    """When one rank fails its peers fail too (broken connections); wait a moment
    for their reports and blame the rank that failed first."""
    failures = {rank: failure}
    grace_end = time.monotonic() + 2.0
    while time.monotonic() < grace_end:
        try:
            other_rank, ok, value = results.get(timeout=0.2)
        except queue.Empty:
            continue
        if not ok:
            failures[other_rank] = value
    first = min(failures, key=lambda r: failures[r][0])
    return RankError(first, failures[first][1])


def run_on_ranks(
    fn: Callable,
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str = "gloo",
    **kwargs: Any,
) -> list[Any]:
    """Call ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` processes.

    Returns the per-rank return values in rank order (they must be picklable).
    Raises :class:`RankError` with the failing rank's traceback, or
    ``TimeoutError`` naming the ranks that had not finished after ``timeout``
    seconds; in both cases every process is killed first.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    location = _function_location(fn)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="bitscale-ranks-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        processes = [
            ctx.Process(
                target=_worker,
                args=(
                    rank,
                    world_size,
                    init_file,
                    backend,
                    timeout,
                    location,
                    args,
                    kwargs,
                    results,
                ),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        values: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(values) < world_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(range(world_size)) - set(values))
                    raise TimeoutError(
                        f"run_on_ranks({location[2]}): ranks {missing} did not finish within "
                        f"{timeout:.0f} s (a hung collective?)"
                    )
                try:
                    rank, ok, value = results.get(timeout=min(remaining, 1.0))
                except queue.Empty:
                    dead = [
                        r
                        for r, p in enumerate(processes)
                        if r not in values and p.exitcode is not None
                    ]
                    if dead and results.empty():
                        # Give a dying rank's queue message a moment to arrive.
                        time.sleep(0.5)
                        if results.empty():
                            raise RankError(
                                dead[0],
                                f"process exited with code {processes[dead[0]].exitcode} "
                                "without reporting a result",
                            ) from None
                    continue
                if not ok:
                    raise _first_failure(rank, value, results)
                values[rank] = value
        finally:
            for process in processes:
                process.join(timeout=5 if len(values) == world_size else 0.1)
                if process.is_alive():
                    process.kill()
                    process.join()
    return [values[rank] for rank in range(world_size)]
