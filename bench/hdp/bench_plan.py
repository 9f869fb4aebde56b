"""Planner speed: HDP ``plan_batch`` at cluster scale, with the static-mesh planner as the
baseline in the same run.

    .venv/bin/pytest bench/hdp/bench_plan.py --benchmark-only

Goals (issue 4): 1,024 ranks x 10K sequences well under 50 ms; 16,384 ranks x 100K sequences
under 1 s. Lengths are Wikipedia document lengths (cut at 256K) when the data file exists,
else a seeded lognormal long tail.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from bitscale.hdp.plan import plan_batch, plan_static_mesh

WIKIPEDIA = Path("/work/shared/data/wikipedia_lengths.txt")
CAPACITY = 16384


def _lengths(num: int) -> list[int]:
    rng = random.Random(num)
    if WIKIPEDIA.exists():
        pool = [int(x) for x in WIKIPEDIA.read_text().split()]
        return [min(rng.choice(pool), 262144) for _ in range(num)]
    return [min(max(1, int(rng.lognormvariate(6.0, 1.6))), 262144) for _ in range(num)]


@pytest.mark.benchmark(group="hdp_plan")
@pytest.mark.parametrize("planner", ["hdp", "static"])
@pytest.mark.parametrize(("world", "num"), [(1024, 10_000), (16384, 100_000)])
def test_plan_speed(benchmark, planner: str, world: int, num: int) -> None:  # type: ignore[no-untyped-def]
    lengths = _lengths(num)
    fn = plan_batch if planner == "hdp" else plan_static_mesh
    plan = benchmark.pedantic(fn, args=(lengths, world, CAPACITY), rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(
        world=world,
        sequences=num,
        capacity=CAPACITY,
        items=len(plan.items),
        balance=plan.stats.balance,
        ring_bytes=plan.stats.ring_bytes,
    )
