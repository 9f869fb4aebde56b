"""Training stall per checkpoint: bitscale lazy saves vs torch.save, DCP save and DCP async_save.

    .venv/bin/pytest bench/checkpoint/bench_lazy.py --benchmark-only [--quick]
    BITSCALE_BENCH_CKPT_DIR=/dev/shm .venv/bin/pytest bench/checkpoint/bench_lazy.py ...

One model (a stack of square Linear layers, fp32, Adam: ~200 MB of parameters plus
~400 MB of optimizer state in full runs; ~8 MB + 16 MB in quick runs) trains on the
GPU when there is one. Each benchmark round is one training iteration followed by a
checkpoint of the whole state, every iteration, as the provider does it:

- ``bitscale``: ``Checkpointer.save`` (the optimizer pre-step hook waits for copies)
- ``torch.save``: synchronous ``torch.save`` of the state dicts, then fsync
- ``dcp.save``: ``torch.distributed.checkpoint.save`` (fsyncs its files)
- ``dcp.async_save``: waits for the previous save, then ``async_save`` (staging blocks)
- ``no checkpoint``: the iteration alone

The timed region is the whole round. Right before a provider's rounds and right after its
last save is durable (no save in flight either time), the same benchmark times as many
groups of its ``interval`` iterations without a checkpoint, bracketing the rounds in time;
the stall per checkpoint is the round's median minus the median of those groups (``stall_per_checkpoint_s``,
also as a share of the iterations between checkpoints). The stall is clamped at zero: a
checkpoint only adds work, so a negative difference of two medians is noise of a shared
machine (other load during one of the two measurements), not a speed-up; the signed
difference is kept as ``stall_difference_s``. Measuring the reference once per run instead
(as this file first did) made an every-8 stall 8x that reference's noise: -272 ms on 2 busy
cores. The ``no checkpoint`` rows are recorded as a ``reference`` (a floor, not a baseline).
Each provider's saves go to a fresh directory, so DCP never overwrites an earlier checkpoint. A second benchmark times one bitscale save until it
is durable (copies, writes, fsyncs, commit) and compares that flush throughput with a
sequential write + fsync on the same filesystem (the ``limits`` fixture).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from bitscale.checkpoint import Checkpointer
from torch import nn

GROUP = "checkpoint stall"
PROVIDERS = ["bitscale", "torch.save", "dcp.save", "dcp.async_save"]
# Every iteration (the flush must keep up with training, or it sets the pace) and every
# 8th (the DataStates regime: the copy hides behind forward/backward, the flush behind
# the next iterations).
CASES = [
    pytest.param(p, i, id=f"{p}-every{i}") for i in (1, 8) for p in ["no checkpoint", *PROVIDERS]
]


@dataclass
class Workload:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: torch.Tensor
    device: torch.device
    state_bytes: int
    case: str
    root: Path

    def iteration(self) -> None:
        loss = self.model(self.batch).square().mean()
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        self.optimizer.step()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def state_dicts(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}


def _sizes(quick: bool, cuda: bool) -> tuple[int, int, int]:
    """(width, layers, batch rows): 12 x 2048^2 ~ 50 M parameters (200 MB fp32) in full runs."""
    if quick:
        return 512, 8, 256
    return 2048, 12, 16384 if cuda else 512


@pytest.fixture(scope="module")
def workload(quick: bool) -> Iterator[Workload]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    width, layers, rows = _sizes(quick, device.type == "cuda")
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = torch.randn(rows, width, device=device)
    base = Path(os.environ.get("BITSCALE_BENCH_CKPT_DIR", tempfile.gettempdir()))
    root = Path(tempfile.mkdtemp(prefix="bitscale-bench-ckpt-", dir=base))
    params = sum(p.numel() for p in model.parameters())
    work = Workload(
        model=model,
        optimizer=optimizer,
        batch=batch,
        device=device,
        state_bytes=3 * 4 * params,  # fp32 parameters + Adam exp_avg + exp_avg_sq
        case=f"{params / 1e6:.0f}M params + Adam, {rows}x{width} batch, {device.type}",
        root=root,
    )
    for _ in range(3):  # creates Adam state, warms kernels and allocator
        work.iteration()
    work.sync()
    yield work
    shutil.rmtree(root, ignore_errors=True)


def _iteration_times(work: Workload, interval: int, rounds: int) -> list[float]:
    """Seconds per training iteration, timed in ``rounds`` groups of ``interval``."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(interval):
            work.iteration()
        work.sync()
        times.append((time.perf_counter() - start) / interval)
    return times


def _init_single_process_group(root: Path) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=0, world_size=1)


