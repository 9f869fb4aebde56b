"""Planner quality on real Wikipedia length batches: HDP vs static DP x CP mesh.

Draws global batches of ``world * capacity * micro_batches`` tokens from
/work/shared/data/wikipedia_lengths.txt (documents sampled uniformly, seeded), plans each with
``plan_batch`` and ``plan_static_mesh`` under the default CostModel, and prints the estimated
balance (makespan / mean busy time) and ring bytes HDP / static. The static mesh's CP is
fixed for the run, sized for ``--max-len`` (Megatron-LM's launch-time
``--context-parallel-size`` must hold the longest document the loader yields), unless
``--static-cp`` is given; it assigns
documents as Megatron-LM does (``dp_balanced``: next-fit packs in dataset order dealt
round-robin to DP groups); ``balance_tok`` is the stronger token-balanced assignment, for
comparison.

    .venv/bin/python bench/hdp/wikipedia_plan.py [--world 64] [--capacity 32768] [--batches 20]
"""

from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path

from bitscale.hdp.plan import plan_batch, plan_static_mesh

DEFAULT_LENGTHS = Path("/work/shared/data/wikipedia_lengths.txt")


def sample_batch(lengths: list[int], tokens: int, max_len: int, rng: random.Random) -> list[int]:
    """Documents drawn uniformly (cut to max_len, as a loader truncates) until ``tokens``."""
    batch: list[int] = []
    total = 0
    while total < tokens:
        L = min(rng.choice(lengths), max_len)
        batch.append(L)
        total += L
    return batch


def _launch_cp(max_len: int, capacity: int) -> int:
    """Least power-of-two CP whose zigzag shards (2 * ceil(L / 2CP) slots) of max_len fit."""
    cp = 1
    while (max_len if cp == 1 else 2 * -(-max_len // (2 * cp))) > capacity:
        cp *= 2
    return cp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=Path, default=DEFAULT_LENGTHS)
    parser.add_argument("--world", type=int, default=64)
    parser.add_argument("--capacity", type=int, default=32768)
    parser.add_argument("--micro-batches", type=int, default=8, help="tokens per rank / capacity")
    parser.add_argument("--max-len", type=int, default=262144)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument(
        "--static-cp", type=int, help="static mesh CP (default: the least that holds --max-len)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lengths = [int(line) for line in args.lengths.read_text().split()]
    rng = random.Random(args.seed)
    static_cp = args.static_cp or _launch_cp(args.max_len, args.capacity)
    rows = []
    for _ in range(args.batches):
        batch = sample_batch(
            lengths, args.world * args.capacity * args.micro_batches, args.max_len, rng
        )
        hdp = plan_batch(batch, args.world, args.capacity)
        static = plan_static_mesh(batch, args.world, args.capacity, cp_size=static_cp)
        token_balanced = plan_static_mesh(
            batch, args.world, args.capacity, cp_size=static_cp, assignment="token_balanced"
        )
        cp = static.items[0].cp_size
        rows.append(
            (
                hdp.stats.balance,
                static.stats.balance,
                hdp.stats.ring_bytes / static.stats.ring_bytes if static.stats.ring_bytes else 0.0,
                static.stats.makespan / hdp.stats.makespan,
                cp,
                len(batch),
                token_balanced.stats.balance,
            )
        )
    print(
        f"world {args.world}, capacity {args.capacity}, {args.micro_batches} x capacity tokens "
        f"per rank, max_len {args.max_len}, {args.batches} batches"
    )
    print(
        "batch  docs  static_cp  balance_hdp  balance_static  ring_bytes_hdp/static  speedup_est"
        "  balance_tok"
    )
    for k, (bh, bs, ratio, speedup, cp, docs, bt) in enumerate(rows):
        print(
            f"{k:5d} {docs:5d} {cp:10d} {bh:12.4f} {bs:15.4f} {ratio:22.4%} {speedup:12.3f}"
            f" {bt:12.4f}"
        )
    cols = list(zip(*rows, strict=True))
    print(
        f"mean  balance_hdp {statistics.mean(cols[0]):.4f} (max {max(cols[0]):.4f})  "
        f"balance_static {statistics.mean(cols[1]):.4f} (min {min(cols[1]):.4f})  "
        f"ring_bytes_hdp/static {statistics.mean(cols[2]):.4%} (max {max(cols[2]):.4%})  "
        f"speedup {statistics.mean(cols[3]):.3f}  "
        f"balance_tok {statistics.mean(cols[6]):.4f} (min {min(cols[6]):.4f})"
    )


if __name__ == "__main__":
    main()
