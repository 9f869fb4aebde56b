"""Triton weight-only bipolar linear (A16): float activations times packed weights.

Imported only by :mod:`bitscale.kernels.dispatch`, lazily. Shape legend as in
``triton_gemm``: x [M, K] (bf16/fp16/fp32), the weight's bit planes uint8
[w, N, ceil(K/8)] or code words int32 [N, code_word_count(w, K)] (WeightLayout),
scales float32 [N, NG]. Each K-tile of the weight is unpacked in registers to its
bipolar levels 2U - (2^w - 1) (odd integers up to 255, exact in bf16 and fp16),
dotted with the activations in their own dtype with a float32 accumulator, and
scaled once per K-group. Up to 16 rows, autotune also weighs split-K tiles: SPLIT_K
programs share an output tile's K-tiles, and the last to finish adds their float32
partials in a fixed order, so outputs do not change from run to run. Swapped tiles
(SWAP_AB) compute the output transposed, levels [N, K] times x^T, so the levels unpacked
in registers are the MMA's register operand.
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
    bipolar_levels,
    byte_aligned,
    cdiv,
    code_level_unscale,
    code_word_levels_16,
    k_tile_heuristics,
    load_code_words,
    m_bucket,
    scaled_code_levels,
    store_dtype,
    tile_grid,
    tile_of_program,
    tiles_for_rows,
    unpack_weight_codes,
    weight_strides,
)
from bitscale.kernels.reference import PackedWeight

__all__ = ["INTERPRETED", "bipolar_linear_a16"]

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). BLOCK_N = 32 tiles keep >= 128
# programs busy at M <= 16, N = 4096 (132 SMs on an H100), where the weight read is
# the whole cost. With about one program per SM, bandwidth comes from bytes in flight:
# an SM's share of HBM (~25 GB/s) times ~1 us latency is ~25 KB, so the decode tiles
# reach BLOCK_K = 512 (W4: 8 KB of planes per stage, 2-3 stages in flight).
_A16_TILES = (
    # BLOCK_M = 1: the GEMV path, FMAs instead of a 16-row dot; for M = 1 only.
    (1, 16, 256, 4, 3),
    (1, 32, 128, 4, 4),
    (1, 32, 256, 4, 3),
    (1, 64, 128, 4, 3),
    (16, 32, 128, 4, 4),
    (16, 32, 256, 4, 3),
    (16, 32, 512, 4, 3),
    (16, 16, 512, 4, 4),
    (16, 64, 128, 4, 4),
    (16, 128, 128, 4, 4),
    (16, 256, 64, 4, 4),
    (32, 128, 64, 4, 4),
    (64, 128, 64, 4, 3),
    (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 3),
)


# Split-K tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K), for
# M <= SPLIT_K_MAX_M. On the H100 at N = K = 4096 the decode kernels were latency-bound,
# not bandwidth-bound: W1 took 11.9 us for 2 MB of planes and each further plane (2 MB)
# added only ~1.3 us, a ~10 us floor set by 16 dependent K-loop iterations of 128-256
# programs (1-2 per SM). Splitting K over 4-8 programs shortens that chain as much and
# puts 4-8x the programs, and bytes in flight, on the SMs.
_A16_SPLIT_K_TILES = (
    (1, 32, 256, 4, 3, 4),
    (1, 64, 128, 4, 3, 8),
    (16, 32, 128, 4, 4, 4),
    (16, 64, 128, 4, 4, 8),
)
SPLIT_K_MAX_M = 16

# Swapped tiles (SWAP_AB): the same tile shapes, computing out^T = levels @ x^T. Levels
# unpacked in the K loop and dotted as the right operand go to shared memory first, and
# Hopper's wgmma reads them there: Triton then waits for each K step's wgmma before the
# next unpack (TTGIR: warp_group_dot_wait {pendings = 0} in the loop of the code-word
# (128, 256, 64) tile). As the left operand the levels stay in registers, which wgmma
# reads directly, and wgmmas stay in flight while the next K-tile unpacks ({pendings =
# 1} on Triton 3.9, 3-7 on 3.6); a 16-row M becomes the MMA's N (HGMMA.64x16x16).
# On code words each lane unpacks exactly the levels its wgmma fragment holds (the runs
# of WeightLayout.CODE_WORDS), so they go from the words to the MMA with no shuffle
# through shared memory: the (16, 64, 256) decode tile's K loop runs 3.55 SASS
# instructions per W4 code on Triton 3.6, 2.90 on 3.9 (4.38 and 3.85 in plain word order),
# and 2.95 / 2.45 per W1 code, whose levels need no subtraction.
# BLOCK_N >= 64 per 4 warps, wgmma's M. A static reading, unmeasured: autotune weighs them.
# Not for expanded weights, whose levels load through shared memory like x (in flight
# either way). The (16, 64, 256) tile split 4 ways keeps its 3.6 per code (Triton 3.6) and
# puts 256 programs on N = 4096 at decode, where the unsplit one has 64 for 132 SMs.
# In (16, 128, 256) one warpgroup issues two wgmmas per 16-wide K step, which share the
# step's fences and x's shared-memory descriptors: about 185 K-loop instructions per K-tile
# besides the unpack at either width, so per code it runs 2.21 (W1), 2.85 (W2) and 2.94
# (W4) on Triton 3.6, 2.10 / 2.41 / 2.73 on 3.9, ungrouped in up to 237 registers; grouped
# (the group loop around the K loop) it spills 8-48 bytes on code words, 88-184 on planes.
_A16_SWAPPED_TILES = (
    (16, 64, 128, 4, 4),
    (16, 64, 256, 4, 3),
    (16, 64, 128, 4, 4, 8),
    (16, 64, 256, 4, 3, 4),
    (16, 128, 256, 4, 3),
    (16, 128, 256, 4, 3, 4),
    (64, 128, 64, 4, 3),
    (128, 128, 64, 4, 3),
    (128, 256, 64, 8, 3),
)
# Not a candidate: the swapped (256, 128, 64, 8, 3) tile, 2 warpgroups each issuing
# m64n256k16 wgmmas. On an H200 (torch 2.11, Triton 3.6) it computed wrong outputs on
# grouped 3-bit planes at M = 300, N = 260, K = 1024 (errors up to 20 past the float32
# bound, test_gpu_every_tile), which the interpreter does not reproduce; its grouped
# build was also the most register-starved swapped tile (255 registers, 480-byte stack,
# 15.6 SASS instructions per W4 code in the K loop on Triton 3.6).
_ALL_TILES = _A16_TILES + _A16_SPLIT_K_TILES + _A16_SWAPPED_TILES
# The split-K workspace and counters fit every tile (16 columns, the narrowest, is what
# the interpreter's tests force).
_MAX_SPLIT_K = max(tile[5] for tile in _ALL_TILES if len(tile) > 5)
_MIN_BLOCK_N = min(tile[1] for tile in _ALL_TILES)


def _rows_fit(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Autotune candidates for this call: tiles no taller than the rows
    (:func:`tiles_for_rows`), the GEMV tiles (BLOCK_M = 1) only at M = 1, where they
    compete with the 16-row tiles (a GEMV program per row would re-read the weight M
    times), split-K tiles only up to SPLIT_K_MAX_M rows, where the launcher allocates
    their workspace, and swapped tiles only on packed weights."""
    bucket = named_args["M_BUCKET"]
    candidates = [
        config
        for config in configs
        if (bucket == 1 or config.kwargs["BLOCK_M"] > 1)
        and (bucket <= SPLIT_K_MAX_M or config.kwargs.get("SPLIT_K", 1) == 1)
        and not (kwargs["W_LEVELS"] and config.kwargs.get("SWAP_AB", False))
    ]
    return tiles_for_rows(candidates, named_args, **kwargs)


