"""HDP planner: which ranks run which tokens, in what order (pure Python, deterministic).

``plan_batch`` gives each sequence the fewest ranks it needs (ByteScale's hybrid data
parallelism); ``plan_static_mesh`` is the Megatron-style DP x CP baseline. Both return the same
``Plan`` type so one runtime and one set of metrics serve both.

Conventions the runtime relies on:

* ``Plan.items`` is one global execution order; ``item_id`` equals the index in it. Every rank
  runs ``Plan.for_rank(r)`` in that order. Because the order is total, the lowest unfinished
  multi-rank item always has all of its ranks waiting on it: P2P rings on the world group
  (tag = ``item_id``) cannot deadlock and need no barriers.
* A multi-rank item holds one sequence of length L on d ranks: the sequence is padded at its
  tail to ``2 * d * chunk_size`` tokens (``chunk_size = ceil(L / (2d))``) and cut into 2d
  chunks; ring position r holds chunks r and 2d-1-r, so its shard is exactly two
  ``(seq_id, start, end)`` ranges (chunk r first), clamped to ``[0, L)``; a range that lies in
  the padding is empty (``start == end``). Each rank therefore holds ``2 * chunk_size`` token
  slots, of which ``end - start`` per range are real.
* A single-rank item holds one or more whole sequences (``(seq_id, 0, L)``), packed.
* Capacity: a rank never holds more than ``capacity`` token slots in one micro-batch (padding
  included; with offloading, ``slots * (1 - offload_ratio * offloadable_fraction)`` device
  slots). So d(L) is the least d with ``2 * ceil(L / (2d)) <= capacity``: ``ceil(L / capacity)``
  for even capacity, ``ceil(L / (capacity - 1))`` for odd capacity (zigzag chunks pair up).
* Loss tokens: labels are shifted inside each sequence, so a sequence of length L contributes
  ``L - 1`` loss tokens (its last token predicts nothing); padding contributes none.
  ``Plan.stats.loss_tokens = sum(L - 1)`` is the global normaliser of the summed loss.
* Ring bytes: ``CostModel.ring_kv_bytes(d, 2 * chunk_size)`` and
  ``CostModel.ring_dkv_bytes(d, 2 * chunk_size)`` per multi-rank item, i.e. over all ranks and
  layers ``num_layers * d * (2(d-1)) * kv_hop`` K/V bytes and ``num_layers * d * d * kv_hop``
  dK/dV bytes with ``kv_hop = 2 * kv_heads * head_dim * element_size * 2 * chunk_size``
  (dK/dV hops use ``dkv_element_size``, float32 by default)
  (details in `bitscale.hdp.cost`). Single-rank items send nothing. This counts one forward
  and one backward ring pass per attention layer (activation recomputation would repeat the
  forward pass); set the CostModel's num_layers, kv_heads, head_dim and element_size to the
  model the runtime runs to compare with its counted bytes.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import heapq
import math
import operator
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ParamSpec, TypeVar

from .cost import CostModel, OffloadConfig

__all__ = [
    "CostModel",
    "GroupRule",
    "OffloadConfig",
    "Plan",
    "PlanStats",
    "StaticAssignment",
    "WorkItem",
    "plan_batch",
    "plan_static_mesh",
]

_P = ParamSpec("_P")
_R = TypeVar("_R")

Range = tuple[int, int, int]
"""``(seq_id, start, end)``: a half-open token range of one original sequence."""


class GroupRule(StrEnum):
    """How many ranks a sequence longer than the capacity gets."""

    CEIL = "ceil"
    """The minimum d that holds it (ByteScale)."""
    POW2 = "pow2"
    """That minimum rounded up to a power of two, capped at world_size (Megatron hybrid CP)."""


class StaticAssignment(StrEnum):
    """How the static mesh hands documents to DP groups and micro-batches."""

    DP_BALANCED = "dp_balanced"
    """What Megatron-LM does (``DpBalancedScheduler``, ``--sequence-packing-scheduler
    dp_balanced`` in ``megatron/core/datasets/data_schedule.py``; the baseline of its
    ``examples/dynamic_context_parallel`` benchmark): the whole global batch, in dataset
    order, is packed next-fit into packs of at most capacity * CP tokens; while the pack
    count is not a multiple of DP, the last document of the last pack holding several is
    moved into a pack of its own (appended at the end); pack k then runs as micro-batch
    k // DP on DP group k % DP. Every group runs the same number of micro-batches whatever
    they cost, which is also how ByteScale describes its static baseline ("the same number
    of micro-batches" per device, notes 1.6). Where Megatron stops on an assertion (only
    the first pack is left to split) this splits the first pack too, and groups still
    without a pack (fewer documents than DP groups) stay idle."""
    TOKEN_BALANCED = "token_balanced"
    """Each document, in dataset order, goes to the DP group with the fewest token slots so
    far and each group packs its own next-fit: a stronger baseline than Megatron's (tokens
    balanced across groups, though not attention work), kept for comparison."""


@dataclass(frozen=True)
class WorkItem:
    """One forward/backward of some tokens on a ring of ranks (see the module docstring)."""

    item_id: int
    """Unique; equals the index in ``Plan.items`` (the global execution order)."""
    ranks: tuple[int, ...]
    """Ranks in ring order: position p sends to p+1 and receives from p-1 (mod d)."""
    shards: tuple[tuple[Range, ...], ...]
    """One tuple of ``(seq_id, start, end)`` per rank, aligned with ``ranks``."""
    chunk_size: int = 0
    """Padded zigzag chunk length for multi-rank items (each rank holds 2 * chunk_size token
    slots); 0 for single-rank items, which are packed without padding."""
    micro_batch: int | None = None
    """Items sharing this id run inside one forward/backward on the same ranks (the static
    mesh packs several zigzag-sharded documents per micro-batch); None means its own."""
    offload_ratio: float = 0.0
    """Fraction of offloadable activations this item moves to host memory."""
    est_time: float = 0.0
    """Estimated per-rank seconds (a micro-batch's time is split over its items by compute)."""

    def __post_init__(self) -> None:
        if self.micro_batch is None:
            object.__setattr__(self, "micro_batch", self.item_id)

    @property
    def cp_size(self) -> int:
        """Ranks in the ring (1 = no communication)."""
        return len(self.ranks)

    @property
    def seq_ids(self) -> tuple[int, ...]:
        """Sequences in this item, in shard order, each once."""
        seen: dict[int, None] = {}
        for shard in self.shards:
            for seq_id, _, _ in shard:
                seen[seq_id] = None
        return tuple(seen)

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens over all ranks."""
        return sum(end - start for shard in self.shards for _, start, end in shard)

    @property
    def slots_per_rank(self) -> int:
        """Token slots one rank holds: 2 * chunk_size for rings, the packed tokens otherwise."""
        if self.cp_size > 1:
            return 2 * self.chunk_size
        return self.num_tokens

    @property
    def padding_tokens(self) -> int:
        """Tail padding of a zigzag-sharded sequence (0 for single-rank items)."""
        return self.cp_size * self.slots_per_rank - self.num_tokens

    def shard_for(self, rank: int) -> tuple[Range, ...]:
        """The ranges ``rank`` holds in this item (ValueError if it is not in the ring)."""
        try:
            return self.shards[self.ranks.index(rank)]
        except ValueError:
            raise ValueError(
                f"rank {rank} is not in item {self.item_id} (ranks {self.ranks})"
            ) from None


@dataclass(frozen=True)
class PlanStats:
    """Estimated outcome of a plan under its cost model (per-rank seconds, exact bytes)."""

    busy_time: tuple[float, ...]
    """Per rank: sum of its micro-batch times."""
    finish_time: tuple[float, ...]
    """Per rank: when its last item ends, waits for ring partners included."""
    makespan: float
    """max(finish_time): the estimated step time before gradient sync."""
    balance: float
    """makespan / mean(busy_time) (1.0 = perfect). Stricter than max/mean of busy time: the
    max includes the waits for ring partners, since the step waits for the slowest rank."""
    micro_batches: tuple[int, ...]
    """Per rank: forward/backward calls it runs."""
    ring_kv_bytes: int
    ring_dkv_bytes: int
    ring_bytes: int
    """ring_kv_bytes + ring_dkv_bytes, summed over all items, ranks and layers."""
    padding_tokens: int
    """Tail padding of zigzag-sharded sequences, summed over items."""
    loss_tokens: int
    """sum(L - 1) over sequences (labels shifted inside each sequence)."""


@dataclass(frozen=True)
class Plan:
    """Items in global execution order plus their estimated stats."""

    items: tuple[WorkItem, ...]
    world_size: int
    capacity: int
    lengths: tuple[int, ...]
    stats: PlanStats
    strategy: str
    """"hdp" or "static" (for reports)."""
    cost: CostModel
    """The cost model the stats were estimated with."""
    _by_rank: list[list[int]] | None = field(default=None, init=False, repr=False, compare=False)

    def for_rank(self, rank: int) -> list[WorkItem]:
        """The items ``rank`` runs, in global execution order."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        if self._by_rank is None:
            # Built on first use: a simulator never asks, and at 16,384 ranks x 1e5 items
            # (CP 128) the index alone takes a second.
            by_rank: list[list[int]] = [[] for _ in range(self.world_size)]
            for item in self.items:
                for r in item.ranks:
                    by_rank[r].append(item.item_id)
            object.__setattr__(self, "_by_rank", by_rank)
        assert self._by_rank is not None
        return [self.items[i] for i in self._by_rank[rank]]

    def ring_bytes_for_rank(self, rank: int) -> tuple[int, int]:
        """(K/V bytes, dK/dV bytes) that ``rank`` itself sends over the step: each ring member
        sends 1/d of its item's ring_kv_bytes and ring_dkv_bytes (``2(d-1)`` K/V hops and
        ``d`` dK/dV hops per layer). Summed over ranks this equals ``stats``."""
        kv = dkv = 0
        for item in self.for_rank(rank):
            d = item.cp_size
            kv += self.cost.ring_kv_bytes(d, 2 * item.chunk_size) // d
            dkv += self.cost.ring_dkv_bytes(d, 2 * item.chunk_size) // d
        return kv, dkv

    def fingerprint(self) -> str:
        """SHA-256 of the items and inputs: equal on every rank iff the plans are equal."""
        digest = hashlib.sha256()
        digest.update(repr((self.world_size, self.capacity, self.lengths, self.strategy)).encode())
        for item in self.items:
            digest.update(
                repr((item.ranks, item.shards, item.chunk_size, item.micro_batch)).encode()
            )
            digest.update(repr(item.offload_ratio).encode())
        return digest.hexdigest()


def _gc_paused(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``fn`` with the cyclic garbage collector paused.

    A plan is millions of small acyclic tuples; the generational collector rescans them on
    every allocation threshold (static mesh, 16,384 ranks x 1e5 documents at CP 32: 5.2 s of
    CPU with the collector, 1.9 s without). Reference counting still frees everything.
    """

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    return wrapper


@_gc_paused
def plan_batch(
    lengths: Sequence[int],
    world_size: int,
    capacity: int,
    *,
    cost: CostModel | None = None,
    group_rule: GroupRule | str = "ceil",
    balance: bool = True,
    offload: OffloadConfig | None = None,
    pipeline_stages: int = 1,
    widen: bool = False,
) -> Plan:
    """Plan one global batch with hybrid data parallelism.

    1. Sequence L gets d ranks: 1 if it fits in ``capacity``, else the minimum d (module
       docstring; ``group_rule="pow2"`` rounds up to a power of two, capped at world_size).
       With ``offload``, a long sequence may take fewer ranks and offload activations when
       that lowers the rank-seconds it costs (``d * time``) and the ring stays shorter than
       the mean rank load; the whole plan is kept only if its estimated makespan beats the
       plan without offloading (longer rigid rings can pack worse than they save).
       With ``widen``, a ring that alone would outlast the mean rank load (so would set the
       step time) gets more ranks while that shortens it; then, with ``balance``, rings that
       cannot run side by side (a ring of d ranks leaves world_size - d for all others)
       and so end after the rest of the work are widened too: a greedy search over their
       sizes on a makespan bound of the ring placement (`_widen_rigid`), and the widened
       plan is kept only if its estimated makespan beats the plan without. Widening only
       ever adds ranks (sizes stay powers of two or world_size under pow2); it is off by
       default, so every ring has the minimum d.
    2. Sequences that fit are packed best-fit-decreasing into single-rank items of at most
       ``capacity`` tokens (same worst-case bound as first-fit-decreasing; O(n log n) with
       bisect where first-fit needs a segment tree): per rank after balancing, or globally
       with ``balance=False``.
    3. ``balance=True``: multi-rank items (d, then length, descending) go to the d least-loaded
       ranks (inside one node when a node has d ranks free as early; ties to lower ranks)
       and start when the last of them is free; then the idle windows this leaves (ranks
       waiting for a ring's last member) are filled first (backfilling), each with the
       longest single sequences of the batch that fit its time and capacity; the other
       single sequences, most expensive first, go to the rank that is free first (LPT), so
       cheap ranks get more micro-batches, and each rank packs its own after its rings.
       With ``pipeline_stages`` p > 1 (each rank a 1F1B pipeline), a rank's LPT priority is
       when it is free + (p - 1) * its largest micro-batch (the 1F1B critical path), so
       pipelines that hold a long item get fewer others (ByteScale's PP-Balance).
       ``balance=False``: items in arrival order go to the ranks with the fewest items (equal
       micro-batch counts, as static systems do).
    4. The global order sorts items by estimated start time.

    Raises ValueError for an empty batch, non-int or non-positive lengths, ``capacity < 1``,
    ``world_size < 1``, or a sequence that needs more than ``world_size`` ranks.
    """
    lengths_t = _check_lengths(lengths)
    _check_world_and_capacity(world_size, capacity)
    if (
        not isinstance(pipeline_stages, int)
        or isinstance(pipeline_stages, bool)
        or pipeline_stages < 1
    ):
        raise ValueError(f"pipeline_stages must be an int >= 1, got {pipeline_stages!r}")
    cost = cost or CostModel()
    rule = _check_group_rule(group_rule)
    long_ids = [i for i, n in enumerate(lengths_t) if n > capacity]
    d_of = {i: _ranks_needed(lengths_t[i], i, capacity, world_size, rule) for i in long_ids}
    ratio_of = dict.fromkeys(long_ids, 0.0)
    if long_ids and (offload is not None or widen):
        # The mean rank load bounds the step from below; a ring longer than that is the
        # critical path. Offloading (fewer ranks, longer ring) must stay under it; widening
        # adds ranks to a ring above it.
        total = sum(cost.alpha * n * n + cost.beta * n for n in lengths_t if n <= capacity)
        for i in long_ids:
            d = d_of[i]
            total += d * cost.micro_batch_time([_padded(lengths_t[i], d)], range(d))
        mean_load = total / world_size
        for i in long_ids:
            if offload is not None:
                d_of[i], ratio_of[i] = _choose_offload(
                    lengths_t[i], d_of[i], capacity, cost, offload, rule, mean_load
                )
            if widen and ratio_of[i] == 0.0:
                d_of[i], mean_load = _widen(
                    lengths_t[i], d_of[i], world_size, cost, rule, mean_load
                )
    # Longest first, ties by id (sorted is stable, also with reverse=True).
    singles = sorted(
        (i for i, n in enumerate(lengths_t) if n <= capacity),
        key=lengths_t.__getitem__,
        reverse=True,
    )
    if balance:
        timeline = _place_rings(d_of, ratio_of, lengths_t, world_size, cost, offload)
        wider, wider_bound = None, 0.0
        if widen and long_ids:
            # The work LPT spreads over the ranks, gamma charged per capacity tokens as LPT does.
            beta = cost.beta + cost.gamma / capacity
            singles_work = sum(
                cost.alpha * n * n + beta * n for n in map(lengths_t.__getitem__, singles)
            )
            wider = _widen_rigid(
                timeline, d_of, ratio_of, lengths_t, world_size, cost, rule, offload, singles_work
            )
            if wider is not None:
                wider_bound = wider.bound(singles_work)[0]
        args = (singles, ratio_of, lengths_t, world_size, capacity, cost, pipeline_stages)
        plan = _balanced_plan(timeline, *args)
        # The bound ignores how whole sequences fit into idle windows, so the widened rings
        # are kept only if the plan they give really ends sooner; the bound is a lower bound
        # of that plan's makespan, so it is not built when it cannot.
        if wider is not None and wider_bound < plan.stats.makespan:
            candidate = _balanced_plan(wider, *args)
            if candidate.stats.makespan < plan.stats.makespan:
                plan = candidate
    else:
        plan = _arrival_order_plan(
            long_ids, singles, d_of, ratio_of, lengths_t, world_size, capacity, cost, offload
        )
    if any(ratio_of.values()):
        plain = plan_batch(
            lengths_t,
            world_size,
            capacity,
            cost=cost,
            group_rule=rule,
            balance=balance,
            pipeline_stages=pipeline_stages,
            widen=widen,
        )
        if plain.stats.makespan <= plan.stats.makespan:
            return plain
    return plan


# (start, placement index, ranks, shards, chunk_size, offload ratio, per-rank seconds)
_Placed = tuple[float, int, tuple[int, ...], tuple[tuple[Range, ...], ...], int, float, float]

_RIGID_EVALUATIONS = 48
"""Most ring placements `_widen_rigid` tries per plan. In the 24 simulated 70B/MoE steps
of issue 5 (128-1,536 ranks, 256K-2M context) the search stops by itself within 23,
except 70B on 512 ranks at 2M, where placements 24-48 lower the bound by 0.45 %."""

_RIGID_WORK = 100_000
"""Most rank assignments (sum of ring sizes over all tried placements) `_widen_rigid`
spends: one costs ~4 us, so at most ~0.4 s, which caps the search at one placement for
16,384 ranks x 8,000 rings (LLaMA-7B, 2M context: 61,577 ranks in rings) and leaves
the 48 for the tens to hundreds of rings whose rigid packing costs 5-20 % of a step."""


class _Timeline:
    """Per-rank state of the balance scheduler while rings are placed.

    ``load``: when the rank is next free; ``gaps``: its ``[start, end)`` idle windows before
    rings that waited for their last member (backfilling shrinks them from the front);
    ``idle``: their total length when made; ``largest``: its longest ring (pipeline
    balance); ``rings``: ``(seq_id, ranks, start, time, blocker)`` in placement order, where
    ``blocker`` is the index of the ring whose end set this ring's start (-1: it started at 0
    or on ranks freed by single-rank work).
    """

    def __init__(self, world_size: int) -> None:
        self.load = [0.0] * world_size
        self.idle = [0.0] * world_size
        self.largest = [0.0] * world_size
        self.gaps: list[list[list[float]]] = [[] for _ in range(world_size)]
        self.rings: list[tuple[int, tuple[int, ...], float, float, int]] = []
        self._last_ring = [-1] * world_size

    def add_ring(self, seq_id: int, ranks: tuple[int, ...], time: float) -> float:
        """Run the ring when its last rank is free; returns its start."""
        load, index = self.load, len(self.rings)
        start = max(load[r] for r in ranks)
        blocker = -1
        for r in ranks:
            if load[r] < start:
                self.gaps[r].append([load[r], start])
                self.idle[r] += start - load[r]
            elif blocker < 0 < start:
                blocker = self._last_ring[r]
            load[r] = start + time
            self.largest[r] = max(self.largest[r], time)
            self._last_ring[r] = index
        self.rings.append((seq_id, ranks, start, time, blocker))
        return start

    def add_single(self, rank: int, time: float) -> None:
        """Single-rank work after everything the rank has so far."""
        self.load[rank] += time
        self._last_ring[rank] = -1

    def critical_chain(self) -> list[int]:
        """Indices of the rings that end last and of those each waited for, latest first."""
        ends = [start + time for _, _, start, time, _ in self.rings]
        index = ends.index(max(ends))
        chain = []
        while index >= 0:
            chain.append(index)
            index = self.rings[index][4]
        return chain

    def free_beside(self, index: int, world_size: int) -> int:
        """Ranks that no other ring uses at any moment while ring ``index`` runs: it could
        have that many more without waiting for, or delaying, the rings beside it."""
        _, ranks, start, time, _ = self.rings[index]
        end = start + time
        # Sweep the other rings' starts and ends inside this one's interval (ends first at
        # equal times: a ring ending when another starts does not overlap it).
        events = []
        for k, (_, other, other_start, other_time, _) in enumerate(self.rings):
            if k != index and other_start < end and other_start + other_time > start:
                events.append((max(other_start, start), 1, len(other)))
                events.append((other_start + other_time, 0, -len(other)))
        used = busiest = 0
        for _, _, change in sorted(events):
            used += change
            busiest = max(busiest, used)
        return world_size - len(ranks) - busiest

    def bound(self, singles_work: float) -> tuple[float, float]:
        """(makespan bound, level): ``level`` is the busy time every rank reaches when
        ``singles_work`` is poured into the least busy ranks (idle windows count as free:
        backfilling fills them first); no plan of these rings ends before
        max(level, the last ring's end), and it ends later where whole sequences do not
        fill the windows or even out the ranks."""
        busy = sorted(load - idle for load, idle in zip(self.load, self.idle, strict=True))
        level, filled = busy[-1], 0.0
        for k, b in enumerate(busy, start=1):
            filled += b
            level = (filled + singles_work) / k
            if k == len(busy) or level <= busy[k]:
                break
        return max(level, max(self.load)), level


def _ring_time(
    cost: CostModel, length: int, ranks: Sequence[int], ratio: float, offload: OffloadConfig | None
) -> float:
    return cost.micro_batch_time(
        [_padded(length, len(ranks))], ranks, offload_ratio=ratio, offload=offload
    )


def _place_rings(
    d_of: dict[int, int],
    ratio_of: dict[int, float],
    lengths: tuple[int, ...],
    world_size: int,
    cost: CostModel,
    offload: OffloadConfig | None,
) -> _Timeline:
    """Balance scheduler, multi-rank part: rings (d, then length, descending) on the d
    least-loaded ranks, inside one node when a node has d ranks free as early."""
    timeline = _Timeline(world_size)
    # Heap of (load, rank): ties go to the lower rank, so first-wave rings are contiguous.
    heap = [(0.0, r) for r in range(world_size)]
    for seq_id in sorted(d_of, key=lambda i: (-d_of[i], -lengths[i], i)):
        d = d_of[seq_id]
        popped = [heapq.heappop(heap) for _ in range(d)]
        if d <= cost.node_size:
            popped = _prefer_one_node(heap, popped, d, cost.node_size)
        chosen = [r for _, r in popped[:d]]
        for entry in popped[d:]:
            heapq.heappush(heap, entry)
        ranks = tuple(sorted(chosen))
        time = _ring_time(cost, lengths[seq_id], ranks, ratio_of[seq_id], offload)
        timeline.add_ring(seq_id, ranks, time)
        for r in chosen:
            heapq.heappush(heap, (timeline.load[r], r))
    return timeline


def _wider_sizes(
    length: int,
    d: int,
    target: float,
    free: int,
    world_size: int,
    cost: CostModel,
    rule: GroupRule,
) -> list[tuple[int, float]]:
    """(size, time) of the ring sizes above d to try for a ring that should take at most
    ``target`` seconds and has ``free`` ranks idle beside it: the least size that is that
    fast (by bisection: time falls with d apart from padding and tile wiggles), the size
    that takes exactly the idle ranks, one step up (d + 1, or 2d under pow2) for when
    neither exists, and world_size (time is not convex in d, so the sizes in between are
    no guide). Under pow2 every size is a power of two or world_size. Times assume ranks
    0..size-1, as `_widen` does."""
    if d >= world_size:
        return []
    if rule is GroupRule.POW2:
        ladder = [1 << k for k in range(d.bit_length(), world_size.bit_length())]
        ladder = [size for size in ladder if d < size < world_size] + [world_size]
    else:
        ladder = list(range(d + 1, world_size + 1))

    def time_on(size: int) -> float:
        return cost.micro_batch_time([_padded(length, size)], range(size))

    lo, hi = 0, len(ladder)
    while lo < hi:
        mid = (lo + hi) // 2
        if time_on(ladder[mid]) <= target:
            hi = mid
        else:
            lo = mid + 1
    fitting = bisect_right(ladder, d + free) - 1
    picks = [lo, fitting, 0, len(ladder) - 1]
    sizes = dict.fromkeys(ladder[k] for k in picks if 0 <= k < len(ladder))
    return [(size, time_on(size)) for size in sizes]


def _widen_rigid(
    timeline: _Timeline,
    d_of: dict[int, int],
    ratio_of: dict[int, float],
    lengths: tuple[int, ...],
    world_size: int,
    cost: CostModel,
    rule: GroupRule,
    offload: OffloadConfig | None,
    singles_work: float,
) -> _Timeline | None:
    """Widen rings that cannot run side by side and so end after the rest of the work.

    A ring needs all of its ranks at once: a 90-rank ring on 128 ranks leaves 38, so a
    41-rank ring must follow it, and the two in a row outlast the mean load although
    neither does alone (what `_widen` checks). Greedy descent on `_Timeline.bound`: take
    the chain of rings that ends last; for each of its rings, give it and every ring of its
    size each of the `_wider_sizes` for the time the chain must lose; keep the placement
    with the lowest bound; repeat while the bound falls. A size is skipped without placing
    it when the rank-seconds it adds already lift the mean load to the bound (a world_size
    ring runs alone, so the rest of the work comes after it). At most `_RIGID_EVALUATIONS`
    placements and `_RIGID_WORK` rank assignments. Returns the widened placement, or None
    when no widening lowers the bound.
    """
    best, level = timeline.bound(singles_work)
    if best <= level:
        return None
    placements = min(_RIGID_EVALUATIONS, _RIGID_WORK // sum(d_of.values()))
    best_d, best_timeline = d_of, timeline
    while best > level and placements > 0:
        excess = best - level
        rank_seconds = sum(best_timeline.load) - sum(best_timeline.idle) + singles_work
        found = None
        for index in best_timeline.critical_chain():
            seq_id, ranks, _, time, _ = best_timeline.rings[index]
            if placements == 0:
                break
            if ratio_of[seq_id] > 0.0:
                continue
            d = len(ranks)
            free = best_timeline.free_beside(index, world_size)
            # Rings of one size tend to run in parallel waves, each chain ending about when
            # this one does: widening only this ring would leave the step as long.
            peers = [i for i, size in best_d.items() if size == d and ratio_of[i] == 0.0]
            for size, size_time in _wider_sizes(
                lengths[seq_id], d, time - excess, free, world_size, cost, rule
            ):
                # Estimated from this ring's times: the peers hold sequences of similar
                # length (same size), and a world_size ring runs alone.
                rest = rank_seconds - len(peers) * d * time
                floor = (
                    len(peers) * size_time + rest / world_size
                    if size == world_size
                    else (rest + len(peers) * size * size_time) / world_size
                )
                limit = found[0] if found else best * (1 - 1e-9)
                if floor >= limit or placements == 0:
                    continue
                trial = {**best_d, **dict.fromkeys(peers, size)}
                trial_timeline = _place_rings(trial, ratio_of, lengths, world_size, cost, offload)
                placements -= 1
                trial_bound, trial_level = trial_timeline.bound(singles_work)
                if trial_bound < limit:
                    found = (trial_bound, trial_level, trial, trial_timeline)
        if found is None:
            break
        best, level, best_d, best_timeline = found
    return None if best_d is d_of else best_timeline


def _balanced_plan(
    timeline: _Timeline,
    singles: list[int],
    ratio_of: dict[int, float],
    lengths: tuple[int, ...],
    world_size: int,
    capacity: int,
    cost: CostModel,
    pipeline_stages: int,
) -> Plan:
    """Balance scheduler, single-rank part, on the rings of ``timeline`` (which it fills)."""
    placed: list[_Placed] = []
    for seq_id, ranks, start, time, _ in timeline.rings:
        shards, chunk = _zigzag_shards(seq_id, lengths[seq_id], len(ranks))
        placed.append((start, len(placed), ranks, shards, chunk, ratio_of[seq_id], time))
    load, gaps = timeline.load, timeline.gaps

    def place_bin(rank: int, seq_ids: list[int]) -> None:
        time = cost.compute_time([lengths[i] for i in seq_ids])
        shard = tuple([(i, 0, lengths[i]) for i in seq_ids])
        for gap in gaps[rank]:
            if gap[0] + time <= gap[1]:
                placed.append((gap[0], len(placed), (rank,), (shard,), 0, 0.0, time))
                gap[0] += time
                return
        placed.append((load[rank], len(placed), (rank,), (shard,), 0, 0.0, time))
        load[rank] += time

    # Idle windows first: a rank waiting for the last member of its next ring idles anyway,
    # so each window takes, bin by bin, the longest sequences of the whole batch that still
    # fit in its time and capacity (a single-rank item needs no partner, so running it
    # early is always legal). Filling them from each rank's own share instead leaves a
    # window empty whenever that share holds only sequences too long for it (70B, 512
    # ranks, 256K context: 1.2 s of a 28.6 s step).
    def work(n: int) -> float:  # compute of one sequence without the call's gamma
        return cost.compute_time([n]) - cost.gamma

    pool: dict[int, list[int]] = {}
    for seq_id in reversed(singles):  # pop() then takes the lowest id of a length
        pool.setdefault(lengths[seq_id], []).append(seq_id)
    sizes = sorted(pool)
    taken: set[int] = set()
    for rank in range(world_size):
        for gap in gaps[rank]:
            while sizes:
                chosen: list[int] = []
                tokens, room = capacity, gap[1] - gap[0] - cost.gamma
                while sizes:
                    # work() grows with n, so both limits are bisections.
                    k = min(bisect_right(sizes, tokens), bisect_right(sizes, room, key=work)) - 1
                    if k < 0:
                        break
                    n = sizes[k]
                    chosen.append(pool[n].pop())
                    taken.add(chosen[-1])
                    if not pool[n]:
                        del pool[n], sizes[k]
                    tokens -= n
                    room -= work(n)
                if not chosen:
                    break
                start = gap[0]
                place_bin(rank, chosen)
                if gap[0] == start:  # summed in another order, it missed by a rounding
                    break
    left = [seq_id for seq_id in singles if seq_id not in taken]

    # LPT over the other single sequences (not over bins: a whole bin is too coarse a unit
    # to even out ranks that hold ~10 micro-batches) by when each rank is free; then each
    # rank packs its own. gamma is charged per capacity tokens, which is what packing will
    # cost. With pipeline stages (1F1B) a rank costs its load + (p - 1) * its largest
    # micro-batch, so pipelines that already hold a long item get fewer others (PP-aware
    # balance).
    bubble = pipeline_stages - 1
    largest = timeline.largest
    heap = [(load[r] + bubble * largest[r], r) for r in range(world_size)]
    heapq.heapify(heap)
    per_rank: list[list[int]] = [[] for _ in range(world_size)]
    free_at = list(load)
    alpha, beta = cost.alpha, cost.beta + cost.gamma / capacity
    # Attention as compute_time counts it (whole tiles past attention_tile = 1), so the
    # schedule evens out the cost it is timed with.
    tiles = cost.attention_work if cost.attention_tile > 1 else None
    heappushpop = heapq.heappushpop
    if left:
        r = heapq.heappop(heap)[1]
        for seq_id in left:
            L = lengths[seq_id]
            per_rank[r].append(seq_id)
            seconds = alpha * (L * L if tiles is None else tiles(L)) + beta * L
            free_at[r] += seconds
            if bubble:
                largest[r] = max(largest[r], seconds + cost.gamma)
            r = heappushpop(heap, (free_at[r] + bubble * largest[r], r))[1]
    for r, seq_ids in enumerate(per_rank):
        for packed in _pack_best_fit(seq_ids, lengths, capacity):
            place_bin(r, packed)
    return _finish_plan(placed, world_size, capacity, lengths, cost)


def _arrival_order_plan(
    long_ids: list[int],
    singles: list[int],
    d_of: dict[int, int],
    ratio_of: dict[int, float],
    lengths: tuple[int, ...],
    world_size: int,
    capacity: int,
    cost: CostModel,
    offload: OffloadConfig | None,
) -> Plan:
    """No balance scheduler: items in arrival order (first sequence id) go to the ranks
    with the fewest items, each after everything those ranks have so far."""
    timeline = _Timeline(world_size)
    placed: list[_Placed] = []
    bins = _pack_best_fit(singles, lengths, capacity)
    units = sorted(
        [(i, True, i) for i in long_ids] + [(min(b), False, k) for k, b in enumerate(bins)]
    )
    heap_count = [(0, r) for r in range(world_size)]
    for _, is_multi, key in units:
        popped = [heapq.heappop(heap_count) for _ in range(d_of[key] if is_multi else 1)]
        if is_multi:
            ranks = tuple(sorted(r for _, r in popped))
            shards, chunk = _zigzag_shards(key, lengths[key], len(ranks))
            ratio = ratio_of[key]
            time = _ring_time(cost, lengths[key], ranks, ratio, offload)
            start = timeline.add_ring(key, ranks, time)
            placed.append((start, len(placed), ranks, shards, chunk, ratio, time))
        else:
            rank = popped[0][1]
            time = cost.compute_time([lengths[i] for i in bins[key]])
            shard = tuple([(i, 0, lengths[i]) for i in bins[key]])
            placed.append((timeline.load[rank], len(placed), (rank,), (shard,), 0, 0.0, time))
            timeline.add_single(rank, time)
        for count, r in popped:
            heapq.heappush(heap_count, (count + 1, r))
    return _finish_plan(placed, world_size, capacity, lengths, cost)


def _finish_plan(
    placed: list[_Placed],
    world_size: int,
    capacity: int,
    lengths: tuple[int, ...],
    cost: CostModel,
) -> Plan:
    """The global order sorts items by estimated start, then by placement."""
    placed.sort(key=lambda entry: (entry[0], entry[1]))
    items = tuple(
        WorkItem(
            item_id=k,
            ranks=ranks,
            shards=shards,
            chunk_size=chunk,
            offload_ratio=ratio,
            est_time=time,
        )
        for k, (_, _, ranks, shards, chunk, ratio, time) in enumerate(placed)
    )
    mb_times = {k: entry[6] for k, entry in enumerate(placed)}
    stats = _plan_stats(items, mb_times, world_size, lengths, cost)
    return Plan(
        items=items,
        world_size=world_size,
        capacity=capacity,
        lengths=lengths,
        stats=stats,
        strategy="hdp",
        cost=cost,
    )


@_gc_paused
def plan_static_mesh(
    lengths: Sequence[int],
    world_size: int,
    capacity: int,
    *,
    cp_size: int | None = None,
    cost: CostModel | None = None,
    assignment: StaticAssignment | str = StaticAssignment.DP_BALANCED,
) -> Plan:
    """Plan one global batch on a static DP x CP mesh (the Megatron-style baseline).

    CP (default: the least power of two whose zigzag shards of this batch's longest
    sequence fit in ``capacity``; a real mesh fixes CP at launch for the longest sequence
    the run can see, so pass ``cp_size`` to model that) must divide world_size;
    DP = world_size / CP and CP group g is ranks ``g*CP .. g*CP + CP - 1``. Documents are
    packed into micro-batches of at most ``capacity`` token slots per rank, every document
    zigzag-sharded over the CP group (padded to a multiple of 2*CP, TE's THD layout).
    ``assignment`` picks how documents reach DP groups and micro-batches
    (`StaticAssignment`; the default is what Megatron-LM does). Each document is one item;
    the items of one micro-batch share ``WorkItem.micro_batch``. With CP = 1 a micro-batch
    is one single-rank item of whole sequences.
    """
    lengths_t = _check_lengths(lengths)
    _check_world_and_capacity(world_size, capacity)
    try:
        assignment = StaticAssignment(assignment)
    except ValueError:
        choices = ", ".join(repr(a.value) for a in StaticAssignment)
        raise ValueError(f"assignment must be one of {choices}, got {assignment!r}") from None
    cost = cost or CostModel()
    longest = max(lengths_t)
    if cp_size is None:
        cp = 1
        while not _fits(longest, cp, capacity):
            cp *= 2
            if cp > world_size:
                raise ValueError(
                    f"the longest sequence ({longest} tokens) needs a CP group of {cp} ranks "
                    f"at capacity {capacity}, more than world_size {world_size}; raise capacity "
                    "or world_size, or split the sequence"
                )
    else:
        cp = cp_size
        if not isinstance(cp, int) or cp < 1:
            raise ValueError(f"cp_size must be an int >= 1, got {cp!r}")
        if not _fits(longest, cp, capacity):
            raise ValueError(
                f"cp_size {cp} is too small: the longest sequence ({longest} tokens) needs "
                f"2*ceil(L/(2*cp)) <= capacity {capacity}; raise cp_size or capacity"
            )
    if world_size % cp:
        raise ValueError(
            f"cp_size {cp} must divide world_size {world_size} (DP = world_size / CP); "
            "pick a world_size that is a multiple of the CP group"
        )
    dp = world_size // cp

    slots_of = [L if cp == 1 else 2 * cp * ((L + 2 * cp - 1) // (2 * cp)) for L in lengths_t]
    if assignment is StaticAssignment.DP_BALANCED:
        per_group = _assign_dp_balanced(slots_of, dp, capacity * cp)
    else:
        per_group = _assign_token_balanced(slots_of, dp, capacity * cp)

    # Global order: round m runs micro-batch m of every group.
    items: list[WorkItem] = []
    mb_times: dict[int, float] = {}
    for m in range(max(len(batches) for batches in per_group)):
        for g, batches in enumerate(per_group):
            if m >= len(batches):
                continue
            seq_ids = batches[m]
            ranks = tuple(range(g * cp, (g + 1) * cp))
            padded = [slots_of[i] for i in seq_ids]
            mb_time = cost.micro_batch_time(padded, ranks)
            first = len(items)
            mb_times[first] = mb_time
            if cp == 1:
                shard = tuple([(i, 0, lengths_t[i]) for i in seq_ids])
                items.append(
                    WorkItem(item_id=first, ranks=ranks, shards=(shard,), est_time=mb_time)
                )
                continue
            # est_time splits the micro-batch time over its documents by compute.
            work = [cost.alpha * s * s + cost.beta * s for s in padded]
            scale = mb_time / sum(work) if sum(work) > 0 else 0.0
            for seq_id, w in zip(seq_ids, work, strict=True):
                shards, chunk = _zigzag_shards(seq_id, lengths_t[seq_id], cp)
                items.append(
                    WorkItem(
                        item_id=len(items),
                        ranks=ranks,
                        shards=shards,
                        chunk_size=chunk,
                        micro_batch=first,
                        est_time=w * scale,
                    )
                )
    stats = _plan_stats(tuple(items), mb_times, world_size, lengths_t, cost)
    return Plan(
        items=tuple(items),
        world_size=world_size,
        capacity=capacity,
        lengths=lengths_t,
        stats=stats,
        strategy="static",
        cost=cost,
    )


# --------------------------------------------------------------------------------------------
# helpers


def _check_lengths(lengths: Sequence[int]) -> tuple[int, ...]:
    try:
        values = tuple(map(operator.index, lengths))
    except TypeError:
        raise TypeError(f"lengths must be a sequence of ints, got {lengths!r:.200}") from None
    if not values:
        raise ValueError("lengths is empty: a batch needs at least one sequence")
    if min(values) < 1:
        seq_id = next(i for i, n in enumerate(values) if n < 1)
        raise ValueError(
            f"lengths[{seq_id}] = {values[seq_id]}: every sequence needs >= 1 token; "
            "drop empty ones"
        )
    return values


def _check_world_and_capacity(world_size: int, capacity: int) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(
            f"capacity must be an int >= 1 (tokens per rank per micro-batch), got {capacity!r}"
        )


def _check_group_rule(group_rule: GroupRule | str) -> GroupRule:
    try:
        return GroupRule(group_rule)
    except ValueError:
        raise ValueError(
            f"group_rule must be one of {[g.value for g in GroupRule]}, got {group_rule!r}"
        ) from None


def _fits(length: int, d: int, capacity: int) -> bool:
    """Whether one rank's share of ``length`` on d ranks fits (zigzag slots for d > 1)."""
    if d == 1:
        return length <= capacity
    return 2 * math.ceil(length / (2 * d)) <= capacity


def _min_ranks(length: int, capacity: int) -> int:
    """Least d with _fits(length, d, capacity); 0 if no d fits (capacity 1, length >= 2)."""
    if length <= capacity:
        return 1
    even = capacity - capacity % 2
    if even == 0:
        return 0
    return math.ceil(length / even)


def _ranks_needed(length: int, seq_id: int, capacity: int, world_size: int, rule: GroupRule) -> int:
    d = _min_ranks(length, capacity)
    if d == 0 or d > world_size:
        limit = world_size * (capacity - capacity % 2) if world_size > 1 else capacity
        raise ValueError(
            f"sequence {seq_id} has {length} tokens; {world_size} ranks of capacity {capacity} hold "
            f"at most {limit} (zigzag shards use an even number of slots); raise capacity or "
            "world_size, or split the sequence"
        )
    if rule is GroupRule.POW2 and d > 1:
        d = min(1 << (d - 1).bit_length(), world_size)
    return d


def _prefer_one_node(
    heap: list[tuple[float, int]], popped: list[tuple[float, int]], d: int, node_size: int
) -> list[tuple[float, int]]:
    """Reorder ``popped`` (the d least-loaded ranks) so its first d entries sit in one node
    when some node has d ranks that are free no later than those: the ring then runs over
    NVLink instead of InfiniBand at the same start time. Extra candidates (at most
    2 * node_size, to keep placement O(d + node_size)) are popped from ``heap`` and returned
    after the first d; the caller pushes those back."""
    start = popped[-1][0]
    while heap and heap[0][0] <= start and len(popped) < d + 2 * node_size:
        popped.append(heapq.heappop(heap))
    by_node: dict[int, list[tuple[float, int]]] = {}
    for entry in popped:  # popped is in (load, rank) order, so each list is too
        by_node.setdefault(entry[1] // node_size, []).append(entry)
    fits = [(members[d - 1], node) for node, members in by_node.items() if len(members) >= d]
    if not fits:
        return popped
    _, node = min(fits)
    first = by_node[node][:d]
    taken = {r for _, r in first}
    return first + [entry for entry in popped if entry[1] not in taken]


def _padded(length: int, d: int) -> int:
    """Length padded to a multiple of 2d (the zigzag layout)."""
    return 2 * d * math.ceil(length / (2 * d))


def _widen(
    length: int, d: int, world_size: int, cost: CostModel, rule: GroupRule, mean_load: float
) -> tuple[int, float]:
    """Widen a ring that outlasts the mean rank load while that lowers the step's lower bound
    max(ring time, mean load): more ranks shorten the ring but cost rank-seconds (exposed
    ring traffic grows with d). Returns (d, the mean load with the chosen ring)."""
    time = cost.micro_batch_time([_padded(length, d)], range(d))
    while d < world_size and time > mean_load:
        wider = min(2 * d, world_size) if rule is GroupRule.POW2 else d + 1
        wider_time = cost.micro_batch_time([_padded(length, wider)], range(wider))
        wider_mean = mean_load + (wider * wider_time - d * time) / world_size
        if max(wider_time, wider_mean) >= max(time, mean_load):
            break
        d, time, mean_load = wider, wider_time, wider_mean
    return d, mean_load


def _choose_offload(
    length: int,
    d_min: int,
    capacity: int,
    cost: CostModel,
    offload: OffloadConfig,
    rule: GroupRule,
    max_time: float,
) -> tuple[int, float]:
    """(d, ratio) minimising d * item time over d from the offload-enabled minimum to d_min,
    among rings that take at most ``max_time``. Times assume ranks 0..d-1 (the planner has
    not chosen ranks yet), i.e. NVLink rings up to node_size."""
    keep = 1.0 - offload.max_ratio * offload.offloadable_fraction
    best = (d_min * cost.micro_batch_time([_padded(length, d_min)], range(d_min)), d_min, 0.0)
    d = max(2, _min_ranks(length, math.floor(capacity / keep)))
    if rule is GroupRule.POW2:
        d = 1 << (d - 1).bit_length()
    while d < d_min:
        slots = _padded(length, d) // d
        # Least ratio with slots * (1 - ratio * f) <= capacity.
        ratio = max(0.0, (1.0 - capacity / slots) / offload.offloadable_fraction)
        if ratio <= offload.max_ratio:
            time = cost.micro_batch_time(
                [d * slots], range(d), offload_ratio=ratio, offload=offload
            )
            if d * time < best[0] and time <= max_time:
                best = (d * time, d, ratio)
        d = d * 2 if rule is GroupRule.POW2 else d + 1
    return best[1], best[2]


def _pack_best_fit(order: list[int], lengths: tuple[int, ...], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing: each sequence into the open bin with the least room that fits."""
    if not order:
        return []
    if sum(lengths[i] for i in order) <= capacity:
        return [order]
    bins: list[list[int]] = []
    # Open bins encoded as room * scale + bin index, so bisect finds the least room >= L and,
    # among equal rooms, the oldest bin (deterministic).
    scale = len(order) + 1
    open_bins: list[int] = []
    for seq_id in order:
        L = lengths[seq_id]
        pos = bisect_left(open_bins, L * scale)
        if pos == len(open_bins):
            index, room = len(bins), capacity
            bins.append([])
        else:
            code = open_bins.pop(pos)
            index, room = code % scale, code // scale
        bins[index].append(seq_id)
        room -= L
        if room > 0:
            insort(open_bins, room * scale + index)
    return bins


def _next_fit(seq_ids: Sequence[int], slots_of: Sequence[int], budget: int) -> list[list[int]]:
    """Documents in the given order into packs of at most ``budget`` slots, a new pack
    whenever the next document does not fit in the current one."""
    packs: list[list[int]] = []
    used = budget + 1
    for seq_id in seq_ids:
        if used + slots_of[seq_id] > budget:
            packs.append([])
            used = 0
        packs[-1].append(seq_id)
        used += slots_of[seq_id]
    return packs


def _assign_dp_balanced(slots_of: list[int], dp: int, budget: int) -> list[list[list[int]]]:
    """Per DP group, its packs in micro-batch order (`StaticAssignment.DP_BALANCED`)."""
    packs = _next_fit(range(len(slots_of)), slots_of, budget)
    missing = -len(packs) % dp
    i = len(packs) - 1
    while missing and i >= 0:
        if len(packs[i]) > 1:
            packs.append([packs[i].pop()])
            missing -= 1
        else:
            i -= 1
    return [packs[g::dp] for g in range(dp)]


def _assign_token_balanced(slots_of: list[int], dp: int, budget: int) -> list[list[list[int]]]:
    """Per DP group, its packs in micro-batch order (`StaticAssignment.TOKEN_BALANCED`)."""
    group_docs: list[list[int]] = [[] for _ in range(dp)]
    heap = [(0, g) for g in range(dp)]
    for seq_id, slots in enumerate(slots_of):
        tokens, g = heap[0]
        group_docs[g].append(seq_id)
        heapq.heapreplace(heap, (tokens + slots, g))
    return [_next_fit(seq_ids, slots_of, budget) for seq_ids in group_docs]


def _zigzag_shards(seq_id: int, length: int, d: int) -> tuple[tuple[tuple[Range, Range], ...], int]:
    """Zigzag shards of one sequence on d ring positions, and the padded chunk size."""
    c = -(-length // (2 * d))
    # Chunk bounds min(k*c, length) for k = 0..2d, built with C-level range/zip (this runs
    # once per document per static-mesh plan: 1e5 documents x CP 128 at cluster scale).
    bounds = list(range(0, (length // c + 1) * c, c))
    bounds += [length] * (2 * d + 1 - len(bounds))
    chunks = list(zip([seq_id] * (2 * d), bounds[:-1], bounds[1:], strict=True))
    return tuple(zip(chunks[:d], chunks[: d - 1 : -1], strict=True)), c


def _plan_stats(
    items: tuple[WorkItem, ...],
    mb_times: dict[int, float],
    world_size: int,
    lengths: tuple[int, ...],
    cost: CostModel,
) -> PlanStats:
    """Replay the global order: a micro-batch starts when all of its ranks are free.

    ``mb_times``: per-rank seconds of each micro-batch, keyed by the id of its first item.
    """
    busy = [0.0] * world_size
    finish = [0.0] * world_size
    calls = [0] * world_size
    kv = dkv = padding = 0
    k = 0
    while k < len(items):
        first = items[k]
        end = k + 1
        while end < len(items) and items[end].micro_batch == first.micro_batch:
            end += 1
        mb_time = mb_times[first.item_id]
        start = max(finish[r] for r in first.ranks)
        for r in first.ranks:
            busy[r] += mb_time
            finish[r] = start + mb_time
            calls[r] += 1
        for item in items[k:end]:
            d = len(item.ranks)
            if d > 1:
                slots = 2 * item.chunk_size
                kv += cost.ring_kv_bytes(d, slots)
                dkv += cost.ring_dkv_bytes(d, slots)
                padding += d * slots - lengths[item.shards[0][0][0]]
        k = end
    makespan = max(finish)
    mean_busy = sum(busy) / world_size
    return PlanStats(
        busy_time=tuple(busy),
        finish_time=tuple(finish),
        makespan=makespan,
        balance=makespan / mean_busy if mean_busy > 0 else 1.0,
        micro_batches=tuple(calls),
        ring_kv_bytes=kv,
        ring_dkv_bytes=dkv,
        ring_bytes=kv + dkv,
        padding_tokens=padding,
        loss_tokens=sum(lengths) - len(lengths),
    )
