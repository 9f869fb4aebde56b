"""HDP runtime end to end: a 2-layer transformer trained on several ranks equals one process.

float64 throughout; relative error of a tensor = max|got - want| / max|want|.
"""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from bitscale.hdp import CostModel, HDPRunner, plan_batch, plan_static_mesh
from bitscale.hdp.plan import OffloadConfig
from bitscale.hdp.runtime import IGNORE_INDEX, build_micro_batch, summed_cross_entropy
from bitscale.hdp.tiny_model import TinyTransformer
from torch.distributed.fsdp import fully_shard

from bitscale.testing import run_on_ranks

CAPACITY = 32
VOCAB = 64
STEPS = 5
TOLERANCE = 1e-10
# run_on_ranks' deadline; subgroups wait no longer (gloo's default would be 30 minutes).
TIMEOUT_S = 280
MODEL = dict(vocab_size=VOCAB, dim=32, heads=4, kv_heads=2, layers=2, mlp_dim=64)
# Ring bytes of TinyTransformer(**MODEL) in float64: 2 layers, 2 KV heads of dim 8.
COST = CostModel(num_layers=2, kv_heads=2, head_dim=8, element_size=8)


def _batch(seed: int, num_sequences: int = 32) -> list[torch.Tensor]:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    lengths = [rng.randint(7, 4 * CAPACITY) for _ in range(num_sequences)]
    lengths[0] = 4 * CAPACITY  # the longest allowed: a 4-rank ring
    lengths[1] = 7
    return [torch.randint(0, VOCAB, (n,), generator=gen) for n in lengths]


def _model() -> TinyTransformer:
    torch.manual_seed(1234)
    return TinyTransformer(**MODEL).double()


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _plan(strategy: str, lengths: list[int], world_size: int, capacity: int = CAPACITY):
    if strategy.startswith("hdp"):
        return plan_batch(lengths, world_size, capacity, cost=COST)
    return plan_static_mesh(lengths, world_size, capacity, cost=COST)


def _reference_run() -> dict:
    """One process, whole batch: loss = sum of token losses / loss tokens, per step."""
    # Tiny ops: more intra-op threads only fight the other processes for the 2 cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference_steps()
    finally:
        torch.set_num_threads(threads)


def _reference_steps() -> dict:
    model = _model()
    optimizer = _optimizer(model)
    losses, grads = [], None
    for step in range(STEPS):
        batch = _batch(step)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for tokens in batch:
            logits = model(tokens, torch.arange(tokens.shape[0]))
            labels = torch.cat([tokens[1:], torch.tensor([IGNORE_INDEX])])
            loss_sum = loss_sum + summed_cross_entropy(logits, labels)
        loss = loss_sum / sum(t.shape[0] - 1 for t in batch)
        loss.backward()
        losses.append(loss.item())
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
    return {"losses": losses, "grads": grads, "params": dict(model.state_dict())}