@autotune(
    configs=autotune_configs(_A16_TILES + _A16_SPLIT_K_TILES, _A16_SWAPPED_TILES),
    key=["M_BUCKET", "N", "K", "GROUP_K", "W_BITS", "W_LEVELS"],
    prune_configs_by={"early_config_prune": _rows_fit},
)
@triton.heuristics(k_tile_heuristics())
@triton.jit
def _bipolar_a16_kernel(
    x_ptr,
    w_ptr,
    w_scale_ptr,
    bias_ptr,
    out_ptr,
    workspace_ptr,
    counter_ptr,
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
    W_LEVELS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr = 1,
    SWAP_AB: tl.constexpr = False,
):
    # Decode on code words: levels scaled by powers of two, undone once per group.
    GEMV_WORDS: tl.constexpr = BLOCK_M == 1 and w_ptr.dtype.element_ty == tl.int32
    # 1-bit decode on bit planes: the levels' sign bits applied to x, instead of levels
    # and FMAs.
    GEMV_SIGNS: tl.constexpr = BLOCK_M == 1 and W_BITS == 1 and not (W_LEVELS or GEMV_WORDS)
    # Dot tiles on code words and 16-bit activations build their levels in that dtype
    # (code_word_levels_16).
    x_dtype: tl.constexpr = x_ptr.dtype.element_ty
    LEVELS_16: tl.constexpr = (
        BLOCK_M > 1
        and w_ptr.dtype.element_ty == tl.int32
        and (x_dtype == tl.float16 or (x_dtype == tl.bfloat16 and W_BITS <= 6))
    )
    pid_m, pid_n = tile_of_program(TILE_GROUP_ROWS)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)  # row offsets: M * K and M * N pass 2^31 in long prefills
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    tl.static_assert(not SWAP_AB or BLOCK_M > 1, "the GEMV tiles have no MMA operands to swap")
    # Swapped tiles hold acc and result transposed, [BLOCK_N, BLOCK_M], until the epilogue.
    if SWAP_AB:
        result = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        result = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SPLIT_K == 1:
        first_group = 0
        stop_group = NUM_GROUPS
    else:
        # This program's share of the K-tiles, numbered group after group. A group split
        # between programs is scaled in each; the last program adds the parts.
        tiles_per_group = tl.cdiv(GROUP_K, BLOCK_K)
        tiles_per_split = tl.cdiv(NUM_GROUPS * tiles_per_group, SPLIT_K)
        first_tile = tl.program_id(2) * tiles_per_split
        stop_tile = tl.minimum(first_tile + tiles_per_split, NUM_GROUPS * tiles_per_group)
        if NUM_GROUPS == 1:
            # A constant when the JIT specializes ungrouped weights: g = 0 keeps the
            # K offsets' alignment known, and so the plane loads vectorized.
            first_group = 0
            stop_group = 1
        else:
            first_group = first_tile // tiles_per_group
            stop_group = tl.cdiv(stop_tile, tiles_per_group)
    for g in range(first_group, stop_group):
        if SPLIT_K == 1:
            kk_start = 0
            kk_stop = GROUP_K
            # Tells the compiler the K loop runs at least once: with a zero-trip path, whose
            # accumulator zeros join the loop's exit, ptxas serialized every wgmma of
            # ungrouped (NUM_GROUPS == 1) builds, each waiting out the last (C7515, Triton
            # 3.6; the "waits" column of scripts/sass_stats.py). Launchers pass K >= 1.
            tl.assume(GROUP_K > 0)
        else:
            group_tile = g * tiles_per_group
            kk_start = (tl.maximum(first_tile, group_tile) - group_tile) * BLOCK_K
            kk_stop = (tl.minimum(stop_tile, group_tile + tiles_per_group) - group_tile) * BLOCK_K
        if BLOCK_M == 1:
            partial_KN = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        elif SWAP_AB:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(kk_start, kk_stop, BLOCK_K):
            in_group = (kk + offs_k) < GROUP_K
            k = g * GROUP_K + kk + offs_k
            if GEMV_WORDS or LEVELS_16:
                words_NW = load_code_words(
                    w_ptr,
                    g * GROUP_K + kk,
                    (g + 1) * GROUP_K,
                    offs_n,
                    n_mask,
                    stride_wn,
                    W_BITS,
                    EVEN_K,
                    BLOCK_K,
                )
                if GEMV_WORDS:
                    level_NK = scaled_code_levels(words_NW, BLOCK_N, BLOCK_K, W_BITS)
                else:
                    level_NK = code_word_levels_16(words_NW, BLOCK_N, BLOCK_K, W_BITS, x_dtype)
                level_KN = tl.trans(level_NK)
            elif W_LEVELS:
                level_KN = tl.load(
                    # int64 rows: an expanded weight passes 2^31 elements from N * K = 2^31.
                    w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + k[:, None],
                    mask=in_group[:, None] & n_mask[None, :],
                    other=0.0,
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
                    SIGN_BITS=GEMV_SIGNS,
                )
                if not GEMV_SIGNS:
                    level_KN = bipolar_levels(u_KN, W_BITS)
            # Padded activations are 0, so the weight levels there never count.
            if BLOCK_M == 1:
                # Decode GEMV: one row, float32 FMAs into a [BLOCK_K, BLOCK_N] partial sum
                # reduced once per group, instead of an MMA over 15 padding rows. Unmeasured:
                # autotune weighs it against the 16-row tiles at M = 1.
                x_K1 = tl.load(
                    x_ptr + rows[None, :] * stride_xm + k[:, None],
                    mask=m_mask[None, :] & in_group[:, None],
                    other=0.0,
                )
                if GEMV_SIGNS:
                    # 1-bit levels are +-1: flipping x's sign bit is the product, exactly
                    # as the FMA rounds it (shift, LOP3, FADD: 3 instructions per code).
                    x_bits_K1 = x_K1.to(tl.float32).to(tl.uint32, bitcast=True)
                    partial_KN += (x_bits_K1 ^ u_KN).to(tl.float32, bitcast=True)
                else:
                    partial_KN += x_K1.to(tl.float32) * level_KN.to(tl.float32)
            else:
                x_MK = tl.load(
                    x_ptr + rows[:, None] * stride_xm + k[None, :],
                    mask=m_mask[:, None] & in_group[None, :],
                    other=0.0,
                )
                if DOT_FP32:
                    x_MK = x_MK.to(tl.float32)
                    level_KN = level_KN.to(tl.float32)
                else:
                    level_KN = level_KN.to(x_dtype)
                if SWAP_AB:
                    acc = tl.dot(tl.trans(level_KN), tl.trans(x_MK), acc, input_precision=PRECISION)
                else:
                    acc = tl.dot(x_MK, level_KN, acc, input_precision=PRECISION)
        if GEMV_WORDS:
            # Exact: the products and sums scaled by 2^(j * W) rescale bit for bit.
            partial_KN *= code_level_unscale(BLOCK_K, W_BITS)[:, None]
        if BLOCK_M == 1:
            acc = tl.sum(partial_KN, axis=0)[None, :]
        w_scale = tl.load(w_scale_ptr + offs_n * NUM_GROUPS + g, mask=n_mask, other=0.0)
        if SWAP_AB:
            result += acc * w_scale[:, None]
        else:
            result += acc * w_scale[None, :]
    if SWAP_AB:
        result = tl.trans(result)
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:
        # Deterministic split-K: every program stores its float32 partial, and the last
        # of a tile's SPLIT_K programs to arrive sums them in split order and writes the
        # output (atomics would add in arrival order, differing run to run).
        partial_ptrs = workspace_ptr + (offs_m[:, None] * N + offs_n[None, :])
        tl.store(partial_ptrs + tl.program_id(2) * M * N, result, mask=out_mask)
        tl.debug_barrier()  # all of this program's partial before its arrival
        tile = pid_m * tl.num_programs(1) + pid_n
        arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
        last = arrived == SPLIT_K - 1
        if last:
            result = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for split in tl.static_range(SPLIT_K):
                # .cg: from L2, where the other programs' partials are, not a stale L1.
                result += tl.load(
                    partial_ptrs + split * M * N, mask=out_mask, other=0.0, cache_modifier=".cg"
                )
        out_mask = tl.where(last, out_mask, False)  # `&` makes an int32 mask in the interpreter
    if HAS_BIAS:
        result += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=out_mask)


