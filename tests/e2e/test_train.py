"""End-to-end: the real ``bitscale train`` command on 2 to 4 local gloo processes."""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from bitscale.checkpoint import latest_step, list_steps, verify

from bitscale.train import DEMO_ARGS

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def _losses(run: dict) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in run["steps"]}


def _with_steps(args: tuple[str, ...], steps: int) -> list[str]:
    out = list(args)
    out[out.index("--steps") + 1] = str(steps)
    return out


def test_demo_command_with_fewer_steps(
    tmp_path: Path, run_train, read_metrics, record_property
) -> None:
    """The README's `make demo` command, verbatim except --steps (10 = one checkpoint).

    HDP must train faster than the static mesh on the default data. The full demo measured
    HDP / static = 1.24 tokens/s on this 2-core machine; on 2 cores shared with other test
    processes the margin over 1.2 is not safe, so this asserts > 1.0 and records the ratio
    (junit property hdp_over_static_tokens_per_s)."""
    steps = int(DEMO_ARGS[DEMO_ARGS.index("--ckpt-every") + 1])
    result = run_train([*_with_steps(DEMO_ARGS, steps), "--no-progress"], cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = read_metrics(tmp_path / "runs/demo/metrics.json")
    assert set(metrics["runs"]) == {"hdp", "static"}
    for name, run in metrics["runs"].items():
        losses = _losses(run)
        assert sorted(losses) == list(range(1, steps + 1)), name
        assert losses[steps] < losses[1] - 0.3, (name, losses)
        assert all(len(r["busy_s"]) == 2 for r in run["steps"])
        assert run["summary"]["saves"] == 1
        assert latest_step(tmp_path / "runs/demo/ckpt" / name) == steps
    assert (tmp_path / "runs/demo/train.png").stat().st_size > 10_000
    assert "tokens/s" in result.stdout and "hdp (2 proc)" in result.stdout
    summaries = {name: run["summary"] for name, run in metrics["runs"].items()}
    ratio = summaries["hdp"]["tokens_per_s"] / summaries["static"]["tokens_per_s"]
    record_property("hdp_over_static_tokens_per_s", round(ratio, 3))
    print(f"demo: HDP / static tokens/s = {ratio:.3f}")
    assert ratio > 1.0, summaries
    # Same batches: the schedules differ in where tokens run, not in what is trained.
    assert summaries["hdp"]["model_flops_per_token"] == summaries["static"]["model_flops_per_token"]
    assert summaries["hdp"]["mfu"] is None and "n/a" in result.stdout  # no peak for a CPU


def test_four_processes_hdp_equals_static_in_float64(
    tmp_path: Path, run_train, read_metrics, small_args
) -> None:
    """Same batches, two schedules (different items, ranks, rings): the same loss at every
    step to float64 round-off, and the loss goes down."""
    args = [*small_args, "--nproc", "4", "--steps", "8", "--schedule", "both"]
    args += ["--precision", "float64", "--metrics", "m.json"]
    result = run_train(args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = read_metrics(tmp_path / "m.json")["runs"]
    hdp, static = _losses(runs["hdp"]), _losses(runs["static"])
    assert sorted(hdp) == sorted(static) == list(range(1, 9))
    for step in hdp:
        assert math.isclose(hdp[step], static[step], rel_tol=1e-10, abs_tol=0), step
    assert hdp[8] < hdp[1] - 0.3, hdp
    # Every K/V and dK/dV byte the rings sent was planned, and nothing else was sent.
    for name, run in runs.items():
        for record in run["steps"]:
            assert record["ring_bytes"] == record["planned_ring_bytes"] > 0, (name, record)
    # The two schedules really ran different plans: HDP keeps short documents on one rank.
    assert sum(r["ring_bytes"] for r in runs["hdp"]["steps"]) < sum(
        r["ring_bytes"] for r in runs["static"]["steps"]
    )


def test_compile_with_hdp_compiles_once(tmp_path: Path, run_train, read_metrics, small_args):
    """--compile on 2 processes: the token count changes every micro-batch (packed documents
    and ring shards), yet every graph is built in the first step and none after. With
    activation checkpointing and bf16 on too: rings still send exactly the planned bytes
    (bf16 K/V, float32 dK/dV; attention is never recomputed)."""
    args = [*small_args, "--nproc", "2", "--steps", "3", "--compile", "--metrics", "m.json"]
    args += ["--activation-checkpointing", "--precision", "bf16"]  # the GPU configuration
    result = run_train(args, cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = read_metrics(tmp_path / "m.json")["runs"]["hdp"]["steps"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert steps[0]["graphs_compiled"] >= 1
    assert [r["graphs_compiled"] for r in steps[1:]] == [0, 0], steps
    # Different micro-batch sizes did run: both packed documents and rings.
    assert all(r["ring_bytes"] == r["planned_ring_bytes"] > 0 for r in steps)
    assert "compiled blocks, activation checkpointing" in result.stdout


def test_kill_9_then_resume_on_other_process_counts(
    tmp_path: Path, run_train, start_ranks, read_metrics, small_args
) -> None:
    """SIGKILL every rank of a 2-process job mid-run; the newest committed step loads on 3
    processes (universal resharding) and on 2 (bitwise), and both continue exactly where an
    uninterrupted run goes."""
    common = [*small_args, "--precision", "float64", "--ckpt-every", "2"]
    ckpt = tmp_path / "ckpt"
    ranks = start_ranks(2, [*common, "--steps", "1000", "--ckpt-dir", str(ckpt)], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while (latest_step(ckpt) or 0) < 4:
            assert time.monotonic() < deadline, "no checkpoint at step 4 within 120 s"
            assert all(p.poll() is None for p in ranks), [p.communicate()[0] for p in ranks]
            time.sleep(0.05)
    finally:
        for process in ranks:
            process.kill()
            process.wait()
    safe = latest_step(ckpt)
    assert safe is not None and 4 <= safe < 1000
    verify(ckpt, safe)
    end = safe + 4

    reference = run_train(
        [*common, "--nproc", "2", "--steps", str(end), "--metrics", "ref.json"], cwd=tmp_path
    )
    assert reference.returncode == 0, reference.stdout + reference.stderr
    expected = _losses(read_metrics(tmp_path / "ref.json")["runs"]["hdp"])

    for world in (3, 2):
        copy = tmp_path / f"ckpt-{world}"
        shutil.copytree(ckpt, copy)
        args = [*common, "--nproc", str(world), "--steps", str(end), "--ckpt-dir", str(copy)]
        result = run_train([*args, "--resume", "--metrics", f"resumed-{world}.json"], cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"resumed from step {safe}" in result.stdout
        resumed = _losses(read_metrics(tmp_path / f"resumed-{world}.json")["runs"]["hdp"])
        assert sorted(resumed) == list(range(safe + 1, end + 1))
        for step, loss in resumed.items():
            if world == 2:
                assert loss == expected[step], (step, loss, expected[step])
            else:
                assert math.isclose(loss, expected[step], rel_tol=1e-10, abs_tol=0), step
        assert latest_step(copy) == end


def test_sigint_commits_the_pending_checkpoint_and_names_the_safe_step(
    tmp_path: Path, start_train, small_args
) -> None:
    ckpt = tmp_path / "ckpt"
    process = start_train(
        [
            *small_args,
            "--nproc",
            "2",
            "--steps",
            "1000",
            "--ckpt-dir",
            str(ckpt),
            "--ckpt-every",
            "2",
        ],
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 120
        while (latest_step(ckpt) or 0) < 2:
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            assert process.poll() is None, process.communicate()[0]
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, output
    safe = latest_step(ckpt)
    assert safe is not None
    assert f"step {safe} is committed and safe" in output, output
    assert "stopped by SIGINT after step" in output, output
    verify(ckpt, safe)
    # Nothing half-written is left next to the committed steps.
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        ["LATEST", *(f"step-{s:08d}" for s in list_steps(ckpt))]
    )
