"""Cost model shared by the HDP planner (`bitscale.hdp.plan`) and the cluster simulator.

Pure arithmetic, no torch. Times are seconds per rank, bytes are exact integers.

Compute of one micro-batch of documents with (padded) lengths ``s_i`` on ``d`` ranks::

    t_compute = sum_i(alpha * s_i**2 + beta * s_i) / d + gamma

(``alpha``: causal attention of the whole model, forward + backward; ``beta``: GEMMs and
everything else linear in tokens; ``gamma``: fixed cost of one forward/backward call).

Ring traffic of a ``d``-rank zigzag ring item (``d >= 2``) whose ranks each hold ``slots``
token slots (``slots = 2 * chunk_size``, padding included, because the ring moves whole
tensors) is, summed over all ranks and all attention layers::

    kv_hop   = 2 * kv_heads * head_dim * element_size * slots       # one K block + one V block
    dkv_hop  = 2 * kv_heads * head_dim * dkv_element_size * slots   # dK/dV accumulate in fp32
    ring_kv  = num_layers * d * 2 * (d - 1) * kv_hop                # (d-1) hops forward, (d-1) backward
    ring_dkv = num_layers * d * d * dkv_hop                         # d hops back to the owner

Each rank sends ``(3d - 2)`` blocks per layer: 2(d - 1) K/V hops and d dK/dV hops. Ring
communication overlaps only with the compute of the ring steps, so what the ring adds to
an item's time is::

    t_ring    = num_layers * ((2(d - 1) * kv_hop + d * dkv_hop) / bandwidth
                              + (3d - 2) * ring_step_latency)
    t_exposed = max(0, t_ring - (d - 1)/d * (sum_i(alpha * s_i**2) / d + t_steps))

with ``bandwidth`` = ``intra_node_bandwidth`` when all ranks sit in one node of
``node_size`` consecutive ranks, else ``inter_node_bandwidth``. This exposure is why short
sequences under context parallelism are communication-bound: their attention is too small
to hide the ring.

Three costs of running a document on a ring rather than whole, all off by default (the
exact formulas above, which is what CPU attention costs) and set by the cluster simulator
from GPU kernel facts:

* ``attention_tile`` t > 1: flash attention computes whole t x t tiles per document, so
  ``s**2`` (twice the causal pairs) becomes twice the pairs of the tiles touched:
  ``t**2 * n * (n + 1)`` with ``n = ceil(s / t)`` for a whole document (causal tile
  triangle), and per rank of a d-rank zigzag ring (chunks of ``c = s / 2d``)
  ``t**2 * (m * (m + 1) + 2 * (d - 1) * m * ceil(c / t))`` with ``m = ceil(2c / t)``
  (step 0 is causal over the rank's 2c rows, each other step is 2c x c or c x 2c);
* ``ring_step_overhead``: fixed seconds per ring step per layer, added to the item's
  compute ``num_layers * d`` times;
* ``ring_merge_time``: seconds per token slot per ring step after the first (whole model),
  added ``(d - 1) * slots`` times.

The two per-step costs (together ``t_steps``) run on the compute stream, so like attention
they hide ring traffic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from itertools import combinations


@dataclass(frozen=True, kw_only=True)
class OffloadConfig:
    """Selective activation offloading of long (multi-rank) items to host memory.

    Moving a fraction ``r`` of the offloadable activations to the host lets a rank hold
    ``capacity / (1 - r * offloadable_fraction)`` token slots, so a long sequence needs fewer
    ranks (less ring traffic, fewer ring steps). The copy costs
    ``r * offloadable_fraction * activation_bytes_per_token * slots / host_bandwidth`` seconds
    each way (device-to-host in forward, host-to-device in backward) and hides behind the
    item's forward (1/3 of compute) and backward (2/3) respectively.
    """

    max_ratio: float = 0.5
    """Largest fraction r of the offloadable activations moved to host, in [0, 1]."""
    offloadable_fraction: float = 0.8
    """Share of a rank's per-token activation memory that offloading can move (the rest is
    workspace and the tensors of the layer in flight)."""
    activation_bytes_per_token: float = 4.5e6
    """Device activation bytes per token over the whole model; 4.5 MB is a 7B model with
    selective recompute (34 * hidden * 32 layers bytes in bf16)."""
    host_bandwidth: float = 25e9
    """Host<->device bytes/s per GPU (PCIe Gen5 x16 at ~50 % of peak)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_ratio <= 1.0:
            raise ValueError(f"OffloadConfig.max_ratio must be in [0, 1], got {self.max_ratio}")
        if not 0.0 < self.offloadable_fraction <= 1.0:
            raise ValueError(
                "OffloadConfig.offloadable_fraction must be in (0, 1], "
                f"got {self.offloadable_fraction}"
            )
        if self.max_ratio * self.offloadable_fraction >= 1.0:
            raise ValueError(
                "OffloadConfig.max_ratio * offloadable_fraction must be < 1 (a rank cannot "
                "offload all of its activations); lower max_ratio"
            )
        for name in ("activation_bytes_per_token", "host_bandwidth"):
            if getattr(self, name) <= 0:
                raise ValueError(f"OffloadConfig.{name} must be > 0, got {getattr(self, name)}")

    def copy_time(self, ratio: float, slots: int) -> float:
        """Seconds of one direction of the host copy for ``slots`` tokens at ``ratio``."""
        moved = ratio * self.offloadable_fraction * self.activation_bytes_per_token * slots
        return moved / self.host_bandwidth


