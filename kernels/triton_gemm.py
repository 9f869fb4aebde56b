"""Triton bipolar GEMM with one int8 x int8 -> int32 ``tl.dot`` per tile (identity B).

Imported only by :mod:`bitscale.kernels.dispatch`, lazily: the ``triton_*``
modules are the only ones that import triton. ``TRITON_INTERPRET`` is read when
the kernels are decorated, at import.

Shape legend: M rows of activations (tokens), N output channels, K the
reduction, G the K-group length (``group_k``; K when ungrouped), NG = K / G.
Activations arrive as signed-centred codes S = Ux - 2^(a-1) (int8 [M, K]),
weights as w bit planes (uint8 [w, N, ceil(K/8)]) or code words (int32
[N, code_word_count(w, K)], WeightLayout.CODE_WORDS); per group g,

    Y_g = 4 * S_g @ T_g^T + 2 * rowsum(S_g) 1^T + 2 * 1 rowsum(T_g)^T + G

is the exact integer product of the bipolar values, and the float output is
``sum_g scale_x[m, g] * scale_w[n, g] * Y_g``. Padding (K past a group's end,
rows past M) loads S = 0, which zeroes the product whatever T holds there, and
the correction uses the true G.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from bitscale.kernels import triton_expand
from bitscale.kernels._autotune_cache import autotune
from bitscale.kernels._triton_common import (
    INTERPRETED,
    TILE_GROUP_ROWS,
    autotune_configs,
    byte_aligned,
    k_tile_heuristics,
    m_bucket,
    store_dtype,
    tile_grid,
    tile_of_program,
    tiles_for_rows,
    unpack_weight_codes,
    weight_strides,
)
from bitscale.kernels.config import CODE_WORD_BITS, WeightLayout, weight_layout
from bitscale.kernels.reference import code_word_count

__all__ = ["INTERPRETED", "bipolar_gemm", "quantize_activations"]

# int32 holds |S @ T^T| <= G * 2^(a + w - 2) only while that stays below 2^31
# (W8A8: G < 131072); past it every tile's partial product goes to int64. The
# recovery (below) goes to int64 from G * 2^(a + w + 1) on.
_INT32_LIMIT = 1 << 31


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). BLOCK_N = 32 tiles keep >= 128
# programs busy at M <= 16, N = 4096 (132 SMs on an H100), where the weight read is
# the whole cost; BLOCK_K = 512 puts more of it in flight (see triton_a16). At large M
# every K step's wgmma drains before the next is issued: Triton keeps only dots with a
# float32 accumulator in flight across iterations, never int8 -> int32 (pendings = 0 in
# the TTGIR of Triton 3.6 and 3.9). (128, 256, 128) halves the drains per output tile of
# (128, 256, 64), in 144 KiB of shared memory over 3 stages.
_GEMM_TILES = (
    (16, 32, 128, 4, 4),
    (16, 32, 256, 4, 3),
    (16, 32, 512, 4, 3),
    (16, 64, 128, 4, 4),
    (16, 128, 128, 4, 4),
    (32, 64, 128, 4, 4),
    (64, 64, 128, 4, 4),
    (64, 128, 128, 4, 3),
    (128, 128, 64, 8, 3),
    (128, 128, 128, 8, 3),
    (128, 256, 64, 8, 3),
    (128, 256, 128, 8, 3),
)


@autotune(
    configs=autotune_configs(_GEMM_TILES),
    key=["M_BUCKET", "N", "K", "GROUP_K", "W_BITS", "W_CODES"],
    prune_configs_by={"early_config_prune": tiles_for_rows},
)
@triton.heuristics(k_tile_heuristics())
@triton.jit
def _bipolar_gemm_kernel(
    x_ptr,
    x_rowsum_ptr,
    x_scale_ptr,
    w_ptr,
    w_rowsum_ptr,
    w_scale_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    GROUP_K,
    NUM_GROUPS,
    stride_xm,
    stride_wplane,
    stride_wn,
    stride_om,
    M_BUCKET,
    W_BITS: tl.constexpr,
    BYTE_ALIGNED: tl.constexpr,
    EVEN_K: tl.constexpr,
    W_CODES: tl.constexpr,
    INT_OUT: tl.constexpr,
    WIDE_ACC: tl.constexpr,
    NARROW_RECOVERY: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tile_of_program(TILE_GROUP_ROWS)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)  # row offsets: M * K and M * N pass 2^31 in long prefills
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    if INT_OUT:
        result = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int64)
    else:
        result = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    tl.assume(GROUP_K > 0)  # the K loop runs: see the A16 kernel's assume
    for g in range(0, NUM_GROUPS):
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        wide = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int64)
        for kk in range(0, GROUP_K, BLOCK_K):
            in_group = (kk + offs_k) < GROUP_K
            k = g * GROUP_K + kk + offs_k
            x_SK = tl.load(
                x_ptr + rows[:, None] * stride_xm + k[None, :],
                mask=m_mask[:, None] & in_group[None, :],
                other=0,
            )
            if W_CODES:
                t_KN = tl.load(
                    # int64 rows: an expanded weight passes 2^31 elements from N * K = 2^31.
                    w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + k[:, None],
                    mask=in_group[:, None] & n_mask[None, :],
                    other=0,
                )
            else:
                u_KN = unpack_weight_codes(
                    w_ptr,
                    g * GROUP_K + kk,
                    (g + 1) * GROUP_K,
                    offs_n,
                    n_mask,
                    stride_wplane,
                    stride_wn,
                    W_BITS,
                    BYTE_ALIGNED,
                    EVEN_K,
                    BLOCK_K,
                    BLOCK_N,
                )
                t_KN = (u_KN - (1 << (W_BITS - 1))).to(tl.int8)
            if WIDE_ACC:
                wide += tl.dot(x_SK, t_KN, out_dtype=tl.int32).to(tl.int64)
            else:
                acc = tl.dot(x_SK, t_KN, acc, out_dtype=tl.int32)
        x_rowsum = tl.load(x_rowsum_ptr + offs_m * NUM_GROUPS + g, mask=m_mask, other=0)
        w_rowsum = tl.load(w_rowsum_ptr + offs_n * NUM_GROUPS + g, mask=n_mask, other=0)
        if NARROW_RECOVERY:
            y = 4 * acc + 2 * x_rowsum[:, None] + 2 * w_rowsum[None, :] + GROUP_K
        else:
            # The bipolar product reaches G * (2^a - 1)(2^w - 1): past int32 for W8A8
            # at G ~ 33k, so recover in int64.
            y = (
                4 * (wide + acc.to(tl.int64))
                + 2 * x_rowsum.to(tl.int64)[:, None]
                + 2 * w_rowsum.to(tl.int64)[None, :]
                + GROUP_K
            )
        if INT_OUT:
            result += y.to(tl.int64)
        else:
            x_scale = tl.load(x_scale_ptr + offs_m * NUM_GROUPS + g, mask=m_mask, other=0.0)
            w_scale = tl.load(w_scale_ptr + offs_n * NUM_GROUPS + g, mask=n_mask, other=0.0)
            result += y.to(tl.float32) * (x_scale[:, None] * w_scale[None, :])
    if HAS_BIAS:
        result += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _require(tensor: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if tensor.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {tensor.dtype}")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous; call .contiguous() first")


def bipolar_gemm(
    x_centred: torch.Tensor,
    x_rowsums: torch.Tensor,
    w_packed: torch.Tensor,
    w_rowsums: torch.Tensor,
    *,
    a_bits: int,
    w_bits: int,
    k: int,
    group_k: int,
    x_scales: torch.Tensor | None = None,
    w_scales: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    accumulate_int64: bool | None = None,
    expand_weight: bool | None = None,
) -> torch.Tensor:
    """Launch the identity-B GEMM.

    Without scales the result is the exact int64 [M, N] bipolar product (one
    group, ``group_k == k``); with ``x_scales`` [M, NG] and ``w_scales`` [N, NG]
    (float32) it is the scaled float output in ``out_dtype``, plus ``bias``.
    ``accumulate_int64`` forces (True) or forbids (False) the int64 tile
    accumulator; None picks it only when int32 could overflow. ``w_packed`` is the
    weight's bit planes or code words (``WeightLayout``). ``expand_weight`` forces
    (True) or forbids (False) expanding it to int8 codes before the GEMM; None expands
    from ``triton_expand.EXPAND_MIN_M`` rows on.
    """
    if k < 1 or group_k < 1 or k % group_k:
        raise ValueError(f"group_k={group_k} must be positive and divide K={k}")
    m = x_centred.shape[0] if x_centred.dim() == 2 else -1
    num_groups = k // group_k
    if w_packed.dtype == torch.int32:  # code words
        group_size = group_k if num_groups > 1 else None
        if weight_layout(w_bits, group_size) is not WeightLayout.CODE_WORDS:
            raise ValueError(
                f"code words hold {', '.join(map(str, CODE_WORD_BITS))}-bit weights whose "
                f"K-groups start on a run of words; got w_bits={w_bits}, group_k={group_k}: "
                "pass bit planes instead"
            )
        n = w_packed.shape[0] if w_packed.dim() == 2 else -1
        _require(w_packed, "w_packed", torch.int32, (n, code_word_count(w_bits, k)))
    else:
        n = w_packed.shape[1] if w_packed.dim() == 3 else -1
        _require(w_packed, "w_packed", torch.uint8, (w_bits, n, (k + 7) // 8))
    _require(x_centred, "x_centred", torch.int8, (m, k))
    _require(x_rowsums, "x_rowsums", torch.int32, (m, num_groups))
    _require(w_rowsums, "w_rowsums", torch.int32, (n, num_groups))
    int_out = x_scales is None
    if int_out != (w_scales is None):
        raise ValueError("pass both x_scales and w_scales (float output) or neither (int64)")
    if int_out:
        if num_groups != 1:
            raise ValueError("the exact int64 output needs one K-group (group_k == K)")
        if bias is not None:
            raise ValueError("bias needs the float output (pass x_scales and w_scales)")
        dtype = torch.int64
    else:
        _require(x_scales, "x_scales", torch.float32, (m, num_groups))
        _require(w_scales, "w_scales", torch.float32, (n, num_groups))
        dtype = out_dtype or torch.float32
    if bias is not None:
        _require(bias, "bias", bias.dtype, (n,))
    inputs = (x_centred, x_rowsums, w_packed, w_rowsums, x_scales, w_scales, bias)
    devices = {t.device for t in inputs if t is not None}
    if len(devices) != 1:
        raise ValueError(
            f"all inputs must be on one device, got {sorted(map(str, devices))}; move them "
            "with .to(x_centred.device)"
        )
    if accumulate_int64 is None:
        accumulate_int64 = group_k << (a_bits + w_bits - 2) >= _INT32_LIMIT
    # |4 S @ T^T + 2 rowsum(S) + 2 rowsum(T) + G| < G * 2^(a + w + 1): int32 holds the
    # recovery too (W4A8 for G < 2^18), and halves the epilogue's registers.
    narrow_recovery = not accumulate_int64 and group_k << (a_bits + w_bits + 1) < _INT32_LIMIT
    out = torch.empty((m, n), dtype=store_dtype(dtype), device=x_centred.device)
    if m == 0 or n == 0:
        return out.to(dtype)
    if expand_weight is None:
        expand_weight = m >= triton_expand.EXPAND_MIN_M
    weight = w_packed
    if expand_weight:
        weight = triton_expand.expand_weight_codes(w_packed, w_bits, k)
    stride_wplane, stride_wn = weight_strides(weight)
    _bipolar_gemm_kernel[tile_grid(m, n)](
        x_centred,
        x_rowsums,
        x_scales if x_scales is not None else x_rowsums,
        weight,
        w_rowsums,
        w_scales if w_scales is not None else w_rowsums,
        bias if bias is not None else w_rowsums,
        out,
        m,
        n,
        k,
        group_k,
        num_groups,
        x_centred.stride(0),
        stride_wplane,
        stride_wn,
        out.stride(0),
        m_bucket(m),
        W_BITS=w_bits,
        BYTE_ALIGNED=byte_aligned(group_k, num_groups),
        W_CODES=expand_weight,
        INT_OUT=int_out,
        WIDE_ACC=accumulate_int64,
        NARROW_RECOVERY=narrow_recovery,
        HAS_BIAS=bias is not None,
    )
    return out.to(dtype)


@triton.jit
def _quantize_activations_kernel(
    x_ptr,
    codes_ptr,
    rowsum_ptr,
    scale_ptr,
    GROUP_K,
    NUM_GROUPS,
    stride_xm,
    LEVELS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per (token, K-group): absmax pass, then a code + row-sum pass,
    # so dynamic activation quantization is one launch, not four torch ops.
    row = tl.program_id(0).to(tl.int64)  # row * K passes 2^31 in long prefills
    group = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    start = row * stride_xm + group * GROUP_K
    absmax = tl.zeros((BLOCK,), dtype=tl.float32)
    for kk in range(0, GROUP_K, BLOCK):
        mask = kk + offs < GROUP_K
        x = tl.load(x_ptr + start + kk + offs, mask=mask, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.abs(x))
    # The same IEEE operations, in the same order, as format.codes_from_scales.
    scale = tl.math.div_rn(tl.max(absmax, axis=0), LEVELS * 1.0)
    step = tl.where(scale == 0.0, 1.0, scale) * 2.0
    total = tl.zeros((BLOCK,), dtype=tl.int32)
    code_start = row * NUM_GROUPS * GROUP_K + group * GROUP_K
    for kk in range(0, GROUP_K, BLOCK):
        mask = kk + offs < GROUP_K
        x = tl.load(x_ptr + start + kk + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.floor(tl.math.div_rn(x, step) + HALF * 1.0)
        u = tl.minimum(tl.maximum(u, 0.0), LEVELS * 1.0)
        s = u.to(tl.int32) - HALF
        tl.store(codes_ptr + code_start + kk + offs, s.to(tl.int8), mask=mask)
        total += tl.where(mask, s, 0)
    tl.store(rowsum_ptr + row * NUM_GROUPS + group, tl.sum(total, axis=0))
    tl.store(scale_ptr + row * NUM_GROUPS + group, scale)


def quantize_activations(
    x: torch.Tensor, *, a_bits: int, group_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Absmax per-token (per K-group) quantization of float ``x`` [M, K], fused.

    Returns signed-centred codes (int8 [M, K]), their row sums per group
    (int32 [M, NG]) and the scales (float32 [M, NG]); the codes equal
    ``quantize(x, a_bits, group_size=group_k, method="absmax").codes - 2^(a-1)``.
    """
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be 2-d [M, K] with unit stride along K, got {tuple(x.shape)}")
    m, k = x.shape
    if group_k < 1 or k % group_k:
        raise ValueError(f"group_k={group_k} must be positive and divide K={k}")
    num_groups = k // group_k
    codes = torch.empty((m, k), dtype=torch.int8, device=x.device)
    rowsums = torch.empty((m, num_groups), dtype=torch.int32, device=x.device)
    scales = torch.empty((m, num_groups), dtype=torch.float32, device=x.device)
    if m == 0:
        return codes, rowsums, scales
    block = min(triton.next_power_of_2(group_k), 64 if INTERPRETED else 1024)
    _quantize_activations_kernel[(m, num_groups)](
        x,
        codes,
        rowsums,
        scales,
        group_k,
        num_groups,
        x.stride(0),
        LEVELS=(1 << a_bits) - 1,
        HALF=1 << (a_bits - 1),
        BLOCK=block,
    )
    return codes, rowsums, scales
