"""Cluster-scale simulator: static DP x CP mesh vs HDP, for a model, a cluster and a length
distribution.

It plans every step with the same planner the runtime executes (`plan_batch`,
`plan_static_mesh`), under a `CostModel` derived from first principles:

* a rank is one tensor-parallel group of ``tensor_parallel`` GPUs;
* GEMM time per token: ``3 * gemm_flops_fwd / (tp * peak * gemm_efficiency)`` (train = fwd +
  2x fwd); attention time per sequence: ``3.5 * 2 * layers * hidden * s**2 / (tp * peak *
  attention_efficiency)`` (causal; FlashAttention backward ~2.5x its forward);
* ring hops overlap with the attention of the same step and are exposed otherwise, over
  NVLink inside a node and InfiniBand across nodes (`bitscale.hdp.cost`);
* what running a document on a ring costs beyond its FLOPs: flash attention computes whole
  ``attention_tile`` tiles per document chunk (a 300-token document on CP 4 is 8 chunks of
  38 tokens, each filling a sliver of a 128-row tile), each ring step launches
  ``ring_step_kernels`` small kernels of ``min_kernel_time``, and each step after the first
  merges its partial output and gradients through HBM (``ring_merge_bytes_per_token``);
* per-rank token capacity from memory: ``(hbm * usable - model states) / activation bytes per
  token``, activations ``34 * hidden * layers / tp`` bytes per token (bf16, selective
  recompute, sequence parallel);
* one gradient all-reduce per step over all ranks, ``2 (N-1)/N * 2 * params / tp`` bytes per
  rank at the all-reduce bus bandwidth, not overlapped, identical for every strategy.

Step time = planned makespan + gradient sync. The optional pipeline mode (``pipeline_stages``
p > 1) makes each HDP rank a pipeline of p stages and models 1F1B per rank: a rank's
micro-batches of per-stage time t_i take ``sum(t_i) + (p - 1) * max(t_i)``; the HDP
strategies then balance with that critical path (`plan_batch(pipeline_stages=p)`: pipelines
holding a long item get fewer others). ByteScale's ordering of length buckets across
neighbouring stages is not modelled.

Strategies: ``static`` (Megatron-style mesh: CP fixed for ``max_context``, documents
assigned as Megatron-LM's ``dp_balanced`` packing scheduler does, see
`bitscale.hdp.plan.StaticAssignment`), ``hdp-no-balance`` (minimal rings, equal micro-batch
counts), ``hdp`` (minimal rings + balance scheduler), ``hdp-pow2`` (rings rounded to powers
of two, Megatron hybrid CP), ``hdp-offload`` (hdp + selective activation offloading). The
ablation adds one technique at a time: static -> dynamic rings -> balance -> offloading.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

from bitscale._io import save_figure

from .cost import CostModel, OffloadConfig
from .plan import Plan, _fits, _gc_paused, plan_batch, plan_static_mesh

__all__ = [
    "ABLATION",
    "MODELS",
    "PRESETS",
    "ClusterConfig",
    "LengthDistribution",
    "ModelConfig",
    "SimulationConfig",
    "SimulationReport",
    "StepResult",
    "Strategy",
    "WorkloadConfig",
    "cost_model",
    "fast_mode",
    "sample_lengths",
    "simulate",
]


class Strategy(StrEnum):
    STATIC = "static"
    HDP_NO_BALANCE = "hdp-no-balance"
    HDP = "hdp"
    HDP_POW2 = "hdp-pow2"
    HDP_OFFLOAD = "hdp-offload"


ABLATION: tuple[tuple[Strategy, str], ...] = (
    (Strategy.STATIC, "static DP x CP mesh"),
    (Strategy.HDP_NO_BALANCE, "+ dynamic rings (fewest ranks per sequence)"),
    (Strategy.HDP, "+ balance scheduler (LPT, backfill, widen)"),
    (Strategy.HDP_OFFLOAD, "+ selective offloading"),
)
"""Techniques added one at a time, in order, with their table labels."""


class LengthDistribution(StrEnum):
    EMPIRICAL = "empirical"
    """Sampled with replacement from a file of lengths (one per line)."""
    LOGNORMAL = "lognormal"
    """Lognormal with the given mean and sigma, clipped to [min_length, max_length]."""
    LONGTAIL = "longtail"
    """Byted-like skew: 80 % <= 4K, 15 % 4K-32K, 4.5 % 32K-256K, 0.45 % 256K-2M, 0.05 % >= 2M
    (log-uniform inside each bucket), then cut at max_context."""
    FIXED = "fixed"
    """Every sequence has max_context tokens."""


# Bucket (low, high, probability) of the Byted-like long tail (hdp.md 2: "80 % of samples
# <= 4K, 0.05 % >= 2M"); the middle buckets interpolate a power-law tail.
_LONGTAIL_BUCKETS = (
    (64, 4096, 0.80),
    (4096, 32768, 0.15),
    (32768, 262144, 0.045),
    (262144, 2097152, 0.0045),
    (2097152, 2097152, 0.0005),
)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Transformer shape (SwiGLU or plain FFN; MoE with ``num_experts`` experts, ``top_k``
    active)."""

    name: str
    num_layers: int
    hidden: int
    num_heads: int
    kv_heads: int
    ffn_hidden: int
    vocab: int
    num_experts: int = 1
    top_k: int = 1
    gated_mlp: bool = True
    """SwiGLU (three FFN matrices); False: a plain GeLU FFN (two), Megatron-LM's default
    without ``--swiglu``."""

    def __post_init__(self) -> None:
        for f in ("num_layers", "hidden", "num_heads", "kv_heads", "ffn_hidden", "vocab"):
            if getattr(self, f) < 1:
                raise ValueError(f"ModelConfig.{f} must be >= 1, got {getattr(self, f)}")
        if self.hidden % self.num_heads or self.num_heads % self.kv_heads:
            raise ValueError(
                f"ModelConfig {self.name}: hidden ({self.hidden}) must divide by num_heads "
                f"({self.num_heads}) and num_heads by kv_heads ({self.kv_heads})"
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"ModelConfig {self.name}: need 1 <= top_k ({self.top_k}) <= num_experts "
                f"({self.num_experts})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def kv_hidden(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def gemm_flops_per_token(self) -> int:
        """Forward GEMM FLOPs per token: QKV + output projections, active experts, LM head."""
        h, f = self.hidden, self.ffn_hidden
        per_layer = 2 * (h * (h + 2 * self.kv_hidden) + h * h + self._ffn_mats * h * f * self.top_k)
        return self.num_layers * per_layer + 2 * h * self.vocab

    def attention_flops(self, length: int) -> int:
        """Forward causal attention FLOPs of one sequence: 2 * layers * hidden * s**2."""
        return 2 * self.num_layers * self.hidden * length * length

    @property
    def _ffn_mats(self) -> int:
        return 3 if self.gated_mlp else 2

    @property
    def params(self) -> int:
        """All parameters (every expert), embeddings and LM head untied."""
        h, f = self.hidden, self.ffn_hidden
        per_layer = h * (h + 2 * self.kv_hidden) + h * h + self._ffn_mats * h * f * self.num_experts
        return self.num_layers * per_layer + 2 * h * self.vocab

    @property
    def ring_merge_bytes_per_token(self) -> int:
        """HBM bytes per token per layer of merging one ring step's partial results (bf16):
        forward reads the partial output and reads + writes the running one (3 x 2 B per
        element of hidden), backward does the same for dQ (hidden) and dK/dV (2 x kv_hidden)."""
        return 12 * self.hidden + 12 * self.kv_hidden

    @property
    def activation_bytes_per_token(self) -> int:
        """Activation bytes per token over all layers: 34 * hidden per layer in bf16 with
        selective recompute and FlashAttention (Korthikanti et al. 2022), before TP."""
        return 34 * self.hidden * self.num_layers


MODELS: dict[str, ModelConfig] = {
    m.name: m
    for m in (
        ModelConfig(
            name="llama-7b", num_layers=32, hidden=4096, num_heads=32, kv_heads=32,
            ffn_hidden=11008, vocab=32000,
        ),
        ModelConfig(
            name="llama3-8b", num_layers=32, hidden=4096, num_heads=32, kv_heads=8,
            ffn_hidden=14336, vocab=128256,
        ),
        ModelConfig(
            name="llama-70b", num_layers=80, hidden=8192, num_heads=64, kv_heads=8,
            ffn_hidden=28672, vocab=32000,
        ),
        # The model of Megatron-LM's examples/dynamic_context_parallel/benchmark_dcp.sh:
        # 12 layers, hidden 2048, FFN 8192, 16 heads without --group-query-attention (MHA)
        # or --swiglu (GeLU FFN), vocab 131072.
        ModelConfig(
            name="megatron-dcp-bench", num_layers=12, hidden=2048, num_heads=16, kv_heads=16,
            ffn_hidden=8192, vocab=131072, gated_mlp=False,
        ),
        ModelConfig(
            name="moe-141b", num_layers=56, hidden=6144, num_heads=48, kv_heads=8,
            ffn_hidden=16384, vocab=32768, num_experts=8, top_k=2,
        ),
    )
}  # fmt: skip
"""Reference shapes: LLaMA-7B (MHA), LLaMA-3-8B (GQA 4:1), LLaMA-70B (GQA 8:1), and a
Mixtral-8x22B-like 141B MoE (8 experts, top-2)."""


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """GPUs and links. Bandwidths are bytes/s per GPU in one direction."""

    num_gpus: int = 1024
    gpus_per_node: int = 8
    tensor_parallel: int = 1
    """GPUs per rank (a TP group always sits inside one node)."""
    peak_flops: float = 989e12
    """Dense bf16 FLOP/s per GPU (H100 SXM)."""
    gemm_efficiency: float = 0.5
    attention_efficiency: float = 0.4
    nvlink_bandwidth: float = 200e9
    ib_bandwidth: float = 25e9
    """200 Gb/s NIC per GPU."""
    pcie_bandwidth: float = 25e9
    allreduce_bandwidth: float = 100e9
    """NCCL all-reduce bus bandwidth per GPU across nodes (hierarchical: NVLink inside the
    node, 8 x 200 Gb/s rails out of it)."""
    ring_step_latency: float = 10e-6
    micro_batch_overhead: float = 2e-3
    """Seconds per forward/backward call (launches, hooks)."""
    attention_tile: int = 128
    """Query rows and keys per flash-attention tile, head_dim 128 on H100: FlashAttention-3's
    causal forward computes 128 x 128 tiles and its backward 128-key blocks (of 64 query
    rows, so 128 overstates the backward's waste on the query side); a tile costs the same
    however few of its rows a document chunk fills."""
    ring_step_kernels: int = 10
    """Small compute-stream kernels per ring step per layer besides the attention kernel
    itself, counted in TransformerEngine's P2P context-parallel attention for packed (THD)
    documents (``AttnFuncWithCPAndKVP2P``): forward 5 (two cu_seqlens rescalings, half-
    tensor read, LSE correction, output correction), backward 5 (half-tensor read,
    FlashAttention-2's dO.O preprocessing and dQ conversion, adding the step's dQ and dK/dV
    into the running ones). A whole document runs one step without them."""
    min_kernel_time: float = 3.8e-6
    """GPU time of one tiny kernel launched back-to-back in a stream (NVIDIA, "Getting
    Started with CUDA Graphs": 3.8 us per launch of a 2.9 us kernel): the fixed floor; the
    bytes the merge kernels move are costed separately (``hbm_bandwidth``)."""
    hbm_bandwidth: float = 3.35e12
    """Bytes/s of GPU memory (H100 SXM HBM3 peak), for the memory-bound ring-step merges."""
    hbm_bytes: float = 80e9
    usable_memory: float = 0.85
    """Fraction of HBM for model states and activations (the rest: allocator, workspace)."""

    def __post_init__(self) -> None:
        if self.num_gpus < 1 or self.gpus_per_node < 1 or self.tensor_parallel < 1:
            raise ValueError("ClusterConfig: num_gpus, gpus_per_node, tensor_parallel must be >= 1")
        if self.gpus_per_node % self.tensor_parallel or self.num_gpus % self.tensor_parallel:
            raise ValueError(
                f"ClusterConfig: tensor_parallel {self.tensor_parallel} must divide "
                f"gpus_per_node {self.gpus_per_node} and num_gpus {self.num_gpus}"
            )
        for f in ("gemm_efficiency", "attention_efficiency", "usable_memory"):
            if not 0 < getattr(self, f) <= 1:
                raise ValueError(f"ClusterConfig.{f} must be in (0, 1], got {getattr(self, f)}")
        if self.attention_tile < 1 or self.ring_step_kernels < 0:
            raise ValueError(
                f"ClusterConfig: attention_tile ({self.attention_tile}) must be >= 1 and "
                f"ring_step_kernels ({self.ring_step_kernels}) >= 0"
            )
        if not (self.min_kernel_time >= 0 and self.hbm_bandwidth > 0):
            raise ValueError(
                f"ClusterConfig: min_kernel_time ({self.min_kernel_time}) must be >= 0 and "
                f"hbm_bandwidth ({self.hbm_bandwidth}) > 0"
            )

    @property
    def num_ranks(self) -> int:
        return self.num_gpus // self.tensor_parallel

    @property
    def ranks_per_node(self) -> int:
        return self.gpus_per_node // self.tensor_parallel


@dataclass(frozen=True, kw_only=True)
class WorkloadConfig:
    """Where sequence lengths come from and how many tokens a step holds."""

    distribution: LengthDistribution = LengthDistribution.LONGTAIL
    lengths_file: str | None = None
    """For ``empirical``: one length per line."""
    max_context: int = 2097152
    """Longer sequences are cut to this length (as a loader truncates)."""
    mean: float = 1024.0
    """``lognormal`` mean (before clipping)."""
    sigma: float = 1.5
    min_length: int = 128
    """``lognormal`` lower clip."""
    tokens_per_rank: float = 4.0
    """Global batch = tokens_per_rank * capacity * ranks tokens (>= one max_context sequence)."""
    global_batch_tokens: int | None = None
    """Overrides tokens_per_rank when set."""
    sequences_per_rank: float | None = None
    """Global batch = round(sequences_per_rank * ranks) sequences instead of a token count
    (loaders that batch a fixed number of samples, e.g. Megatron-LM's global batch size)."""
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "distribution", LengthDistribution(self.distribution))
        if self.distribution is LengthDistribution.EMPIRICAL and not self.lengths_file:
            raise ValueError("WorkloadConfig: distribution 'empirical' needs lengths_file=PATH")
        if self.max_context < 1 or self.min_length < 1:
            raise ValueError("WorkloadConfig: max_context and min_length must be >= 1")
        if self.sequences_per_rank is not None and not self.sequences_per_rank > 0:
            raise ValueError(
                f"WorkloadConfig: sequences_per_rank must be > 0, got {self.sequences_per_rank}"
            )


