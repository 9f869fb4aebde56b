"""End to end: `bitscale train` on this machine's ranks (2 processes).

- HDP vs the static DP x CP mesh: each round is one ``bitscale train --schedule both``
  run, in which the same processes train from the same initial state on the same global
  batches, first with HDP, then with the static mesh, so both see the same machine.
- Lazy checkpoints every step vs no checkpoints: each round runs the trainer without,
  then with ``--ckpt-dir --ckpt-every 1``.

A round's ratio is the baseline's median step time over bitscale's (the first step of
each run is warm-up and is left out); the recorded ratio is the median over rounds.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

_WARMUP_STEPS = 1


def _processes_and_env() -> tuple[int, dict[str, str], str]:
    """(process count, environment, where the ranks run) for this machine."""
    import torch

    env = dict(os.environ)
    if torch.cuda.device_count() >= 2:
        return 2, env, f"{torch.cuda.device_count()} GPUs, 2 used (NCCL)"
    # HDP needs at least two ranks to differ from static; with fewer than two GPUs the
    # ranks run on CPU (gloo), 2 processes sharing the cores.
    env["CUDA_VISIBLE_DEVICES"] = ""
    return 2, env, "CPU, 2 gloo processes"


def _median_step(steps: list[dict[str, Any]], key: str = "time_s") -> float:
    timed = steps[_WARMUP_STEPS:] or steps
    return statistics.median(s[key] for s in timed)


def _sizes(quick: bool) -> dict[str, int]:
    if quick:
        return {"steps": 4, "rounds": 1, "docs_per_step": 16, "max_len": 512}
    return {"steps": 20, "rounds": 3, "docs_per_step": 32, "max_len": 1024}


def _train(
    env: dict[str, str], nproc: int, sizes: dict[str, int], metrics: Path, *flags: str
) -> dict:
    """One ``bitscale train`` run; returns its --metrics document."""
    command = [
        sys.executable, "-m", "bitscale.cli", "train",
        "--nproc", str(nproc),
        "--model", "tiny",
        "--steps", str(sizes["steps"]),
        "--docs-per-step", str(sizes["docs_per_step"]),
        "--max-len", str(sizes["max_len"]),
        "--metrics", str(metrics),
        "--no-progress",
        *flags,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command[1:])} exited with {result.returncode}:\n{result.stderr[-4000:]}"
        )
    return json.loads(metrics.read_text())


def _case(nproc: int, sizes: dict[str, int]) -> str:
    return (
        f"tiny GPT, {nproc} ranks, {sizes['docs_per_step']} docs x <= {sizes['max_len']} "
        f"tokens, {sizes['steps']} steps"
    )


@pytest.mark.benchmark(group="train step: HDP vs static mesh")
def test_train_step_hdp_vs_static(
    benchmark: Any, bench_record: Any, quick: bool, tmp_path: Path
) -> None:
    nproc, env, where = _processes_and_env()
    sizes = _sizes(quick)
    documents: list[dict[str, Any]] = []

    def train_both() -> None:
        documents.append(_train(env, nproc, sizes, tmp_path / "m.json", "--schedule", "both"))

    benchmark.pedantic(train_both, rounds=sizes["rounds"], warmup_rounds=0, iterations=1)

    hdp = [_median_step(d["runs"]["hdp"]["steps"]) for d in documents]
    static = [_median_step(d["runs"]["static"]["steps"]) for d in documents]
    last = documents[-1]["runs"]
    balance = {name: last[name]["summary"]["mean_balance"] for name in ("hdp", "static")}
    bench_record(
        baseline="static mesh",
        case=_case(nproc, sizes),
        shape={"nproc": nproc, **sizes},
        metric="median step time",
        value=statistics.median(hdp),
        baseline_value=statistics.median(static),
        unit="s",
        higher_is_better=False,
        ratio=statistics.median(s / h for s, h in zip(static, hdp, strict=True)),
        rounds_of_both=len(documents),
        ranks_run_on=where,
        hdp_balance=balance["hdp"],
        static_balance=balance["static"],
        hdp_ring_bytes=last["hdp"]["summary"]["ring_bytes"],
        static_ring_bytes=last["static"]["summary"]["ring_bytes"],
        hdp_final_loss=last["hdp"]["summary"]["final_loss"],
        static_final_loss=last["static"]["summary"]["final_loss"],
        note=f"busy max/mean: HDP {balance['hdp']:.3f}, static {balance['static']:.3f}; {where}",
    )


@pytest.mark.benchmark(group="train step: lazy checkpoint every step")
def test_train_step_with_lazy_checkpoints(
    benchmark: Any, bench_record: Any, quick: bool, tmp_path: Path
) -> None:
    nproc, env, where = _processes_and_env()
    sizes = _sizes(quick)
    pairs: list[tuple[dict, dict]] = []

    def train_without_then_with() -> None:
        without = _train(env, nproc, sizes, tmp_path / "m0.json", "--schedule", "hdp")
        ckpt_dir = tmp_path / f"ckpt-{len(pairs)}"
        with_ckpt = _train(
            env, nproc, sizes, tmp_path / "m1.json",
            "--schedule", "hdp", "--ckpt-dir", str(ckpt_dir), "--ckpt-every", "1",
        )  # fmt: skip
        pairs.append((without["runs"]["hdp"], with_ckpt["runs"]["hdp"]))

    benchmark.pedantic(train_without_then_with, rounds=sizes["rounds"], warmup_rounds=0)

    plain = [_median_step(a["steps"]) for a, _ in pairs]
    checkpointed = [_median_step(b["steps"]) for _, b in pairs]
    stall = [_median_step(b["steps"], "ckpt_stall_s") for _, b in pairs]
    stall_fraction = statistics.median(s / t for s, t in zip(stall, checkpointed, strict=True))
    bench_record(
        baseline="no checkpoints",
        case=_case(nproc, sizes),
        shape={"nproc": nproc, **sizes},
        metric="median step time",
        value=statistics.median(checkpointed),
        baseline_value=statistics.median(plain),
        unit="s",
        higher_is_better=False,
        ratio=statistics.median(p / c for p, c in zip(plain, checkpointed, strict=True)),
        median_stall_per_checkpoint_s=statistics.median(stall),
        stall_fraction_of_step=stall_fraction,
        saves=pairs[-1][1]["summary"]["saves"],
        ranks_run_on=where,
        note=(
            f"stall per checkpoint {1e3 * statistics.median(stall):.1f} ms = "
            f"{stall_fraction:.2%} of the step; {where}"
        ),
    )
