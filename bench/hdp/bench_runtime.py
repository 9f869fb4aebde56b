"""Measured HDP steps vs static-mesh steps on 4 gloo ranks (CPU), same processes, same batches.

    .venv/bin/pytest bench/hdp/bench_runtime.py --benchmark-only [--quick]
    .venv/bin/python bench/hdp/bench_runtime.py        # prints the table

Each round runs one global batch through ``HDPRunner`` twice from the same processes and
weights: planned by ``plan_static_mesh`` (CP sized for the longest document, every document
zigzag-sharded over the CP ring) and by ``plan_batch`` (HDP), alternating which goes first.
Lengths are Wikipedia document lengths divided by 4 (a CPU-sized model), clipped to
[16, 4 * capacity], with one document of 4 * capacity per batch so the static mesh needs CP 4.
Recorded: median step time (HDP vs static), per-rank busy time (seconds inside forward /
backward, ring waits included) and its max/mean, ring bytes counted by the runtime.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from bitscale.hdp import CostModel, HDPRunner, plan_batch, plan_static_mesh
from bitscale.hdp.tiny_model import TinyTransformer

from bitscale.testing import run_on_ranks

WIKIPEDIA = Path("/work/shared/data/wikipedia_lengths.txt")
WORLD = 4
CAPACITY = 512
TOKENS_PER_BATCH = 4 * WORLD * CAPACITY
MODEL = dict(vocab_size=256, dim=64, heads=4, kv_heads=2, layers=2, mlp_dim=128)
COST = CostModel(num_layers=2, kv_heads=2, head_dim=16, element_size=4)


def _batches(num: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    if WIKIPEDIA.exists():
        pool = [int(x) for x in WIKIPEDIA.read_text().split()[:200_000]]
    else:
        pool = [max(1, int(rng.lognormvariate(6.0, 1.6))) for _ in range(200_000)]
    batches = []
    for _ in range(num):
        lengths = [4 * CAPACITY]
        while sum(lengths) < TOKENS_PER_BATCH:
            lengths.append(min(max(16, rng.choice(pool) // 4), 4 * CAPACITY))
        rng.shuffle(lengths)
        batches.append(lengths)
    return batches


def _bench_on_ranks(rank: int, world_size: int, rounds: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = TinyTransformer(**MODEL)
    runner = HDPRunner(model)
    gen = torch.Generator().manual_seed(1)
    records: dict[str, list[dict[str, Any]]] = {"hdp": [], "static": []}
    for index, lengths in enumerate(_batches(rounds + 1)):
        batch = [torch.randint(0, MODEL["vocab_size"], (n,), generator=gen) for n in lengths]
        order = ("hdp", "static") if index % 2 else ("static", "hdp")
        for strategy in order:
            if strategy == "hdp":
                plan = plan_batch(lengths, world_size, CAPACITY, cost=COST)
            else:
                plan = plan_static_mesh(lengths, world_size, CAPACITY, cost=COST)
            dist.barrier()
            started = time.perf_counter()
            result = runner.step(batch, plan)
            step = torch.tensor([time.perf_counter() - started])
            dist.all_reduce(step, op=dist.ReduceOp.MAX)
            if index == 0:
                continue  # warm-up round
            records[strategy].append(
                {
                    "step_s": step.item(),
                    "busy_s": result.busy_time,
                    "ring_bytes": sum(result.ring_kv_bytes) + sum(result.ring_dkv_bytes),
                    "plan_ring_bytes": plan.stats.ring_bytes,
                    "plan_balance": plan.stats.balance,
                    "micro_batches": plan.stats.micro_batches,
                    "sequences": len(lengths),
                }
            )
    return records


def _summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    busy = [statistics.median(r["busy_s"][k] for r in records) for k in range(WORLD)]
    return {
        "step_s": statistics.median(r["step_s"] for r in records),
        "busy_s": busy,
        "busy_max_over_mean": max(busy) / (sum(busy) / len(busy)),
        "ring_bytes": statistics.median(r["ring_bytes"] for r in records),
        "ring_bytes_match_plan": all(r["ring_bytes"] == r["plan_ring_bytes"] for r in records),
        "plan_balance": statistics.median(r["plan_balance"] for r in records),
        "micro_batches": records[-1]["micro_batches"],
    }


def measure(rounds: int) -> dict[str, dict[str, Any]]:
    records = run_on_ranks(_bench_on_ranks, WORLD, rounds, timeout=1800)[0]
    return {strategy: _summary(r) for strategy, r in records.items()}


@pytest.mark.benchmark(group="hdp_runtime")
def test_hdp_step_vs_static_on_4_gloo_ranks(benchmark, bench_record, quick: bool) -> None:  # type: ignore[no-untyped-def]
    rounds = 2 if quick else 5
    summary = benchmark.pedantic(measure, args=(rounds,), rounds=1, iterations=1)
    hdp, static = summary["hdp"], summary["static"]
    assert hdp["ring_bytes_match_plan"] and static["ring_bytes_match_plan"]
    bench_record(
        baseline="static mesh",
        case=f"4 gloo ranks, capacity {CAPACITY}, {TOKENS_PER_BATCH} tokens/step, {rounds} rounds",
        metric="median step time",
        value=hdp["step_s"],
        baseline_value=static["step_s"],
        unit="s",
        higher_is_better=False,
        hdp=hdp,
        static=static,
        note=(
            f"busy max/mean HDP {hdp['busy_max_over_mean']:.2f} vs static "
            f"{static['busy_max_over_mean']:.2f}; ring bytes HDP/static "
            f"{hdp['ring_bytes'] / max(1, static['ring_bytes']):.3f}"
        ),
    )


def main() -> None:
    rounds = 2 if os.environ.get("BITSCALE_BENCH_QUICK") == "1" else 5
    summary = measure(rounds)
    print(
        f"{WORLD} gloo ranks, capacity {CAPACITY}, {TOKENS_PER_BATCH} tokens/step, {rounds} rounds"
    )
    for strategy, s in summary.items():
        busy = " ".join(f"{b:.2f}" for b in s["busy_s"])
        print(
            f"{strategy:>6}: step {s['step_s']:.2f} s | busy per rank [{busy}] s "
            f"max/mean {s['busy_max_over_mean']:.2f} | ring {s['ring_bytes'] / 1e6:.1f} MB "
            f"(= plan: {s['ring_bytes_match_plan']}) | plan balance {s['plan_balance']:.2f} | "
            f"micro-batches {s['micro_batches']}"
        )
    print(f"step time static / HDP: {summary['static']['step_s'] / summary['hdp']['step_s']:.2f}x")


if __name__ == "__main__":
    main()
