"""The on-disk autotune cache: its file logic, and the autotuner reading it instead of
timing candidates (in the interpreter, with the timing stubbed: timing needs a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from bitscale.kernels import _autotune_cache as cache
from bitscale.kernels import bipolar_linear, dequantize, quantize

triton = pytest.importorskip("triton", reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONTEXT = cache.TuningContext("_kernel", "NVIDIA H100 80GB HBM3", "9.0", "3.9.0", "ab" * 32)


def _zero_counters(named_args: dict) -> None:
    """A stand-in pre-launch hook."""


def _configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=3),
        triton.Config(
            {"BLOCK_M": 16, "BLOCK_N": 32, "SPLIT_K": 4},
            num_warps=4,
            num_stages=3,
            pre_hook=_zero_counters,
        ),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "SWAP_AB": True}, num_warps=8, num_stages=4),
    ]


def _entry(configs: list[triton.Config], chosen: int) -> dict:
    records = [cache.config_record(config) for config in configs]
    timings = {i: [float(i + 1), float(i), float(i + 2)] for i in range(len(configs))}
    timings[2] = [float("inf")] * 3  # a candidate that failed to build
    return {
        "candidates": cache.candidates_digest(records),
        "choice": records[chosen],
        "timings_ms": cache.timings_record(timings, records),
    }


def test_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path))
    assert cache.autotune_cache_dir() == tmp_path / "autotune"
    monkeypatch.delenv(cache.CACHE_DIR_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.autotune_cache_dir() == tmp_path / "home" / ".cache" / "bitscale" / "autotune"


def test_every_context_field_names_its_own_file() -> None:
    names = {CONTEXT.file_name()}
    for field, other in (
        ("kernel", "_other_kernel"),
        ("device", "NVIDIA H100 PCIe"),
        ("capability", "8.0"),
        ("triton", "3.6.0"),
        ("source", "cd" * 32),
    ):
        names.add(cache.TuningContext(**{**CONTEXT.__dict__, field: other}).file_name())
    assert len(names) == 6
    assert CONTEXT.file_name() == cache.TuningContext(**CONTEXT.__dict__).file_name()
    assert CONTEXT.file_name().startswith("_kernel-")


def test_a_recorded_choice_reads_back_only_for_its_key_and_candidates(tmp_path: Path) -> None:
    configs = _configs()
    entry = _entry(configs, chosen=1)
    cache.record(tmp_path, CONTEXT, "(1, 4096, 'torch.bfloat16')", entry)
    found = cache.lookup(tmp_path, CONTEXT, "(1, 4096, 'torch.bfloat16')", entry["candidates"])
    assert found == json.loads(json.dumps(entry))
    assert (
        cache.lookup(tmp_path, CONTEXT, "(2, 4096, 'torch.bfloat16')", entry["candidates"]) is None
    )
    fewer = cache.candidates_digest([cache.config_record(c) for c in configs[:2]])
    assert cache.lookup(tmp_path, CONTEXT, "(1, 4096, 'torch.bfloat16')", fewer) is None
    newer_triton = cache.TuningContext(**{**CONTEXT.__dict__, "triton": "3.10.0"})
    assert cache.lookup(tmp_path, newer_triton, "(1, 4096, 'torch.bfloat16')", fewer) is None


def test_the_choice_matches_back_to_the_live_config_with_its_hook() -> None:
    configs = _configs()
    entry = json.loads(json.dumps(_entry(configs, chosen=1)))
    live = _configs()  # new objects, as in another process
    chosen, timings = cache.match_choice(entry, [cache.config_record(c) for c in live])
    assert live[chosen] == configs[1] and live[chosen].pre_hook is _zero_counters
    assert timings == {0: [1.0, 0.0, 2.0], 1: [2.0, 1.0, 3.0], 2: [float("inf")] * 3}
    # Reordered candidates: the same config by its record, not its position.
    reordered = [live[2], live[1], live[0]]
    assert cache.match_choice(entry, [cache.config_record(c) for c in reordered])[0] == 1


@pytest.mark.parametrize(
    "change",
    [
        lambda entry: entry["choice"]["kwargs"].update(BLOCK_N=48),
        lambda entry: entry["choice"].update(pre_hook=None),
        lambda entry: entry["timings_ms"][0][0].update(num_warps=2),
        lambda entry: entry.pop("timings_ms"),
        lambda entry: entry.update(choice="BLOCK_M=16"),
    ],
    ids=["unknown-tile", "hook-dropped", "unknown-timed-tile", "no-timings", "malformed"],
)
def test_an_entry_that_does_not_fit_the_candidates_is_not_trusted(
    change: Callable[[dict], None],
) -> None:
    configs = _configs()
    entry = json.loads(json.dumps(_entry(configs, chosen=1)))
    change(entry)
    assert cache.match_choice(entry, [cache.config_record(c) for c in configs]) is None


def test_a_corrupt_file_is_ignored_with_a_warning_and_rewritten(tmp_path: Path) -> None:
    entry = _entry(_configs(), chosen=0)
    path = tmp_path / CONTEXT.file_name()
    path.write_text('{"version": 1, "entries": {"(1,)": {"candi')
    with pytest.warns(RuntimeWarning, match="corrupt"):
        assert cache.lookup(tmp_path, CONTEXT, "(1,)", entry["candidates"]) is None
    cache.record(tmp_path, CONTEXT, "(1,)", entry)
    assert cache.lookup(tmp_path, CONTEXT, "(1,)", entry["candidates"]) is not None


def test_another_format_version_is_ignored_with_a_warning(tmp_path: Path) -> None:
    entry = _entry(_configs(), chosen=0)
    cache.record(tmp_path, CONTEXT, "(1,)", entry)
    path = tmp_path / CONTEXT.file_name()
    document = json.loads(path.read_text())
    document["version"] = cache.FORMAT_VERSION + 1
    path.write_text(json.dumps(document))
    with pytest.warns(RuntimeWarning, match="format version"):
        assert cache.lookup(tmp_path, CONTEXT, "(1,)", entry["candidates"]) is None
    cache.record(tmp_path, CONTEXT, "(2,)", entry)
    assert json.loads(path.read_text())["version"] == cache.FORMAT_VERSION
    assert set(json.loads(path.read_text())["entries"]) == {"(2,)"}


def test_a_failed_write_leaves_the_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = _entry(_configs(), chosen=0)
    cache.record(tmp_path, CONTEXT, "(1,)", entry)
    path = tmp_path / CONTEXT.file_name()
    before = path.read_bytes()

    def disk_full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.warns(RuntimeWarning, match="could not be written"):
        cache.record(tmp_path, CONTEXT, "(2,)", entry)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, path.name + ".lock"])


_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from bitscale.kernels import _autotune_cache as cache

    folder, name, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    ready = folder / f"ready-{name}"
    context = cache.TuningContext("_kernel", "device", "9.0", "3.9.0", "ab" * 32)
    entry = {"candidates": "d", "choice": {"kwargs": {"BLOCK_M": 16}}, "timings_ms": []}
    ready.touch()
    deadline = time.monotonic() + 60
    while not go.exists():
        assert time.monotonic() < deadline, "no start signal"
        time.sleep(0.001)
    for i in range(40):
        cache.record(folder, context, f"({name}, {i})", entry)
        assert cache.lookup(folder, context, f"({name}, {i})", "d") == entry
    """
)


