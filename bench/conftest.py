"""Shared fixtures of the bitscale benchmark suite; the conventions are in bench/README.md.

- ``--quick`` (or ``BITSCALE_BENCH_QUICK=1``): reduced sizes and rounds; the ``quick``
  fixture says which, ``@pytest.mark.full_only`` skips a benchmark in quick runs.
- ``bench_*.py`` files under bench/ are collected (their functions are ``test_*``).
- ``@pytest.mark.gpu`` benchmarks skip with the reason on a machine without CUDA.
- Every benchmark's ``extra_info`` gets the device, torch/triton versions, CPU count,
  the quick flag and the subsystem (the folder under bench/).
- ``limits``: physical limits, measured in-run (disk, memory bandwidth, CPU fp32 matmul)
  or from datasheets (GPU HBM bandwidth, bf16/int8 tensor-core peaks).
- ``bench_record(...)``: writes the extra_info keys of the convention, ratios included.
- ``bench_compare(bitscale, baseline, ...)``: times both interleaved round by round and
  records the side-by-side ratio of medians.
"""

from __future__ import annotations

import fnmatch
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bitscale.bench import QUICK_ENV, Limit, current_device, known_gpu_peaks, ratio_to_baseline

BENCH_DIR = Path(__file__).resolve().parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--quick",
        action="store_true",
        default=False,
        help=f"bitscale benchmarks: reduced sizes and rounds (same as {QUICK_ENV}=1)",
    )


def _quick(config: pytest.Config) -> bool:
    return bool(config.getoption("--quick")) or os.environ.get(QUICK_ENV) == "1"


def pytest_configure(config: pytest.Config) -> None:
    if _quick(config):
        # Through the environment, so that processes a benchmark spawns see it too.
        os.environ[QUICK_ENV] = "1"
    config.addinivalue_line("markers", "full_only: skipped by `--quick` (too slow for it)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if BENCH_DIR not in file_path.resolve().parents:
        return None
    # The python plugin already collects files named on the command line and files
    # matching python_files; collecting them here too would run them twice.
    if parent.session.isinitpath(file_path) or any(
        fnmatch.fnmatch(file_path.name, p) for p in parent.config.getini("python_files")
    ):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    quick = _quick(config)
    no_cuda = not torch.cuda.is_available()
    for item in items:
        if no_cuda and "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device; this machine has none"))
        if quick and "full_only" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="full run only (--quick given)"))


# ---------------------------------------------------------------------------------------
# Environment record


def _environment() -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    device, device_name = current_device()
    # The cores this process may use (a container's share), not the host's.
    cpu_count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "device": device,
        "device_name": device_name,
        "torch": torch.__version__,
        "triton": version("triton"),
        "bitscale": version("bitscale"),
        "cpu_count": cpu_count,
        "torch_threads": torch.get_num_threads(),
        "quick": os.environ.get(QUICK_ENV) == "1",
    }


_ENVIRONMENT: dict[str, Any] = {}


def _cached_environment() -> dict[str, Any]:
    if not _ENVIRONMENT:
        _ENVIRONMENT.update(_environment())
    return _ENVIRONMENT


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["bitscale"] = dict(_cached_environment())


@pytest.fixture(scope="session")
def bench_env() -> dict[str, Any]:
    """Device slug and name, torch/triton/bitscale versions, CPU count, quick flag."""
    return dict(_cached_environment())


@pytest.fixture(scope="session")
def quick() -> bool:
    """True in ``--quick`` runs: shrink sizes and rounds so the suite fits in minutes."""
    return os.environ.get(QUICK_ENV) == "1"


def _subsystem(path: Path) -> str:
    relative = path.resolve().relative_to(BENCH_DIR)
    return relative.parts[0] if len(relative.parts) > 1 else "other"


@pytest.fixture(autouse=True)
def _record_environment(request: pytest.FixtureRequest) -> None:
    if "benchmark" not in request.fixturenames:
        return
    benchmark = request.getfixturevalue("benchmark")
    benchmark.extra_info.update(_cached_environment())
    benchmark.extra_info["subsystem"] = _subsystem(request.path)


# ---------------------------------------------------------------------------------------
# Physical limits


def _mount_point(path: Path) -> Path:
    # Names the filesystem, not the benchmark's temporary folder, so names match across runs.
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