def _train(runner: HDPRunner, model, strategy: str, world_size: int, capacity: int) -> dict:
    optimizer = _optimizer(model)
    losses, grads, byte_errors = [], None, []
    for step in range(STEPS):
        batch = _batch(step)
        plan = _plan(strategy, [t.shape[0] for t in batch], world_size, capacity)
        result = runner.step(batch, plan)
        losses.append(result.loss)
        if result.loss_tokens != plan.stats.loss_tokens:
            byte_errors.append(("loss_tokens", result.loss_tokens, plan.stats.loss_tokens))
        if sum(result.ring_kv_bytes) != plan.stats.ring_kv_bytes:
            byte_errors.append(("kv", sum(result.ring_kv_bytes), plan.stats.ring_kv_bytes))
        if sum(result.ring_dkv_bytes) != plan.stats.ring_dkv_bytes:
            byte_errors.append(("dkv", sum(result.ring_dkv_bytes), plan.stats.ring_dkv_bytes))
        if step == 0:
            grads = {n: _full(p.grad).clone() for n, p in model.named_parameters()}
        optimizer.step()
    # numpy, not tensors: torch pickles tensors through shared memory that dies with the rank.
    return {
        "losses": losses,
        "grads": {n: g.numpy() for n, g in grads.items()},
        "params": {n: _full(p).detach().numpy() for n, p in model.state_dict().items()},
        "byte_errors": byte_errors,
    }


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective), or the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _offload_check(runner_group, world_size: int) -> dict:
    """Same step with and without offloading half of the saved activations of ring items."""
    batch = _batch(100)
    plan = _plan("hdp", [t.shape[0] for t in batch], world_size)
    results = {}
    for ratio in (None, 0.5):
        model = _model()
        runner = HDPRunner(
            model, group=runner_group, offload_ratio=ratio, offload_min_slots=CAPACITY
        )
        result = runner.step(batch, plan)
        results[ratio] = (result, {n: p.grad.clone() for n, p in model.named_parameters()})
    (plain, plain_grads), (offloaded, off_grads) = results[None], results[0.5]
    return {
        "bitwise": plain.loss == offloaded.loss
        and all(torch.equal(plain_grads[n], off_grads[n]) for n in plain_grads),
        "plain": plain.offload,
        "offloaded": offloaded.offload,
    }


def _equivalence_on_ranks(rank: int, world_size: int, phases: list[tuple[str, int, int]]) -> dict:
    torch.manual_seed(0)
    groups = {
        n: dist.new_group(list(range(n)), timeout=timedelta(seconds=TIMEOUT_S))
        for n in sorted({p[1] for p in phases})
    }
    out = {}
    for strategy, n, capacity in phases:
        if rank >= n:
            continue
        model = _model()
        if strategy == "hdp-fsdp":
            assert n == world_size, "FSDP2 phases shard over the world mesh"
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
        runner = HDPRunner(model, group=groups[n])
        trained = _train(runner, model, strategy, n, capacity)
        if rank == 0:
            out[(strategy, n, capacity)] = trained
        if strategy == "hdp" and n == 4:
            check = _offload_check(groups[n], n)
            if rank == 0:
                out["offload"] = check
    return out


def _rel(got_array, want: torch.Tensor) -> float:
    got = torch.from_numpy(got_array)
    scale = want.abs().max().item()
    return (got - want).abs().max().item() / (scale if scale > 0 else 1.0)


PHASES = [
    # The batch (7 .. 128 tokens) is shared; capacity is the least that lets n ranks hold the
    # longest sequence (128 = n * capacity, rounded to even zigzag shards), so rings of every
    # size up to n occur. HDP on 8 ranks at capacity 16 uses rings of up to 8 ranks; the
    # static mesh at capacity 32 on 8 ranks is CP 4 x DP 2.
    ("hdp", 2, 64),
    ("hdp", 3, 44),
    ("hdp", 4, 32),
    ("hdp", 8, 16),
    ("static", 8, 32),
    # FSDP2 (parameters, gradients and AdamW states sharded over 8 ranks) under HDP; rings of
    # up to 4 ranks (8-rank rings are covered above, and cost the most CPU here).
    ("hdp-fsdp", 8, 32),
]
NUM_RANDOM_PLANS = 200


def _all_checks_on_ranks(rank: int, world_size: int) -> dict:
    """Every multi-rank check of this file in one spawn (8 processes cost ~20 s CPU)."""
    return {
        "equivalence": _equivalence_on_ranks(rank, world_size, PHASES),
        "random_plans": _random_plans_on_ranks(rank, world_size, NUM_RANDOM_PLANS, 7),
    }


@pytest.fixture(scope="module")
def eight_ranks() -> list[dict]:
    return run_on_ranks(_all_checks_on_ranks, 8, timeout=TIMEOUT_S)


