"""Cluster simulator (bitscale.hdp.simulate): calibration targets of issue 5 in fast mode,
report contents, length sampling, pipeline schedule and the `bitscale simulate` CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from bitscale.hdp.plan import CostModel, plan_batch
from bitscale.hdp.simulate import (
    MODELS,
    PRESETS,
    ClusterConfig,
    LengthDistribution,
    ModelConfig,
    SimulationConfig,
    SimulationReport,
    Strategy,
    WorkloadConfig,
    _pipeline_time,
    cost_model,
    fast_mode,
    sample_lengths,
    simulate,
)

from bitscale.cli import main as cli_main

CONTEXTS = (256 * 1024, 512 * 1024, 1024 * 1024, 2048 * 1024)


def with_context(config: SimulationConfig, context: int) -> SimulationConfig:
    return replace(config, workload=replace(config.workload, max_context=context))


@pytest.fixture(scope="module")
def context_sweep() -> dict[tuple[str, int], SimulationReport]:
    """7B (MHA) at 256K..2M and 8B (GQA) at 2M, fast mode, on the Byted-like long tail."""
    base = fast_mode(PRESETS["llama-7b-2m"])
    strategies = [Strategy.STATIC, Strategy.HDP, Strategy.HDP_POW2]
    reports = {("llama-7b", c): simulate(with_context(base, c), strategies) for c in CONTEXTS}
    gqa = replace(base, model=MODELS["llama3-8b"])
    reports["llama3-8b", CONTEXTS[-1]] = simulate(with_context(gqa, CONTEXTS[-1]), strategies)
    return reports


def test_speedup_grows_with_context(context_sweep: dict[tuple[str, int], SimulationReport]) -> None:
    for strategy in (Strategy.HDP, Strategy.HDP_POW2):
        speedups = [context_sweep["llama-7b", c].speedup(strategy) for c in CONTEXTS]
        assert speedups == sorted(speedups) and speedups[0] < speedups[-1], (strategy, speedups)
        assert speedups[0] > 1.5


def test_ceil_groups_beat_pow2_at_2m(
    context_sweep: dict[tuple[str, int], SimulationReport],
) -> None:
    report = context_sweep["llama-7b", CONTEXTS[-1]]
    assert report.speedup(Strategy.HDP) > report.speedup(Strategy.HDP_POW2)
    # pow2 rings are at least as large, so they move at least as many bytes.
    hdp, pow2 = report.results["hdp"], report.results["hdp-pow2"]
    assert pow2.ring_kv_bytes + pow2.ring_dkv_bytes > hdp.ring_kv_bytes + hdp.ring_dkv_bytes


def test_gqa_gains_less_than_mha(context_sweep: dict[tuple[str, int], SimulationReport]) -> None:
    mha = context_sweep["llama-7b", CONTEXTS[-1]].speedup(Strategy.HDP)
    gqa = context_sweep["llama3-8b", CONTEXTS[-1]].speedup(Strategy.HDP)
    assert 1.0 < gqa < mha


def test_all_strategies_equal_when_every_sequence_fills_a_rank() -> None:
    capacity = 4096
    config = SimulationConfig(
        model=MODELS["llama-7b"],
        cluster=ClusterConfig(num_gpus=64),
        workload=WorkloadConfig(
            distribution=LengthDistribution.FIXED,
            max_context=capacity,
            global_batch_tokens=64 * capacity * 3,
        ),
        capacity=capacity,
    )
    report = simulate(config)
    times = {name: r.step_time for name, r in report.results.items()}
    assert len(set(times.values())) == 1, times
    assert report.static_cp == 1
    for r in report.results.values():
        assert r.ring_kv_bytes == 0 and r.micro_batches_min == r.micro_batches_max == 3
        # makespan / mean of 64 equal float sums: 1 up to rounding of the mean.
        assert r.balance == pytest.approx(1.0, rel=1e-12)


MEGATRON_GPUS = (4, 8, 16, 32, 64)


@pytest.fixture(scope="module")
def megatron_reports() -> dict[int, SimulationReport]:
    # 20 steps, as the benchmark averages 20 measured iterations (TRAIN_ITERS 30 minus
    # WARMUP_ITERS 10); its batches are only 2 sequences per GPU, so 3 steps are noise.
    base = replace(fast_mode(PRESETS["megatron-dcp"]), steps=20)
    strategies = [Strategy.STATIC, Strategy.HDP_POW2]
    return {
        gpus: simulate(replace(base, cluster=replace(base.cluster, num_gpus=gpus)), strategies)
        for gpus in MEGATRON_GPUS
    }


def test_megatron_dcp_config_hdp_beats_static(
    megatron_reports: dict[int, SimulationReport],
) -> None:
    for gpus, report in megatron_reports.items():
        assert report.static_cp == 4 and report.capacity == 2048
        assert report.sequences == 2 * gpus  # global batch: 8 sequences per DP group
        assert report.speedup(Strategy.HDP_POW2) > 1.0, gpus
        if gpus > 4:  # with 4 GPUs the static mesh is one CP4 group: nothing to imbalance
            assert report.results["hdp-pow2"].balance < report.results["static"].balance
    # With more DP groups the static mesh's imbalance grows, and so does the gain.
    assert megatron_reports[64].speedup("hdp-pow2") > megatron_reports[4].speedup("hdp-pow2")


@pytest.mark.xfail(
    strict=True,
    reason="with Megatron's own baseline (dp_balanced packing), the benchmark's model, batch "
    "and 4-GPU nodes, and the per-ring costs of the GPU kernels (128-row flash-attention "
    "tiles, 10 small kernels of 3.8 us per ring step per layer, bf16 merges of each step's "
    "partial output and gradients at 3.35 TB/s), our cost model gives HDP(pow2)/static "
    "1.05x (4 GPUs), 1.23x (8), 1.20x (16), 1.21x (32), 1.21x (64) against Megatron's "
    "1.29/1.41/1.21/1.38/1.50x. The three kernel costs move the ratios by <= 0.006: "
    "attention is ~14 % of this model's GEMM time, and the extra tile work on CP4 (+21 % "
    "over whole documents) mostly hides ring traffic exposed anyway. At 4 GPUs (DP 1, no DP "
    "imbalance) Megatron's static step is 43 ms slower than its dynamic-CP step, ours "
    "3.6 ms: closing that with per-ring-step cost takes ~0.5 ms per step per layer (~130 "
    "kernel floors), more than the GPU work TransformerEngine's CP path launches; what is "
    "left is host-side (Python launch path, host-device syncs in the THD CP code), which "
    "we cannot derive from first principles",
)
def test_megatron_dcp_config_in_published_band(
    megatron_reports: dict[int, SimulationReport],
) -> None:
    for gpus, report in megatron_reports.items():
        assert 1.2 <= report.speedup(Strategy.HDP_POW2) <= 1.5, gpus


def _touched_tile_pairs(length: int, d: int, tile: int) -> int:
    """Brute force of `CostModel.attention_work`: for a whole document (d = 1), or for
    every rank and ring step of the zigzag layout, list the step's query and key slots and
    which pairs the kernel's mask lets through (causal on the rank's own two chunks at step
    0; all of the visible key chunk(s) otherwise), and count the tile x tile blocks holding
    at least one such pair, tile**2 pairs each."""
    if d == 1:
        steps = [(length, length, True)]
    else:
        chunk = -(-length // (2 * d))
        steps = []
        for rank in range(d):
            steps.append((2 * chunk, 2 * chunk, True))
            for source in (r for r in range(d) if r != rank):
                if source < rank:  # its first chunk, seen by both local chunks
                    steps.append((2 * chunk, chunk, False))
                else:  # both its chunks, seen by the local second chunk only
                    steps.append((chunk, 2 * chunk, False))
    pairs = 0
    for rows, cols, causal in steps:
        blocks = {
            (q // tile, k // tile) for q in range(rows) for k in range(cols) if not causal or k <= q
        }
        pairs += len(blocks) * tile * tile
    return pairs


@pytest.mark.parametrize(("length", "d", "tile"), [(304, 4, 128), (1000, 4, 16), (96, 3, 8),
                                                   (130, 2, 32), (64, 1, 16), (300, 1, 128)])  # fmt: skip
def test_attention_work_count_whole_tiles(length: int, d: int, tile: int) -> None:
    cost = CostModel(attention_tile=tile)
    # alpha is per token**2 of a causal document, i.e. per half pair: work = 2 x pairs.
    assert cost.attention_work(length, d) == 2 * _touched_tile_pairs(length, d, tile)
    assert cost.attention_work(length, d) >= length * length  # tiles cover the causal work
    assert CostModel().attention_work(length, d) == length * length  # tile 1: exact formula


def test_tiles_make_short_documents_costlier_on_rings_only() -> None:
    cost = CostModel(attention_tile=128)
    # The example: a 300-token document on CP 4 is 8 chunks of 38 tokens, each rank
    # runs one 128 x 128 tile per ring step: 16 tiles, against 6 for the whole document.
    assert cost.attention_work(304, 4) == 16 * 128 * 128 * 2
    assert cost.attention_work(300) == 6 * 128 * 128 * 2
    # Long documents: the exact s**2 plus the masked halves of the diagonal tiles.
    length = 2 * 8 * 128 * 64
    assert cost.attention_work(length, 8) == length * length + length * 128
    assert cost.attention_time([length], 8) == pytest.approx(
        cost.alpha * (length * length + length * 128) / 8, rel=1e-15
    )


def test_ring_step_costs_add_to_ring_items_only() -> None:
    # No ring exposure (huge bandwidth, no latency): the per-step costs add exactly.
    plain = CostModel(intra_node_bandwidth=1e30, ring_step_latency=0.0)
    steps = replace(plain, ring_step_overhead=5e-5, ring_merge_time=2e-9)
    padded = [4096, 1024]
    slots = sum(padded) // 4
    extra = plain.num_layers * 4 * 5e-5 + 3 * slots * 2e-9
    ring = range(4)
    assert steps.micro_batch_time(padded, ring) == pytest.approx(
        plain.micro_batch_time(padded, ring) + extra, rel=1e-12
    )
    assert steps.micro_batch_time(padded, [0]) == plain.micro_batch_time(padded, [0])
    # They run on the compute stream, so they hide ring traffic like attention does.
    slow = CostModel(intra_node_bandwidth=1e9, alpha=0.0)
    hidden = replace(slow, ring_step_overhead=1.0)
    compute = hidden.compute_time(padded, 4) + hidden.num_layers * 4 * 1.0
    assert hidden.micro_batch_time(padded, ring) == pytest.approx(compute, rel=1e-12)


def test_fit_counts_attention_in_tiles_of_its_base() -> None:
    truth = CostModel(alpha=3e-9, beta=2e-5, gamma=4e-3, attention_tile=64)
    samples = [(docs, truth.compute_time(docs)) for docs in ([100], [700, 30], [5000], [64] * 9)]
    fitted = CostModel.fit(samples, base=CostModel(attention_tile=64))
    for name in ("alpha", "beta", "gamma"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-9)


def test_cluster_kernel_costs_reach_the_cost_model() -> None:
    config = PRESETS["megatron-dcp"]
    cost = cost_model(config)
    c, m = config.cluster, config.model
    assert cost.attention_tile == 128
    assert cost.ring_step_overhead == pytest.approx(10 * 3.8e-6, rel=1e-15)
    # 12 layers x (12 x 2048 + 12 x 2048) bytes per token slot at 3.35 TB/s.
    assert cost.ring_merge_time == pytest.approx(12 * (12 * 2048 + 12 * 2048) / 3.35e12)
    assert m.ring_merge_bytes_per_token == 12 * m.hidden + 12 * m.kv_hidden
    off = replace(c, attention_tile=1, ring_step_kernels=0)
    bare = cost_model(replace(config, cluster=off))
    assert bare.attention_tile == 1 and bare.ring_step_overhead == 0.0


def test_report_contents_and_ablation() -> None:
    config = replace(
        with_context(PRESETS["llama-7b-2m"], 512 * 1024),
        cluster=ClusterConfig(num_gpus=256),
    )
    report = simulate(config)
    assert set(report.results) == {s.value for s in Strategy}
    static = report.results["static"]
    for r in report.results.values():
        assert r.tokens == static.tokens
        assert r.grad_sync_bytes == static.grad_sync_bytes  # same all-reduce for everyone
        assert r.step_time == pytest.approx(r.compute_time + r.grad_sync_time, rel=1e-12)
        assert r.tokens_per_s == pytest.approx(r.tokens / r.step_time, rel=1e-12)
        assert 0 < r.mfu < 1 and r.balance >= 1.0
        assert r.busy_min <= r.busy_mean <= r.busy_max <= r.compute_time * (1 + 1e-12)
    hdp = report.results["hdp"]
    assert hdp.ring_kv_bytes < static.ring_kv_bytes
    # Minimal rings never outgrow the static mesh's CP group; the balance scheduler may
    # widen one past it when that shortens the step (here a 36-rank ring: 90.4 s vs 90.8 s).
    assert report.results["hdp-no-balance"].max_ring <= report.static_cp
    assert hdp.micro_batches_max > hdp.micro_batches_min  # cheap ranks run more micro-batches
    rows = report.ablation()
    assert [row["strategy"] for row in rows] == ["static", "hdp-no-balance", "hdp", "hdp-offload"]
    assert rows[-1]["speedup_vs_static"] == pytest.approx(report.speedup("hdp-offload"))
    assert sum(row["share_of_gain"] for row in rows) == pytest.approx(1.0)
    json.dumps(report.as_dict())  # JSON-able


def test_pipeline_time_is_1f1b_critical_path() -> None:
    # One rank, two 10 s micro-batches (20 tokens do not fit in 16): p stages take
    # sum + (p - 1) * max per stage time.
    plan = plan_batch([10, 10], 1, 16, cost=CostModel(alpha=0.0, beta=1.0, gamma=0.0))
    assert _pipeline_time(plan, 1) == 20.0
    assert _pipeline_time(plan, 3) == 20.0 + 2 * 10.0
    config = replace(PRESETS["llama-7b-256k"], cluster=ClusterConfig(num_gpus=64))
    flat = simulate(config, ["hdp"])
    piped = simulate(replace(config, pipeline_stages=2), ["hdp"])
    assert piped.num_ranks == flat.num_ranks // 2 and piped.capacity == flat.capacity
    result = piped.results["hdp"]
    assert result.compute_time > result.busy_max  # the (p - 1) * max bubble comes on top


def test_sample_lengths_distributions() -> None:
    longtail = WorkloadConfig(max_context=2 * 1024 * 1024, seed=3)
    lengths = sample_lengths(longtail, 2_000_000_000, seed=3)
    n = len(lengths)
    assert sum(lengths) >= 2_000_000_000 and sum(lengths[:-1]) < 2_000_000_000
    assert abs(sum(L <= 4096 for L in lengths) / n - 0.80) < 0.01
    assert abs(sum(L >= 2 * 1024 * 1024 for L in lengths) / n - 0.0005) < 0.0003
    assert lengths == sample_lengths(longtail, 2_000_000_000, seed=3)
    cut = sample_lengths(replace(longtail, max_context=300), 100_000, seed=1)
    assert max(cut) == 300
    lognormal = WorkloadConfig(
        distribution=LengthDistribution.LOGNORMAL, max_context=8192, min_length=128
    )
    values = sample_lengths(lognormal, 10_000_000, seed=0)
    assert min(values) >= 128 and max(values) <= 8192
    counted = sample_lengths(lognormal, 0, seed=0, count=3000)
    assert counted == values[:3000]  # same draws, cut by count instead of tokens
    assert 600 < sum(values) / len(values) < 1100  # mean 1024 before clipping at 8192


def test_empirical_lengths_from_file(tmp_path: Path) -> None:
    path = tmp_path / "lengths.txt"
    path.write_text("5\n7\n9\n")
    workload = WorkloadConfig(
        distribution=LengthDistribution.EMPIRICAL, lengths_file=str(path), max_context=8
    )
    values = sample_lengths(workload, 1000, seed=0)
    assert set(values) <= {5, 7, 8}


def test_megatron_benchmark_model_shape() -> None:
    # benchmark_dcp.sh: 12 layers, hidden 2048, FFN 8192 (GeLU: two matrices), MHA, vocab
    # 131072, untied embeddings.
    m = MODELS["megatron-dcp-bench"]
    per_layer = 4 * 2048 * 2048 + 2 * 2048 * 8192
    assert m.params == 12 * per_layer + 2 * 2048 * 131072
    # Forward GEMMs: 2 FLOPs per weight of every layer and of the LM head (not the embedding).
    assert m.gemm_flops_per_token == 2 * (12 * per_layer + 2048 * 131072)
    gated = replace(m, gated_mlp=True)
    assert gated.params - m.params == 12 * 2048 * 8192


def test_fast_mode_caps_gpus() -> None:
    config = fast_mode(PRESETS["moe-141b-2m"])
    assert config.cluster.num_gpus == 1024 and config.steps == 3
    assert config.cluster.tensor_parallel == 8


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ModelConfig(name="x", num_layers=2, hidden=100, num_heads=3, kv_heads=1, ffn_hidden=4, vocab=8), "must divide"),
        (lambda: ModelConfig(name="x", num_layers=2, hidden=64, num_heads=4, kv_heads=4, ffn_hidden=4, vocab=8, top_k=2), "top_k"),
        (lambda: ClusterConfig(num_gpus=16, tensor_parallel=3), "tensor_parallel 3 must divide"),
        (lambda: ClusterConfig(gemm_efficiency=1.5), "gemm_efficiency"),
        (lambda: ClusterConfig(attention_tile=0), "attention_tile"),
        (lambda: ClusterConfig(hbm_bandwidth=0.0), "hbm_bandwidth"),
        (lambda: CostModel(attention_tile=0), "attention_tile must be an int >= 1"),
        (lambda: CostModel(ring_merge_time=-1.0), "ring_merge_time must be finite and >= 0"),
        (lambda: WorkloadConfig(distribution="empirical"), "needs lengths_file"),
        (lambda: WorkloadConfig(sequences_per_rank=0.0), "sequences_per_rank must be > 0"),
        (lambda: SimulationConfig(model=MODELS["llama-7b"], cluster=ClusterConfig(num_gpus=8), pipeline_stages=3), "pipeline_stages 3"),
        (lambda: SimulationConfig(model=MODELS["llama-7b"], cluster=ClusterConfig(num_gpus=24), pipeline_stages=3), "32 layers"),
        (lambda: SimulationConfig(model=MODELS["llama-70b"], cluster=ClusterConfig(num_gpus=8)).resolved_capacity(), "no room for activations"),
    ],
)  # fmt: skip
def test_bad_config_raises_value_error(make, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        make()


def test_cli_json_table_sweep_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["simulate", "--preset", "llama-7b-256k", "--gpus", "64", "--steps", "1"]
    assert cli_main([*args, "--json", "--strategies", "static,hdp"]) == 0
    (point,) = json.loads(capsys.readouterr().out)
    assert point["context"] == 256 * 1024 and set(point["results"]) == {"static", "hdp"}
    assert point["speedup_vs_static"]["hdp"] > 1.0
    plot = tmp_path / "speedup.png"
    assert cli_main([*args, "--sweep", "context=64K,128K", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "context 64K" in out and "context 128K" in out and "ablation" in out
    assert plot.stat().st_size > 10_000
    for bad, message in (
        (["--sweep", "layers=1,2"], "--sweep takes KEY=V1,V2"),
        (["--context", "0"], "token counts must be >= 1"),
        (["--context", "2X"], "expected a token count"),
    ):
        with pytest.raises(SystemExit) as excinfo:
            cli_main([*args, *bad])
        assert excinfo.value.code == 2
        assert message in capsys.readouterr().err
    assert cli_main([*args, "--strategies", "static,warp"]) == 2
    assert "unknown strategy 'warp'" in capsys.readouterr().err
    assert cli_main([*args, "--fast", "--sweep", "gpus=512,4096"]) == 2
    assert "--fast simulates at most 1024 GPUs" in capsys.readouterr().err