class PhysicalLimits:
    """Limits of this machine; measured ones are measured once per run and cached."""

    def __init__(self, quick: bool) -> None:
        self._quick = quick
        self._cache: dict[Any, Limit] = {}

    def _best_seconds(self, fn: Callable[[], object], repeats: int) -> float:
        # Best of N, not the median: a limit is what the hardware can do, and other
        # load on a shared machine only ever makes one attempt slower.
        fn()  # warm-up: page faults, allocator, thread pool
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    def disk_write_bandwidth(self, directory: str | os.PathLike[str] | None = None) -> Limit:
        """Sequential write + fsync of one file, in B/s, on ``directory``'s filesystem.

        The physical limit of a checkpoint flush: pass the directory the checkpoint
        benchmark writes to. 256 MiB in 8 MiB chunks (64 MiB in quick runs), best of 3.
        """
        directory = Path(directory or tempfile.gettempdir())
        key = ("disk", os.stat(directory).st_dev)
        if key not in self._cache:
            nbytes = (64 if self._quick else 256) << 20
            chunk = os.urandom(8 << 20)
            target = directory / f".bitscale-disk-probe-{os.getpid()}"

            def write() -> None:
                with open(target, "wb") as f:
                    for _ in range(nbytes // len(chunk)):
                        f.write(chunk)
                    f.flush()
                    os.fsync(f.fileno())

            try:
                seconds = self._best_seconds(write, repeats=3)
            finally:
                target.unlink(missing_ok=True)
            self._cache[key] = Limit(
                name=f"sequential write + fsync on {_mount_point(directory)}",
                value=nbytes / seconds,
                unit="B/s",
                source="measured in-run",
            )
        return self._cache[key]

    def memory_bandwidth(self, device: str = "cpu") -> Limit:
        """Copy bandwidth (bytes read + written per second) of ``device`` memory.

        On CUDA this is the datasheet HBM bandwidth when the GPU is known (the measured
        copy rate otherwise); on CPU a 256 MiB tensor copy (64 MiB quick), best of 5.
        """
        import torch

        dev = torch.device(device)
        if dev.type == "cuda":
            peaks = known_gpu_peaks(torch.cuda.get_device_name(dev))
            if peaks is not None:
                return peaks.limit("hbm")
        key = ("memory", str(dev))
        if key not in self._cache:
            nbytes = (64 if self._quick else 256) << 20
            src = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
            dst = torch.empty_like(src)

            def copy() -> None:
                dst.copy_(src)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)

            seconds = self._best_seconds(copy, repeats=5)
            self._cache[key] = Limit(
                name=f"{dev.type} memory copy bandwidth",
                value=2 * nbytes / seconds,
                unit="B/s",
                source="measured in-run",
            )
        return self._cache[key]

    def cpu_matmul_peak(self) -> Limit:
        """fp32 ``torch.matmul`` FLOP/s at n=2048 (1024 quick), all torch threads, best of 3.

        Measured, not theoretical: it is what the CPU reaches through MKL/oneDNN, the
        roofline CPU kernels are held to.
        """
        import torch

        key = ("cpu_matmul",)
        if key not in self._cache:
            n = 1024 if self._quick else 2048
            a = torch.randn(n, n)
            b = torch.randn(n, n)
            seconds = self._best_seconds(lambda: torch.matmul(a, b), repeats=3)
            self._cache[key] = Limit(
                name=f"CPU fp32 matmul ({torch.get_num_threads()} threads, n={n})",
                value=2 * n**3 / seconds,
                unit="FLOP/s",
                source="measured in-run",
            )
        return self._cache[key]

    def gpu_peak(self, kind: str, device: int = 0) -> Limit | None:
        """Datasheet peak of the CUDA device: ``kind`` in ``"hbm"``, ``"bf16"``, ``"int8"``.

        None for a GPU model bitscale has no datasheet numbers for.
        """
        import torch

        if not torch.cuda.is_available():
            raise ValueError("gpu_peak needs a CUDA device; mark the benchmark @pytest.mark.gpu")
        peaks = known_gpu_peaks(torch.cuda.get_device_name(device))
        return None if peaks is None else peaks.limit(kind)


@pytest.fixture(scope="session")
def limits(quick: bool) -> PhysicalLimits:
    """Physical limits of this machine (see :class:`PhysicalLimits`)."""
    return PhysicalLimits(quick)


# ---------------------------------------------------------------------------------------
# Recording results


