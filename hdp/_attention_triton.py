"""The CUDA back end of the attention block: fused Triton kernels over packed documents.

Three kernels, flash-attention 2 style, token-major (no batch dimension), GQA by indexing the
K/V head as ``h // (H // G)`` (K/V heads are never copied):

* ``_forward_kernel``: one program per (query tile, query head); it walks the key tiles of its
  range with an online softmax (base 2: scores are pre-multiplied by ``scale * log2(e)``) and
  writes the block's normalized output and natural-log log-sum-exp.
* ``_backward_kv_kernel``: one program per (key tile, K/V head); it keeps its K/V tile and
  dK/dV accumulators on chip and walks the query tiles of its range for every query head of
  its group, so dK/dV sum over the group without atomics.
* ``_backward_q_kernel``: one program per (query tile, query head); it walks the key tiles of
  the same ranges as the forward and accumulates dQ.

Backward probabilities are ``exp(s * scale - lse)`` with the *final* log-sum-exp over every
block of the ring and ``delta = rowsum(dout * out_final)`` from the caller, so a block's
gradients are its exact share of the full gradient. Every program accumulates in a fixed
order and nothing is accumulated with atomics: results are bitwise reproducible run to run.

Ranges. Key j is visible to query i iff ``doc(i) == doc(j)`` and (causal) ``pos(j) <= pos(i)``.
Along T, documents never decrease and positions strictly increase within a document, in the
queries and in the keys, so ``doc * 2^32 + pos`` is sorted in both, and the keys a tile of
queries can see form one contiguous range: from the first key of the tile's first query's
document to the last key at or before the tile's last query (causal) or the last key of its
document (full). The key tiles that can see a query form one contiguous range of queries the
same way. The ranges are found with ``torch.searchsorted`` on the device (no host sync); the
kernels loop over their range only, masking elementwise inside, so work and memory are linear
in tokens for short documents, and a query tile does no work for documents other than its own.

Rows that see no key get ``out = 0``, ``lse = -inf`` and zero gradients (no NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .attention_block import TokenDocs, key_ranges, query_ranges

_LOG2E = tl.constexpr(math.log2(math.e))
_LN2 = tl.constexpr(math.log(2.0))

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 128


@triton.jit
def _forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    q_doc_ptr,
    q_pos_ptr,
    k_doc_ptr,
    k_pos_ptr,
    k_start_ptr,
    k_end_ptr,
    num_queries,
    head_group,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_lh,
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // head_group
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < num_queries
    dim_ok = dims < HEAD_DIM
    rows64 = rows.to(tl.int64)
    q = tl.load(
        q_ptr + rows64[:, None] * stride_qt + head * stride_qh + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    q_doc = tl.load(q_doc_ptr + rows, mask=row_ok, other=0)
    q_pos = tl.load(q_pos_ptr + rows, mask=row_ok, other=0)
    k_start = tl.load(k_start_ptr + tile)
    k_end = tl.load(k_end_ptr + tile)

    # Running max (log2 units) and sum of the online softmax, and the unnormalized output.
    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(k_start, k_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < k_end
        cols64 = cols.to(tl.int64)
        k = tl.load(
            k_ptr + cols64[:, None] * stride_kt + kv_head * stride_kh + dims[None, :],
            mask=col_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )
        v = tl.load(
            v_ptr + cols64[:, None] * stride_vt + kv_head * stride_vh + dims[None, :],
            mask=col_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )
        k_doc = tl.load(k_doc_ptr + cols, mask=col_ok, other=0)
        visible = (q_doc[:, None] == k_doc[None, :]) & col_ok[None, :]
        if CAUSAL:
            k_pos = tl.load(k_pos_ptr + cols, mask=col_ok, other=0)
            visible &= k_pos[None, :] <= q_pos[:, None]
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        # A row that has seen no key yet keeps max -inf: subtract 0 there (exp2(-inf) = 0).
        base = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.exp2(scores - base[:, None])
        rescale = tl.exp2(row_max - base)
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
        row_max = new_max

    seen = row_sum > 0.0
    out = acc / tl.where(seen, row_sum, 1.0)[:, None]
    lse = tl.where(seen, (row_max + tl.log2(tl.where(seen, row_sum, 1.0))) * _LN2, float("-inf"))
    tl.store(
        out_ptr + rows64[:, None] * stride_ot + head * stride_oh + dims[None, :],
        out,
        mask=row_ok[:, None] & dim_ok[None, :],
    )
    tl.store(lse_ptr + head * stride_lh + rows, lse, mask=row_ok)


@triton.jit
def _backward_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    dout_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    q_doc_ptr,
    q_pos_ptr,
    k_doc_ptr,
    k_pos_ptr,
    q_start_ptr,
    q_end_ptr,
    num_keys,
    head_group,
    qk_scale,
    scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_lh,
    stride_lt,
    stride_eh,
    stride_et,
    stride_dkt,
    stride_dkh,
    stride_dvt,
    stride_dvh,
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    col_ok = cols < num_keys
    dim_ok = dims < HEAD_DIM
    cols64 = cols.to(tl.int64)
    k = tl.load(
        k_ptr + cols64[:, None] * stride_kt + kv_head * stride_kh + dims[None, :],
        mask=col_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    v = tl.load(
        v_ptr + cols64[:, None] * stride_vt + kv_head * stride_vh + dims[None, :],
        mask=col_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    k_doc = tl.load(k_doc_ptr + cols, mask=col_ok, other=0)
    k_pos = tl.load(k_pos_ptr + cols, mask=col_ok, other=0)
    q_start = tl.load(q_start_ptr + tile)
    q_end = tl.load(q_end_ptr + tile)

    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    # Transposed tiles ([keys, queries]) so dK and dV accumulate rows of this program's keys.
    for head in range(kv_head * head_group, (kv_head + 1) * head_group):
        for m0 in range(q_start, q_end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < q_end
            rows64 = rows.to(tl.int64)
            tile_mask = row_ok[:, None] & dim_ok[None, :]
            q = tl.load(
                q_ptr + rows64[:, None] * stride_qt + head * stride_qh + dims[None, :],
                mask=tile_mask,
                other=0.0,
            )
            # dout may come in another float dtype; the dots take the inputs' dtype.
            dout = tl.load(
                dout_ptr + rows64[:, None] * stride_dot + head * stride_doh + dims[None, :],
                mask=tile_mask,
                other=0.0,
            ).to(q.dtype)
            lse = tl.load(lse_ptr + head * stride_lh + rows * stride_lt, mask=row_ok, other=0.0)
            lse *= _LOG2E
            delta = tl.load(delta_ptr + head * stride_eh + rows * stride_et, mask=row_ok, other=0.0)
            q_doc = tl.load(q_doc_ptr + rows, mask=row_ok, other=0)
            visible = (k_doc[:, None] == q_doc[None, :]) & row_ok[None, :] & col_ok[:, None]
            if CAUSAL:
                q_pos = tl.load(q_pos_ptr + rows, mask=row_ok, other=0)
                visible &= k_pos[:, None] <= q_pos[None, :]
            scores_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
            # A select, not a product: a query that sees no key of any block has lse -inf,
            # exp2 gives inf there, and every one of its scores is masked.
            probs_t = tl.where(visible, tl.exp2(scores_t - lse[None, :]), 0.0)
            dv += tl.dot(probs_t.to(dout.dtype), dout, input_precision=PRECISION)
            dprobs_t = tl.dot(v, tl.trans(dout), input_precision=PRECISION)
            dscores_t = probs_t * (dprobs_t - delta[None, :])
            dk += tl.dot(dscores_t.to(q.dtype), q, input_precision=PRECISION)

    out_mask = col_ok[:, None] & dim_ok[None, :]
    tl.store(
        dk_ptr + cols64[:, None] * stride_dkt + kv_head * stride_dkh + dims[None, :],
        dk * scale,
        mask=out_mask,
    )
    tl.store(
        dv_ptr + cols64[:, None] * stride_dvt + kv_head * stride_dvh + dims[None, :],
        dv,
        mask=out_mask,
    )


@triton.jit
def _backward_q_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    dout_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    q_doc_ptr,
    q_pos_ptr,
    k_doc_ptr,
    k_pos_ptr,
    k_start_ptr,
    k_end_ptr,
    num_queries,
    head_group,
    qk_scale,
    scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_lh,
    stride_lt,
    stride_eh,
    stride_et,
    stride_dqt,
    stride_dqh,
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // head_group
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < num_queries
    dim_ok = dims < HEAD_DIM
    rows64 = rows.to(tl.int64)
    tile_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(
        q_ptr + rows64[:, None] * stride_qt + head * stride_qh + dims[None, :],
        mask=tile_mask,
        other=0.0,
    )
    dout = tl.load(
        dout_ptr + rows64[:, None] * stride_dot + head * stride_doh + dims[None, :],
        mask=tile_mask,
        other=0.0,
    ).to(q.dtype)
    lse = tl.load(lse_ptr + head * stride_lh + rows * stride_lt, mask=row_ok, other=0.0)
    lse *= _LOG2E
    delta = tl.load(delta_ptr + head * stride_eh + rows * stride_et, mask=row_ok, other=0.0)
    q_doc = tl.load(q_doc_ptr + rows, mask=row_ok, other=0)
    q_pos = tl.load(q_pos_ptr + rows, mask=row_ok, other=0)
    k_start = tl.load(k_start_ptr + tile)
    k_end = tl.load(k_end_ptr + tile)

    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(k_start, k_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < k_end
        cols64 = cols.to(tl.int64)
        k = tl.load(
            k_ptr + cols64[:, None] * stride_kt + kv_head * stride_kh + dims[None, :],
            mask=col_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )
        v = tl.load(
            v_ptr + cols64[:, None] * stride_vt + kv_head * stride_vh + dims[None, :],
            mask=col_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )
        k_doc = tl.load(k_doc_ptr + cols, mask=col_ok, other=0)
        visible = (q_doc[:, None] == k_doc[None, :]) & col_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            k_pos = tl.load(k_pos_ptr + cols, mask=col_ok, other=0)
            visible &= k_pos[None, :] <= q_pos[:, None]
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        probs = tl.where(visible, tl.exp2(scores - lse[:, None]), 0.0)  # inf where lse = -inf
        dprobs = tl.dot(dout, tl.trans(v), input_precision=PRECISION)
        dscores = probs * (dprobs - delta[:, None])
        dq += tl.dot(dscores.to(k.dtype), k, input_precision=PRECISION)

    tl.store(
        dq_ptr + rows64[:, None] * stride_dqt + head * stride_dqh + dims[None, :],
        dq * scale,
        mask=tile_mask,
    )


# ---------------------------------------------------------------------------------------
# Launchers


@dataclass(frozen=True)
class _Tiles:
    """One launch configuration per kernel: (BLOCK_M queries, BLOCK_N keys, warps, stages)."""

    forward: tuple[int, int, int, int]
    backward_kv: tuple[int, int, int, int]
    backward_q: tuple[int, int, int, int]


def _interpreted() -> bool:
    return isinstance(_forward_kernel, InterpretedFunction)


def _tiles(block_d: int, dtype: torch.dtype) -> _Tiles:
    """Tiles for H100/H200, or 16 x 16 under the interpreter (tl.dot's smallest tile, so the
    tests' few dozen tokens cross several tiles and documents cross tile borders).

    sm_90 gives a block at most 227 KiB of shared memory and a thread at most 255 registers
    (64K per SM). Each choice below was compiled for sm_90 with Triton 3.9 and read back
    with cuobjdump (registers, spill stack) and the metadata (shared memory); the
    compile test in tests/hdp/test_attention_triton.py prints the table. None of them has
    been timed on a GPU.
    """
    if _interpreted():
        return _Tiles((16, 16, 1, 1), (16, 16, 1, 1), (16, 16, 1, 1))
    if dtype == torch.float32:
        # Exact float32 ("ieee") dots run on the FMA units with both operands in registers:
        # a correctness path, not a fast one. Larger tiles spill (64 x 32 x 128 forward:
        # 704 B of stack, dK/dV at 32 x 64: 14 KB); with 8 warps these use 84 / 112 / 87
        # registers and none spills.
        return _Tiles((32, 16, 8, 1), (32, 32, 8, 1), (32, 32, 8, 1))
    if block_d <= 64:
        # Forward: 128 x 64 scores and a 128 x 64 accumulator on one warpgroup (254
        # registers at D = 64, no spill) leave room for two blocks per SM, one's softmax
        # overlapping the other's wgmmas; 3 stages of K/V are 48 KiB next to a 16 KiB Q.
        # dK/dV: 128 keys per program halve the Q/dO reloads of 64; 32-query steps keep
        # the transposed scores small (180 registers on 8 warps; 64 x 64 tiles on 4
        # warps spill). dQ: 128 x 32 on 4 warps, 168 registers, two blocks per SM.
        return _Tiles((128, 64, 4, 3), (32, 128, 8, 2), (128, 32, 4, 3))
    # D = 128: the 128 x 128 float32 accumulator needs two warpgroups (8 warps: 208
    # registers; 4 warps spill 384 B); Q (32 KiB) and 3 stages of K and V (96 KiB) are 129
    # KiB. dK/dV (32 x 128, as for D = 64): 240 registers, no spill (64 x 64 on 8 warps
    # spills 24 B). dQ: 128 x 32 on 8 warps, 128 registers and 96 KiB, two blocks per SM.
    return _Tiles((128, 64, 8, 3), (32, 128, 8, 2), (128, 32, 8, 2))


def _check_mask(name: str, tensor: torch.Tensor, tokens: int, device: torch.device) -> None:
    if tensor.dtype != torch.int32 or tensor.dim() != 1 or not tensor.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous 1-D int32 tensor (one entry per token); got "
            f"dtype {tensor.dtype}, shape {tuple(tensor.shape)}, contiguous "
            f"{tensor.is_contiguous()}: pass .to(torch.int32).contiguous()"
        )
    if tensor.shape[0] != tokens:
        raise ValueError(f"{name} has {tensor.shape[0]} entries for {tokens} tokens")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, the attention inputs on {device}")


def _check_inputs(
    q_THD: torch.Tensor,
    k_TGD: torch.Tensor,
    v_TGD: torch.Tensor,
    q_doc: torch.Tensor,
    q_pos: torch.Tensor,
    k_doc: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
) -> None:
    if q_THD.dim() != 3 or k_TGD.dim() != 3 or k_TGD.shape != v_TGD.shape:
        raise ValueError(
            "the attention kernels take q [Tq, H, D] and k, v [Tk, G, D] (no batch dimension); "
            f"got q {tuple(q_THD.shape)}, k {tuple(k_TGD.shape)}, v {tuple(v_TGD.shape)}"
        )
    heads, dim = q_THD.shape[1], q_THD.shape[2]
    kv_heads = k_TGD.shape[1]
    if kv_heads == 0 or heads % kv_heads != 0 or k_TGD.shape[2] != dim:
        raise ValueError(
            "q heads must be a multiple of k/v heads (GQA) with equal head dims; got "
            f"q {tuple(q_THD.shape)}, k {tuple(k_TGD.shape)}"
        )
    if not 1 <= dim <= _MAX_HEAD_DIM:
        raise ValueError(f"head dim {dim} is not supported: the kernels take 1..{_MAX_HEAD_DIM}")
    if q_THD.dtype not in _DTYPES or not (q_THD.dtype == k_TGD.dtype == v_TGD.dtype):
        raise ValueError(
            "q, k and v must share one dtype among float16, bfloat16 and float32; got "
            f"{q_THD.dtype}, {k_TGD.dtype}, {v_TGD.dtype} (float64 runs on the torch back end)"
        )
    device = q_THD.device
    if not (k_TGD.device == v_TGD.device == device):
        raise ValueError(
            f"q, k and v must be on one device; got {device}, {k_TGD.device}, {v_TGD.device}"
        )
    if device.type != "cuda" and not _interpreted():
        raise ValueError(
            f"the Triton attention kernels need CUDA tensors (got {device}); on CPU run the "
            "torch back end, or set TRITON_INTERPRET=1 before importing triton"
        )
    for name, tensor, tokens in (
        ("q_doc", q_doc, q_THD.shape[0]),
        ("q_pos", q_pos, q_THD.shape[0]),
        ("k_doc", k_doc, k_TGD.shape[0]),
        ("k_pos", k_pos, k_TGD.shape[0]),
    ):
        _check_mask(name, tensor, tokens, device)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float, got {scale}")


def _unit_inner_stride(x: torch.Tensor) -> torch.Tensor:
    """The kernels address the head dim with stride 1 (vectorized loads); any other layout
    of the token and head dims is read through its strides."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _block_d(dim: int) -> int:
    # tl.dot needs every tile dim >= 16 and tl.arange a power of two: pad with masks.
    return max(16, triton.next_power_of_2(dim))


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs get exact float32 products ("ieee"), not TF32's 10-bit mantissas.
    return "ieee" if dtype == torch.float32 else "tf32"


def block_forward(
    q_THD: torch.Tensor,
    k_TGD: torch.Tensor,
    v_TGD: torch.Tensor,
    q_doc: torch.Tensor,
    q_pos: torch.Tensor,
    k_doc: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out_THD, lse_HT)`` in float32 of queries ``q_THD`` [Tq, H, D] against keys and
    values [Tk, G, D] under the document mask; rows that see no key get 0 and -inf."""
    _check_inputs(q_THD, k_TGD, v_TGD, q_doc, q_pos, k_doc, k_pos, scale)
    num_queries, heads, dim = q_THD.shape
    num_keys, kv_heads = k_TGD.shape[:2]
    device = q_THD.device
    out = torch.zeros((num_queries, heads, dim), dtype=torch.float32, device=device)
    lse = torch.full((heads, num_queries), -math.inf, dtype=torch.float32, device=device)
    if num_queries == 0 or num_keys == 0 or heads == 0:
        return out, lse
    q, k, v = (_unit_inner_stride(x) for x in (q_THD, k_TGD, v_TGD))
    block_d = _block_d(dim)
    block_m, block_n, warps, stages = _tiles(block_d, q.dtype).forward
    k_start, k_end = key_ranges(TokenDocs(q_doc, q_pos), TokenDocs(k_doc, k_pos), block_m, causal)
    grid = (triton.cdiv(num_queries, block_m), heads)
    _forward_kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        q_doc,
        q_pos,
        k_doc,
        k_pos,
        k_start,
        k_end,
        num_queries,
        heads // kv_heads,
        scale * _LOG2E.value,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        CAUSAL=causal,
        HEAD_DIM=dim,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PRECISION=_precision(q.dtype),
        num_warps=warps,
        num_stages=stages,
    )
    return out, lse


def _check_statistics(name: str, stat: torch.Tensor, heads: int, queries: int, device) -> None:
    if stat.dtype != torch.float32 or tuple(stat.shape) != (heads, queries):
        raise ValueError(
            f"{name} must be float32 [H, Tq] = [{heads}, {queries}]; got {stat.dtype} "
            f"{tuple(stat.shape)}"
        )
    if stat.device != device:
        raise ValueError(f"{name} is on {stat.device}, the attention inputs on {device}")


def block_backward(
    q_THD: torch.Tensor,
    k_TGD: torch.Tensor,
    v_TGD: torch.Tensor,
    dout_THD: torch.Tensor,
    lse_HT: torch.Tensor,
    delta_HT: torch.Tensor,
    q_doc: torch.Tensor,
    q_pos: torch.Tensor,
    k_doc: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq_THD, dk_TGD, dv_TGD)`` in float32: this block's share of the gradients, given
    the final ``lse_HT`` over all blocks and ``delta_HT = rowsum(dout * out_final)``."""
    _check_inputs(q_THD, k_TGD, v_TGD, q_doc, q_pos, k_doc, k_pos, scale)
    num_queries, heads, dim = q_THD.shape
    num_keys, kv_heads = k_TGD.shape[:2]
    device = q_THD.device
    if dout_THD.shape != q_THD.shape or dout_THD.dtype not in _DTYPES:
        raise ValueError(
            f"dout must match q's shape {tuple(q_THD.shape)} in float16, bfloat16 or float32; "
            f"got {dout_THD.dtype} {tuple(dout_THD.shape)}"
        )
    if dout_THD.device != device:
        raise ValueError(f"dout is on {dout_THD.device}, the attention inputs on {device}")
    _check_statistics("lse_HT", lse_HT, heads, num_queries, device)
    _check_statistics("delta_HT", delta_HT, heads, num_queries, device)
    dq = torch.zeros((num_queries, heads, dim), dtype=torch.float32, device=device)
    dk = torch.zeros((num_keys, kv_heads, dim), dtype=torch.float32, device=device)
    dv = torch.zeros_like(dk)
    if num_queries == 0 or num_keys == 0 or heads == 0:
        return dq, dk, dv
    q, k, v, dout = (_unit_inner_stride(x) for x in (q_THD, k_TGD, v_TGD, dout_THD))
    block_d = _block_d(dim)
    tiles = _tiles(block_d, q.dtype)
    statistics = (
        lse_HT.stride(0),
        lse_HT.stride(1),
        delta_HT.stride(0),
        delta_HT.stride(1),
    )
    constants = dict(CAUSAL=causal, HEAD_DIM=dim, BLOCK_D=block_d, PRECISION=_precision(q.dtype))

    block_m, block_n, warps, stages = tiles.backward_kv
    q_start, q_end = query_ranges(TokenDocs(q_doc, q_pos), TokenDocs(k_doc, k_pos), block_n, causal)
    _backward_kv_kernel[(triton.cdiv(num_keys, block_n), kv_heads)](
        q,
        k,
        v,
        dout,
        lse_HT,
        delta_HT,
        dk,
        dv,
        q_doc,
        q_pos,
        k_doc,
        k_pos,
        q_start,
        q_end,
        num_keys,
        heads // kv_heads,
        scale * _LOG2E.value,
        scale,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        dout.stride(0),
        dout.stride(1),
        *statistics,
        dk.stride(0),
        dk.stride(1),
        dv.stride(0),
        dv.stride(1),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=warps,
        num_stages=stages,
        **constants,
    )

    block_m, block_n, warps, stages = tiles.backward_q
    k_start, k_end = key_ranges(TokenDocs(q_doc, q_pos), TokenDocs(k_doc, k_pos), block_m, causal)
    _backward_q_kernel[(triton.cdiv(num_queries, block_m), heads)](
        q,
        k,
        v,
        dout,
        lse_HT,
        delta_HT,
        dq,
        q_doc,
        q_pos,
        k_doc,
        k_pos,
        k_start,
        k_end,
        num_queries,
        heads // kv_heads,
        scale * _LOG2E.value,
        scale,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        dout.stride(0),
        dout.stride(1),
        *statistics,
        dq.stride(0),
        dq.stride(1),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=warps,
        num_stages=stages,
        **constants,
    )
    return dq, dk, dv
