"""Zigzag ring attention and packed attention against the dense causal reference (float64)."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from bitscale.hdp.comm import CommCategory, CommCounter, RingExchange
from bitscale.hdp.ring_attention import (
    causal_attention_reference,
    packed_causal_attention,
    zigzag_ring_attention,
)

from bitscale.testing import run_on_ranks

TOLERANCE = 1e-12
# Low-precision inputs: error relative to the largest reference value. Measured: float32
# <= 4e-7; bfloat16 <= 2.4e-3, i.e. about one rounding of a bfloat16 output or gradient
# (2^-8 = 3.9e-3 relative) since the merge and the dK/dV accumulators stay in float32.
LOW_PRECISION_TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}


def _worst(error: float, other: float) -> float:
    """The larger error, NaN if either is: a NaN output must fail the tolerance check,
    and the built-in max would drop it (every comparison with NaN is false)."""
    return math.nan if math.isnan(error) or math.isnan(other) else max(error, other)


def _zigzag_rows(length_padded: int, ring_size: int, position: int) -> torch.Tensor:
    c = length_padded // (2 * ring_size)
    first = torch.arange(position * c, (position + 1) * c)
    second = torch.arange((2 * ring_size - 1 - position) * c, (2 * ring_size - position) * c)
    return torch.cat([first, second])


def _ring_case(rank: int, case: dict, item_id: int) -> dict | None:
    """One ring attention call on case["ranks"]; returns max errors vs the dense reference."""
    ranks = case["ranks"]
    if rank not in ranks:
        return None
    ring_size = len(ranks)
    position = ranks.index(rank)
    gen = torch.Generator().manual_seed(case["seed"])
    heads, kv_heads, head_dim = case["heads"], case["kv_heads"], case["head_dim"]
    dtype = getattr(torch, case.get("dtype", "float64"))
    docs = []
    for length in case["lengths"]:
        c = -(-length // (2 * ring_size))
        padded = 2 * ring_size * c
        q = torch.randn(padded, heads, head_dim, generator=gen, dtype=torch.float64)
        k = torch.randn(padded, kv_heads, head_dim, generator=gen, dtype=torch.float64)
        v = torch.randn(padded, kv_heads, head_dim, generator=gen, dtype=torch.float64)
        dout = torch.randn(padded, heads, head_dim, generator=gen, dtype=torch.float64)
        dout[length:] = 0  # padding rows carry no loss
        # The reference sees exactly the values the ring sees.
        q, k, v, dout = (t.to(dtype).to(torch.float64) for t in (q, k, v, dout))
        docs.append((length, c, padded, q, k, v, dout))

    local = {name: [] for name in ("q", "k", "v", "dout")}
    for _, _, padded, q, k, v, dout in docs:
        rows = _zigzag_rows(padded, ring_size, position)
        for name, full in zip(("q", "k", "v", "dout"), (q, k, v, dout), strict=True):
            local[name].append(full[rows])
    q_l, k_l, v_l = (torch.cat(local[n]).to(dtype).requires_grad_() for n in ("q", "k", "v"))
    counter = CommCounter()
    out_l = zigzag_ring_attention(
        q_l,
        k_l,
        v_l,
        ranks=ranks,
        position=position,
        item_id=item_id,
        chunk_sizes=[doc[1] for doc in docs],
        counter=counter,
    )
    out_l.backward(torch.cat(local["dout"]).to(dtype))

    errors = {"out": 0.0, "dq": 0.0, "dk": 0.0, "dv": 0.0, "padding_grad": 0.0}
    scales = dict.fromkeys(("out", "dq", "dk", "dv"), 0.0)
    offset = 0
    for length, c, padded, q, k, v, dout in docs:
        qr, kr, vr = (t[:length].clone().requires_grad_() for t in (q, k, v))
        ref = causal_attention_reference(qr, kr, vr)
        ref.backward(dout[:length])
        rows = _zigzag_rows(padded, ring_size, position)
        real = rows < length
        mine = slice(offset, offset + 2 * c)
        for name, got, want in (
            ("out", out_l.detach()[mine], ref.detach()),
            ("dq", q_l.grad[mine], qr.grad),
            ("dk", k_l.grad[mine], kr.grad),
            ("dv", v_l.grad[mine], vr.grad),
        ):
            got = got.to(torch.float64)
            err = (got[real] - want[rows[real]]).abs().max().item() if real.any() else 0.0
            errors[name] = _worst(errors[name], err)
            scales[name] = max(scales[name], want.abs().max().item())
        for grad in (q_l.grad, k_l.grad, v_l.grad):
            pad = grad[mine][~real]
            if pad.numel():
                errors["padding_grad"] = _worst(errors["padding_grad"], pad.abs().max().item())
        offset += 2 * c
    # K and V travel in the input dtype, dK and dV in the compute dtype (float32 or float64).
    kv_bytes = 2 * k_l.numel() * k_l.element_size()
    dkv_bytes = 2 * k_l.numel() * (8 if dtype == torch.float64 else 4)
    errors["bytes_ok"] = counter.bytes[CommCategory.RING_KV] == 2 * (ring_size - 1) * kv_bytes and (
        counter.bytes[CommCategory.RING_DKV] == ring_size * dkv_bytes
    )
    errors["scales"] = scales
    return errors


def _ring_cases_on_ranks(rank: int, world_size: int, cases: list[dict]) -> list[dict | None]:
    torch.manual_seed(0)
    return [_ring_case(rank, case, item_id) for item_id, case in enumerate(cases)]


def _cases() -> list[dict]:
    cases = []
    # d = 2..8, rings in scrambled rank order, GQA, non-divisible lengths (tail padding), and
    # several documents per ring.
    scrambled = [5, 2, 7, 0, 3, 6, 1, 4]
    for d in range(2, 9):
        ranks = scrambled[:d]
        cases.append(
            dict(ranks=ranks, lengths=[4 * d + 3], heads=4, kv_heads=2, head_dim=8, seed=10 + d)
        )
        cases.append(
            dict(
                ranks=ranks[::-1], lengths=[2 * d * 3], heads=3, kv_heads=3, head_dim=5, seed=30 + d
            )
        )
    cases.append(
        dict(ranks=[1, 6, 3], lengths=[13, 6, 40], heads=4, kv_heads=1, head_dim=4, seed=7)
    )
    cases.append(
        dict(ranks=[0, 1, 2, 3, 4], lengths=[1, 9], heads=2, kv_heads=2, head_dim=4, seed=8)
    )
    for dtype in LOW_PRECISION_TOLERANCE:
        cases.append(
            dict(
                ranks=[3, 0, 6, 5, 1],
                lengths=[37],
                heads=4,
                kv_heads=2,
                head_dim=8,
                seed=9,
                dtype=dtype,
            )
        )
    return cases


@pytest.mark.dist
def test_ring_attention_matches_dense_for_ring_sizes_2_to_8() -> None:
    cases = _cases()
    per_rank = run_on_ranks(_ring_cases_on_ranks, 8, cases, timeout=180)
    for index, case in enumerate(cases):
        results = [r[index] for r in per_rank if r[index] is not None]
        assert len(results) == len(case["ranks"])
        dtype = case.get("dtype", "float64")
        for errors in results:
            for name in ("out", "dq", "dk", "dv"):
                if dtype == "float64":
                    limit = TOLERANCE
                else:
                    limit = LOW_PRECISION_TOLERANCE[dtype] * errors["scales"][name]
                assert errors[name] <= limit, (case, name, errors[name])
            assert errors["padding_grad"] == 0.0, (case, errors)
            assert errors["bytes_ok"], case


def test_packed_attention_is_block_diagonal() -> None:
    gen = torch.Generator().manual_seed(3)
    lengths = [5, 1, 12, 7]
    q = torch.randn(sum(lengths), 4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(sum(lengths), 2, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(sum(lengths), 2, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(sum(lengths), 4, 6, generator=gen, dtype=torch.float64)
    cu = [0, 5, 6, 18, 25]
    out = packed_causal_attention(q, k, v, cu)
    out.backward(dout)
    for b, e in pairwise(cu):
        qr, kr, vr = (t.detach()[b:e].clone().requires_grad_() for t in (q, k, v))
        ref = causal_attention_reference(qr, kr, vr)
        ref.backward(dout[b:e])
        assert (out.detach()[b:e] - ref.detach()).abs().max() <= TOLERANCE
        for got, want in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
            assert (got[b:e] - want).abs().max() <= TOLERANCE


def test_bad_attention_inputs_raise() -> None:
    q = torch.zeros(6, 4, 2)
    k = torch.zeros(6, 3, 2)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        causal_attention_reference(q, k, k)
    with pytest.raises(ValueError, match="cu_seqlens"):
        packed_causal_attention(q, q, q, [0, 4, 4, 6])
    with pytest.raises(ValueError, match="chunk_sizes"):
        zigzag_ring_attention(q, q, q, ranks=[0, 1], position=0, item_id=0, chunk_sizes=[2])
    with pytest.raises(ValueError, match="distinct ranks"):
        zigzag_ring_attention(q, q, q, ranks=[0, 0], position=0, item_id=0, chunk_sizes=[3])


def _wrong_position_on_ranks(rank: int, world_size: int) -> list[str]:
    """Rings in which ``position`` names another rank than this process."""
    q = torch.zeros(4, 2, 2)
    calls = (
        lambda: zigzag_ring_attention(
            q, q, q, ranks=[1, 0], position=0, item_id=0, chunk_sizes=[2]
        ),
        lambda: RingExchange([1, 0], 0, 0, CommCategory.RING_KV, None, q),
    )
    messages = []
    for call in calls:
        try:
            call()
            messages.append("no error")
        except ValueError as error:
            messages.append(str(error))
    return messages


@pytest.mark.dist
def test_ring_position_must_be_this_rank() -> None:
    (messages,) = run_on_ranks(_wrong_position_on_ranks, 1)
    for message in messages:
        assert "ranks[0] is 1 but this process is rank 0" in message, message
        assert "this rank's index in ranks [1, 0] (1)" in message, message