@pytest.mark.dist
@pytest.mark.slow
def test_hdp_and_static_training_equal_one_process(eight_ranks: list[dict]) -> None:
    reference = _reference_run()
    results = eight_ranks[0]["equivalence"]
    for phase in PHASES:
        got = results[phase]
        assert got["byte_errors"] == [], (phase, got["byte_errors"])
        for step, (a, b) in enumerate(zip(got["losses"], reference["losses"], strict=True)):
            assert abs(a - b) <= TOLERANCE * abs(b), (phase, step, a, b)
        for name, want in reference["grads"].items():
            assert _rel(got["grads"][name], want) <= TOLERANCE, (phase, "grad", name)
        for name, want in reference["params"].items():
            assert _rel(got["params"][name], want) <= TOLERANCE, (phase, "param", name)
    offload = results["offload"]
    assert offload["bitwise"]
    assert offload["plain"]["offloaded_bytes"] == 0
    moved, kept = offload["offloaded"]["offloaded_bytes"], offload["offloaded"]["kept_bytes"]
    assert moved > 0 and offload["offloaded"]["reloaded_bytes"] == moved
    assert abs(moved / (moved + kept) - 0.5) < 0.1
    assert offload["offloaded"]["peak_kept_bytes"] < offload["plain"]["peak_kept_bytes"]


def test_micro_batch_shifts_labels_before_sharding_and_pads_the_tail() -> None:
    tokens = torch.arange(100, 111)  # 11 tokens on a 3-rank ring: c = 2, 12 slots, 1 padding
    plan = plan_batch([11], 3, 4, cost=COST)
    (item,) = plan.items
    assert item.cp_size == 3 and item.chunk_size == 2
    seen_labels = {}
    for plan_rank in range(3):
        mb = build_micro_batch([item], plan_rank, [tokens], plan.lengths)
        assert mb.slots == 4 and mb.layout.chunk_sizes == (2,)
        for pos, tok, label in zip(
            mb.position_ids.tolist(), mb.input_ids.tolist(), mb.labels.tolist(), strict=True
        ):
            if label != IGNORE_INDEX:
                seen_labels[pos] = (tok, label)
        # Rank 0 holds chunks 0 and 5; chunk 5 is position 10 and one padding slot.
        if plan_rank == 0:
            assert mb.position_ids.tolist() == [0, 1, 10, 0]
            assert mb.labels.tolist() == [101, 102, IGNORE_INDEX, IGNORE_INDEX]
            assert mb.padding_tokens == 1 and mb.loss_tokens == 2
    assert seen_labels == {p: (100 + p, 101 + p) for p in range(10)}


def test_runner_rejects_mismatched_inputs() -> None:
    plan = plan_batch([5, 9], 2, 8, cost=COST)
    items = [i for i in plan.items if 1 in i.seq_ids]
    short_batch = [torch.zeros(5, dtype=torch.long), torch.zeros(8, dtype=torch.long)]
    with pytest.raises(ValueError, match="plan was made for 9"):
        build_micro_batch(items, items[0].ranks[0], short_batch, plan.lengths)