def bipolar_linear_a16(
    x: torch.Tensor,
    weight: PackedWeight,
    *,
    bias: torch.Tensor | None = None,
    expand_weight: bool | None = None,
) -> torch.Tensor:
    """``x @ dequantize(weight)^T (+ bias)`` for float x [M, K]; output [M, N] in x's dtype.

    ``expand_weight`` forces (True) or forbids (False) expanding the weight to levels in
    x's dtype before the matmul; None expands from ``triton_expand.EXPAND_MIN_M`` rows on.
    """
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(
            f"x must be a contiguous 2-d [M, K] tensor, got shape {tuple(x.shape)} with "
            f"strides {x.stride()}; call x.reshape(-1, K).contiguous() first"
        )
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    devices = (x.device, weight.data.device, weight.scales.device)
    if bias is not None:
        devices += (bias.device,)
    if len(set(devices)) != 1:
        raise ValueError(
            f"x, the weight's data and scales (and bias) must share a device, got "
            f"{', '.join(map(str, devices))}; move them with .to(x.device)"
        )
    m, k = x.shape
    n = weight.out_features
    if k != weight.in_features:
        raise ValueError(
            f"K mismatch: x is {tuple(x.shape)}, the weight has K={weight.in_features}"
        )
    data = weight.data
    if not data.is_contiguous() or not weight.scales.is_contiguous():
        raise ValueError("the packed weight's data and scales must be contiguous")
    if bias is not None and (tuple(bias.shape) != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous ({n},) tensor")
    out = torch.empty((m, n), dtype=store_dtype(x.dtype), device=x.device)
    if m == 0:
        return out.to(x.dtype)
    fp32 = x.dtype == torch.float32
    group_k = weight.group_k
    if expand_weight is None:
        expand_weight = m >= triton_expand.EXPAND_MIN_M
    w = triton_expand.expand_weight_levels(data, weight.bits, k, x.dtype) if expand_weight else data
    stride_wplane, stride_wn = weight_strides(w)
    rows_bucket = m_bucket(m)
    if rows_bucket <= SPLIT_K_MAX_M:
        # The split-K tiles' partials and arrival counters; a split tile's pre-launch hook
        # zeroes the counters, so the other tiles launch without that memset.
        workspace = torch.empty((_MAX_SPLIT_K, m, n), dtype=torch.float32, device=x.device)
        counters = torch.empty(m * cdiv(n, _MIN_BLOCK_N), dtype=torch.int32, device=x.device)
    else:
        workspace = torch.empty(0, dtype=torch.float32, device=x.device)
        counters = torch.empty(0, dtype=torch.int32, device=x.device)
    _bipolar_a16_kernel[tile_grid(m, n)](
        x,
        w,
        weight.scales,
        bias if bias is not None else weight.scales,
        out,
        workspace,
        counters,
        m,
        n,
        k,
        group_k,
        k // group_k,
        x.stride(0),
        stride_wplane,
        stride_wn,
        out.stride(0),
        rows_bucket,
        W_BITS=weight.bits,
        BYTE_ALIGNED=byte_aligned(group_k, k // group_k),
        W_LEVELS=expand_weight,
        HAS_BIAS=bias is not None,
        # The interpreter's bf16/fp16 tl.dot is wrong: dot in float32 there. On a GPU
        # float32 activations need "ieee", or tl.dot would round them to TF32.
        DOT_FP32=INTERPRETED or fp32,
        PRECISION="ieee" if INTERPRETED or fp32 else "tf32",
    )
    return out if out.dtype == x.dtype else out.to(x.dtype)
