"""Planner speed: HDP ``plan_batch`` at cluster scale, with the static-mesh planner as the
baseline in the same run.

    .venv/bin/pytest bench/hdp/bench_plan.py --benchmark-only [--quick]

Goals (issue 4): 1,024 ranks x 10K sequences well under 50 ms; 16,384 ranks x 100K sequences
under 1 s (full runs only: one round of both planners takes seconds on 2 CPU cores). Lengths
are Wikipedia document lengths (cut at 256K) when the data file exists, else a seeded
lognormal long tail.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from bitscale.hdp.plan import plan_batch, plan_static_mesh

WIKIPEDIA = Path("/work/shared/data/wikipedia_lengths.txt")
CAPACITY = 16384
PROVIDERS = {"hdp": "bitscale", "static": "static mesh"}


def _lengths(num: int) -> list[int]:
    rng = random.Random(num)
    if WIKIPEDIA.exists():
        pool = [int(x) for x in WIKIPEDIA.read_text().split()]
        return [min(rng.choice(pool), 262144) for _ in range(num)]
    return [min(max(1, int(rng.lognormvariate(6.0, 1.6))), 262144) for _ in range(num)]


@pytest.mark.benchmark(group="hdp_plan")
@pytest.mark.parametrize("planner", list(PROVIDERS))
@pytest.mark.parametrize(
    ("world", "num"),
    [
        pytest.param(1024, 10_000, id="1024x10K"),
        pytest.param(16384, 100_000, id="16384x100K", marks=pytest.mark.full_only),
    ],
)
def test_plan_speed(
    benchmark, bench_record, quick: bool, planner: str, world: int, num: int
) -> None:  # type: ignore[no-untyped-def]
    lengths = _lengths(num)
    fn = plan_batch if planner == "hdp" else plan_static_mesh
    plan = benchmark.pedantic(
        fn, args=(lengths, world, CAPACITY), rounds=3 if quick else 5, warmup_rounds=1
    )
    provider = PROVIDERS[planner]
    bench_record(
        provider=provider,
        baseline="static mesh" if provider == "bitscale" else None,
        case=f"{world} ranks x {num} sequences, capacity {CAPACITY}",
        shape={"world": world, "sequences": num, "capacity": CAPACITY},
        items=len(plan.items),
        balance=plan.stats.balance,
        ring_bytes=plan.stats.ring_bytes,
    )
