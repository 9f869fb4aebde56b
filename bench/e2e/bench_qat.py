"""QAT's cost: ``bitscale train --quant w4a8`` against the same run without it.

    .venv/bin/pytest bench/e2e/bench_qat.py --benchmark-only [--quick]

Both runs go through ``bitscale.train.train`` in this process (one rank, HDP schedule, the
default data and token budget, the same seed, so the same batches and initial weights); the
recorded ratio is the float run's median step time over the QAT run's, steps after the
first two (warm-up) only. Issue 22's goals: QAT steady-state step <= 1.3x the bf16 step on a
GPU (it was 15-19 s against 0.43 s on an H200, --model medium), <= 1.5x on CPU; first step
<= 30 s. The note gives the first QAT step and the final-loss gap, so speed is not bought
with quality.
"""

from __future__ import annotations

import statistics
from typing import Any

import pytest

_WARMUP_STEPS = 2


def _run(model: str, steps: int, quant: str | None, precision: str | None) -> dict[str, float]:
    import torch

    from bitscale.train import TrainConfig, train

    config = TrainConfig(
        model=model, steps=steps, schedule="hdp", quant=quant, precision=precision, progress=False
    )
    threads = torch.get_num_threads()
    if not torch.cuda.is_available():
        # One intra-op thread: on a shared 2-core machine a second one waits on OpenMP
        # barriers for a descheduled sibling (see tests/e2e).
        torch.set_num_threads(1)
    try:
        _, records = train(config)["hdp"]
    finally:
        torch.set_num_threads(threads)
    times = [r.time_s for r in records]
    return {
        "median_step_s": statistics.median(times[_WARMUP_STEPS:]),
        "first_step_s": times[0],
        "final_loss": records[-1].loss,
    }


def _compare(bench_record: Any, benchmark: Any, model: str, steps: int, precision: str | None):
    results: dict[str, dict[str, float]] = {}

    def run() -> None:
        results["float"] = _run(model, steps, None, precision)
        results["qat"] = _run(model, steps, "w4a8", precision)

    benchmark.pedantic(run, rounds=1, iterations=1)
    plain, qat = results["float"], results["qat"]
    bench_record(
        baseline=f"no QAT ({precision or 'device default'})",
        case=f"{model} GPT, w4a8 QAT, {steps} steps",
        shape={"model": model, "steps": steps, "precision": precision},
        metric="median step time",
        value=qat["median_step_s"],
        baseline_value=plain["median_step_s"],
        unit="s",
        higher_is_better=False,
        ratio=plain["median_step_s"] / qat["median_step_s"],
        qat_first_step_s=qat["first_step_s"],
        loss_gap=qat["final_loss"] - plain["final_loss"],
        note=(
            f"first QAT step {qat['first_step_s']:.2f} s; final loss {qat['final_loss']:.3f} "
            f"vs {plain['final_loss']:.3f} without QAT"
        ),
    )


@pytest.mark.benchmark(group="QAT step cost")
def test_qat_step_cost_cpu(benchmark: Any, bench_record: Any, quick: bool) -> None:
    """Goal: ratio >= 1 / 1.5 = 0.67 on CPU."""
    _compare(bench_record, benchmark, "tiny" if quick else "small", 6 if quick else 12, None)


@pytest.mark.benchmark(group="QAT step cost")
@pytest.mark.gpu
def test_qat_step_cost_gpu(benchmark: Any, bench_record: Any) -> None:
    """Goal: ratio >= 1 / 1.3 = 0.77 against bf16, the issue's --model medium."""
    _compare(bench_record, benchmark, "medium", 10, "bf16")
