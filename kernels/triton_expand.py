"""Triton expansion of a weight's bit planes, once per call, for large M.

Imported only by ``triton_gemm`` and ``triton_a16``. Their kernels unpack the
planes inside the K loop, and every BLOCK_M-row band of the output repeats it:
about 4 integer ops per code (w <= 4) against, in the int8 GEMM, 128 int8 MACs
per code for a 128-row band. On an H100 SM that is 4 / 64 = 0.06 clocks of
integer ALU against 128 / 4096 = 0.03 of int8 tensor core per code and band: the
unpack, not the MMA, sets the pace, and every band pays it again. From
``EXPAND_MIN_M`` rows on, the launchers expand once (N * K bytes for int8 codes,
2 or 4 N * K for levels in the activation dtype, written and read back through
L2/HBM) and run the kernels on the result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from bitscale.kernels._triton_common import (
    INTERPRETED,
    bipolar_levels,
    cdiv,
    store_dtype,
    unpack_weight_codes,
    weight_strides,
)
from bitscale.kernels.reference import code_word_count

__all__ = ["EXPAND_MIN_M", "expand_weight_codes", "expand_weight_levels"]

# Measured on an H100 (Triton 3.6, CUDA-graph timed, N = K = 4096, bench/kernels'
# crossover): at M = 256 the expanded path took 27-51 us against 148-219 us with the
# planes in the K loop (W4A8, W8A8, W4A16: 3.2-6.0x faster); at M = 16 the in-loop
# W4A16 kernel took 32 us, less than the 51 us the expanded W4A16 path took at M = 256.
# The in-loop time grows about 0.55 us a row past 16, so the two cross near 50 rows;
# 128 keeps a margin until the bench's M = 16 and 64 points place it.
EXPAND_MIN_M = 128
"""Rows of activations from which the launchers expand the weight first (the H100
measurements above; bench/kernels ``expand`` times both paths)."""

# (BLOCK_N, BLOCK_K): 8K codes per program; the interpreter gets a small tile (BLOCK_K
# holding a run of 1-bit code words, 128 codes).
_EXPAND_TILE = (16, 128) if INTERPRETED else (32, 256)


@triton.jit
def _expand_weight_kernel(
    w_ptr,
    out_ptr,
    N,
    K,
    stride_wplane,
    stride_wn,
    W_BITS: tl.constexpr,
    LEVELS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = tl.program_id(1) * BLOCK_K
    offs_k = k_start + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    u_KN = unpack_weight_codes(
        w_ptr,
        k_start,
        K,
        offs_n,
        n_mask,
        stride_wplane,
        stride_wn,
        W_BITS,
        True,
        EVEN_K,
        BLOCK_K,
        BLOCK_N,
    )
    if LEVELS:
        value_KN = bipolar_levels(u_KN, W_BITS).to(out_ptr.dtype.element_ty)
    else:
        value_KN = (u_KN - (1 << (W_BITS - 1))).to(tl.int8)
    tl.store(
        out_ptr + offs_n.to(tl.int64)[None, :] * K + offs_k[:, None],  # N * K may pass 2^31
        value_KN,
        mask=(offs_k < K)[:, None] & n_mask[None, :],
    )


def _expand(data: torch.Tensor, bits: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    assert data.is_contiguous(), "launchers pass contiguous packed weights"
    if data.dtype == torch.uint8:
        assert data.shape[0] == bits and data.shape[2] == (k + 7) // 8, "bit planes"
        n = data.shape[1]
    else:
        assert data.dtype == torch.int32 and data.shape[1] == code_word_count(bits, k), "words"
        n = data.shape[0]
    stride_wplane, stride_wn = weight_strides(data)
    out = torch.empty((n, k), dtype=store_dtype(dtype), device=data.device)
    block_n, block_k = _EXPAND_TILE
    if n and k:
        _expand_weight_kernel[(cdiv(n, block_n), cdiv(k, block_k))](
            data,
            out,
            n,
            k,
            stride_wplane,
            stride_wn,
            W_BITS=bits,
            LEVELS=dtype != torch.int8,
            EVEN_K=k % block_k == 0,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
        )
    return out.to(dtype)


def expand_weight_codes(data: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """int8 [N, K] signed-centred codes T = U - 2^(bits-1) of the bit planes uint8
    [bits, N, ceil(K/8)] or the code words int32 [N, code_word_count(bits, K)] (the
    kernels' own layouts, checked by their launchers)."""
    return _expand(data, bits, k, torch.int8)


def expand_weight_levels(data: torch.Tensor, bits: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, K] bipolar levels 2U - (2^bits - 1) in ``dtype`` (odd integers up to 255,
    exact in bf16, fp16 and fp32) of the bit planes uint8 [bits, N, ceil(K/8)] or the
    code words int32 [N, code_word_count(bits, K)]."""
    return _expand(data, bits, k, dtype)