@dataclass(frozen=True, kw_only=True)
class SimulationConfig:
    model: ModelConfig
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    capacity: int | None = None
    """Tokens per rank per micro-batch; None derives it from memory."""
    static_cp: int | None = None
    """CP of the static mesh; None = the least power of two that holds a ``max_context``
    sequence. A static mesh fixes CP at launch (Megatron-LM's ``--context-parallel-size``),
    so it must hold the longest sequence the loader can produce, not only this batch's."""
    pipeline_stages: int = 1
    """p > 1: each rank is a 1F1B pipeline of p stages (layers split evenly)."""
    offload: OffloadConfig | None = None
    """For ``hdp-offload``; None derives it from the model and cluster."""
    steps: int = 1
    """Sampled global batches averaged per result (seeds seed .. seed + steps - 1)."""

    def __post_init__(self) -> None:
        if self.pipeline_stages < 1 or self.steps < 1:
            raise ValueError("SimulationConfig: pipeline_stages and steps must be >= 1")
        if self.cluster.num_ranks % self.pipeline_stages:
            raise ValueError(
                f"SimulationConfig: pipeline_stages {self.pipeline_stages} must divide the "
                f"{self.cluster.num_ranks} ranks"
            )
        if self.model.num_layers % self.pipeline_stages:
            raise ValueError(
                f"SimulationConfig: pipeline_stages {self.pipeline_stages} must divide the "
                f"model's {self.model.num_layers} layers (layers are split evenly)"
            )

    @property
    def num_ranks(self) -> int:
        """HDP ranks: tensor-parallel groups per pipeline stage."""
        return self.cluster.num_ranks // self.pipeline_stages

    def resolved_capacity(self) -> int:
        """Explicit capacity, or what fits in memory after model states (multiple of 1024)."""
        if self.capacity is not None:
            if self.capacity < 1:
                raise ValueError(f"capacity must be >= 1, got {self.capacity}")
            return self.capacity
        c, m = self.cluster, self.model
        # Model states: bf16 weights + grads and fp32 Adam (16 B/param) ZeRO-sharded over all
        # GPUs, plus two layers of gathered bf16 weights in flight.
        states = 16 * m.params / c.num_gpus + 2 * 2 * m.params / m.num_layers / c.tensor_parallel
        # Under 1F1B the first stage keeps p micro-batches in flight, each with 1/p of the
        # layers, so pipeline stages do not change the tokens one micro-batch may hold.
        per_token = m.activation_bytes_per_token / c.tensor_parallel
        free = c.hbm_bytes * c.usable_memory - states
        tokens = int(free // per_token) // 1024 * 1024
        if tokens < 1024:
            raise ValueError(
                f"{m.name} leaves no room for activations on {c.hbm_bytes / 1e9:.0f} GB GPUs "
                f"(tensor_parallel {c.tensor_parallel}); raise tensor_parallel or set capacity"
            )
        return tokens


FAST_MAX_GPUS = 1024


def fast_mode(config: SimulationConfig) -> SimulationConfig:
    """The simulator's fast mode: at most ``FAST_MAX_GPUS`` GPUs (planning time grows with
    ranks and sequences; the static-vs-HDP trends already show at 512-1,024 GPUs), three
    sampled steps averaged so one rare 2M sequence more or less does not decide a trend."""
    cluster = replace(config.cluster, num_gpus=min(config.cluster.num_gpus, FAST_MAX_GPUS))
    return replace(config, cluster=cluster, steps=3)


def cost_model(config: SimulationConfig) -> CostModel:
    """The per-rank CostModel of a model on a cluster (formulas in the module docstring)."""
    m, c, p = config.model, config.cluster, config.pipeline_stages
    rank_flops = c.tensor_parallel * c.peak_flops
    return CostModel(
        alpha=3.5 * 2 * m.num_layers * m.hidden / p / (rank_flops * c.attention_efficiency),
        beta=3 * m.gemm_flops_per_token / p / (rank_flops * c.gemm_efficiency),
        gamma=c.micro_batch_overhead,
        num_layers=max(1, m.num_layers // p),
        kv_heads=max(1, m.kv_heads // c.tensor_parallel),
        head_dim=m.head_dim,
        element_size=2,
        intra_node_bandwidth=c.nvlink_bandwidth,
        inter_node_bandwidth=c.ib_bandwidth,
        ring_step_latency=c.ring_step_latency,
        # Pipelines laid out stage-contiguously inside nodes: ranks_per_node / p per node.
        node_size=max(1, c.ranks_per_node // p),
        attention_tile=c.attention_tile,
        ring_step_overhead=c.ring_step_kernels * c.min_kernel_time,
        ring_merge_time=m.num_layers
        * m.ring_merge_bytes_per_token
        / p
        / (c.tensor_parallel * c.hbm_bandwidth),
    )


def offload_config(config: SimulationConfig) -> OffloadConfig:
    if config.offload is not None:
        return config.offload
    c = config.cluster
    # Bytes one stage copies per token of one micro-batch (its 1/p of the layers), matching
    # the per-stage compute the CostModel times the copy against.
    per_token = config.model.activation_bytes_per_token / c.tensor_parallel / config.pipeline_stages
    return OffloadConfig(activation_bytes_per_token=per_token, host_bandwidth=c.pcie_bandwidth)


@functools.lru_cache(maxsize=4)
def _read_lengths(path: str) -> Any:
    """The lengths in ``path`` as a read-only int64 array (cached: files hold ~1e6 lines)."""
    import numpy as np

    values = np.loadtxt(path, dtype=np.int64, ndmin=1)
    if values.size == 0 or values.min() < 1:
        raise ValueError(f"{path}: expected one positive length per line")
    values.setflags(write=False)
    return values


def sample_lengths(
    workload: WorkloadConfig, tokens: int, seed: int, *, count: int | None = None
) -> list[int]:
    """Sequence lengths (each <= max_context) summing to at least ``tokens``, or exactly
    ``count`` of them when ``count`` is given (``tokens`` is then ignored)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    w = workload
    pool = (
        _read_lengths(str(w.lengths_file))
        if w.distribution is LengthDistribution.EMPIRICAL
        else None
    )
    out: list[int] = []
    total = 0
    while (len(out) < count) if count is not None else (total < tokens):
        # Vectorised draws, 1,024 at a time, cut where the running total reaches ``tokens``.
        block = 1024
        if w.distribution is LengthDistribution.FIXED:
            draw = np.full(block, w.max_context)
        elif pool is not None:
            draw = pool[rng.integers(0, len(pool), block)]
        elif w.distribution is LengthDistribution.LOGNORMAL:
            mu = math.log(w.mean) - w.sigma**2 / 2
            draw = np.clip(rng.lognormal(mu, w.sigma, block), w.min_length, None).astype(np.int64)
        else:
            probs = np.array([b[2] for b in _LONGTAIL_BUCKETS])
            bucket = rng.choice(len(_LONGTAIL_BUCKETS), size=block, p=probs / probs.sum())
            lo = np.log(np.array([b[0] for b in _LONGTAIL_BUCKETS], dtype=np.float64))[bucket]
            hi = np.log(np.array([b[1] for b in _LONGTAIL_BUCKETS], dtype=np.float64))[bucket]
            draw = np.rint(np.exp(lo + (hi - lo) * rng.random(block))).astype(np.int64)
        draw = np.minimum(draw, w.max_context)
        cumulative = total + np.cumsum(draw)
        if count is not None:
            stop = count - len(out)
        else:
            stop = int(np.searchsorted(cumulative, tokens)) + 1
        out.extend(int(x) for x in draw[:stop])
        total = int(cumulative[min(stop, block) - 1])
    return out


@dataclass(frozen=True)
class StepResult:
    """One strategy's simulated step (means over ``steps`` sampled batches)."""

    strategy: str
    step_time: float
    compute_time: float
    """Planned makespan (pipeline schedule included)."""
    grad_sync_time: float
    tokens: float
    tokens_per_s: float
    mfu: float
    balance: float
    busy_min: float
    busy_mean: float
    busy_max: float
    idle_fraction: float
    """1 - mean busy / compute_time."""
    micro_batches_min: int
    micro_batches_max: int
    ring_kv_bytes: float
    ring_dkv_bytes: float
    grad_sync_bytes: float
    padding_tokens: float
    offloaded_items: float
    max_ring: int
    """Largest ring (ranks) in the plan."""
    plan_seconds: float
    """Wall time the planner took (mean)."""


@dataclass(frozen=True)
class SimulationReport:
    config: dict[str, Any]
    capacity: int
    num_ranks: int
    static_cp: int
    sequences: float
    results: dict[str, StepResult]

    def speedup(
        self, strategy: Strategy | str, baseline: Strategy | str = Strategy.STATIC
    ) -> float:
        return (
            self.results[Strategy(baseline).value].step_time
            / self.results[Strategy(strategy).value].step_time
        )

    def ablation(self) -> list[dict[str, Any]]:
        """Rows adding one technique at a time: step time, speedup over the previous row and
        over static, and the share of the total gain (time saved / total time saved). Empty
        unless every strategy of ``ABLATION`` was simulated."""
        rows: list[dict[str, Any]] = []
        if any(s.value not in self.results for s, _ in ABLATION):
            return rows
        present = list(ABLATION)
        first = self.results[present[0][0].value].step_time
        last = self.results[present[-1][0].value].step_time
        previous = first
        for strategy, label in present:
            t = self.results[strategy.value].step_time
            rows.append(
                {
                    "technique": label,
                    "strategy": strategy.value,
                    "step_time": t,
                    "step_speedup": previous / t,
                    "speedup_vs_static": first / t,
                    "share_of_gain": (previous - t) / (first - last) if first != last else 0.0,
                }
            )
            previous = t
        return rows

    def as_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "capacity": self.capacity,
            "num_ranks": self.num_ranks,
            "static_cp": self.static_cp,
            "sequences": self.sequences,
            "results": {k: asdict(v) for k, v in self.results.items()},
            "speedup_vs_static": {
                k: self.speedup(k) for k in self.results if Strategy.STATIC.value in self.results
            },
            "ablation": self.ablation(),
        }


def _plan(
    strategy: Strategy,
    lengths: list[int],
    config: SimulationConfig,
    capacity: int,
    cost: CostModel,
) -> Plan:
    world = config.num_ranks
    if strategy is Strategy.STATIC:
        cp = config.static_cp or _launch_cp(config.workload.max_context, capacity, world)
        return plan_static_mesh(lengths, world, capacity, cp_size=cp, cost=cost)
    return plan_batch(
        lengths,
        world,
        capacity,
        cost=cost,
        group_rule="pow2" if strategy is Strategy.HDP_POW2 else "ceil",
        balance=strategy is not Strategy.HDP_NO_BALANCE,
        offload=offload_config(config) if strategy is Strategy.HDP_OFFLOAD else None,
        pipeline_stages=config.pipeline_stages,
        widen=strategy is not Strategy.HDP_NO_BALANCE,
    )


def _launch_cp(max_context: int, capacity: int, world: int) -> int:
    """Least power-of-two CP whose zigzag shards of a ``max_context`` sequence fit."""
    cp = 1
    while not _fits(max_context, cp, capacity):
        cp *= 2
        if cp > world:
            raise ValueError(
                f"a static mesh needs CP {cp} for max_context {max_context} at capacity "
                f"{capacity}, more than the {world} ranks; raise capacity or GPUs, or set "
                "static_cp"
            )
    return cp


def _pipeline_time(plan: Plan, stages: int) -> float:
    """1F1B per rank: sum of its micro-batch times + (p - 1) * the largest, then the max over
    ranks (the ranks of one ring start it together, as in the plan's replay)."""
    if stages == 1:
        return plan.stats.makespan
    mb_time: dict[int, float] = {}
    mb_ranks: dict[int, tuple[int, ...]] = {}
    for item in plan.items:
        key = item.micro_batch
        assert key is not None
        mb_time[key] = mb_time.get(key, 0.0) + item.est_time
        mb_ranks[key] = item.ranks
    finish = [0.0] * plan.world_size
    largest = [0.0] * plan.world_size
    for key, t in mb_time.items():  # dicts keep the global order
        ranks = mb_ranks[key]
        start = max(finish[r] for r in ranks)
        for r in ranks:
            finish[r] = start + t
            largest[r] = max(largest[r], t)
    return max(f + (stages - 1) * big for f, big in zip(finish, largest, strict=True))


_INT_FIELDS = {"micro_batches_min": min, "micro_batches_max": max, "max_ring": max}


@_gc_paused  # plans are millions of acyclic tuples: full collections would rescan them all
def simulate(
    config: SimulationConfig, strategies: Sequence[Strategy | str] | None = None
) -> SimulationReport:
    """Simulate one training step (averaged over ``config.steps`` batches) per strategy."""
    chosen = [Strategy(s) for s in (strategies or list(Strategy))]
    capacity = config.resolved_capacity()
    cost = cost_model(config)
    world = config.num_ranks
    m, c, w = config.model, config.cluster, config.workload
    tokens_goal = w.global_batch_tokens or max(
        int(w.tokens_per_rank * capacity * world), w.max_context
    )
    grad_bytes_per_rank = (
        2 * (world - 1) / world * 2 * m.params / c.tensor_parallel / config.pipeline_stages
    )
    grad_time = grad_bytes_per_rank / c.allreduce_bandwidth
    per_step: dict[Strategy, list[dict[str, float]]] = {s: [] for s in chosen}
    static_cp = 0
    sequences = 0
    for step in range(config.steps):
        count = None
        if w.sequences_per_rank is not None:
            count = max(1, round(w.sequences_per_rank * world))
        lengths = sample_lengths(w, tokens_goal, w.seed + step, count=count)
        sequences += len(lengths)
        tokens = sum(lengths)
        attention_flops = sum(m.attention_flops(L) for L in lengths)
        model_flops = 3 * (m.gemm_flops_per_token * tokens + attention_flops)
        for strategy in chosen:
            start = time.perf_counter()
            plan = _plan(strategy, lengths, config, capacity, cost)
            elapsed = time.perf_counter() - start
            if strategy is Strategy.STATIC:
                static_cp = plan.items[0].cp_size
            compute = _pipeline_time(plan, config.pipeline_stages)
            step_time = compute + grad_time
            busy = plan.stats.busy_time
            mean_busy = sum(busy) / len(busy)
            per_step[strategy].append(
                {
                    "step_time": step_time,
                    "compute_time": compute,
                    "grad_sync_time": grad_time,
                    "tokens": tokens,
                    "tokens_per_s": tokens / step_time,
                    "mfu": model_flops / (step_time * c.num_gpus * c.peak_flops),
                    "balance": plan.stats.balance,
                    "busy_min": min(busy),
                    "busy_mean": mean_busy,
                    "busy_max": max(busy),
                    "idle_fraction": 1 - mean_busy / compute if compute > 0 else 0.0,
                    "micro_batches_min": min(plan.stats.micro_batches),
                    "micro_batches_max": max(plan.stats.micro_batches),
                    "ring_kv_bytes": plan.stats.ring_kv_bytes * config.pipeline_stages,
                    "ring_dkv_bytes": plan.stats.ring_dkv_bytes * config.pipeline_stages,
                    "grad_sync_bytes": grad_bytes_per_rank * world * config.pipeline_stages,
                    "padding_tokens": plan.stats.padding_tokens,
                    "offloaded_items": sum(1 for i in plan.items if i.offload_ratio > 0),
                    "max_ring": max(i.cp_size for i in plan.items),
                    "plan_seconds": elapsed,
                }
            )
    results = {}
    for strategy, rows in per_step.items():
        merged: dict[str, Any] = {}
        for key in rows[0]:
            values = [row[key] for row in rows]
            reduce = _INT_FIELDS.get(key)
            merged[key] = int(reduce(values)) if reduce else sum(values) / len(values)
        results[strategy.value] = StepResult(strategy=strategy.value, **merged)
    return SimulationReport(
        config=_config_dict(config),
        capacity=capacity,
        num_ranks=world,
        static_cp=static_cp,
        sequences=sequences / config.steps,
        results=results,
    )


def _config_dict(config: SimulationConfig) -> dict[str, Any]:
    out = asdict(config)
    out["workload"]["distribution"] = config.workload.distribution.value
    return out


def _preset(
    model: str,
    gpus: int,
    context: int,
    *,
    tp: int = 1,
    capacity: int | None = None,
    distribution: LengthDistribution = LengthDistribution.LONGTAIL,
    **workload: Any,
) -> SimulationConfig:
    return SimulationConfig(
        model=MODELS[model],
        cluster=ClusterConfig(num_gpus=gpus, tensor_parallel=tp),
        workload=WorkloadConfig(distribution=distribution, max_context=context, **workload),
        capacity=capacity,
    )


PRESETS: dict[str, SimulationConfig] = {
    "llama-7b-2m": _preset("llama-7b", 1024, 2 * 1024 * 1024, capacity=16384),
    "llama-7b-256k": _preset("llama-7b", 1024, 256 * 1024, capacity=16384),
    "llama3-8b-2m": _preset("llama3-8b", 1024, 2 * 1024 * 1024, capacity=16384),
    "llama-70b-1m": _preset("llama-70b", 4096, 1024 * 1024, tp=8),
    "moe-141b-2m": _preset("moe-141b", 12288, 2 * 1024 * 1024, tp=8),
    # NVIDIA's dynamic-CP benchmark (Megatron-LM examples/dynamic_context_parallel:
    # README.md and benchmark_dcp.sh): its model, TP1 CP4, lognormal 128..8192 mean 1024
    # sigma 1.5, capacity (--max-seqlen-per-dp-cp-rank) 2048, run on four GPUs per node.
    # Global batch = MICRO_BATCH_SIZE 1 x DP x NUM_MICROBATCHES 8 samples, and each
    # MockVarlenDataset sample is one unpacked sequence: 8 DP = 2 sequences per rank.
    "megatron-dcp": replace(
        _preset(
            "megatron-dcp-bench", 64, 8192, capacity=2048,
            distribution=LengthDistribution.LOGNORMAL, mean=1024.0, sigma=1.5,
            min_length=128, sequences_per_rank=2.0,
        ),
        cluster=ClusterConfig(num_gpus=64, gpus_per_node=4),
        static_cp=4,
    ),
    "wikipedia-7b": _preset(
        "llama-7b", 1024, 262144, capacity=32768, distribution=LengthDistribution.EMPIRICAL,
        lengths_file="/work/shared/data/wikipedia_lengths.txt",
    ),
}  # fmt: skip
"""Named configurations for ``bitscale simulate --preset``."""


# --------------------------------------------------------------------------------------------
# command line: `bitscale simulate`

_SWEEP_KEYS = ("context", "gpus", "capacity")


def _parse_tokens(text: str) -> int:
    """``262144``, ``256K``, ``2M`` (K = 1024)."""
    scale = {"K": 1024, "M": 1024 * 1024}.get(text[-1:].upper(), 1)
    digits = text[:-1] if scale > 1 else text
    try:
        value = int(float(digits) * scale)
    except ValueError:
        raise ValueError(f"expected a token count like 4096, 256K or 2M, got {text!r}") from None
    if value < 1:
        raise ValueError(f"token counts must be >= 1, got {text!r}")
    return value


def _parse_sweep(text: str) -> tuple[str, list[int]]:
    key, _, values = text.partition("=")
    if key not in _SWEEP_KEYS or not values:
        raise ValueError(
            f"--sweep takes KEY=V1,V2,... with KEY one of {list(_SWEEP_KEYS)}, got {text!r}"
        )
    return key, [_parse_tokens(v) for v in values.split(",")]


def _apply(config: SimulationConfig, key: str, value: int) -> SimulationConfig:
    if key == "context":
        return replace(config, workload=replace(config.workload, max_context=value))
    if key == "gpus":
        return replace(config, cluster=replace(config.cluster, num_gpus=value))
    return replace(config, capacity=value)


def _for_argparse(parse: Any) -> Any:
    """Wrap a parser so argparse prints its ValueError message (it hides plain ones)."""
    import argparse

    @functools.wraps(parse)
    def wrapper(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return wrapper


def _parse_strategies(text: str) -> list[Strategy]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    known = {s.value: s for s in Strategy}
    for name in names:
        if name not in known:
            raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(known)}")
    if not names:
        raise ValueError("--strategies is empty")
    return [known[name] for name in names]


def add_arguments(parser: Any) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-7b-2m")
    parser.add_argument("--model", choices=sorted(MODELS), help="override the preset's model")
    parser.add_argument("--gpus", type=int, help="number of GPUs")
    parser.add_argument("--tp", type=int, help="tensor-parallel GPUs per rank")
    parser.add_argument(
        "--context", type=_for_argparse(_parse_tokens), help="max context (e.g. 2M)"
    )
    parser.add_argument(
        "--capacity", type=_for_argparse(_parse_tokens), help="tokens per rank per micro-batch"
    )
    parser.add_argument(
        "--distribution", choices=[d.value for d in LengthDistribution], help="length source"
    )
    parser.add_argument("--lengths-file", help="one length per line (distribution empirical)")
    parser.add_argument(
        "--batch-tokens", type=_for_argparse(_parse_tokens), help="global batch in tokens"
    )
    parser.add_argument("--static-cp", type=int, help="CP of the static mesh")
    parser.add_argument("--pp", type=int, help="pipeline stages (1F1B)")
    parser.add_argument("--steps", type=int, help="sampled batches averaged per point")
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--fast", action="store_true", help=f"fast mode: <= {FAST_MAX_GPUS} GPUs, 3 steps"
    )
    parser.add_argument(
        "--strategies",
        default=",".join(s.value for s in Strategy),
        help="comma-separated subset of " + ", ".join(s.value for s in Strategy),
    )
    parser.add_argument(
        "--sweep",
        type=_for_argparse(_parse_sweep),
        help="KEY=V1,V2,... over context, gpus or capacity (e.g. context=256K,512K,1M,2M)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--plot", metavar="PNG", help="plot speedup over static vs the sweep")


def config_from_args(args: Any) -> SimulationConfig:
    """The preset with the command line's overrides applied."""
    config = PRESETS[args.preset]
    cluster = config.cluster
    if args.gpus is not None:
        cluster = replace(cluster, num_gpus=args.gpus)
    if args.tp is not None:
        cluster = replace(cluster, tensor_parallel=args.tp)
    workload = config.workload
    if args.context is not None:
        workload = replace(workload, max_context=args.context)
    if args.distribution is not None:
        workload = replace(workload, distribution=LengthDistribution(args.distribution))
    if args.lengths_file is not None:
        workload = replace(workload, lengths_file=args.lengths_file)
    if args.batch_tokens is not None:
        workload = replace(workload, global_batch_tokens=args.batch_tokens, sequences_per_rank=None)
    if args.seed is not None:
        workload = replace(workload, seed=args.seed)
    changes: dict[str, Any] = {"cluster": cluster, "workload": workload}
    if args.model is not None:
        changes["model"] = MODELS[args.model]
    if args.capacity is not None:
        changes["capacity"] = args.capacity
    if args.static_cp is not None:
        changes["static_cp"] = args.static_cp
    if args.pp is not None:
        changes["pipeline_stages"] = args.pp
    if args.steps is not None:
        changes["steps"] = args.steps
    config = replace(config, **changes)
    return fast_mode(config) if args.fast else config


def _human(tokens: int) -> str:
    for unit, size in (("M", 1024 * 1024), ("K", 1024)):
        if tokens >= size and tokens % size == 0:
            return f"{tokens // size}{unit}"
    return str(tokens)


def format_report(report: SimulationReport, title: str) -> str:
    """Per-strategy table and ablation table as plain text."""
    lines = [
        f"{title}: {report.num_ranks} ranks, capacity {report.capacity} tokens/rank, "
        f"static CP {report.static_cp}, {report.sequences:.0f} sequences/step",
        f"{'strategy':16s}{'step s':>10s}{'tokens/s':>12s}{'MFU':>7s}{'balance':>9s}"
        f"{'idle':>7s}{'ring TB':>10s}{'speedup':>9s}",
    ]
    has_static = Strategy.STATIC.value in report.results
    for name, r in report.results.items():
        speedup = f"{report.speedup(name):8.2f}x" if has_static else f"{'-':>9s}"
        ring_tb = (r.ring_kv_bytes + r.ring_dkv_bytes) / 1e12
        lines.append(
            f"{name:16s}{r.step_time:10.2f}{r.tokens_per_s:12.4g}{r.mfu:7.1%}{r.balance:9.3f}"
            f"{r.idle_fraction:7.1%}{ring_tb:10.2f}{speedup}"
        )
    ablation = report.ablation()
    if len(ablation) > 1:
        lines.append(f"{'ablation':48s}{'step s':>10s}{'x prev':>8s}{'x static':>10s}{'share':>8s}")
        for row in ablation:
            lines.append(
                f"{row['technique']:48s}{row['step_time']:10.2f}{row['step_speedup']:8.2f}"
                f"{row['speedup_vs_static']:10.2f}{row['share_of_gain']:8.1%}"
            )
    return "\n".join(lines)


def plot_speedups(points: list[tuple[int, SimulationReport]], key: str, path: str) -> None:
    """Speedup over the static mesh per strategy against the swept quantity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    strategies = [s for s in points[0][1].results if s != Strategy.STATIC.value]
    for strategy in strategies:
        ax.plot(
            [x for x, _ in points],
            [report.speedup(strategy) for _, report in points],
            marker="o",
            label=strategy,
        )
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--", label="static")
    ax.set_xscale("log", base=2)
    ax.set_xticks([x for x, _ in points], [_human(x) for x, _ in points])
    ax.set_xlabel({"context": "max context (tokens)", "gpus": "GPUs", "capacity": "capacity"}[key])
    ax.set_ylabel("speedup over static DP x CP mesh")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def main(args: Any) -> int:
    import json

    try:
        config = config_from_args(args)
        strategies = _parse_strategies(args.strategies)
        key, values = args.sweep if args.sweep else ("context", [config.workload.max_context])
        if args.plot and Strategy.STATIC not in strategies:
            raise ValueError("--plot shows speedup over static: keep 'static' in --strategies")
        if args.fast and key == "gpus" and max(values) > FAST_MAX_GPUS:
            raise ValueError(
                f"--fast simulates at most {FAST_MAX_GPUS} GPUs, but --sweep asks for "
                f"{max(values)}: sweep gpus up to {FAST_MAX_GPUS} or drop --fast"
            )
        points = [(v, simulate(_apply(config, key, v), strategies)) for v in values]
    except ValueError as error:
        print(f"bitscale simulate: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{key: v, **report.as_dict()} for v, report in points], indent=2))
    else:
        for v, report in points:
            title = f"{args.preset} [{config.model.name}, {key} {_human(v)}]"
            print(format_report(report, title))
            print()
    if args.plot:
        plot_speedups(points, key, args.plot)
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0
