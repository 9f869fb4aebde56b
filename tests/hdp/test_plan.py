"""Planner invariants (bitscale.hdp.plan): coverage, capacity, minimal rings, zigzag layout,
determinism, deadlock-free order, exact stats, and input validation."""

from __future__ import annotations

import math
import random
from collections import deque
from pathlib import Path

import pytest
from bitscale.hdp.plan import (
    CostModel,
    OffloadConfig,
    Plan,
    StaticAssignment,
    WorkItem,
    _place_rings,
    plan_batch,
    plan_static_mesh,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

WIKIPEDIA = Path("/work/shared/data/wikipedia_lengths.txt")


def min_ranks_brute_force(length: int, capacity: int) -> int:
    """Least d whose zigzag shard (2 * ceil(L / 2d) slots) fits, by search."""
    if length <= capacity:
        return 1
    d = 2
    while 2 * math.ceil(length / (2 * d)) > capacity:
        d += 1
    return d


def expected_zigzag(seq_id: int, length: int, d: int) -> list[tuple[tuple[int, int, int], ...]]:
    c = math.ceil(length / (2 * d))

    def chunk(k: int) -> tuple[int, int, int]:
        return (seq_id, min(k * c, length), min((k + 1) * c, length))

    return [(chunk(p), chunk(2 * d - 1 - p)) for p in range(d)]


def check_plan(
    plan: Plan, lengths: list[int], capacity: int, world: int, offloadable_fraction: float = 0.8
) -> None:
    """Invariants every plan (HDP or static) must satisfy."""
    cost = plan.cost
    assert plan.world_size == world and plan.capacity == capacity
    assert plan.lengths == tuple(lengths)
    covered = [[0] * L for L in lengths]
    kv = dkv = padding = 0
    micro_batch_slots: dict[tuple[int, int], int] = {}
    for index, item in enumerate(plan.items):
        assert item.item_id == index
        assert len(item.ranks) == len(set(item.ranks)) == len(item.shards) == item.cp_size
        assert all(0 <= r < world for r in item.ranks)
        assert list(item.ranks) == sorted(item.ranks)
        for shard in item.shards:
            for seq_id, start, end in shard:
                assert 0 <= start <= end <= lengths[seq_id]
                for t in range(start, end):
                    covered[seq_id][t] += 1
        if item.cp_size == 1:
            assert item.chunk_size == 0
            (shard,) = item.shards
            assert all(start == 0 and end == lengths[s] for s, start, end in shard)
            slots = sum(end - start for _, start, end in shard)
        else:
            (seq_id,) = item.seq_ids
            assert [tuple(s) for s in item.shards] == expected_zigzag(
                seq_id, lengths[seq_id], item.cp_size
            )
            assert item.chunk_size == math.ceil(lengths[seq_id] / (2 * item.cp_size))
            slots = 2 * item.chunk_size
            device_slots = slots * (1 - item.offload_ratio * offloadable_fraction)
            assert device_slots <= capacity + 1e-9
            hop = 2 * cost.kv_heads * cost.head_dim * cost.element_size * slots
            dkv_hop = 2 * cost.kv_heads * cost.head_dim * max(cost.element_size, 4) * slots
            kv += cost.num_layers * item.cp_size * 2 * (item.cp_size - 1) * hop
            dkv += cost.num_layers * item.cp_size * item.cp_size * dkv_hop
            padding += item.cp_size * slots - lengths[seq_id]
        for r in item.ranks:
            key = (r, item.micro_batch)
            micro_batch_slots[key] = micro_batch_slots.get(key, 0) + slots
    # Every real token in exactly one shard of one item.
    assert all(count == 1 for tokens in covered for count in tokens)
    # No rank holds more than capacity token slots in one micro-batch (offloaded rings are
    # checked on device slots above).
    if all(item.offload_ratio == 0 for item in plan.items):
        assert max(micro_batch_slots.values()) <= capacity
    stats = plan.stats
    assert stats.ring_kv_bytes == kv and stats.ring_dkv_bytes == dkv
    assert stats.ring_bytes == kv + dkv
    assert stats.padding_tokens == padding
    assert stats.loss_tokens == sum(L - 1 for L in lengths)
    assert len(stats.busy_time) == world
    assert stats.makespan == max(stats.finish_time)
    assert all(
        f >= b - 1e-9 * stats.makespan
        for f, b in zip(stats.finish_time, stats.busy_time, strict=True)
    )
    assert stats.balance >= 1.0 - 1e-12
    # Per-rank sent bytes add up to the totals exactly.
    per_rank = [plan.ring_bytes_for_rank(r) for r in range(world)]
    assert sum(k for k, _ in per_rank) == kv and sum(v for _, v in per_rank) == dkv
    # for_rank lists exactly the items holding that rank, in global order.
    for r in range(world):
        ids = [item.item_id for item in plan.for_rank(r)]
        assert ids == [item.item_id for item in plan.items if r in item.ranks]
        assert stats.micro_batches[r] == len({plan.items[i].micro_batch for i in ids})
    check_deadlock_free(plan)


def check_deadlock_free(plan: Plan) -> None:
    """Execute the per-rank queues: a ring runs only when it heads the queue of all its ranks.

    Items of one micro-batch run together, so the unit of execution is the micro-batch.
    """
    queues = {
        r: deque(item.micro_batch for item in plan.for_rank(r)) for r in range(plan.world_size)
    }
    for r in queues:  # collapse consecutive items of one micro-batch
        collapsed: deque[int] = deque()
        for mb in queues[r]:
            if not collapsed or collapsed[-1] != mb:
                collapsed.append(mb)
        queues[r] = collapsed
    ranks_of = {item.micro_batch: item.ranks for item in plan.items}
    remaining = sum(len(q) for q in queues.values())
    while remaining:
        progressed = False
        for mb, ranks in ranks_of.items():
            if all(queues[r] and queues[r][0] == mb for r in ranks):
                for r in ranks:
                    queues[r].popleft()
                    remaining -= 1
                progressed = True
        assert progressed, "no micro-batch can start: the order deadlocks"


@st.composite
def batches(draw: st.DrawFn) -> tuple[list[int], int, int]:
    world = draw(st.integers(1, 9))
    capacity = draw(st.integers(1, 40))
    even = capacity - capacity % 2
    longest = capacity if world == 1 or even == 0 else world * even
    lengths = draw(st.lists(st.integers(1, longest), min_size=1, max_size=30))
    return lengths, world, capacity


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=batches(),
    group_rule=st.sampled_from(["ceil", "pow2"]),
    balance=st.booleans(),
    widen=st.booleans(),
)
def test_hdp_plan_invariants(
    batch: tuple[list[int], int, int], group_rule: str, balance: bool, widen: bool
) -> None:
    lengths, world, capacity = batch
    options = {"group_rule": group_rule, "balance": balance, "widen": widen}
    plan = plan_batch(lengths, world, capacity, **options)
    check_plan(plan, lengths, capacity, world)
    assert plan.strategy == "hdp"
    # Minimal rings: single-rank iff the sequence fits; otherwise the least d that holds it
    # (rounded up to a power of two, capped at world_size, under pow2).
    placed_d = {}
    for item in plan.items:
        for seq_id in item.seq_ids:
            placed_d[seq_id] = item.cp_size
    for seq_id, L in enumerate(lengths):
        d = min_ranks_brute_force(L, capacity)
        if group_rule == "pow2" and d > 1:
            d = min(2 ** math.ceil(math.log2(d)), world)
        if widen and d > 1:  # widening only ever adds ranks to a ring
            assert d <= placed_d[seq_id] <= world, (seq_id, L)
            if group_rule == "pow2" and placed_d[seq_id] < world:
                assert placed_d[seq_id] & (placed_d[seq_id] - 1) == 0
        else:
            assert placed_d[seq_id] == d, (seq_id, L)
        if d > 1:
            assert sum(1 for i in plan.items if seq_id in i.seq_ids) == 1
    # Deterministic: an identical plan on every call (what every rank computes).
    again = plan_batch(list(lengths), world, capacity, **options)
    assert again == plan and again.fingerprint() == plan.fingerprint()