def test_two_processes_writing_at_once_keep_every_entry(tmp_path: Path) -> None:
    """Two writers merge 40 entries each into one file at the same time; with warnings as
    errors, neither ever reads a corrupt file, and no entry is lost."""
    go = tmp_path / "go"
    writers = [
        subprocess.Popen(
            [sys.executable, "-W", "error", "-c", _WRITER, str(tmp_path), name, str(go)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("'a'", "'b'")
    ]
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready-{name}").exists() for name in ("'a'", "'b'")):
            assert time.monotonic() < deadline, "the writers did not start"
            assert all(writer.poll() is None for writer in writers), writers[0].stderr
            time.sleep(0.01)
        go.touch()
        errors = [writer.communicate(timeout=120)[1] for writer in writers]
    finally:
        for writer in writers:
            writer.kill()
    assert [writer.returncode for writer in writers] == [0, 0], errors
    writers_context = cache.TuningContext("_kernel", "device", "9.0", "3.9.0", "ab" * 32)
    document = json.loads((tmp_path / writers_context.file_name()).read_text())
    expected = {f"({name}, {i})" for name in ("'a'", "'b'") for i in range(40)}
    assert set(document["entries"]) == expected
    assert not list(tmp_path.glob(".*.tmp"))


def test_every_autotuned_kernel_consults_the_cache() -> None:
    from bitscale.kernels import triton_a16, triton_bitplane, triton_gemm
    from bitscale.kernels._autotune_cache import CachedAutotuner

    for kernel in (
        triton_a16._bipolar_a16_kernel,
        triton_gemm._bipolar_gemm_kernel,
        triton_bitplane._bipolar_bitplane_kernel,
    ):
        assert isinstance(kernel, CachedAutotuner) and kernel.cache_results


def test_a_single_candidate_is_neither_timed_nor_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bitscale.kernels import triton_a16

    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path))
    tuner = cache.autotune(_configs(), key=["M_BUCKET"])(triton_a16._bipolar_a16_kernel.fn)
    only = _configs()[1]

    def bench() -> None:
        raise AssertionError("a single candidate was timed")

    assert tuner.check_disk_cache((1,), [only], bench)
    assert tuner.cache[(1,)] is only
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_the_a16_kernel_reads_its_choice_back_instead_of_timing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fp32_error_bound: Callable
) -> None:
    """The A16 kernel's autotuner, rebuilt on three candidates with the timing stubbed:
    a first tuner times them and records the split-K tile (whose pre-launch hook keeps
    Triton's own cache away); a second, as in a new process, reads that back without
    timing anything, runs the same tile, pre-launch hook included, and gives the same
    outputs bit for bit. A hand-edited entry is not trusted: a third tuner re-times."""
    from bitscale.kernels import triton_a16
    from bitscale.kernels._triton_common import tile_config

    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path))
    kernel = triton_a16._bipolar_a16_kernel
    tiles = [(16, 16, 64, 4, 3), (16, 16, 64, 4, 3, 8), (16, 32, 64, 4, 3)]
    timed = []

    def tuner(timings: list[float]) -> object:
        def stub_bench(kernel_call: Callable, quantiles: tuple) -> list[float]:
            timed.append(timings[len(timed) % len(timings)])
            return [timed[-1]] * len(quantiles)

        configs = [tile_config(tile) for tile in tiles]
        built = cache.autotune(
            configs,
            key=kernel.keys,
            prune_configs_by={"early_config_prune": kernel.early_config_prune},
            do_bench=stub_bench,
        )(kernel.fn)
        monkeypatch.setattr(triton_a16, "_bipolar_a16_kernel", built)
        return built

    generator = torch.Generator().manual_seed(23)
    x = torch.randn(3, 200, generator=generator)
    w = quantize(torch.randn(33, 200, generator=generator), 3)
    torch_empty = torch.empty

    def run() -> torch.Tensor:
        # Stale arrival counters (5s): only the split tile's pre-launch hook zeroes them.
        def stale_int32_empty(*args: object, **kwargs: object) -> torch.Tensor:
            tensor = torch_empty(*args, **kwargs)
            return tensor.fill_(5) if tensor.dtype == torch.int32 else tensor

        with monkeypatch.context() as patch:
            patch.setattr(torch, "empty", stale_int32_empty)
            return bipolar_linear(x.to(DEVICE), w.to(DEVICE), backend="triton").cpu()

    first_tuner = tuner([2.0, 1.0, 3.0])  # the split-K tile wins
    first = run()
    assert len(timed) == 3
    assert first_tuner.best_config.kwargs.get("SPLIT_K") == 8
    w_dequantized = dequantize(w)
    expected = x.double() @ w_dequantized.double().t()
    assert ((first.double() - expected).abs() <= fp32_error_bound(x, w_dequantized)).all()

    timed.clear()
    second_tuner = tuner([1.0, 2.0, 3.0])  # would pick another tile if it timed
    second = run()
    assert timed == []
    assert second_tuner.best_config in second_tuner.configs
    assert second_tuner.best_config.pre_hook is not None
    assert second_tuner.best_config.kwargs.get("SPLIT_K") == 8
    assert torch.equal(second, first)

    (path,) = (tmp_path / "autotune").glob("_bipolar_a16_kernel-*.json")
    document = json.loads(path.read_text())
    (entry,) = document["entries"].values()
    entry["choice"]["kwargs"]["BLOCK_N"] = 48
    path.write_text(json.dumps(document))
    third_tuner = tuner([1.0, 2.0, 3.0])
    with pytest.warns(RuntimeWarning, match="not among the candidates"):
        run()
    assert len(timed) == 3
    assert third_tuner.best_config.kwargs.get("SPLIT_K") is None
    (entry,) = json.loads(path.read_text())["entries"].values()
    assert entry["choice"]["kwargs"] == {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64}
