"""Simulated HDP speedup over the static DP x CP mesh vs maximum context (the report's
"speedup vs context" plot).

    .venv/bin/pytest bench/hdp/bench_simulate.py --benchmark-only [--quick]

`bitscale.hdp.simulate` plans each sampled global batch with both planners under the cost
model of the ``llama-7b-2m`` preset (7B, 1,024 GPUs in the simulator's fast mode, capacity
16K tokens per rank) and the Byted-like long-tail length distribution cut at each context.
Each point records the simulated step time of HDP (``ceil`` rings + balance scheduler)
against the static mesh (CP fixed for the context) as an untimed metric; the timed median
is the simulator's own wall time. Full runs average 3 sampled steps (the fast mode) over
256K..2M; quick runs simulate one step at 256K, 1M and 2M (~1.5 s on 2 CPU cores).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from bitscale.hdp.simulate import PRESETS, Strategy, fast_mode, simulate

PRESET = "llama-7b-2m"
K = 1024
CONTEXTS = [
    pytest.param(256 * K, id="256K"),
    pytest.param(512 * K, id="512K", marks=pytest.mark.full_only),
    pytest.param(1024 * K, id="1M"),
    pytest.param(2048 * K, id="2M"),
]


@pytest.mark.benchmark(group="hdp simulated speedup vs context")
@pytest.mark.parametrize("context", CONTEXTS)
def test_simulated_speedup_vs_context(benchmark, bench_record, quick: bool, context: int) -> None:  # type: ignore[no-untyped-def]
    base = fast_mode(PRESETS[PRESET])
    config = replace(
        base,
        workload=replace(base.workload, max_context=context),
        steps=1 if quick else base.steps,
    )
    report = benchmark.pedantic(
        simulate, args=(config, [Strategy.STATIC, Strategy.HDP]), rounds=1, warmup_rounds=0
    )
    static = report.results[Strategy.STATIC.value]
    hdp = report.results[Strategy.HDP.value]
    bench_record(
        provider="bitscale",
        baseline="static mesh",
        case=(
            f"simulated {PRESET}, {config.cluster.num_gpus} GPUs, longtail lengths, "
            f"context {context // K}K, {config.steps} step(s)"
        ),
        shape={"gpus": config.cluster.num_gpus, "capacity": report.capacity, "context": context},
        x_name="context",
        x=context,
        series="hdp (ceil)",
        metric="simulated step time",
        value=hdp.step_time,
        baseline_value=static.step_time,
        unit="s",
        higher_is_better=False,
        static_cp=report.static_cp,
        balance=hdp.balance,
        static_balance=static.balance,
        note=(
            f"simulated: static mesh (CP {report.static_cp}) {static.step_time:.2f} s, "
            f"hdp {hdp.step_time:.2f} s per step; balance {static.balance:.2f} -> "
            f"{hdp.balance:.2f}"
        ),
    )