def _round_function(
    provider: str, work: Workload, interval: int
) -> tuple[Callable[[], None], Callable[[], None]]:
    """(one round: ``interval`` iterations + one checkpoint, finish: make the last one durable)."""
    counter = iter(range(1, 10**9))
    iterate = work.iteration
    # A fresh directory per benchmark: a step number reused from an earlier benchmark
    # would make DCP overwrite (and warn about) that benchmark's checkpoint.
    directory = Path(
        tempfile.mkdtemp(prefix=f"{provider.replace(' ', '-')}-every{interval}-", dir=work.root)
    )

    def iterations() -> None:
        for _ in range(interval):
            iterate()

    work = dataclasses.replace(work)
    work.iteration = iterations  # type: ignore[method-assign]
    if provider == "no checkpoint":

        def plain() -> None:
            work.iteration()
            work.sync()

        return plain, lambda: None

    if provider == "bitscale":
        checkpointer = Checkpointer(directory, keep=2)
        checkpointer.attach(work.optimizer)
        state = {"model": work.model, "optim": work.optimizer}

        def lazy() -> None:
            work.iteration()
            checkpointer.save(next(counter), state)
            work.sync()

        return lazy, checkpointer.close

    if provider == "torch.save":
        path = directory / "torch_save.pt"

        def sync_save() -> None:
            work.iteration()
            tmp = path.with_suffix(".tmp")
            with open(tmp, "wb") as handle:
                torch.save(work.state_dicts(), handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
            work.sync()

        return sync_save, lambda: None

    import torch.distributed.checkpoint as dcp

    _init_single_process_group(work.root)
    if provider == "dcp.save":

        def dcp_save() -> None:
            work.iteration()
            step = next(counter)
            dcp.save(work.state_dicts(), checkpoint_id=directory / f"dcp-{step}")
            shutil.rmtree(directory / f"dcp-{step - 2}", ignore_errors=True)
            work.sync()

        return dcp_save, lambda: None

    assert provider == "dcp.async_save"
    pending: list[Any] = []

    def wait_pending() -> None:
        while pending:
            response = pending.pop()
            future = getattr(response, "upload_completion", response)
            future.result()

    def dcp_async() -> None:
        wait_pending()  # the DCP recipe: at most one save in flight
        work.iteration()
        step = next(counter)
        pending.append(dcp.async_save(work.state_dicts(), checkpoint_id=directory / f"adcp-{step}"))
        shutil.rmtree(directory / f"adcp-{step - 2}", ignore_errors=True)
        work.sync()

    return dcp_async, wait_pending


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize(("provider", "interval"), CASES)
def test_stall_per_checkpoint(
    benchmark, bench_record, workload: Workload, quick: bool, provider: str, interval: int
) -> None:
    rounds = 5 if quick else 10
    # The reference iteration time of this benchmark, measured before its first save and
    # after its last one is durable: no save is in flight, and the load of a shared machine
    # is sampled on both sides of the rounds rather than once per run.
    reference = _iteration_times(workload, interval, rounds)
    one_round, finish = _round_function(provider, workload, interval)
    try:
        benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=2)
    finally:
        finish()
    reference += _iteration_times(workload, interval, rounds)
    iteration_s = statistics.median(reference)
    if benchmark.stats is None:
        return
    case = f"{workload.case}, checkpoint every {interval} iteration(s)"
    shape = {"state_bytes": workload.state_bytes, "interval": interval}
    if provider == "no checkpoint":
        bench_record(provider=provider, reference=True, case=case, shape=shape)
        return
    between = interval * iteration_s
    difference = benchmark.stats.stats.median - between
    # Clamped: saving only adds work, so a negative difference is measurement noise.
    stall = max(0.0, difference)
    bench_record(
        provider=provider,
        baseline="torch.save" if provider == "bitscale" else None,
        case=case,
        shape=shape,
        stall_per_checkpoint_s=stall,
        stall_difference_s=difference,
        iteration_s=iteration_s,
        note=(
            f"stall {stall * 1e3:.1f} ms per checkpoint = {100 * stall / between:.1f}% of "
            f"{interval} x {iteration_s * 1e3:.0f} ms iteration(s)"
            + (f" (within noise: difference {difference * 1e3:.1f} ms)" if difference < 0 else "")
        ),
    )


@pytest.mark.benchmark(group="checkpoint flush")
def test_flush_throughput(benchmark, bench_record, limits, workload: Workload, quick: bool) -> None:
    checkpointer = Checkpointer(workload.root / "flush", keep=1)
    state = {"model": workload.model, "optim": workload.optimizer}
    counter = iter(range(1, 10**9))

    def save_until_durable() -> None:
        checkpointer.save(next(counter), state)
        checkpointer.wait()

    try:
        benchmark.pedantic(save_until_durable, rounds=3 if quick else 5, warmup_rounds=1)
    finally:
        checkpointer.close()
    if benchmark.stats is None:
        return
    throughput = workload.state_bytes / benchmark.stats.stats.median
    limit = limits.disk_write_bandwidth(workload.root)
    bench_record(
        provider="bitscale",
        case=workload.case,
        shape={"state_bytes": workload.state_bytes},
        achieved=throughput,
        limit=limit,
        note=f"{throughput / 1e9:.2f} GB/s until durable = {100 * throughput / limit.value:.0f}% of a raw sequential write",
    )