def record(
    benchmark: Any,
    *,
    provider: str = "bitscale",
    baseline: str | None = None,
    case: str | None = None,
    shape: dict[str, Any] | None = None,
    x_name: str | None = None,
    x: float | None = None,
    series: str | None = None,
    metric: str | None = None,
    value: float | None = None,
    baseline_value: float | None = None,
    unit: str | None = None,
    higher_is_better: bool = False,
    ratio: float | None = None,
    reference: bool = False,
    achieved: float | None = None,
    limit: Limit | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Write the bench/README.md ``extra_info`` keys into ``benchmark.extra_info``.

    ``reference=True`` marks a provider that is a floor to read numbers against (training
    without checkpoints), not a baseline: the report shows it without a ratio.
    ``value``/``baseline_value`` are for untimed metrics (planner balance, simulated
    step time); the ratio to the baseline is computed from them unless ``ratio`` is
    given. ``achieved`` (in ``limit.unit``) gives ``ratio_to_limit = achieved / limit``.
    """
    if provider != "bitscale" and baseline is not None:
        raise ValueError(
            f"provider={provider!r} is a baseline; `baseline` names the baseline of a "
            "bitscale measurement, leave it unset here"
        )
    if (achieved is None) != (limit is None):
        raise ValueError("give both `achieved` and `limit` (in limit.unit), or neither")
    if value is None and (baseline_value is not None or metric is not None):
        raise ValueError("`metric`/`baseline_value` describe a recorded `value`; give `value`")
    if reference and provider == "bitscale":
        raise ValueError("reference=True marks a non-bitscale floor (e.g. 'no checkpoint')")
    info: dict[str, Any] = {"provider": provider}
    if reference:
        info["reference"] = True
    optional = {
        "baseline": baseline,
        "case": case,
        "shape": shape,
        "x_name": x_name,
        "x": x,
        "series": series,
        "metric": metric,
        "value": value,
        "baseline_value": baseline_value,
        "unit": unit,
    }
    info.update({k: v for k, v in optional.items() if v is not None})
    if value is not None:
        info["higher_is_better"] = higher_is_better
    if ratio is None and value is not None and baseline_value is not None:
        ratio = ratio_to_baseline(value, baseline_value, higher_is_better=higher_is_better)
    if ratio is not None:
        info["ratio_to_baseline"] = ratio
    if limit is not None and achieved is not None:
        info.update(limit.as_extra_info())
        info["achieved"] = achieved
        info["ratio_to_limit"] = achieved / limit.value
    info.update(extra)
    benchmark.extra_info.update(info)
    return info


@pytest.fixture
def bench_record(benchmark: Any) -> Callable[..., dict[str, Any]]:
    """``bench_record(provider=..., baseline=..., case=..., ...)``: see :func:`record`."""

    def bound(**kwargs: Any) -> dict[str, Any]:
        return record(benchmark, **kwargs)

    return bound


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """Medians of one side-by-side measurement, in seconds per call."""

    bitscale_median_s: float
    baseline_median_s: float
    ratio: float
    """``baseline_median_s / bitscale_median_s``: > 1 means bitscale is faster."""


def compare(
    benchmark: Any,
    bitscale: Callable[[], object],
    baseline: Callable[[], object],
    *,
    baseline_name: str,
    rounds: int,
    warmup_rounds: int = 1,
    sync: Callable[[], None] | None = None,
    work: float | None = None,
    limit: Limit | None = None,
    **record_kwargs: Any,
) -> Comparison:
    """Time ``bitscale`` with pytest-benchmark and ``baseline`` in between, round by round.

    Each round runs the baseline (timed here) and then bitscale (timed by
    pytest-benchmark), so both see the same machine state; noise on a shared machine
    hits both sides alike. ``sync`` (e.g. ``torch.cuda.synchronize``) runs inside both
    timed regions. ``work`` (FLOP, OP or bytes per call, in ``limit.unit`` x s) gives
    ``achieved = work / bitscale median`` and its ratio to ``limit``; with ``limit=None``
    (an unknown GPU's ``gpu_peak``) no ratio to a limit is recorded.
    """
    if rounds < 3:
        raise ValueError(f"rounds must be >= 3 for a meaningful median, got {rounds}")
    if limit is not None and work is None:
        raise ValueError("`limit` needs `work` (FLOP, OP or bytes per call, in limit.unit x s)")
    if limit is None:
        work = None  # e.g. gpu_peak() of a GPU without datasheet numbers: no ratio to limit
    baseline_times: list[float] = []
    calls = {"setup": 0}

    def timed_baseline() -> None:
        calls["setup"] += 1
        start = time.perf_counter()
        baseline()
        if sync is not None:
            sync()
        if calls["setup"] > warmup_rounds:
            baseline_times.append(time.perf_counter() - start)

    def timed_bitscale() -> None:
        bitscale()
        if sync is not None:
            sync()

    benchmark.pedantic(
        timed_bitscale, setup=timed_baseline, rounds=rounds, warmup_rounds=warmup_rounds
    )
    if benchmark.stats is None:  # --benchmark-disable: one unmeasured call of each
        return Comparison(bitscale_median_s=math.nan, baseline_median_s=math.nan, ratio=math.nan)
    bitscale_median = benchmark.stats.stats.median
    baseline_median = statistics.median(baseline_times)
    result = Comparison(
        bitscale_median_s=bitscale_median,
        baseline_median_s=baseline_median,
        ratio=baseline_median / bitscale_median,
    )
    record(
        benchmark,
        baseline=baseline_name,
        ratio=result.ratio,
        achieved=None if work is None else work / bitscale_median,
        limit=limit,
        baseline_median_s=baseline_median,
        **record_kwargs,
    )
    if work is not None and limit is not None:
        benchmark.extra_info["baseline_ratio_to_limit"] = work / baseline_median / limit.value
    return result


@pytest.fixture
def bench_compare(benchmark: Any) -> Callable[..., Comparison]:
    """``bench_compare(bitscale_fn, baseline_fn, baseline_name=..., rounds=...)``: see :func:`compare`."""

    def bound(
        bitscale: Callable[[], object], baseline: Callable[[], object], **kwargs: Any
    ) -> Comparison:
        return compare(benchmark, bitscale, baseline, **kwargs)

    return bound