@dataclass(frozen=True, kw_only=True)
class CostModel:
    """Per-rank time and ring bytes of work items (formulas in the module docstring).

    The defaults describe a LLaMA-7B-like model (32 layers, hidden 4096, 32 KV heads of 128,
    bf16) on one H100 at ~400 TFLOP/s effective: ``beta`` = 3 * 2 * 6.5e9 FLOP/token / 4e14,
    ``alpha`` = 3.5 * 2 * 32 * 4096 FLOP/token**2 / 4e14 (FlashAttention backward ~2.5x its
    forward). Bandwidths are per GPU: NVLink 200 GB/s, InfiniBand 25 GB/s (200 Gb/s NIC).
    """

    alpha: float = 2.3e-9
    """Seconds per token**2 (causal attention, forward + backward, whole model)."""
    beta: float = 1.0e-4
    """Seconds per token (GEMMs, norms, loss)."""
    gamma: float = 2.0e-3
    """Seconds per micro-batch (one forward/backward call: launches, hooks)."""
    num_layers: int = 32
    """Attention layers; each runs one ring pass per multi-rank item."""
    kv_heads: int = 32
    """Key/value heads (fewer than query heads under GQA)."""
    head_dim: int = 128
    element_size: int = 2
    """Bytes per element of K and V on the ring (the model's activation dtype)."""
    dkv_element_size: int | None = None
    """Bytes per element of dK and dV on the ring. ``None``: ``max(element_size, 4)``, because
    the runtime accumulates and sends partial dK/dV in float32 (float64 for float64 models):
    a bf16 ring adding bf16 partial gradients over 8 hops loses ~3 significant bits."""
    intra_node_bandwidth: float = 200e9
    """Bytes/s one rank sends to its ring neighbour inside a node."""
    inter_node_bandwidth: float = 25e9
    """Bytes/s one rank sends to its ring neighbour across nodes."""
    ring_step_latency: float = 10e-6
    """Seconds of fixed cost per ring hop per layer."""
    node_size: int = 8
    """Ranks per node; ranks r and r' share a node iff r // node_size == r' // node_size."""
    attention_tile: int = 1
    """Query rows (and keys) per flash-attention tile; every tile a document touches costs
    ``attention_tile**2`` pairs however little of it the document fills. 1: exact pair
    counts (``alpha * s**2``)."""
    ring_step_overhead: float = 0.0
    """Seconds per ring step per layer (a forward step and its backward step) of compute-
    stream work a whole document does not do: small correction and accumulation kernels."""
    ring_merge_time: float = 0.0
    """Seconds per token slot per ring step after the first, whole model: merging a step's
    partial attention output (forward) and partial dQ, dK/dV (backward) into the running
    ones, a memory-bound pass over the rank's slots."""

    def __post_init__(self) -> None:
        for name in (
            "alpha",
            "beta",
            "gamma",
            "ring_step_latency",
            "ring_step_overhead",
            "ring_merge_time",
        ):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"CostModel.{name} must be finite and >= 0, got {value}")
        for name in ("intra_node_bandwidth", "inter_node_bandwidth"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CostModel.{name} must be > 0, got {getattr(self, name)}")
        if self.dkv_element_size is not None and (
            not isinstance(self.dkv_element_size, int) or self.dkv_element_size < 1
        ):
            raise ValueError(
                f"CostModel.dkv_element_size must be None or an int >= 1, "
                f"got {self.dkv_element_size!r}"
            )
        for name in (
            "num_layers",
            "kv_heads",
            "head_dim",
            "element_size",
            "node_size",
            "attention_tile",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"CostModel.{name} must be an int >= 1, got {value!r}")

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V of one token in one layer: 2 * kv_heads * head_dim * element_size."""
        return 2 * self.kv_heads * self.head_dim * self.element_size

    @property
    def dkv_bytes_per_token(self) -> int:
        """Bytes of dK and dV of one token in one layer, in the ring's gradient dtype."""
        dkv_element_size = self.dkv_element_size or max(self.element_size, 4)
        return 2 * self.kv_heads * self.head_dim * dkv_element_size

    def ring_kv_bytes(self, d: int, slots: int) -> int:
        """K/V bytes all ranks of a ``d``-rank ring send for one item (forward + backward)."""
        if d < 2:
            return 0
        return self.num_layers * d * 2 * (d - 1) * self.kv_bytes_per_token * slots

    def ring_dkv_bytes(self, d: int, slots: int) -> int:
        """dK/dV bytes all ranks of a ``d``-rank ring send for one item (backward)."""
        if d < 2:
            return 0
        return self.num_layers * d * d * self.dkv_bytes_per_token * slots

    def ring_bandwidth(self, ranks: Sequence[int]) -> float:
        """Per-rank send bandwidth of a ring over ``ranks`` (NVLink inside a node, else IB)."""
        first_node = ranks[0] // self.node_size
        if all(r // self.node_size == first_node for r in ranks):
            return self.intra_node_bandwidth
        return self.inter_node_bandwidth

    def attention_work(self, length: int, d: int = 1) -> int:
        """The ``alpha`` multiplier of one document's causal attention, summed over its
        ``d`` ranks: ``length**2`` (twice its causal token pairs), or with
        ``attention_tile`` > 1 twice the pairs of the whole tiles it touches (module
        docstring), as a whole document (d = 1) or as zigzag chunks on d ranks."""
        t = self.attention_tile
        if t == 1:
            return length * length
        if d == 1:
            n = -(-length // t)
            return t * t * n * (n + 1)
        chunk = -(-length // (2 * d))
        rows = -(-2 * chunk // t)
        return d * t * t * (rows * (rows + 1) + 2 * (d - 1) * rows * (-(-chunk // t)))

    def attention_time(self, lengths: Iterable[int], d: int = 1) -> float:
        """Per-rank seconds of the causal attention of documents of ``lengths`` on d ranks."""
        if self.attention_tile == 1:
            return sum(self.alpha * s * s for s in lengths) / d
        return sum(self.alpha * self.attention_work(s, d) for s in lengths) / d

    def compute_time(self, lengths: Iterable[int], d: int = 1) -> float:
        """``sum(alpha*s**2 + beta*s) / d + gamma``: one micro-batch of documents on d ranks
        (``s**2`` counted in whole tiles when ``attention_tile`` > 1)."""
        if self.attention_tile == 1:
            work = sum(self.alpha * s * s + self.beta * s for s in lengths)
        else:
            alpha, beta, pairs = self.alpha, self.beta, self.attention_work
            work = sum(alpha * pairs(s, d) + beta * s for s in lengths)
        return work / d + self.gamma

    def micro_batch_time(
        self,
        padded_lengths: Sequence[int],
        ranks: Sequence[int],
        *,
        offload_ratio: float = 0.0,
        offload: OffloadConfig | None = None,
    ) -> float:
        """Per-rank seconds of one micro-batch: zigzag-sharded documents (lengths padded to a
        multiple of 2d) on the ring ``ranks``, or whole documents when ``len(ranks) == 1``."""
        d = len(ranks)
        compute = self.compute_time(padded_lengths, d)
        if d == 1:
            return compute
        slots = sum(padded_lengths) // d
        steps = (
            self.num_layers * d * self.ring_step_overhead + (d - 1) * slots * self.ring_merge_time
        )
        compute += steps
        # Per layer each rank sends 2(d-1) K/V blocks and d dK/dV blocks.
        sent = (2 * (d - 1) * self.kv_bytes_per_token + d * self.dkv_bytes_per_token) * slots
        ring = self.num_layers * (
            sent / self.ring_bandwidth(ranks) + (3 * d - 2) * self.ring_step_latency
        )
        attention = self.attention_time(padded_lengths, d)
        exposed = max(0.0, ring - (attention + steps) * (d - 1) / d)
        if offload_ratio > 0.0:
            if offload is None:
                raise ValueError("offload_ratio > 0 needs an OffloadConfig (offload=...)")
            copy = offload.copy_time(offload_ratio, slots)
            exposed += max(0.0, copy - compute / 3) + max(0.0, copy - 2 * compute / 3)
        return compute + exposed

    @classmethod
    def fit(
        cls,
        samples: Iterable[tuple[int | Sequence[int], float]],
        *,
        base: CostModel | None = None,
    ) -> CostModel:
        """Least-squares ``alpha, beta, gamma >= 0`` from measured single-rank micro-batches.

        ``samples``: ``(lengths, seconds)`` pairs, ``lengths`` one document length or the
        lengths of the documents packed in that micro-batch. Every other field is taken from
        ``base`` (default: the defaults), and the attention column counts pairs as ``base``
        does (`attention_work`). Non-negativity is exact: every subset of free
        coefficients is solved and the feasible one with the least squared error wins.
        """
        model = base or cls()
        rows: list[tuple[float, float, float]] = []
        targets: list[float] = []
        for lengths, seconds in samples:
            docs = [lengths] if isinstance(lengths, int) else list(lengths)
            if not docs or any(not isinstance(s, int) or s < 1 for s in docs):
                raise ValueError(f"CostModel.fit: lengths must be ints >= 1, got {lengths!r}")
            if not (seconds >= 0 and math.isfinite(seconds)):
                raise ValueError(f"CostModel.fit: time must be finite and >= 0, got {seconds!r}")
            pairs = sum(model.attention_work(s) for s in docs)
            rows.append((float(pairs), float(sum(docs)), 1.0))
            targets.append(float(seconds))
        if len(rows) < 3:
            raise ValueError(f"CostModel.fit needs >= 3 samples, got {len(rows)}")
        best: tuple[float, tuple[float, float, float]] | None = None
        for size in (3, 2, 1):
            for active in combinations(range(3), size):
                coef = _least_squares(rows, targets, active)
                if coef is None or min(coef) < 0:
                    continue
                error = sum(
                    (sum(c * x for c, x in zip(coef, row, strict=True)) - y) ** 2
                    for row, y in zip(rows, targets, strict=True)
                )
                if best is None or error < best[0]:
                    best = (error, coef)
        assert best is not None, "the single-coefficient fits include gamma = mean(t) >= 0"
        alpha, beta, gamma = best[1]
        return replace(model, alpha=alpha, beta=beta, gamma=gamma)

    def describe(self) -> dict[str, float | int]:
        """All fields as a plain dict (for JSON reports)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _least_squares(
    rows: list[tuple[float, float, float]], targets: list[float], active: tuple[int, ...]
) -> tuple[float, float, float] | None:
    """Normal equations on the ``active`` columns (others fixed at 0); None if singular."""
    import numpy as np

    a = np.array([[row[j] for j in active] for row in rows], dtype=np.float64)
    # Columns span s**2 ~ 1e10 down to 1; scaling each to unit norm keeps lstsq well conditioned.
    norms = np.linalg.norm(a, axis=0)
    if np.any(norms == 0):
        return None
    solution, _, rank, _ = np.linalg.lstsq(a / norms, np.array(targets), rcond=None)
    if rank < len(active):
        return None
    coef = [0.0, 0.0, 0.0]
    for j, value in zip(active, solution / norms, strict=True):
        coef[j] = float(value)
    return (coef[0], coef[1], coef[2])
