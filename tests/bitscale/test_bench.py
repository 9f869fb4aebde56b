"""`bitscale bench`: result-file naming, pairing and medians, rendering, and one real run."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bitscale.bench import (
    RESULTS_VERSION,
    BenchError,
    Limit,
    Subsystem,
    append_run,
    build_rows,
    device_slug,
    find_repo_root,
    kernel_goal_rows,
    known_gpu_peaks,
    ratio_to_baseline,
    render_markdown,
    results_path,
    run_suite,
    write_report,
)
from bitscale.cli import main

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_device_slug_and_results_path() -> None:
    assert device_slug(["NVIDIA H100 80GB HBM3"], 16) == "nvidia-h100-80gb-hbm3"
    assert device_slug(["NVIDIA H200"] * 8, 16) == "nvidia-h200-x8"
    assert device_slug([], 2) == "cpu-2core"
    with pytest.raises(ValueError, match="cpu_count"):
        device_slug([], 0)
    path = results_path(Path("bench/results"), "cpu-2core", dt.date(2026, 11, 26))
    assert path == Path("bench/results/cpu-2core-2026-11-26.json")
    with pytest.raises(ValueError, match="slug"):
        results_path(Path("r"), "NVIDIA H100", dt.date(2026, 1, 1))


def test_known_gpu_peaks() -> None:
    sxm = known_gpu_peaks("NVIDIA H100 80GB HBM3")
    assert sxm is not None and sxm.model == "H100 SXM" and sxm.hbm_bytes_per_s == 3.35e12
    assert known_gpu_peaks("NVIDIA H100 PCIe").model == "H100 PCIe"  # type: ignore[union-attr]
    assert known_gpu_peaks("NVIDIA H100 NVL").model == "H100 NVL"  # type: ignore[union-attr]
    h200 = known_gpu_peaks("NVIDIA H200")
    assert h200 is not None and h200.hbm_bytes_per_s == 4.8e12
    assert (h200.bf16_flops, h200.int8_ops) == (989.5e12, 1979e12)
    assert known_gpu_peaks("NVIDIA A100 80GB PCIe").model == "A100 80GB PCIe"  # type: ignore[union-attr]
    assert known_gpu_peaks("NVIDIA A100-SXM4-80GB").model == "A100 80GB SXM"  # type: ignore[union-attr]
    assert known_gpu_peaks("NVIDIA GeForce RTX 4090") is None
    limit = sxm.limit("bf16")
    assert (limit.value, limit.unit, limit.source) == (989.5e12, "FLOP/s", "datasheet")
    with pytest.raises(ValueError, match="limit kind"):
        sxm.limit("fp4")
    with pytest.raises(ValueError, match="> 0"):
        Limit(name="x", value=0.0, unit="B/s", source="datasheet")


def test_ratio_direction() -> None:
    # Times: bitscale 2 s vs baseline 6 s is a 3x speedup.
    assert ratio_to_baseline(2.0, 6.0, higher_is_better=False) == 3.0
    assert ratio_to_baseline(2.0, 6.0, higher_is_better=True) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="positive"):
        ratio_to_baseline(0.0, 1.0, higher_is_better=False)


def _bench(
    name: str, median: float, extra: dict[str, Any], *, group: str = "g", rounds: int = 5
) -> dict[str, Any]:
    return {
        "group": group,
        "name": name,
        "fullname": f"bench/kernels/bench_mm.py::{name}",
        "params": None,
        "extra_info": {"subsystem": "kernels", **extra},
        "stats": {"median": median, "rounds": rounds},
    }


def _document(
    device: str, runs: list[list[dict[str, Any]]], *, quick: bool = True, date: str = "2026-11-26"
) -> dict:
    return {
        "version": RESULTS_VERSION,
        "device": device,
        "date": date,
        "runs": [{"quick": quick, "benchmarks": b, "outcomes": []} for b in runs],
    }


def _paired_run(bitscale_s: float, baseline_s: float, m: int) -> list[dict[str, Any]]:
    case = {"case": f"M={m}", "x_name": "M", "x": m, "series": "W4"}
    return [
        _bench(f"test_mm[bitscale-{m}]", bitscale_s, {"baseline": "torch fp32", **case}),
        _bench(f"test_mm[torch-{m}]", baseline_s, {"provider": "torch fp32", **case}),
    ]


def test_pairing_and_medians_over_runs() -> None:
    # Three runs: per-run speedups 2x, 3x, 10x -> the row's ratio is their median 3x,
    # its value the median of bitscale's per-run medians (not a single run's time).
    runs = [_paired_run(1.0, 2.0, 16), _paired_run(2.0, 6.0, 16), _paired_run(0.5, 5.0, 16)]
    (row,) = build_rows([_document("cpu-2core", runs)])
    assert (row.provider, row.baseline, row.case) == ("bitscale", "torch fp32", "M=16")
    assert row.ratio == 3.0
    assert row.value == 1.0 and row.baseline_value == 5.0
    assert (row.runs, row.rounds, row.x, row.series) == (3, 5, 16.0, "W4")


def test_every_baseline_of_a_case_gets_a_row() -> None:
    run = [
        _bench("test_stall[bitscale]", 0.1, {"baseline": "torch.save", "note": "ours"}),
        _bench("test_stall[torch.save]", 0.4, {"provider": "torch.save"}),
        _bench("test_stall[dcp]", 0.3, {"provider": "dcp.async_save", "note": "theirs"}),
        _bench("test_stall[none]", 0.05, {"provider": "no checkpoint", "reference": True}),
    ]
    rows = build_rows([_document("cpu-2core", [run])])
    assert [(r.provider, r.baseline, r.ratio) for r in rows] == [
        ("bitscale", "dcp.async_save", pytest.approx(3.0)),
        ("bitscale", "torch.save", pytest.approx(4.0)),
        ("no checkpoint", None, None),
    ]
    assert rows[0].note == "ours; dcp.async_save: theirs"


def test_rows_keep_devices_and_modes_apart() -> None:
    documents = [
        _document("cpu-2core", [_paired_run(1.0, 2.0, 1)], quick=True),
        _document("cpu-2core", [_paired_run(1.0, 4.0, 1)], quick=False),
        _document("nvidia-h100-80gb-hbm3", [_paired_run(1.0, 8.0, 1)], quick=False),
    ]
    rows = build_rows(documents)
    assert sorted((r.device, r.quick, r.ratio) for r in rows) == [
        ("cpu-2core", False, 4.0),
        ("cpu-2core", True, 2.0),
        ("nvidia-h100-80gb-hbm3", False, 8.0),
    ]


def test_only_the_newest_day_counts() -> None:
    older = _document("cpu-2core", [_paired_run(1.0, 9.0, 1)] * 3, date="2026-11-25")
    newer = _document("cpu-2core", [_paired_run(1.0, 2.0, 1)], date="2026-11-26")
    (row,) = build_rows([older, newer])
    assert (row.ratio, row.runs, row.date) == (2.0, 1, "2026-11-26")


def test_recorded_ratios_and_untimed_metrics() -> None:
    side_by_side = _bench(
        "test_cmp",
        1.0,
        {
            "baseline": "torch.save",
            "ratio_to_baseline": 4.0,
            "baseline_median_s": 4.2,
            "ratio_to_limit": 0.5,
            "limit_name": "disk",
        },
    )
    metric = _bench(
        "test_balance",
        0.01,
        {"baseline": "static", "metric": "max/mean", "value": 1.05, "baseline_value": 1.26},
    )
    unpaired = _bench("test_lonely", 1.0, {"provider": "raw write"}, group="alone")
    rows = {
        r.name: r for r in build_rows([_document("cpu-2core", [[side_by_side, metric, unpaired]])])
    }
    # A ratio measured inside the benchmark wins over one recomputed from medians.
    assert rows["test_cmp"].ratio == 4.0 and rows["test_cmp"].baseline_value == 4.2
    assert rows["test_cmp"].ratio_to_limit == 0.5 and rows["test_cmp"].limit_name == "disk"
    assert rows["test_balance"].metric == "max/mean" and rows["test_balance"].rounds == 0
    assert rows["test_balance"].ratio == pytest.approx(1.26 / 1.05)
    assert rows["test_lonely"].ratio is None and rows["test_lonely"].provider == "raw write"


def test_gpu_cases_show_their_cuda_graph_times() -> None:
    """Eager medians of GPU kernels include the host's launch path; the kernel-only
    CUDA-graph times they record go into the row's note (medians over runs)."""
    runs = [
        [
            _bench(
                "test_gpu_mm",
                100e-6,
                {
                    "baseline": "torch.matmul bf16",
                    "graph_seconds": graph_s,
                    "graph_baseline_seconds": {"torch.matmul bf16": baseline_s, "other": 1.0},
                },
            )
        ]
        for graph_s, baseline_s in ((10e-6, 11e-6), (12e-6, 12e-6), (20e-6, 30e-6))
    ]
    (row,) = build_rows([_document("nvidia-h100", runs)])
    assert row.note == "CUDA graph: 12 µs vs 12 µs (1.10x)"
    (plain,) = build_rows([_document("cpu-2core", [[_bench("test_cpu", 1.0, {})]])])
    assert plain.note == ""