def _random_plans_on_ranks(rank: int, world_size: int, num_plans: int, seed: int) -> list:
    """Run many random plans; every rank checks its own bytes against the plan."""
    groups = {
        n: dist.new_group(list(range(n)), timeout=timedelta(seconds=TIMEOUT_S))
        if n < world_size
        else None
        for n in range(2, 9)
    }
    rng = random.Random(seed)
    torch.manual_seed(0)
    model = TinyTransformer(vocab_size=16, dim=8, heads=2, kv_heads=1, layers=1, mlp_dim=8).double()
    cost = CostModel(num_layers=1, kv_heads=1, head_dim=4, element_size=8)
    runners = {n: HDPRunner(model, group=groups[n]) for n in range(2, 9) if rank < n}
    report = []
    for index in range(num_plans):
        n = rng.randint(2, 8)
        capacity = rng.randint(2, 12)
        longest = n * (capacity - capacity % 2)
        lengths = [rng.randint(1, longest) for _ in range(rng.randint(1, 8))]
        kind = rng.choice(["hdp", "hdp-pow2", "hdp-unbalanced", "hdp-offload", "static"])
        if kind == "static":
            try:
                plan = plan_static_mesh(lengths, n, capacity, cost=cost)
            except ValueError:
                kind = "hdp"
        if kind.startswith("hdp"):
            plan = plan_batch(
                lengths,
                n,
                capacity,
                cost=cost,
                group_rule="pow2" if kind == "hdp-pow2" else "ceil",
                balance=kind != "hdp-unbalanced",
                offload=OffloadConfig(max_ratio=0.5) if kind == "hdp-offload" else None,
            )
        if rank >= n:
            continue
        gen = torch.Generator().manual_seed(index)
        batch = [torch.randint(0, 16, (L,), generator=gen) for L in lengths]
        result = runners[n].step(batch, plan)
        expected_kv = expected_dkv = 0
        for item in plan.for_rank(rank):
            expected_kv += cost.ring_kv_bytes(item.cp_size, 2 * item.chunk_size) // item.cp_size
            expected_dkv += cost.ring_dkv_bytes(item.cp_size, 2 * item.chunk_size) // item.cp_size
        ok = (
            result.comm_bytes["ring_kv"] == expected_kv
            and result.comm_bytes["ring_dkv"] == expected_dkv
            and sum(result.ring_kv_bytes) == plan.stats.ring_kv_bytes
            and sum(result.ring_dkv_bytes) == plan.stats.ring_dkv_bytes
            and result.loss_tokens == plan.stats.loss_tokens
        )
        if all(item.cp_size == 1 for item in plan.for_rank(rank)):
            ok = ok and result.comm_bytes["ring_kv"] == 0 and result.comm_bytes["ring_dkv"] == 0
        # Items the planner gave an offload ratio move activations to host and back.
        offloading = sum(1 for item in plan.for_rank(rank) if item.offload_ratio > 0)
        ok = ok and result.offload["micro_batches"] == offloading
        ok = ok and result.offload["reloaded_bytes"] == result.offload["offloaded_bytes"]
        loss_error = 0.0
        if rank == 0 and plan.stats.loss_tokens:
            with torch.no_grad():
                total = sum(
                    summed_cross_entropy(
                        model(t, torch.arange(t.shape[0])),
                        torch.cat([t[1:], torch.tensor([IGNORE_INDEX])]),
                    ).item()
                    for t in batch
                )
            want = total / plan.stats.loss_tokens
            loss_error = abs(result.loss - want) / abs(want)
        report.append(
            (index, kind, n, ok, loss_error, plan.fingerprint(), result.offload["micro_batches"])
        )
    return report


@pytest.mark.dist
@pytest.mark.slow
def test_random_plans_run_without_deadlock_and_count_bytes_exactly(
    eight_ranks: list[dict],
) -> None:
    per_rank = [r["random_plans"] for r in eight_ranks]
    ran = {entry[0] for entry in per_rank[0]}
    assert len(ran) == NUM_RANDOM_PLANS
    fingerprints = {}
    for rank_report in per_rank:
        for index, kind, n, ok, loss_error, fingerprint, _ in rank_report:
            assert ok, (index, kind, n)
            assert loss_error <= TOLERANCE, (index, kind, n, loss_error)
            assert fingerprints.setdefault(index, fingerprint) == fingerprint
    kinds = {entry[1] for entry in per_rank[0]}
    assert kinds == {"hdp", "hdp-pow2", "hdp-unbalanced", "hdp-offload", "static"}
    offloaded = sum(entry[6] for rank_report in per_rank for entry in rank_report)
    assert offloaded > 0
    assert {entry[2] for entry in per_rank[0]} == set(range(2, 9))


@pytest.mark.parametrize(
    ("tokens", "error"),
    [
        (
            torch.zeros(5),
            "1-D integer tensor of token ids, got shape \\(5,\\) and dtype torch.float32",
        ),
        (torch.zeros(1, 5, dtype=torch.long), "got shape \\(1, 5\\)"),
    ],
)
def test_batch_must_hold_1d_integer_token_tensors(tokens: torch.Tensor, error: str) -> None:
    from bitscale.hdp.runtime import _check_sequence

    with pytest.raises(ValueError, match=error):
        _check_sequence([tokens], 0, 5)
