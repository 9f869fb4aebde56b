"""Issue 5 goals table: speedup HDP / static mesh, balance and each technique's factor for
7B / 70B / 141B-MoE-like models at 256K..2M context on 1,024 / 4,096 / 12,288 GPUs, plus the
wall time of one 16,384-GPU step.

    .venv/bin/python bench/hdp/simulate_goals.py [--gpus 1024,4096,12288] [--json out.json]

Workload: the Byted-like long tail (80 % <= 4K, 0.05 % >= 2M, cut at the context), global
batch of 4 x capacity tokens per rank, one sampled step per point (seed 0).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

from bitscale.hdp.simulate import MODELS, PRESETS, ClusterConfig, Strategy, simulate

MODEL_SETUPS = {
    # model: (tensor_parallel, capacity or None = from memory)
    "llama-7b": (1, 16384),
    "llama-70b": (8, None),
    "moe-141b": (8, None),
}
CONTEXTS = (256 * 1024, 512 * 1024, 1024 * 1024, 2048 * 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", default="1024,4096,12288")
    parser.add_argument("--models", default=",".join(MODEL_SETUPS))
    parser.add_argument("--json", help="also write all reports here")
    args = parser.parse_args()
    base = PRESETS["llama-7b-2m"]
    rows = []
    print(
        f"{'model':10s}{'GPUs':>7s}{'ctx':>6s}{'C':>7s}{'CP':>5s}{'static s':>10s}{'hdp s':>9s}"
        f"{'x hdp':>7s}{'x pow2':>7s}{'x +off':>7s}{'bal st':>8s}{'bal hdp':>8s}"
        f"{'x rings':>8s}{'x bal':>7s}{'x off':>7s}{'sim s':>7s}"
    )
    for model in args.models.split(","):
        tp, capacity = MODEL_SETUPS[model]
        for gpus in (int(g) for g in args.gpus.split(",")):
            for context in CONTEXTS:
                config = replace(
                    base,
                    model=MODELS[model],
                    cluster=ClusterConfig(num_gpus=gpus, tensor_parallel=tp),
                    workload=replace(base.workload, max_context=context),
                    capacity=capacity,
                )
                start = time.perf_counter()
                try:
                    report = simulate(config)
                except ValueError as error:
                    print(f"{model:10s}{gpus:7d}{context // 1024:5d}K  skipped: {error}")
                    continue
                elapsed = time.perf_counter() - start
                # Each technique's factor: step time before it / after it (ablation order).
                factor = {row["strategy"]: row["step_speedup"] for row in report.ablation()}
                r = report.results
                print(
                    f"{model:10s}{gpus:7d}{context // 1024:5d}K{report.capacity:7d}"
                    f"{report.static_cp:5d}{r['static'].step_time:10.1f}{r['hdp'].step_time:9.1f}"
                    f"{report.speedup(Strategy.HDP):7.2f}{report.speedup(Strategy.HDP_POW2):7.2f}"
                    f"{report.speedup(Strategy.HDP_OFFLOAD):7.2f}{r['static'].balance:8.3f}"
                    f"{r['hdp'].balance:8.3f}{factor['hdp-no-balance']:8.2f}{factor['hdp']:7.2f}"
                    f"{factor['hdp-offload']:7.2f}{elapsed:7.1f}",
                    flush=True,
                )
                rows.append({"model": model, "gpus": gpus, "context": context, **report.as_dict()})
    config = replace(base, cluster=ClusterConfig(num_gpus=16384))
    start = time.process_time()
    report = simulate(config, [Strategy.STATIC, Strategy.HDP])
    print(
        f"16,384 GPUs, llama-7b 2M, static + hdp: {time.process_time() - start:.1f} s CPU "
        f"(plan: static {report.results['static'].plan_seconds:.1f} s, hdp "
        f"{report.results['hdp'].plan_seconds:.1f} s wall), speedup {report.speedup('hdp'):.2f}x"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