def _gpu_case(series: str, m: int, ratio: float, *, eager: float = 0.5) -> dict[str, Any]:
    """A GPU kernel case as bench/kernels records it: bf16's CUDA-graph time ``ratio``
    times bitscale's."""
    return _bench(
        f"test_gpu_linear[{m}-{series}]",
        20e-6,
        {
            "case": f"M={m} N=4096 K=4096 {series}",
            "shape": {"M": m, "N": 4096, "K": 4096},
            "series": series,
            "baseline": "torch.matmul bf16",
            "ratio_to_baseline": eager,
            "graph_seconds": 10e-6,
            "graph_baseline_seconds": {"torch.matmul bf16": ratio * 10e-6, "bit planes": 1.0},
        },
    )


def test_kernel_goals_read_the_cuda_graph_ratios() -> None:
    """Each goal covers its series and rows (W8A8 from M = 1024), judged on the median
    CUDA-graph ratio of the newest day; the floor keeps each series' slowest case; cases
    without a bf16 graph time (the expansion crossover, CPU runs) count for none."""
    day = [
        _gpu_case("W4A16", 1, 3.2),
        _gpu_case("W4A16", 16, 0.9),
        _gpu_case("W2A16", 1, 4.0),
        _gpu_case("W8A8", 256, 1.1),
        _gpu_case("W8A8", 4096, 1.5),
        _gpu_case("W4A4 bit-plane", 16, 0.1),
    ]
    crossover = _gpu_case("W4A16 expanded", 256, 0.1)
    crossover["extra_info"]["graph_baseline_seconds"] = {"planes in the K loop": 1e-6}
    second_run = [_gpu_case("W4A16", 1, 2.6)]  # the W4A16 M = 1 median: 2.9x over 3 runs
    third_run = [_gpu_case("W4A16", 1, 2.9)]
    older = _gpu_case("W1A16", 1, 9.0)  # an older day: older code, not counted
    documents = [
        _document("nvidia-h100", [[older]], quick=False, date="2026-11-25"),
        _document("nvidia-h100", [[*day, crossover], second_run, third_run], quick=False),
        _document("cpu-2core", [[_bench("test_cpu_linear", 1.0, {"series": "W4A16"})]]),
    ]
    rows = kernel_goal_rows(documents)
    verdicts = [(r.goal, r.case.split(" N=")[0], round(r.ratio, 2), r.met) for r in rows]
    assert verdicts == [
        ("W4A16 >= 3x at M = 1", "M=1", 2.9, False),
        ("W2A16 >= 5x at M = 1", "M=1", 4.0, False),
        ("W8A8 >= 1.3x at M >= 1024", "M=4096", 1.5, True),
        ("never slower than bf16", "M=1", 4.0, True),  # W2A16's only case
        ("never slower than bf16", "M=16", 0.9, False),  # W4A16's slowest
        ("never slower than bf16", "M=256", 1.1, True),  # W8A8's slowest
    ]
    first = rows[0]
    assert (first.runs, first.eager_ratio, first.date, first.quick) == (3, 0.5, "2026-11-26", False)
    markdown = render_markdown([], [], {}, ["nvidia-h100-2026-11-26.json"], rows)
    assert (
        "| W4A16 >= 3x at M = 1 | M=1 N=4096 K=4096 W4A16 | 2.90x | 0.50x | **no** "
        "| nvidia-h100 (2026-11-26) | full | 3 |" in markdown
    )
    assert "Not measured on a GPU yet: W1A16 >= 7x at M = 1." in markdown


