"""Run the benchmark suite in bench/ and render its results.

``bitscale bench run [--quick] [--only SUBSYSTEM] [--repeat N]`` runs pytest-benchmark
over bench/ of the repository checkout and appends the run to
``bench/results/<device>-<date>.json``. ``bitscale bench report`` renders every results
file into bench/RESULTS.md (one table per subsystem: bitscale against its baseline, the
ratio, the ratio to the physical limit, the device) and PNG plots in bench/results/plots/.

bench/ is not part of the installed package: both commands look for it in the current
directory and its parents. The conventions benchmarks follow (``extra_info`` keys, the
quick flag) are in bench/README.md; the fixtures that implement them are in
bench/conftest.py and use the pure helpers of this module.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from bitscale._io import atomic_output, save_figure

__all__ = [
    "KERNEL_GOALS",
    "QUICK_ENV",
    "RESULTS_VERSION",
    "BenchError",
    "GoalRow",
    "GpuPeaks",
    "KernelGoal",
    "Limit",
    "Row",
    "Subsystem",
    "append_run",
    "build_rows",
    "current_device",
    "device_slug",
    "find_repo_root",
    "kernel_goal_rows",
    "known_gpu_peaks",
    "load_results",
    "ratio_to_baseline",
    "render_markdown",
    "render_plots",
    "results_path",
    "run_suite",
    "write_report",
]

RESULTS_VERSION = 1
"""Format version of bench/results/*.json (a ``version`` key at the top)."""

QUICK_ENV = "BITSCALE_BENCH_QUICK"
"""``1`` when the run is ``--quick``; set by bench/conftest.py so that spawned ranks see it."""

_MAX_KEPT_ROUNDS = 200
_QUICK_TIMEOUT_S = 600
_FULL_TIMEOUT_S = 3600

BITSCALE_PROVIDER = "bitscale"
"""``extra_info["provider"]`` of the measurements of bitscale itself."""


class Subsystem(StrEnum):
    """The folders of bench/, one per part of bitscale (plus the end-to-end job)."""

    KERNELS = "kernels"
    HDP = "hdp"
    CHECKPOINT = "checkpoint"
    E2E = "e2e"

    def __str__(self) -> str:
        return self.value


class BenchError(ValueError):
    """A ``bitscale bench`` command cannot do what was asked; the message says how to fix it."""


# ---------------------------------------------------------------------------------------
# Devices and physical limits


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(cuda_device_names: Sequence[str], cpu_count: int) -> str:
    """The device part of a results file name: the GPU name slugified, or ``cpu-<n>core``.

    Several GPUs add ``-x<n>`` (``nvidia-h100-80gb-hbm3-x8``); benchmarks use device 0.
    """
    if cuda_device_names:
        name = _slug(cuda_device_names[0])
        return f"{name}-x{len(cuda_device_names)}" if len(cuda_device_names) > 1 else name
    if cpu_count < 1:
        raise ValueError(f"cpu_count must be >= 1, got {cpu_count}")
    return f"cpu-{cpu_count}core"


def results_path(results_dir: Path, device: str, date: dt.date) -> Path:
    """``<results_dir>/<device>-<YYYY-MM-DD>.json``: one file per device and UTC day."""
    if not device or _slug(device) != device:
        raise ValueError(f"device must be a slug like 'cpu-2core', got {device!r}")
    return results_dir / f"{device}-{date.isoformat()}.json"


@dataclass(frozen=True, kw_only=True)
class Limit:
    """A physical limit a measurement is compared with (``achieved / value`` <= 1)."""

    name: str
    """What the limit is, with the device, e.g. ``"HBM bandwidth (NVIDIA H100 SXM)"``."""
    value: float
    """In ``unit``; must be > 0."""
    unit: str
    """``"B/s"``, ``"FLOP/s"`` or ``"OP/s"``: the unit of the matching ``achieved``."""
    source: str
    """``"datasheet"`` or ``"measured in-run"`` (how this number was obtained)."""

    def __post_init__(self) -> None:
        if not (self.value > 0 and math.isfinite(self.value)):
            raise ValueError(f"Limit {self.name!r}: value must be finite and > 0, got {self.value}")

    def as_extra_info(self) -> dict[str, Any]:
        return {
            "limit_name": self.name,
            "limit_value": self.value,
            "limit_unit": self.unit,
            "limit_source": self.source,
        }


@dataclass(frozen=True, kw_only=True)
class GpuPeaks:
    """Dense datasheet peaks of one GPU model (no structured sparsity)."""

    model: str
    hbm_bytes_per_s: float
    bf16_flops: float
    int8_ops: float

    def limit(self, kind: str) -> Limit:
        """``kind`` is ``"hbm"``, ``"bf16"`` or ``"int8"``."""
        table = {
            "hbm": ("HBM bandwidth", self.hbm_bytes_per_s, "B/s"),
            "bf16": ("bf16 tensor-core peak", self.bf16_flops, "FLOP/s"),
            "int8": ("int8 tensor-core peak", self.int8_ops, "OP/s"),
        }
        if kind not in table:
            raise ValueError(f"limit kind must be one of {sorted(table)}, got {kind!r}")
        what, value, unit = table[kind]
        return Limit(name=f"{what} ({self.model})", value=value, unit=unit, source="datasheet")


# NVIDIA datasheets. Their tensor-core figures are "with sparsity"; dense is half of
# that (H100 SXM: bf16 1979 -> 989.5 TFLOP/s, int8 3958 -> 1979 TOPS). Matched against
# torch.cuda.get_device_name(), most specific patterns first.
_SPARSE = 0.5
_GPU_PEAKS: tuple[tuple[tuple[str, ...], GpuPeaks], ...] = (
    (("h200", "nvl"), GpuPeaks(model="H200 NVL", hbm_bytes_per_s=4.8e12, bf16_flops=1671e12 * _SPARSE, int8_ops=3341e12 * _SPARSE)),
    (("h200",), GpuPeaks(model="H200 SXM", hbm_bytes_per_s=4.8e12, bf16_flops=1979e12 * _SPARSE, int8_ops=3958e12 * _SPARSE)),
    (("h100", "nvl"), GpuPeaks(model="H100 NVL", hbm_bytes_per_s=3.9e12, bf16_flops=1671e12 * _SPARSE, int8_ops=3341e12 * _SPARSE)),
    (("h100", "pcie"), GpuPeaks(model="H100 PCIe", hbm_bytes_per_s=2.0e12, bf16_flops=1513e12 * _SPARSE, int8_ops=3026e12 * _SPARSE)),
    (("h100",), GpuPeaks(model="H100 SXM", hbm_bytes_per_s=3.35e12, bf16_flops=1979e12 * _SPARSE, int8_ops=3958e12 * _SPARSE)),
    (("a100", "80gb", "pcie"), GpuPeaks(model="A100 80GB PCIe", hbm_bytes_per_s=1.935e12, bf16_flops=624e12 * _SPARSE, int8_ops=1248e12 * _SPARSE)),
    (("a100", "80gb"), GpuPeaks(model="A100 80GB SXM", hbm_bytes_per_s=2.039e12, bf16_flops=624e12 * _SPARSE, int8_ops=1248e12 * _SPARSE)),
    (("a100",), GpuPeaks(model="A100 40GB SXM", hbm_bytes_per_s=1.555e12, bf16_flops=624e12 * _SPARSE, int8_ops=1248e12 * _SPARSE)),
)  # fmt: skip


def known_gpu_peaks(device_name: str) -> GpuPeaks | None:
    """Datasheet peaks for a GPU name as torch reports it, or None for an unknown model."""
    name = device_name.lower()
    for patterns, peaks in _GPU_PEAKS:
        if all(p in name for p in patterns):
            return peaks
    return None


def ratio_to_baseline(value: float, baseline_value: float, *, higher_is_better: bool) -> float:
    """How many times better bitscale is than its baseline: > 1 means bitscale wins.

    For times (lower is better) this is the speedup ``baseline / value``.
    """
    if not (value > 0 and baseline_value > 0):
        raise ValueError(
            f"ratio needs two positive numbers, got value={value}, baseline={baseline_value}"
        )
    return value / baseline_value if higher_is_better else baseline_value / value


# ---------------------------------------------------------------------------------------
# Locating the checkout and running pytest-benchmark


def find_repo_root(start: Path) -> Path:
    """The repository checkout holding bench/: ``start`` or the first parent that has one."""
    start = start.resolve()
    for candidate in (start, *start.parents):
        if (candidate / "bench" / "conftest.py").is_file() and (
            candidate / "pyproject.toml"
        ).is_file():
            return candidate
    raise BenchError(
        f"no bench/ suite in {start} or its parents: bench/ ships with the bitscale "
        "repository, not with the installed package; run `bitscale bench` from inside a "
        "checkout (git clone the repository and cd into it)"
    )


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_output(path, "w") as f:
        f.write(text)


def current_device() -> tuple[str, str]:
    """(slug, human-readable name) of the device benchmarks run on: CUDA device 0, or the
    CPU cores this process may use."""
    import torch

    names: list[str] = []
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    cpu_count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    slug = device_slug(names, cpu_count or 1)
    return slug, (names[0] if names else f"CPU ({cpu_count} cores)")


def _outcomes_from_junit(path: Path) -> list[dict[str, str]]:
    """Per-test outcome (passed/skipped/failed/error) with the skip or failure message."""
    outcomes = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            child = case.find(tag)
            if child is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = child.get("message", "") or (child.text or "")
                break
        classname = case.get("classname", "")
        parts = classname.split(".")
        # classname is the dotted module path (bench.kernels.bench_x[.TestClass]).
        at = parts.index("bench") if "bench" in parts else -1
        subsystem = parts[at + 1] if at >= 0 and len(parts) > at + 2 else "other"
        outcomes.append(
            {
                "test": f"{classname}::{case.get('name', '')}",
                "subsystem": subsystem,
                "outcome": outcome,
                "message": message.strip(),
            }
        )
    return outcomes


def _bench_paths(repo: Path, only: Sequence[Subsystem]) -> list[Path]:
    bench = repo / "bench"
    if not only:
        return [bench]
    paths = []
    for subsystem in only:
        folder = bench / subsystem.value
        if not any(folder.glob("bench_*.py")):
            raise BenchError(
                f"--only {subsystem}: {folder} has no bench_*.py files; choose one of "
                f"{[s.value for s in Subsystem if any((bench / s.value).glob('bench_*.py'))]}"
            )
        paths.append(folder)
    return paths


def run_suite(
    repo: Path,
    *,
    quick: bool,
    only: Sequence[Subsystem] = (),
    pytest_args: Sequence[str] = (),
    now: dt.datetime | None = None,
) -> tuple[Path | None, int]:
    """Run pytest-benchmark over bench/ (or the ``only`` subsystems) in ``repo``.

    Appends one run (the pytest-benchmark JSON plus device, flags and per-test outcomes)
    to ``bench/results/<device>-<date>.json``. Returns (that path, pytest's exit code);
    the path is None when pytest did not run the suite (usage error, nothing collected,
    interrupted).
    """
    from bitscale.env import collect_env

    paths = _bench_paths(repo, only)
    now = now or dt.datetime.now(dt.UTC)
    device, device_name = current_device()
    with tempfile.TemporaryDirectory(prefix="bitscale-bench-") as tmp:
        bench_json, junit = Path(tmp) / "benchmark.json", Path(tmp) / "junit.xml"
        command = [
            sys.executable,
            "-m",
            "pytest",
            *(str(p.relative_to(repo)) for p in paths),
            f"--benchmark-json={bench_json}",
            f"--junitxml={junit}",
            "-p",
            "no:cacheprovider",
            # pyproject's 300 s per-test limit is for unit tests; a full-size benchmark
            # (three end-to-end training runs) takes longer. Later --timeout args win.
            f"--timeout={_QUICK_TIMEOUT_S if quick else _FULL_TIMEOUT_S}",
            *(["--quick"] if quick else []),
            *pytest_args,
        ]
        env = dict(os.environ)
        if quick:
            env[QUICK_ENV] = "1"
        else:
            env.pop(QUICK_ENV, None)
        print("$", " ".join(command[1:]), flush=True)
        exit_code = subprocess.run(command, cwd=repo, env=env, check=False).returncode
        # 0: all passed or skipped, 1: some failed; both are runs worth keeping (a CPU
        # run of GPU-only benchmarks writes no benchmark JSON, only skip reasons).
        # Anything else (usage error, nothing collected, interrupted) records nothing.
        if exit_code not in (0, 1) or not junit.is_file():
            return None, exit_code
        raw = json.loads(bench_json.read_text()) if bench_json.is_file() else {}
        for benchmark in raw.get("benchmarks", []):
            # Per-round times are kept for small round counts only: a 50k-round
            # micro-benchmark would add megabytes to a committed file; its quartiles stay.
            if len(benchmark.get("stats", {}).get("data", ())) > _MAX_KEPT_ROUNDS:
                del benchmark["stats"]["data"]
        outcomes = _outcomes_from_junit(junit)
    run = {
        "started_utc": now.isoformat(timespec="seconds"),
        "device": device,
        "device_name": device_name,
        "quick": quick,
        "only": [s.value for s in only],
        "command": ["bitscale", "bench", "run", *(["--quick"] if quick else [])]
        + [arg for s in only for arg in ("--only", s.value)],
        "pytest_exit_code": exit_code,
        "env": collect_env(),
        "outcomes": outcomes,
        "machine_info": raw.get("machine_info", {}),
        "commit_info": raw.get("commit_info", {}),
        "benchmarks": raw.get("benchmarks", []),
    }
    path = results_path(repo / "bench" / "results", device, now.date())
    append_run(path, run, device=device, date=now.date())
    return path, exit_code


def append_run(path: Path, run: Mapping[str, Any], *, device: str, date: dt.date) -> None:
    """Add ``run`` to the results file at ``path`` (created if missing), atomically."""
    if path.is_file():
        document = json.loads(path.read_text())
        if document.get("version") != RESULTS_VERSION:
            raise BenchError(
                f"{path} has format version {document.get('version')}, this bitscale writes "
                f"{RESULTS_VERSION}; move that file away before running again"
            )
    else:
        document = {
            "version": RESULTS_VERSION,
            "device": device,
            "date": date.isoformat(),
            "runs": [],
        }
    document["runs"].append(dict(run))
    _atomic_write_text(path, json.dumps(document, indent=1) + "\n")


# ---------------------------------------------------------------------------------------
# Reading results into comparable rows


@dataclass(frozen=True, kw_only=True)
class _Measurement:
    """One benchmark of one run, with the conventions of bench/README.md applied."""

    device: str
    date: str
    quick: bool
    run_id: tuple[int, int]
    """(index of the results document, index of the run in it)."""
    subsystem: str
    group: str
    name: str
    provider: str
    baseline: str | None
    case: str
    median_s: float
    rounds: int
    extra: Mapping[str, Any]


@dataclass(frozen=True, kw_only=True)
class Row:
    """One line of a RESULTS.md table: medians over one day's runs of a benchmark on a device."""

    subsystem: str
    group: str
    case: str
    name: str
    device: str
    quick: bool
    provider: str
    baseline: str | None
    metric: str
    """``"time"`` (median seconds per round) or the name of a recorded metric."""
    unit: str
    value: float
    """Median over runs of bitscale's median time, or of its recorded metric value."""
    baseline_value: float | None
    ratio: float | None
    """Median over runs of the per-run ratio to the baseline (> 1: bitscale better)."""
    ratio_to_limit: float | None
    limit_name: str | None
    runs: int
    rounds: int
    """Timed rounds per run (the median of them); 0 for recorded, untimed metrics."""
    date: str
    """UTC day of the runs (the newest results file of this device that has the benchmark)."""
    x_name: str | None = None
    x: float | None = None
    series: str | None = None
    note: str = ""
    """The benchmark's ``note``, and the baseline's own note after it."""
    extra: Mapping[str, Any] = field(default_factory=dict)


def load_results(results_dir: Path) -> list[dict[str, Any]]:
    """Every ``*.json`` results document in ``results_dir``, sorted by file name."""
    documents = []
    for path in sorted(results_dir.glob("*.json")):
        document = json.loads(path.read_text())
        if document.get("version") != RESULTS_VERSION or "runs" not in document:
            raise BenchError(
                f"{path} is not a bitscale results file of version {RESULTS_VERSION}; "
                "remove it or regenerate it with `bitscale bench run`"
            )
        documents.append(document)
    return documents


def _case_of(benchmark: Mapping[str, Any], extra: Mapping[str, Any]) -> str:
    if "case" in extra:
        return str(extra["case"])
    params = {k: v for k, v in (benchmark.get("params") or {}).items() if k != "provider"}
    return " ".join(f"{k}={v}" for k, v in sorted(params.items())) or "-"


def _measurements(documents: Iterable[Mapping[str, Any]]) -> list[_Measurement]:
    out = []
    for document_index, document in enumerate(documents):
        for run_index, run in enumerate(document["runs"]):
            for bm in run.get("benchmarks", []):
                extra = dict(bm.get("extra_info") or {})
                params = bm.get("params") or {}
                provider = str(extra.get("provider", params.get("provider", BITSCALE_PROVIDER)))
                fullname = bm.get("fullname", bm["name"])
                subsystem = str(extra.get("subsystem") or _subsystem_from_path(fullname))
                out.append(
                    _Measurement(
                        device=document["device"],
                        date=document["date"],
                        quick=bool(run.get("quick")),
                        run_id=(document_index, run_index),
                        subsystem=subsystem,
                        group=bm.get("group") or bm["name"].split("[")[0],
                        name=bm["name"],
                        provider=provider,
                        baseline=extra.get("baseline"),
                        case=_case_of(bm, extra),
                        median_s=float(bm["stats"]["median"]),
                        rounds=int(bm["stats"]["rounds"]),
                        extra=extra,
                    )
                )
    return out


def _subsystem_from_path(fullname: str) -> str:
    parts = fullname.split("::")[0].split("/")
    if "bench" in parts and parts.index("bench") + 1 < len(parts) - 1:
        return parts[parts.index("bench") + 1]
    return "other"


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def build_rows(documents: Iterable[Mapping[str, Any]]) -> list[Row]:
    """Pair bitscale with its baselines per run, then take medians over a day's runs.

    Within one run, group and case, each bitscale measurement gets one row per other
    provider measured there (ratio: that provider's median / bitscale's, or the
    recorded ``ratio_to_baseline`` for the provider named in its ``baseline``); with no
    other provider it gets one row of its own recorded numbers. Providers of a case
    without a bitscale measurement, and providers recorded as ``reference``, get rows of
    their own.
    """
    by_point: dict[tuple, list[_Measurement]] = defaultdict(list)
    for m in _measurements(documents):
        by_point[(m.run_id, m.group, m.case)].append(m)
    per_key: dict[tuple, list[tuple[_Measurement, _Measurement | None]]] = defaultdict(list)

    def add(m: _Measurement, baseline: str | None, partner: _Measurement | None) -> None:
        key = (m.subsystem, m.group, m.case, m.name, m.device, m.quick, baseline)
        per_key[key].append((m, partner))

    for point in by_point.values():
        ours = [m for m in point if m.provider == BITSCALE_PROVIDER]
        # A "reference" (e.g. training with no checkpoint at all) is a floor to read
        # numbers against, not an alternative bitscale could be faster than.
        references = [
            m for m in point if m.provider != BITSCALE_PROVIDER and m.extra.get("reference")
        ]
        others = [m for m in point if m.provider != BITSCALE_PROVIDER and m not in references]
        for m in references:
            add(m, None, None)
        if not ours:
            for m in others:
                add(m, None, None)
        for m in ours:
            for partner in others:
                add(m, partner.provider, partner)
            if m.baseline not in {p.provider for p in others} and (m.baseline or not others):
                add(m, m.baseline, None)
    rows = []
    for key, all_pairs in per_key.items():
        # Runs of the newest day only: older files measured older code, and a median
        # across code versions would hide a regression.
        newest = max(m.date for m, _ in all_pairs)
        rows.append(_row(key, [(m, p) for m, p in all_pairs if m.date == newest]))
    rows.sort(
        key=lambda r: (
            r.subsystem,
            r.group,
            r.device,
            r.quick,
            r.series or "",
            r.x or 0,
            r.case,
            r.name,
            r.baseline or "",
        )
    )
    return rows


def _row(key: tuple, pairs: Sequence[tuple[_Measurement, _Measurement | None]]) -> Row:
    subsystem, group, case, name, device, quick, baseline = key
    first = pairs[0][0]
    timed = "value" not in first.extra
    values, baseline_values, ratios, limit_ratios = [], [], [], []
    for m, partner in pairs:
        values.append(m.median_s if timed else float(m.extra["value"]))
        # Numbers the benchmark recorded itself describe the baseline it names.
        recorded = partner is None or partner.provider == m.baseline
        baseline_value = None
        if partner is not None:
            baseline_value = partner.median_s if timed else partner.extra.get("value")
        elif "baseline_value" in m.extra:
            baseline_value = m.extra["baseline_value"]
        elif timed and "baseline_median_s" in m.extra:
            baseline_value = m.extra["baseline_median_s"]
        if baseline_value is not None:
            baseline_values.append(float(baseline_value))
        if recorded and "ratio_to_baseline" in m.extra:
            ratios.append(float(m.extra["ratio_to_baseline"]))
        elif baseline_value is not None:
            ratios.append(
                ratio_to_baseline(
                    values[-1],
                    float(baseline_value),
                    higher_is_better=bool(m.extra.get("higher_is_better", False)),
                )
            )
        if "ratio_to_limit" in m.extra:
            limit_ratios.append(float(m.extra["ratio_to_limit"]))
    x = first.extra.get("x")
    notes = [str(first.extra["note"])] if first.extra.get("note") else []
    graph = _graph_note([m.extra for m, _ in pairs], baseline)
    if graph:
        notes.insert(0, graph)
    partner = pairs[0][1]
    if partner is not None and partner.extra.get("note"):
        notes.append(f"{partner.provider}: {partner.extra['note']}")
    return Row(
        subsystem=subsystem,
        group=group,
        case=case,
        name=name,
        device=device,
        quick=quick,
        provider=first.provider,
        baseline=baseline,
        metric="time" if timed else str(first.extra.get("metric", "value")),
        unit="s" if timed else str(first.extra.get("unit", "")),
        value=statistics.median(values),
        baseline_value=_median(baseline_values),
        ratio=_median(ratios),
        ratio_to_limit=_median(limit_ratios),
        limit_name=first.extra.get("limit_name"),
        runs=len(pairs),
        rounds=int(statistics.median(m.rounds for m, _ in pairs)) if timed else 0,
        date=first.date,
        x_name=first.extra.get("x_name"),
        x=float(x) if isinstance(x, int | float) else None,
        series=first.extra.get("series"),
        note="; ".join(notes),
        extra=first.extra,
    )


def _graph_note(extras: Sequence[Mapping[str, Any]], baseline: str | None) -> str | None:
    """Kernel-only times (CUDA-graph replays, ``graph_seconds`` and
    ``graph_baseline_seconds``) recorded beside the eager medians of GPU kernel cases:
    medians over runs, and the median of the per-run ratios. None without them."""
    ours, theirs, ratios = [], [], []
    for extra in extras:
        if "graph_seconds" not in extra:
            continue
        ours.append(float(extra["graph_seconds"]))
        baseline_s = (extra.get("graph_baseline_seconds") or {}).get(baseline)
        if baseline_s is not None:
            theirs.append(float(baseline_s))
            ratios.append(float(baseline_s) / ours[-1])
    if not ours:
        return None
    text = f"CUDA graph: {_format_value(_median(ours), 's')}"
    if ratios:
        text += f" vs {_format_value(_median(theirs), 's')} ({_format_ratio(_median(ratios))})"
    return text


# ---------------------------------------------------------------------------------------
# The kernel goals of the issue (bench/README.md), read off the GPU kernel benchmarks

_BF16 = "torch.matmul bf16"
"""The baseline every kernel goal is stated against."""


@dataclass(frozen=True, kw_only=True)
class KernelGoal:
    """A speed goal of the bipolar kernels against bf16 ``torch.matmul`` on the same GPU,
    held to the kernel-only (CUDA-graph) ratio: bf16 time / bitscale time."""

    name: str
    series: re.Pattern[str]
    """Benchmark series it covers (``extra_info["series"]``, e.g. ``W4A16``)."""
    min_m: int
    max_m: int | None
    min_ratio: float
    worst_case_only: bool = False
    """One row per series and device: its slowest case (a floor over every M and shape),
    instead of one row per case."""


KERNEL_GOALS = (
    KernelGoal(
        name="W4A16 >= 3x at M = 1", series=re.compile(r"W4A16"), min_m=1, max_m=1, min_ratio=3.0
    ),
    KernelGoal(
        name="W2A16 >= 5x at M = 1", series=re.compile(r"W2A16"), min_m=1, max_m=1, min_ratio=5.0
    ),
    KernelGoal(
        name="W1A16 >= 7x at M = 1", series=re.compile(r"W1A16"), min_m=1, max_m=1, min_ratio=7.0
    ),
    KernelGoal(
        name="W8A8 >= 1.3x at M >= 1024",
        series=re.compile(r"W8A8"),
        min_m=1024,
        max_m=None,
        min_ratio=1.3,
    ),
    KernelGoal(
        name="never slower than bf16",
        series=re.compile(r"W\dA(16|8)"),
        min_m=1,
        max_m=None,
        min_ratio=1.0,
        worst_case_only=True,
    ),
)
"""The issue's goals on an H100 (kernels section 5 of the research notes)."""


@dataclass(frozen=True, kw_only=True)
class GoalRow:
    """A goal's verdict on one case (or, for a floor, a series' slowest case) of one device's
    newest day: medians over that day's runs."""

    goal: str
    case: str
    ratio: float
    """CUDA-graph ratio, bf16 time / bitscale time."""
    eager_ratio: float | None
    device: str
    date: str
    quick: bool
    runs: int
    met: bool


@dataclass(frozen=True, kw_only=True)
class _GoalCase:
    """One GPU kernel case of a device's newest day: medians over that day's runs."""

    device: str
    date: str
    quick: bool
    series: str
    case: str
    m: int
    ratio: float
    eager_ratio: float | None
    runs: int


def _goal_cases(documents: Iterable[Mapping[str, Any]]) -> list[_GoalCase]:
    """bitscale's GPU kernel cases that recorded a CUDA-graph time of bf16 torch.matmul."""
    by_case: dict[tuple, list[_Measurement]] = defaultdict(list)
    for m in _measurements(documents):
        graph_bf16 = (m.extra.get("graph_baseline_seconds") or {}).get(_BF16)
        if m.provider == BITSCALE_PROVIDER and graph_bf16 and "M" in (m.extra.get("shape") or {}):
            by_case[(m.device, m.quick, str(m.extra.get("series")), m.case)].append(m)
    newest: dict[str, str] = defaultdict(str)
    for (device, *_), measurements in by_case.items():
        newest[device] = max(newest[device], *(m.date for m in measurements))
    cases = []
    for (device, quick, series, case), measurements in sorted(by_case.items()):
        # The device's newest day only: older days measured older code, and a verdict
        # should not mix versions (build_rows keeps each row's own newest day).
        day = [m for m in measurements if m.date == newest[device]]
        if not day:
            continue
        ratios = [m.extra["graph_baseline_seconds"][_BF16] / m.extra["graph_seconds"] for m in day]
        eager = [float(m.extra["ratio_to_baseline"]) for m in day if m.baseline == _BF16]
        cases.append(
            _GoalCase(
                device=device,
                date=newest[device],
                quick=quick,
                series=series,
                case=case,
                m=int(day[0].extra["shape"]["M"]),
                ratio=statistics.median(ratios),
                eager_ratio=_median(eager),
                runs=len(day),
            )
        )
    return cases


def kernel_goal_rows(documents: Iterable[Mapping[str, Any]]) -> list[GoalRow]:
    """Each of :data:`KERNEL_GOALS` against the GPU kernel benchmarks that recorded a
    CUDA-graph time of bf16 ``torch.matmul`` beside bitscale's, per device and mode (full
    or quick), on that device's newest day. A goal no benchmark covers has no row."""
    cases = _goal_cases(documents)
    rows = []
    for goal in KERNEL_GOALS:
        covered = [
            c
            for c in cases
            if goal.series.fullmatch(c.series)
            and c.m >= goal.min_m
            and (goal.max_m is None or c.m <= goal.max_m)
        ]
        if goal.worst_case_only:
            slowest: dict[tuple, _GoalCase] = {}
            for c in covered:
                key = (c.device, c.quick, c.series)
                if key not in slowest or c.ratio < slowest[key].ratio:
                    slowest[key] = c
            covered = [slowest[key] for key in sorted(slowest)]
        rows += [
            GoalRow(
                goal=goal.name,
                case=c.case,
                ratio=c.ratio,
                eager_ratio=c.eager_ratio,
                device=c.device,
                date=c.date,
                quick=c.quick,
                runs=c.runs,
                met=c.ratio >= goal.min_ratio,
            )
            for c in covered
        ]
    return rows


def _not_run(documents: Iterable[Mapping[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(subsystem, test, outcome, message) of the latest run per device that skipped or failed."""
    latest: dict[tuple[str, str], tuple[str, str, str]] = {}  # (test, device) -> outcome
    for document in documents:
        for run in document["runs"]:
            for o in run.get("outcomes", []):
                if o["outcome"] != "passed":
                    latest[(o["test"], document["device"])] = (
                        o.get("subsystem", "other"),
                        o["outcome"],
                        o["message"],
                    )
                else:
                    latest.pop((o["test"], document["device"]), None)
    # Parametrized cases that were skipped or failed for the same reason are one line.
    cases: dict[tuple[str, str, str, str], list[str]] = defaultdict(list)
    for (test, device), (subsystem, outcome, message) in latest.items():
        first_line = message.splitlines()[0] if message else ""
        cases[(subsystem, test.split("[")[0], outcome, f"{device}: {first_line}")].append(test)
    return [
        (subsystem, tests[0] if len(tests) == 1 else f"{base} ({len(tests)} cases)", outcome, why)
        for (subsystem, base, outcome, why), tests in sorted(cases.items())
    ]


# ---------------------------------------------------------------------------------------
# Rendering


def _format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        for scale, suffix in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs"), (1e-9, "ns")):
            if abs(value) >= scale or suffix == "ns":
                return f"{value / scale:.3g} {suffix}"
    return f"{value:.4g} {unit}".strip()


def _format_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _mode(quick: bool) -> str:
    return "quick" if quick else "full"


def _plot_file(subsystem: str, group: str) -> str:
    return f"{_slug(subsystem)}-{_slug(group)}.png"


def _render_goals(goals: Sequence[GoalRow]) -> list[str]:
    lines = [
        "## Kernel goals",
        "",
        "The issue's goals for the bipolar kernels, each against bf16 `torch.matmul` on the "
        "same GPU in the same run: **ratio** = bf16 kernel time / bitscale kernel time, both "
        "replayed in CUDA graphs (kernel-only; the eager ratio beside it includes the host's "
        "launch path). A floor goal shows each series' slowest case.",
        "",
    ]
    if goals:
        lines += [
            "| goal | case | ratio | eager ratio | met | device | mode | runs |",
            "|---|---|---:|---:|---|---|---|---:|",
        ]
        lines += [
            f"| {g.goal} | {g.case} | {_format_ratio(g.ratio)} | {_format_ratio(g.eager_ratio)} "
            f"| {'yes' if g.met else '**no**'} | {g.device} ({g.date}) | {_mode(g.quick)} "
            f"| {g.runs} |"
            for g in goals
        ]
        lines.append("")
    measured = {g.goal for g in goals}
    missing = [goal.name for goal in KERNEL_GOALS if goal.name not in measured]
    if missing:
        lines += [f"Not measured on a GPU yet: {'; '.join(missing)}.", ""]
    return lines


def render_markdown(
    rows: Sequence[Row],
    not_run: Sequence[tuple[str, str, str, str]],
    plots: Mapping[str, str],
    sources: Sequence[str],
    goals: Sequence[GoalRow] = (),
) -> str:
    """RESULTS.md: the kernel goals (:func:`kernel_goal_rows`), a table per subsystem, its
    plots (relative paths), then what did not run."""
    lines = [
        "# Benchmark results",
        "",
        "Generated by `bitscale bench report` from "
        + ", ".join(f"`bench/results/{s}`" for s in sources)
        + ". Do not edit by hand; reproduce with `bitscale bench run [--quick]` and "
        "`bitscale bench report` (see bench/README.md).",
        "",
        "Every number is a median: over the timed rounds of one run, then over the runs of "
        "the newest day on that device. "
        "**ratio** = how many times better bitscale is than the baseline measured in the "
        "same run (> 1: bitscale wins; for times, baseline median / bitscale median). "
        "**of limit** = achieved throughput / the physical limit named next to it. "
        "*quick* runs use reduced sizes and are only comparable with other quick runs.",
        "",
        *_render_goals(goals),
    ]
    by_subsystem: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_subsystem[row.subsystem].append(row)
    not_run_by_subsystem: dict[str, list[tuple[str, str, str, str]]] = defaultdict(list)
    for item in not_run:
        not_run_by_subsystem[item[0]].append(item)
    known = [s.value for s in Subsystem]
    order = known + sorted((set(by_subsystem) | set(not_run_by_subsystem)) - set(known))
    for subsystem in order:
        subsystem_rows = by_subsystem.get(subsystem, [])
        skipped = not_run_by_subsystem.get(subsystem, [])
        if not subsystem_rows and not skipped:
            continue
        lines += [f"## {subsystem}", ""]
        if subsystem_rows:
            lines += [
                "| group | case | provider | metric | value | baseline | baseline value "
                "| ratio | of limit | limit | device | mode | runs x rounds | note |",
                "|---|---|---|---|---:|---|---:|---:|---:|---|---|---|---:|---|",
            ]
            for r in subsystem_rows:
                lines.append(
                    "| "
                    + " | ".join(
                        cell.replace("|", "/")
                        for cell in [
                            r.group,
                            r.case,
                            r.provider,
                            r.metric,
                            _format_value(r.value, r.unit),
                            r.baseline or "-",
                            _format_value(r.baseline_value, r.unit),
                            _format_ratio(r.ratio),
                            "-" if r.ratio_to_limit is None else f"{r.ratio_to_limit:.1%}",
                            r.limit_name or "-",
                            f"{r.device} ({r.date})",
                            _mode(r.quick),
                            f"{r.runs} x {r.rounds}" if r.rounds else f"{r.runs}",
                            r.note,
                        ]
                    )
                    + " |"
                )
            lines.append("")
        for group in sorted({r.group for r in subsystem_rows}):
            plot = plots.get(_plot_file(subsystem, group))
            if plot:
                lines += [f"![{subsystem} {group}]({plot})", ""]
        if skipped:
            lines += ["Not run or failed (latest run per device):", ""]
            lines += [
                f"- `{test}`: **{outcome}**, {message}" for _, test, outcome, message in skipped
            ]
            lines.append("")
    if not rows and not not_run:
        lines += ["No results yet: run `bitscale bench run --quick`.", ""]
    return "\n".join(lines)


def render_plots(rows: Sequence[Row], plot_dir: Path) -> list[str]:
    """One PNG per (subsystem, group); returns the file names written.

    Groups whose rows carry ``x`` become ratio-vs-x lines (speedup vs M, vs context),
    one line per series (and baseline), device and mode. Other groups become bars of
    each provider's median (e.g. stall per checkpoint), every baseline's bar labelled with
    bitscale's ratio to it.
    """
    from matplotlib.figure import Figure

    by_group: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for row in rows:
        by_group[(row.subsystem, row.group)].append(row)
    written = []
    for (subsystem, group), group_rows in sorted(by_group.items()):
        fig = Figure(figsize=(7, 4.2), layout="constrained")
        ax = fig.subplots()
        with_x = [r for r in group_rows if r.x is not None and r.ratio is not None]
        if with_x:
            several_baselines = len({r.baseline for r in with_x}) > 1
            lines: dict[str, list[Row]] = defaultdict(list)
            for r in with_x:
                versus = f" vs {r.baseline}" if several_baselines else ""
                lines[f"{r.series or r.provider}{versus} ({r.device}, {_mode(r.quick)})"].append(r)
            for label, line_rows in sorted(lines.items()):
                line_rows.sort(key=lambda r: r.x)
                ax.plot(
                    [r.x for r in line_rows], [r.ratio for r in line_rows], marker="o", label=label
                )
            xs = [r.x for r in with_x]
            if min(xs) > 0 and max(xs) / min(xs) >= 8:
                ax.set_xscale("log", base=2)
            ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
            x_name = with_x[0].x_name or "x"
            ax.set_xlabel(x_name)
            versus = "baseline" if several_baselines else (with_x[0].baseline or "baseline")
            ax.set_ylabel(f"ratio to {versus} (> 1: bitscale better)")
            ax.set_title(f"{subsystem} / {group}: speedup vs {x_name}", fontsize=9)
        else:
            tags = {(r.case, r.device, r.quick) for r in group_rows}
            shared = len(tags) == 1
            # (provider, case, device, mode) -> (label, value, color, text at the bar's
            # end); bitscale once per case, then each baseline with bitscale's ratio to it.
            bars: dict[tuple, tuple[str, float, str, str]] = {}
            for r in group_rows:
                where = (r.case, r.device, r.quick)
                tag = (
                    ""
                    if shared
                    else "\n" + textwrap.fill(f"{r.case} ({r.device}, {_mode(r.quick)})", width=48)
                )
                ratio = "" if r.ratio is None else f"bitscale {_format_ratio(r.ratio)}"
                if r.baseline_value is None:
                    bars[(r.provider, *where)] = (f"{r.provider}{tag}", r.value, "tab:blue", ratio)
                    continue
                bars.setdefault(
                    (r.provider, *where), (f"{r.provider}{tag}", r.value, "tab:blue", "")
                )
                bars[(r.baseline, *where)] = (
                    f"{r.baseline}{tag}",
                    r.baseline_value,
                    "tab:gray",
                    ratio,
                )
            labels = [bar[0] for bar in bars.values()]
            values = [bar[1] for bar in bars.values()]
            colors = [bar[2] for bar in bars.values()]
            ratios = [bar[3] for bar in bars.values()]
            lines_per_bar = max(label.count("\n") + 1 for label in labels)
            fig.set_size_inches(8, max(4.2, 1.2 + 0.22 * lines_per_bar * len(labels)))
            unit = group_rows[0].unit
            scale, suffix = (1e3, "ms") if unit == "s" else (1.0, unit)
            bars = ax.barh(range(len(values)), [v * scale for v in values], color=colors)
            ax.bar_label(bars, ratios, padding=3, fontsize=8)
            ax.set_yticks(range(len(values)), labels, fontsize=8)
            ax.invert_yaxis()
            metric = group_rows[0].metric
            ax.set_xlabel("median time (ms)" if metric == "time" else f"{metric} ({suffix})")
            ax.margins(x=0.12)  # room for the ratio labels
            title = f"{subsystem} / {group}"
            if shared:
                case, device, quick = next(iter(tags))
                title += "\n" + textwrap.shorten(f"{case} ({device}, {_mode(quick)})", width=90)
            ax.set_title(title, fontsize=9)
        if with_x:
            ax.legend(fontsize=7)
        name = _plot_file(subsystem, group)
        plot_dir.mkdir(parents=True, exist_ok=True)
        # No metadata: the PNG bytes depend only on the data, so re-rendering is a no-op diff.
        save_figure(fig, plot_dir / name, dpi=110, metadata={"Software": None})
        written.append(name)
    return written


def write_report(repo: Path) -> Path:
    """Render bench/results/*.json into bench/RESULTS.md and bench/results/plots/*.png."""
    results_dir = repo / "bench" / "results"
    documents = load_results(results_dir)
    rows = build_rows(documents)
    plot_dir = results_dir / "plots"
    for stale in plot_dir.glob("*.png"):
        stale.unlink()
    written = render_plots(rows, plot_dir)
    plots = {name: f"results/plots/{name}" for name in written}
    sources = sorted(p.name for p in results_dir.glob("*.json"))
    markdown = render_markdown(
        rows, _not_run(documents), plots, sources, kernel_goal_rows(documents)
    )
    out = repo / "bench" / "RESULTS.md"
    _atomic_write_text(out, markdown)
    return out


# ---------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", metavar="{run,report,goals}", required=True)
    run = sub.add_parser(
        "run",
        help="run the benchmarks and append to bench/results/",
        description="Run pytest-benchmark over bench/ and append the run to\n"
        "bench/results/<device>-<date>.json, also when some benchmarks fail.",
        epilog="examples:\n  bitscale bench run --quick\n  bitscale bench run --only kernels"
        " --repeat 3\n  bitscale bench run --quick -- -k lazy",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "--quick",
        action="store_true",
        help="reduced sizes and rounds: the whole suite in a few minutes on 2 CPU cores",
    )
    run.add_argument(
        "--only",
        action="append",
        choices=[s.value for s in Subsystem],
        default=[],
        help="run only this subsystem's benchmarks (repeatable; default: all)",
    )
    run.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the suite this many times; the report takes medians over runs "
        "(default: %(default)s)",
    )
    run.add_argument(
        "pytest_args",
        nargs=argparse.REMAINDER,
        help="after `--`: extra pytest arguments, e.g. -- -k lazy",
    )
    sub.add_parser(
        "report",
        help="render bench/results/*.json into bench/RESULTS.md and plots",
        description="Render every bench/results/*.json into bench/RESULTS.md and "
        "bench/results/plots/*.png. docs/benchmarks.md explains how to read it.",
    )
    sub.add_parser(
        "goals",
        help="print the kernel goals against bench/results/*.json (RESULTS.md's first table)",
        description="Print the kernel goals table: each goal, the GPU case it covers, its "
        "CUDA-graph ratio against bf16 and whether it is met.",
    )


def main(args: argparse.Namespace) -> int:
    try:
        repo = find_repo_root(Path.cwd())
        if args.bench_command == "report":
            out = write_report(repo)
            print(f"wrote {out.relative_to(repo)}")
            return 0
        if args.bench_command == "goals":
            documents = load_results(repo / "bench" / "results")
            print("\n".join(_render_goals(kernel_goal_rows(documents))))
            return 0
        if args.repeat < 1:
            raise BenchError(f"--repeat must be >= 1, got {args.repeat}")
        pytest_args = [a for a in args.pytest_args if a != "--"]
        worst = 0
        for _ in range(args.repeat):
            path, exit_code = run_suite(
                repo,
                quick=args.quick,
                only=[Subsystem(name) for name in dict.fromkeys(args.only)],
                pytest_args=pytest_args,
            )
            if path is None:
                print(f"pytest exited with {exit_code}; no run recorded", file=sys.stderr)
                return exit_code
            print(f"appended a run to {path.relative_to(repo)} (pytest exit code {exit_code})")
            worst = max(worst, exit_code)
        print("render it: bitscale bench report")
        return worst
    except BenchError as exc:
        print(f"bitscale bench: {exc}", file=sys.stderr)
        return 2