@settings(max_examples=60, deadline=None)
@given(batch=batches(), group_rule=st.sampled_from(["ceil", "pow2"]))
def test_offload_plan_invariants(batch: tuple[list[int], int, int], group_rule: str) -> None:
    lengths, world, capacity = batch
    # Slow inter-node rings make offloading pay often.
    cost = CostModel(node_size=1, ring_step_latency=1e-3)
    offload = OffloadConfig(max_ratio=0.9, offloadable_fraction=1.0)
    plan = plan_batch(lengths, world, capacity, cost=cost, offload=offload, group_rule=group_rule)
    check_plan(plan, lengths, capacity, world, offloadable_fraction=1.0)
    for item in plan.items:
        if item.cp_size == 1:
            continue
        (seq_id,) = item.seq_ids
        d = min_ranks_brute_force(lengths[seq_id], capacity)
        if group_rule == "pow2":
            d = min(2 ** math.ceil(math.log2(d)), world)
        assert 0 <= item.offload_ratio <= 0.9
        if item.offload_ratio == 0:
            assert item.cp_size == d
        else:
            assert item.cp_size < d  # offloading only ever saves ranks
    assert plan == plan_batch(
        lengths, world, capacity, cost=cost, offload=offload, group_rule=group_rule
    )


@settings(max_examples=80, deadline=None)
@given(batch=batches(), assignment=st.sampled_from(list(StaticAssignment)))
def test_static_mesh_invariants(
    batch: tuple[list[int], int, int], assignment: StaticAssignment
) -> None:
    lengths, world, capacity = batch
    cp = 1
    while 2 * math.ceil(max(lengths) / (2 * cp)) > capacity if cp > 1 else max(lengths) > capacity:
        cp *= 2
    if cp > world or world % cp:
        with pytest.raises(ValueError, match="world_size"):
            plan_static_mesh(lengths, world, capacity, assignment=assignment)
        return
    plan = plan_static_mesh(lengths, world, capacity, assignment=assignment)
    check_plan(plan, lengths, capacity, world)
    assert plan.strategy == "static"
    for item in plan.items:
        assert item.cp_size == cp
        assert item.ranks[0] % cp == 0 and item.ranks == tuple(
            range(item.ranks[0], item.ranks[0] + cp)
        )
        if cp > 1:
            assert len(item.seq_ids) == 1  # every document is sharded over the CP group
    assert plan == plan_static_mesh(lengths, world, capacity, assignment=assignment)
    if assignment is StaticAssignment.DP_BALANCED:
        # Megatron's dp_balanced deals packs round-robin, and splits packs until their count
        # is a multiple of DP, which a document count that is one always allows.
        counts = plan.stats.micro_batches
        assert max(counts) - min(counts) <= 1
        if len(lengths) % (world // cp) == 0:
            assert len(set(counts)) == 1, counts


def _static_micro_batches(plan: Plan) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(ranks, documents) of each micro-batch in global order."""
    out: dict[int | None, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for item in plan.items:
        ranks, docs = out.get(item.micro_batch, (item.ranks, ()))
        out[item.micro_batch] = (ranks, docs + item.seq_ids)
    return list(out.values())


def test_static_assignment_policies_hand_checked() -> None:
    # CP 1 (every length <= capacity 8), DP 4. dp_balanced (Megatron's DpBalancedScheduler):
    # next-fit in dataset order gives packs [0,1] [2,3] [4,5] [6,7] [8]; 5 packs -> 3 more
    # for a multiple of DP, each the last document of the last pack holding several:
    # [7], [5], [3]; pack k runs as micro-batch k // 4 on group k % 4.
    lengths = [5, 3, 4, 4, 2, 6, 1, 1, 7]
    megatron = plan_static_mesh(lengths, 4, 8)
    assert _static_micro_batches(megatron) == [
        ((0,), (0, 1)), ((1,), (2,)), ((2,), (4,)), ((3,), (6,)),
        ((0,), (8,)), ((1,), (7,)), ((2,), (5,)), ((3,), (3,)),
    ]  # fmt: skip
    assert megatron.stats.micro_batches == (2, 2, 2, 2)
    # token_balanced: each document to the group with the fewest tokens so far
    # (g0 [0,7], g1 [1,4,8], g2 [2,5], g3 [3,6]), then next-fit per group.
    balanced = plan_static_mesh(lengths, 4, 8, assignment="token_balanced")
    assert _static_micro_batches(balanced) == [
        ((0,), (0, 7)), ((1,), (1, 4)), ((2,), (2,)), ((3,), (3, 6)),
        ((1,), (8,)), ((2,), (5,)),
    ]  # fmt: skip
    assert balanced.stats.micro_batches == (1, 2, 2, 1)


def test_hand_checked_plan() -> None:
    # capacity 128, 4 ranks: 500 -> d 4 (chunks of 63), 300 -> 3 (50), 250 -> 2 (63); the rest
    # fit and are packed on one rank each.
    lengths = [7, 100, 33, 250, 500, 17, 64, 300]
    plan = plan_batch(lengths, 4, 128)
    rings = {
        item.seq_ids[0]: (item.cp_size, item.chunk_size) for item in plan.items if item.cp_size > 1
    }
    assert rings == {4: (4, 63), 7: (3, 50), 3: (2, 63)}
    first = plan.items[0]
    assert first.ranks == (0, 1, 2, 3)
    assert first.shards[0] == ((4, 0, 63), (4, 441, 500))
    assert first.shards[3] == ((4, 189, 252), (4, 252, 315))
    assert first.padding_tokens == 4
    assert plan.stats.padding_tokens == 4 + 0 + 2  # 500 -> 504, 300 -> 300, 250 -> 252
    assert plan.stats.loss_tokens == sum(lengths) - len(lengths)
    singles = [item for item in plan.items if item.cp_size == 1]
    assert sorted(s for item in singles for s in item.seq_ids) == [0, 1, 2, 5, 6]
    # Single-rank items send nothing; the 4-rank ring sends (3*4-2) hops per rank per layer.
    cost = CostModel()
    assert cost.ring_kv_bytes(1, 100) == cost.ring_dkv_bytes(1, 100) == 0
    hop = 2 * 32 * 128 * 2 * 126  # bf16 K/V
    dkv_hop = 2 * 32 * 128 * 4 * 126  # dK/dV travel in float32
    assert cost.ring_kv_bytes(4, 126) == 32 * 4 * 6 * hop
    assert cost.ring_dkv_bytes(4, 126) == 32 * 4 * 4 * dkv_hop
    assert CostModel(dkv_element_size=2).ring_dkv_bytes(4, 126) == 32 * 4 * 4 * hop
    # Every rank of that ring sends 6 K/V and 4 dK/dV blocks per layer.
    for r in first.ranks:
        kv, dkv = plan.ring_bytes_for_rank(r)
        assert kv >= 32 * 6 * hop and dkv >= 32 * 4 * dkv_hop


def test_odd_capacity_uses_even_zigzag_slots() -> None:
    # capacity 3: L = 6 on 2 ranks would need chunks of 2 -> 4 slots > 3, so d = 3.
    plan = plan_batch([6], 3, 3)
    (item,) = plan.items
    assert item.cp_size == 3 and item.chunk_size == 1
    with pytest.raises(ValueError, match="at most 4"):
        plan_batch([5], 2, 3)
    with pytest.raises(ValueError, match="capacity 1"):
        plan_batch([2], 8, 1)
    assert plan_batch([1, 1, 1], 2, 1).stats.ring_bytes == 0


def test_pow2_rounds_up_and_caps_at_world_size() -> None:
    plan = plan_batch([5 * 16], 8, 16, group_rule="pow2")
    assert plan.items[0].cp_size == 8
    plan = plan_batch([5 * 16], 6, 16, group_rule="pow2")
    assert plan.items[0].cp_size == 6
    assert plan_batch([5 * 16], 8, 16).items[0].cp_size == 5


def test_balance_gives_cheap_ranks_more_micro_batches() -> None:
    # One expensive sequence (1.1 s) and 110 cheap ones (0.02 s each) on 2 ranks: the rank
    # with the expensive one must get fewer micro-batches for the busy times to meet.
    lengths = [1000] + [100] * 110
    cost = CostModel(alpha=1e-6, beta=1e-4, gamma=0.0)
    plan = plan_batch(lengths, 2, 1000, cost=cost)
    busy = plan.stats.busy_time
    assert max(busy) / min(busy) < 1.05
    heavy = next(item.ranks[0] for item in plan.items if 0 in item.seq_ids)
    calls = plan.stats.micro_batches
    assert calls[heavy] < calls[1 - heavy]
    unbalanced = plan_batch(lengths, 2, 1000, cost=cost, balance=False)
    assert unbalanced.stats.balance > 1.2 > plan.stats.balance
    assert abs(unbalanced.stats.micro_batches[0] - unbalanced.stats.micro_batches[1]) <= 1


def test_widen_shortens_a_ring_that_sets_the_step_time() -> None:
    # One 8K sequence (2 ranks at capacity 4096) and little else on 8 ranks: the 2-rank ring
    # alone outlasts the mean load, so widening spreads it over more ranks.
    lengths = [8192] + [512] * 8
    cost = CostModel()
    minimal = plan_batch(lengths, 8, 4096, cost=cost)
    wide = plan_batch(lengths, 8, 4096, cost=cost, widen=True)
    check_plan(wide, lengths, 4096, 8)
    ring = next(item for item in wide.items if item.cp_size > 1)
    assert next(item for item in minimal.items if item.cp_size > 1).cp_size == 2
    assert ring.cp_size > 2
    assert wide.stats.makespan < minimal.stats.makespan
    # A batch whose rings are short against the mean load keeps the minimum d.
    busy = [8192] + [4000] * 64
    assert plan_batch(busy, 8, 4096, widen=True) == plan_batch(busy, 8, 4096)


# Rings that cannot run side by side: (world, lengths) at capacity 1000. The first
# sequence's minimum ring takes 12 of 16 (7 of 8) ranks; the next rings need more than the
# 4 (1) ranks left, so they wait for it although each ring alone is shorter than the mean
# rank load (what the per-ring widening looks at).
RIGID_CASES = [
    pytest.param(16, [11200, 6400] + [500 + 37 * i for i in range(8)], id="16-ranks-12+7"),
    pytest.param(
        16, [11200, 7200, 6400, 4800] + [500 + 37 * i for i in range(8)], id="16-ranks-12+8+7+5"
    ),
    pytest.param(8, [5600, 3200] + [500 + 37 * i for i in range(8)], id="8-ranks-6+4"),
]
RIGID_COST = CostModel(alpha=1e-6, beta=1e-4, gamma=1e-3)


@pytest.mark.parametrize(("world", "lengths"), RIGID_CASES)
def test_widen_rigid_rings_that_cannot_run_side_by_side(world: int, lengths: list[int]) -> None:
    capacity, cost = 1000, RIGID_COST
    minimal = plan_batch(lengths, world, capacity, cost=cost)
    sizes = sorted((i.cp_size for i in minimal.items if i.cp_size > 1), reverse=True)
    assert sizes[0] + sizes[1] > world  # the two largest rings cannot run side by side
    mean_busy = sum(minimal.stats.busy_time) / world
    assert all(i.est_time < mean_busy for i in minimal.items)  # no ring alone sets the step
    wide = plan_batch(lengths, world, capacity, cost=cost, widen=True)
    check_plan(wide, lengths, capacity, world)
    assert wide.stats.makespan < 0.9 * minimal.stats.makespan
    pow2 = plan_batch(lengths, world, capacity, cost=cost, widen=True, group_rule="pow2")
    assert wide.stats.makespan <= pow2.stats.makespan
    assert wide == plan_batch(lengths, world, capacity, cost=cost, widen=True)


@settings(max_examples=100, deadline=None)
@given(
    batch=batches(), group_rule=st.sampled_from(["ceil", "pow2"]), stages=st.sampled_from([1, 3])
)
def test_rigid_bound_never_exceeds_the_plans_makespan(
    batch: tuple[list[int], int, int], group_rule: str, stages: int
) -> None:
    # The widening search ranks ring placements by this bound and skips building a plan
    # whose bound is no better than a plan it has: sound only if no plan of those rings
    # ends before it. Costs where attention and gamma matter, as in the cases above.
    lengths, world, capacity = batch
    plan = plan_batch(
        lengths, world, capacity, cost=RIGID_COST, group_rule=group_rule, pipeline_stages=stages
    )
    rings = {i.seq_ids[0]: i.cp_size for i in plan.items if i.cp_size > 1}
    timeline = _place_rings(
        rings, dict.fromkeys(rings, 0.0), tuple(lengths), world, RIGID_COST, None
    )
    singles = [n for n in lengths if n <= capacity]
    beta = RIGID_COST.beta + RIGID_COST.gamma / capacity
    bound, level = timeline.bound(sum(RIGID_COST.alpha * n * n + beta * n for n in singles))
    assert level <= bound <= plan.stats.makespan * (1 + 1e-12)


@settings(max_examples=100, deadline=None)
@given(batch=batches(), group_rule=st.sampled_from(["ceil", "pow2"]), widen=st.booleans())
def test_no_rank_idles_where_a_later_sequence_fits(
    batch: tuple[list[int], int, int], group_rule: str, widen: bool
) -> None:
    # Ranks that wait for the last member of a ring idle in between; every single sequence
    # that runs after the rings (on any rank) must be too long for what is left of every
    # such window, else the scheduler left work out of a window it could have filled.
    lengths, world, capacity = batch
    cost = RIGID_COST
    plan = plan_batch(lengths, world, capacity, cost=cost, group_rule=group_rule, widen=widen)
    finish = [0.0] * world
    windows: list[float] = []
    runs: list[list[tuple[float, WorkItem]]] = [[] for _ in range(world)]
    for item in plan.items:  # the replay of Plan.stats: an item starts when its ranks are free
        start = max(finish[r] for r in item.ranks)
        for r in item.ranks:
            if start > finish[r]:
                windows.append(start - finish[r])
            finish[r] = start + item.est_time
            runs[r].append((start, item))
    assert finish == list(plan.stats.finish_time)
    slack = max(windows, default=0.0) * (1 - 1e-12)
    for rank_runs in runs:
        last_ring_end = max(
            (start + item.est_time for start, item in rank_runs if item.cp_size > 1), default=0.0
        )
        for start, item in rank_runs:
            if item.cp_size == 1 and start >= last_ring_end:
                for seq_id in item.seq_ids:
                    assert cost.compute_time([lengths[seq_id]]) > slack, (seq_id, slack)


def test_pipeline_aware_balance_shortens_the_1f1b_critical_path() -> None:
    # 4 pipeline stages: the rank holding the 1.1 s micro-batch pays 3 x 1.1 s of bubble, so
    # PP-aware balance leaves it alone with that item and the other rank takes the rest.
    lengths = [1000] + [100] * 110
    cost = CostModel(alpha=1e-6, beta=1e-4, gamma=0.0)

    def pipeline_time(plan: Plan, stages: int) -> float:
        per_rank = [[i.est_time for i in plan.for_rank(r)] for r in range(plan.world_size)]
        return max(sum(t) + (stages - 1) * max(t) for t in per_rank)

    plain = plan_batch(lengths, 2, 1000, cost=cost)
    aware = plan_batch(lengths, 2, 1000, cost=cost, pipeline_stages=4)
    check_plan(aware, lengths, 1000, 2)
    assert pipeline_time(aware, 4) == pytest.approx(4 * 1.1, rel=1e-12)  # the lower bound
    assert pipeline_time(plain, 4) > 4.9
    assert sorted(aware.stats.micro_batches) == [1, 11]
    assert plan_batch(lengths, 2, 1000, cost=cost, pipeline_stages=1) == plain


def test_offload_takes_fewer_ranks_when_it_pays() -> None:
    # A long sequence on a slow inter-node ring among 40 short ones: offloading 25 % of
    # activations lets 4 ranks hold what needs 5 without it; the PCIe copy hides behind
    # compute, the ring moves fewer bytes and the step gets shorter.
    cost = CostModel(node_size=1)
    offload = OffloadConfig(max_ratio=0.5, offloadable_fraction=0.8)
    lengths = [5 * 16384] + [8000] * 40
    plain = plan_batch(lengths, 8, 16384, cost=cost)
    offloaded = plan_batch(lengths, 8, 16384, cost=cost, offload=offload)
    check_plan(offloaded, lengths, 16384, 8)
    ring = next(item for item in offloaded.items if item.cp_size > 1)
    assert next(item for item in plain.items if item.cp_size > 1).cp_size == 5
    assert ring.cp_size == 4 and ring.offload_ratio == pytest.approx(0.25)
    assert 2 * ring.chunk_size * (1 - ring.offload_ratio * 0.8) <= 16384 + 1e-6
    assert offloaded.stats.ring_bytes < plain.stats.ring_bytes
    assert offloaded.stats.makespan < plain.stats.makespan
    # Too little other work: the 4-rank ring would outlast the mean load, so no offloading.
    few = [5 * 16384, 3000, 2000]
    assert plan_batch(few, 8, 16384, cost=cost, offload=offload) == plan_batch(
        few, 8, 16384, cost=cost
    )
    # A short-only batch never offloads.
    assert all(i.offload_ratio == 0 for i in plan_batch([10, 20], 2, 64, offload=offload).items)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: plan_batch([10, 0, 5], 2, 8), r"lengths\[1\] = 0"),
        (lambda: plan_batch([10, -3], 2, 8), r"lengths\[1\] = -3"),
        (lambda: plan_batch([], 2, 8), "empty"),
        (lambda: plan_batch([100], 2, 8), "sequence 0 has 100 tokens"),
        (lambda: plan_batch([4], 2, 0), "capacity must be an int >= 1"),
        (lambda: plan_batch([4], 2, 2.5), "capacity must be an int >= 1"),
        (lambda: plan_batch([4], 0, 8), "world_size must be an int >= 1"),
        (lambda: plan_batch([4], -2, 8), "world_size must be an int >= 1"),
        (lambda: plan_batch([4], 2.0, 8), "world_size must be an int >= 1"),
        (lambda: plan_batch([4], 2, 8, group_rule="log"), "group_rule must be one of"),
        (lambda: plan_batch([4], 2, 8, pipeline_stages=0), "pipeline_stages must be an int"),
        (lambda: plan_static_mesh([100], 2, 8), "more than world_size 2"),
        (lambda: plan_static_mesh([30], 6, 8), "must divide world_size 6"),
        (lambda: plan_static_mesh([30], 8, 8, cp_size=2), "cp_size 2 is too small"),
        (lambda: plan_static_mesh([3], 8, 8, cp_size=0), "cp_size must be an int >= 1"),
        (lambda: plan_static_mesh([3], 2, 8, assignment="random"), "assignment must be one of"),
        (lambda: plan_batch([4], 2, 8).for_rank(2), r"rank must be in \[0, 2\)"),
        (lambda: OffloadConfig(max_ratio=1.5), "max_ratio must be in"),
        (lambda: CostModel(alpha=-1.0), "alpha must be finite and >= 0"),
        (lambda: CostModel(kv_heads=0), "kv_heads must be an int >= 1"),
        (lambda: CostModel.fit([(10, 1.0), (20, 2.0)]), ">= 3 samples"),
        (lambda: CostModel.fit([(10, 1.0), (0, 2.0), (5, 1.0)]), "lengths must be ints >= 1"),
    ],
)
def test_bad_input_raises_value_error(call, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        call()


def test_non_int_lengths_raise_type_error() -> None:
    with pytest.raises(TypeError, match="sequence of ints"):
        plan_batch([1.5, 2], 2, 8)  # type: ignore[list-item]


def test_cost_model_fit_recovers_coefficients() -> None:
    truth = CostModel(alpha=3e-9, beta=2e-5, gamma=4e-3)
    rng = random.Random(0)
    samples = []
    for _ in range(40):
        docs = [rng.randint(1, 30000) for _ in range(rng.randint(1, 4))]
        samples.append((docs, truth.compute_time(docs)))
    fitted = CostModel.fit(samples, base=CostModel(kv_heads=8))
    assert fitted.kv_heads == 8
    for name in ("alpha", "beta", "gamma"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-9)
    # A negative best-fit intercept is clamped: the fit stays physical.
    line = [(s, 1e-4 * s - 0.05) for s in (1000, 2000, 3000, 4000)]
    clamped = CostModel.fit(line)
    assert clamped.gamma == 0.0 and clamped.alpha >= 0 and clamped.beta > 0


def test_ring_exposure_makes_short_sequences_communication_bound() -> None:
    cost = CostModel()
    ranks_inter = [0, 8]  # two nodes: InfiniBand
    short, long = 4096, 262144
    short_time = cost.micro_batch_time([short], ranks_inter)
    assert short_time > cost.compute_time([short], 2) * 1.5  # ring not hidden
    long_time = cost.micro_batch_time([long], ranks_inter)
    assert long_time == cost.compute_time([long], 2)  # ring hidden behind attention


@pytest.mark.skipif(not WIKIPEDIA.exists(), reason=f"{WIKIPEDIA} not present")
def test_wikipedia_batch_balance_and_ring_bytes() -> None:
    lengths = [int(x) for x in WIKIPEDIA.read_text().split()]
    rng = random.Random(1)
    world, capacity = 64, 32768
    batch: list[int] = []
    while sum(batch) < world * capacity * 8:
        batch.append(min(rng.choice(lengths), 262144))
    hdp = plan_batch(batch, world, capacity)
    static = plan_static_mesh(batch, world, capacity)
    assert hdp.stats.balance <= 1.05
    assert hdp.stats.ring_bytes <= 0.05 * static.stats.ring_bytes
    assert static.stats.makespan > hdp.stats.makespan


def test_shard_for_names_a_ranks_ranges_and_rejects_outsiders() -> None:
    plan = plan_batch([100, 10], 4, 32)
    ring = next(item for item in plan.items if item.cp_size == 4)
    for rank, shard in zip(ring.ranks, ring.shards, strict=True):
        assert ring.shard_for(rank) == shard
    single = next(item for item in plan.items if item.cp_size == 1)
    outsider = next(r for r in range(4) if r not in single.ranks)
    with pytest.raises(ValueError, match=f"rank {outsider} is not in item {single.item_id}"):
        single.shard_for(outsider)


def test_balance_schedules_with_the_cost_it_is_timed_with() -> None:
    """With 128-token attention tiles a 1-token document costs as much attention as a
    128-token one; scheduled as L**2 the three short ones all went to one rank (makespan
    3 tiles' worth), scheduled by tiles the ranks even out at two each."""
    cost = CostModel(alpha=1.0, beta=0.0, gamma=0.0, attention_tile=128)
    plan = plan_batch([128, 1, 1, 1], 2, 4096, cost=cost)
    one_document = cost.compute_time([1])
    assert plan.stats.busy_time == (2 * one_document, 2 * one_document)
    assert plan.stats.makespan == 2 * one_document