def test_bench_goals_prints_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bitscale bench goals`: the goals table alone, on stdout, writing nothing."""
    repo = _fake_repo(tmp_path)
    document = _document("nvidia-h100", [[_gpu_case("W1A16", 1, 7.5)]], quick=False)
    (repo / "bench" / "results" / "nvidia-h100-2026-11-26.json").write_text(json.dumps(document))
    monkeypatch.chdir(repo)
    assert main(["bench", "goals"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("## Kernel goals")
    assert "| W1A16 >= 7x at M = 1 | M=1 N=4096 K=4096 W1A16 | 7.50x | 0.50x | yes |" in out
    assert "| never slower than bf16 | M=1 N=4096 K=4096 W1A16 | 7.50x |" in out
    assert "Not measured on a GPU yet: W4A16 >= 3x at M = 1; W2A16 >= 5x at M = 1;" in out
    assert not (repo / "bench" / "RESULTS.md").exists()


def _fake_repo(root: Path) -> Path:
    (root / "bench" / "results").mkdir(parents=True)
    (root / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    shutil.copy(REPO / "bench" / "conftest.py", root / "bench" / "conftest.py")
    return root


def test_report_renders_markdown_and_pngs(tmp_path: Path) -> None:
    repo = _fake_repo(tmp_path)
    runs = [_paired_run(1.0, 3.0, m) for m in (1, 16, 256)]
    document = _document("cpu-2core", [[b for run in runs for b in run]])
    stall = [
        _bench(
            "test_stall[bitscale]",
            0.01,
            {"baseline": "torch.save", "case": "200MB", "note": "2% | of step"},
            group="stall",
        ),
        _bench(
            "test_stall[torch.save]",
            0.5,
            {"provider": "torch.save", "case": "200MB"},
            group="stall",
        ),
    ]
    for bm in stall:
        bm["extra_info"]["subsystem"] = "checkpoint"
    document["runs"][0]["benchmarks"] += stall
    document["runs"][0]["outcomes"] = [
        {"test": "bench.kernels.bench_mm::test_gpu", "subsystem": "kernels", "outcome": "skipped",
         "message": "needs a CUDA device; this machine has none"},
        *({"test": f"bench.kernels.bench_mm::test_big[{m}]", "subsystem": "kernels",
           "outcome": "failed", "message": "RuntimeError: out of memory\ntraceback"}
          for m in (1, 2)),
        {"test": "bench.kernels.bench_mm::test_once[3]", "subsystem": "kernels",
         "outcome": "skipped", "message": "full run only"},
    ]  # fmt: skip
    (repo / "bench" / "results" / "cpu-2core-2026-11-26.json").write_text(json.dumps(document))
    out = write_report(repo)
    text = out.read_text()
    assert "## kernels" in text and "## checkpoint" in text and "## hdp" not in text
    assert (
        "| g | M=256 | bitscale | time | 1 s | torch fp32 | 3 s | 3.00x | - | - | cpu-2core (2026-11-26) |"
        in text
    )
    assert "| stall | 200MB | bitscale | time | 10 ms | torch.save | 500 ms | 50.00x |" in text
    assert "| 1 x 5 | 2% / of step |" in text  # a "|" inside a cell would split the row
    assert "`bench.kernels.bench_mm::test_gpu`: **skipped**, cpu-2core: needs a CUDA" in text
    assert (
        "`bench.kernels.bench_mm::test_big (2 cases)`: **failed**, cpu-2core: RuntimeError" in text
    )
    assert "`bench.kernels.bench_mm::test_once[3]`: **skipped**" in text
    plots = sorted(p.name for p in (repo / "bench" / "results" / "plots").iterdir())
    assert plots == ["checkpoint-stall.png", "kernels-g.png"]
    for name in plots:
        assert f"(results/plots/{name})" in text
        assert (repo / "bench" / "results" / "plots" / name).read_bytes()[:8] == PNG_SIGNATURE


def test_append_run_keeps_earlier_runs(tmp_path: Path) -> None:
    path = tmp_path / "cpu-2core-2026-11-26.json"
    append_run(path, {"quick": True}, device="cpu-2core", date=dt.date(2026, 11, 26))
    append_run(path, {"quick": False}, device="cpu-2core", date=dt.date(2026, 11, 26))
    document = json.loads(path.read_text())
    assert document["version"] == RESULTS_VERSION and document["device"] == "cpu-2core"
    assert [r["quick"] for r in document["runs"]] == [True, False]
    path.write_text(json.dumps({"version": 99, "runs": []}))
    with pytest.raises(BenchError, match="version 99"):
        append_run(path, {}, device="cpu-2core", date=dt.date(2026, 11, 26))
    assert json.loads(path.read_text())["version"] == 99  # refused, not overwritten


def test_repo_is_found_from_a_subfolder_or_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = _fake_repo(tmp_path / "checkout")
    (repo / "bench" / "kernels").mkdir()
    assert find_repo_root(repo / "bench" / "kernels") == repo.resolve()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with pytest.raises(BenchError, match="run `bitscale bench` from inside a checkout"):
        find_repo_root(outside)
    monkeypatch.chdir(outside)
    assert main(["bench", "report"]) == 2
    assert "no bench/ suite" in capsys.readouterr().err
    monkeypatch.chdir(repo)
    assert main(["bench", "run", "--only", "kernels"]) == 2
    assert "has no bench_*.py files" in capsys.readouterr().err


def _load_conftest() -> Any:
    spec = importlib.util.spec_from_file_location("_bench_conftest", REPO / "bench" / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_record_helper_writes_the_convention() -> None:
    conftest = _load_conftest()
    benchmark = SimpleNamespace(extra_info={})
    limit = Limit(name="disk", value=100.0, unit="B/s", source="measured in-run")
    conftest.record(benchmark, baseline="torch.save", case="c", achieved=80.0, limit=limit)
    assert benchmark.extra_info["ratio_to_limit"] == 0.8
    assert (
        benchmark.extra_info["limit_name"] == "disk"
        and benchmark.extra_info["provider"] == "bitscale"
    )
    conftest.record(benchmark, metric="balance", value=1.0, baseline="static", baseline_value=1.5)
    assert benchmark.extra_info["ratio_to_baseline"] == 1.5
    with pytest.raises(ValueError, match="both `achieved` and `limit`"):
        conftest.record(benchmark, achieved=1.0)
    conftest.record(benchmark, provider="no checkpoint", reference=True)
    assert benchmark.extra_info["reference"] is True
    with pytest.raises(ValueError, match="reference=True marks a non-bitscale"):
        conftest.record(benchmark, reference=True)
    with pytest.raises(ValueError, match="is a baseline"):
        conftest.record(benchmark, provider="torch.save", baseline="torch.save")


_TOY_BENCH = """
from __future__ import annotations
import pytest
import torch


@pytest.mark.benchmark(group="toy")
@pytest.mark.parametrize("m", [4, 32])
def test_side_by_side(bench_compare, limits, quick, m):
    assert quick
    x, w = torch.randn(m, 64), torch.randn(64, 64)
    result = bench_compare(lambda: x @ w, lambda: torch.matmul(x.double(), w.double()),
                           baseline_name="fp64", rounds=5, case=f"M={m}", x_name="M", x=m,
                           work=(2 * m * 64 + 64 * 64) * 4, limit=limits.memory_bandwidth())
    assert result.ratio == result.baseline_median_s / result.bitscale_median_s


def test_recorded(benchmark, bench_record, limits, tmp_path):
    benchmark(lambda: None)
    disk = limits.disk_write_bandwidth(tmp_path)
    bench_record(metric="balance", value=1.0, baseline="static", baseline_value=2.0,
                 achieved=disk.value / 2, limit=disk)


@pytest.mark.gpu
def test_on_gpu(benchmark):
    benchmark(lambda: None)


@pytest.mark.full_only
def test_big(benchmark):
    benchmark(lambda: None)
"""


def test_run_suite_end_to_end(tmp_path: Path) -> None:
    repo = _fake_repo(tmp_path)
    (repo / "bench" / "kernels").mkdir()
    (repo / "bench" / "kernels" / "bench_toy.py").write_text(_TOY_BENCH)
    now = dt.datetime(2026, 11, 26, 11, 20, tzinfo=dt.UTC)
    path, exit_code = run_suite(
        repo,
        quick=True,
        only=[Subsystem.KERNELS],
        now=now,
        pytest_args=["-q", "--benchmark-max-time=0.02"],
    )
    assert exit_code == 0
    assert path is not None and path.parent == repo / "bench" / "results"
    assert path.name.endswith("-2026-11-26.json") and path.name.startswith(("cpu-", "nvidia-"))
    (run,) = json.loads(path.read_text())["runs"]
    assert run["quick"] is True and run["only"] == ["kernels"] and run["env"]["torch"]
    by_name = {b["name"]: b for b in run["benchmarks"]}
    assert len(by_name) == len(run["benchmarks"]), "a benchmark was collected twice"
    assert sorted(by_name) == ["test_recorded", "test_side_by_side[32]", "test_side_by_side[4]"]
    info = by_name["test_side_by_side[4]"]["extra_info"]
    assert (
        info["subsystem"] == "kernels" and info["device"] == path.name[: -len("-2026-11-26.json")]
    )
    assert info["quick"] is True and info["baseline"] == "fp64" and info["ratio_to_baseline"] > 0
    assert info["limit_source"] == "measured in-run" and info["ratio_to_limit"] > 0
    assert len(by_name["test_side_by_side[4]"]["stats"]["data"]) == 5
    assert by_name["test_recorded"]["extra_info"]["ratio_to_limit"] == 0.5
    outcomes = {o["test"].split("::")[-1]: o for o in run["outcomes"]}
    assert outcomes["test_big"]["outcome"] == "skipped"
    assert "full run only" in outcomes["test_big"]["message"]
    import torch

    if not torch.cuda.is_available():
        assert outcomes["test_on_gpu"]["outcome"] == "skipped"
        assert "needs a CUDA device" in outcomes["test_on_gpu"]["message"]
    rows = build_rows([json.loads(path.read_text())])
    assert {r.name for r in rows} == set(by_name)
