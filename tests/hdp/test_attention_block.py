"""The attention block primitive against a dense float64 oracle (masked scores, softmax)."""

from __future__ import annotations

import math

import pytest
import torch
from bitscale.hdp import _attention_torch
from bitscale.hdp.attention_block import (
    TokenDocs,
    block_backward,
    block_forward,
    key_ranges,
    merge_partial,
    query_ranges,
)

# float64 blocks differ from the dense oracle only by summation order.
TOLERANCE = 1e-12


@pytest.fixture(params=[(256, 512), (8, 16)], ids=["cpu-tiles", "small-tiles"])
def tiles(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU tiles as shipped, and small ones so every document crosses tile borders."""
    block_m, block_n = request.param
    monkeypatch.setattr(_attention_torch, "_CPU_BLOCK_M", block_m)
    monkeypatch.setattr(_attention_torch, "_CPU_BLOCK_N", block_n)


def _visible(q_docs: TokenDocs, k_docs: TokenDocs, causal: bool) -> torch.Tensor:
    visible = q_docs.doc[:, None] == k_docs.doc[None, :]
    if causal:
        visible &= k_docs.pos[None, :] <= q_docs.pos[:, None]
    return visible


def _dense(q, k, v, q_docs, k_docs, causal, scale):
    """(out_THD, lse_HT) by materialized scores; rows without a key: (0, -inf)."""
    group = q.shape[1] // k.shape[1]
    scores = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(group, 1)) * scale
    scores = scores.masked_fill(~_visible(q_docs, k_docs, causal), -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.masked_fill(lse == -math.inf, 0.0).unsqueeze(-1))
    return torch.einsum("hqk,khd->qhd", probs, v.repeat_interleave(group, 1)), lse


def _docs(doc: list[int], pos: list[int]) -> TokenDocs:
    return TokenDocs(torch.tensor(doc, dtype=torch.int32), torch.tensor(pos, dtype=torch.int32))


def _layout(lengths: list[int], first_doc: int = 0, skip: tuple[int, ...] = ()) -> TokenDocs:
    """Documents of ``lengths`` one after the other, ids from ``first_doc`` leaving out
    ``skip`` (documents the other side of the block has and this one has not)."""
    doc, pos, ident = [], [], first_doc
    for n in lengths:
        while ident in skip:
            ident += 1
        doc += [ident] * n
        pos += list(range(n))
        ident += 1
    return _docs(doc, pos)


def _qkv(tq: int, tk: int, heads: int, kv_heads: int, dim: int, seed: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(tq, heads, dim, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(tk, kv_heads, dim, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(tk, kv_heads, dim, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, v


def _check_block(q, k, v, q_docs, k_docs, causal, tolerance=TOLERANCE):
    """Forward and backward of one block equal the dense oracle's (the block is the whole
    attention here, so its lse is final)."""
    scale = 0.37
    q64, k64, v64 = (t.to(torch.float64).requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = _dense(q64, k64, v64, q_docs, k_docs, causal, scale)
    out, lse = block_forward(q, k, v, q_docs, k_docs, causal=causal, scale=scale)
    assert out.dtype == lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert torch.equal(lse.isinf(), ref_lse.isinf())
    finite = ref_lse.isfinite()
    assert (lse[finite] - ref_lse[finite]).abs().max() <= tolerance
    assert (out - ref_out).abs().max() <= tolerance * ref_out.abs().max().clamp(min=1)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    dout = dout.to(q.dtype)
    ref_grads = torch.autograd.grad((ref_out * dout.to(torch.float64)).sum(), (q64, k64, v64))
    delta = (dout.to(out.dtype) * out).sum(-1).transpose(0, 1)
    grads = block_backward(q, k, v, dout, lse, delta, q_docs, k_docs, causal=causal, scale=scale)
    for grad, ref, source in zip(grads, ref_grads, (q, k, v), strict=True):
        assert grad.shape == source.shape and not grad.isnan().any()
        assert (grad - ref).abs().max() <= tolerance * ref.abs().max().clamp(min=1)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_packed_documents_match_the_dense_oracle(tiles, causal: bool, group: int) -> None:
    lengths = [1, 37, 2, 1, 64, 19, 1, 33]  # one-token documents, odd lengths
    docs = _layout(lengths)
    q, k, v = _qkv(sum(lengths), sum(lengths), 8, 8 // group, 8, seed=group)
    _check_block(q, k, v, docs, docs, causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_blocks_of_different_chunks_and_missing_documents(tiles, causal: bool) -> None:
    """Queries and keys from different chunks: other lengths and positions, documents one
    side has and the other lacks (their queries see nothing: out 0, lse -inf, no NaN)."""
    q_docs = _docs(
        [0] * 5 + [2] * 9 + [3] * 30 + [5] * 4,
        list(range(40, 45)) + list(range(9)) + list(range(100, 130)) + list(range(4)),
    )
    k_docs = _docs(
        [0] * 50 + [1] * 3 + [3] * 20 + [4] * 7 + [5] * 2,
        list(range(50)) + list(range(3)) + list(range(110, 130)) + list(range(7)) + [10, 11],
    )
    q, k, v = _qkv(len(q_docs), len(k_docs), 4, 2, 8, seed=3)
    _check_block(q, k, v, q_docs, k_docs, causal)


def test_a_chunk_with_no_visible_key_returns_zeros_and_minus_infinity(tiles) -> None:
    q_docs, k_docs = _layout([7, 5]), _layout([6], first_doc=2)
    q, k, v = _qkv(12, 6, 2, 1, 4, seed=4)
    out, lse = block_forward(q, k, v, q_docs, k_docs)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == -math.inf).all())
    delta = torch.zeros_like(lse)
    grads = block_backward(q, k, v, torch.ones_like(q), lse, delta, q_docs, k_docs)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_merged_blocks_give_the_attention_over_their_union(tiles) -> None:
    """Two key blocks merged through their lse, and backward of each block given the final
    lse, add up to attention over both (the ring recipe)."""
    lengths = [30, 3, 41]
    docs = _layout(lengths)
    q, k, v = _qkv(74, 74, 4, 2, 8, seed=5)
    split = 50
    k_parts = (
        TokenDocs(docs.doc[:split], docs.pos[:split]),
        TokenDocs(docs.doc[split:], docs.pos[split:]),
    )
    out = torch.zeros(74, 4, 8, dtype=torch.float64)
    lse = torch.full((4, 74), -math.inf, dtype=torch.float64)
    for part, rows in zip(k_parts, (slice(0, split), slice(split, 74)), strict=True):
        merge_partial(out, lse, *block_forward(q, k[rows], v[rows], docs, part, scale=0.5))
    q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = _dense(q64, k64, v64, docs, docs, True, 0.5)
    assert (out - ref_out).abs().max() <= TOLERANCE and (lse - ref_lse).abs().max() <= TOLERANCE
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    ref_dq, ref_dk, ref_dv = torch.autograd.grad((ref_out * dout).sum(), (q64, k64, v64))
    delta = (dout * out).sum(-1).transpose(0, 1)
    dq = torch.zeros_like(q)
    for part, rows in zip(k_parts, (slice(0, split), slice(split, 74)), strict=True):
        bq, bk, bv = block_backward(q, k[rows], v[rows], dout, lse, delta, docs, part, scale=0.5)
        dq += bq
        assert (bk - ref_dk[rows]).abs().max() <= TOLERANCE
        assert (bv - ref_dv[rows]).abs().max() <= TOLERANCE
    assert (dq - ref_dq).abs().max() <= TOLERANCE


# Low precision: error relative to the largest reference value. bfloat16 inputs are exact in
# float32, which the block computes in, so the only bf16 error is the inputs' own rounding
# (done before both paths see them): what remains is float32 summation order, <= 1e-5.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_in_float32(tiles, dtype: torch.dtype) -> None:
    lengths = [45, 1, 60, 22]
    docs = _layout(lengths)
    q, k, v = _qkv(128, 128, 4, 1, 16, seed=7, dtype=dtype)
    _check_block(q, k, v, docs, docs, True, tolerance=1e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_ranges_hold_every_visible_pair(causal: bool) -> None:
    q_docs, k_docs = _layout([5, 17, 3, 40]), _layout([9, 12, 30, 14])
    visible = _visible(q_docs, k_docs, causal)
    starts, ends = key_ranges(q_docs, k_docs, 8, causal)
    assert starts.dtype == ends.dtype == torch.int32
    for tile, (start, end) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        columns = visible[8 * tile : 8 * tile + 8].any(dim=0).nonzero().flatten()
        assert len(columns) == 0 or (start <= columns.min() and columns.max() < end)
    # Tight at the end: each tile's last query sees its range's last key.
    last_queries = torch.clamp(torch.arange(8, 73, 8), max=65) - 1
    assert visible[last_queries, ends - 1].all()
    starts, ends = query_ranges(q_docs, k_docs, 16, causal)
    for tile, (start, end) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        rows = visible[:, 16 * tile : 16 * tile + 16].any(dim=1).nonzero().flatten()
        assert len(rows) == 0 or (start <= rows.min() and rows.max() < end)
    # Tight at the start: a key tile's first key, if anyone sees it, is seen by the range's
    # first query.
    first_keys = torch.arange(0, 65, 16)
    seen = visible[:, first_keys].any(dim=0)
    assert seen.sum() >= 3 and visible[starts[seen], first_keys[seen]].all()


def test_bad_blocks_are_refused_with_the_reason() -> None:
    docs = _layout([4, 4])
    q, k, v = _qkv(8, 8, 4, 2, 8, seed=8)
    cases = [
        ((q, k[:, :1].expand(8, 3, 8), v[:, :1].expand(8, 3, 8), docs, docs), "multiple of k/v"),
        ((q, k, v[:4], docs, docs), "k, v"),
        ((q, k, v, _layout([4]), docs), "describe every token once"),
        ((q, k.float(), v, docs, docs), "one floating dtype"),
        ((q[0], k, v, docs, docs), r"q \[Tq, H, D\]"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            block_forward(*args)
