"""Triton bipolar GEMM by the paper's bit-plane decomposition (bit-serial, a*w plane products).

Imported only by :mod:`bitscale.kernels.dispatch`, lazily. With activation
planes b_i (i < a) and weight planes c_j (j < w), each a 0/1 matrix along K,

    X @ W^T = sum_i sum_j 2^(i+j) * (4 * b_i @ c_j^T - 2 * popc(b_i) 1^T - 2 * 1 popc(c_j)^T + K)

(the AND form of research note 1.3 C). The paper runs each b_i @ c_j^T as a
1-bit tensor-core MMA (popc of AND); Triton has no b1 MMA, so here each plane
product is an int8 ``tl.dot`` of 0/1 tiles and the shift-add recovery happens
per plane pair. It costs a*w dots where ``triton_gemm`` needs one, so it only
competes at a*w = 1; it exists to compare against the paper's scheme.

Shape legend: planes uint8 [a, M, ceil(K/8)] and [w, N, ceil(K/8)], plane
popcounts int32 [a, M] and [w, N] of the codes; the kernel drops x's bits past K,
so padding adds 0 to every product whatever the planes hold there, and the
correction uses the true K.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from bitscale.kernels._autotune_cache import autotune
from bitscale.kernels._triton_common import (
    INTERPRETED,
    TILE_GROUP_ROWS,
    autotune_configs,
    expand_bits,
    m_bucket,
    tile_grid,
    tile_of_program,
    tiles_for_rows,
)
from bitscale.kernels.format import pack_bitplanes

__all__ = ["INTERPRETED", "bipolar_bitplane_gemm", "bipolar_mm_int_bitplane", "plane_popcounts"]

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
_BITPLANE_TILES = (
    (16, 64, 128, 4, 4),
    (64, 64, 128, 4, 4),
    (128, 128, 64, 8, 3),
)


@autotune(
    configs=autotune_configs(_BITPLANE_TILES),
    key=["M_BUCKET", "N", "K", "A_BITS", "W_BITS"],
    prune_configs_by={"early_config_prune": tiles_for_rows},
)
@triton.jit
def _bipolar_bitplane_kernel(
    x_ptr,
    w_ptr,
    x_popc_ptr,
    w_popc_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xplane,
    stride_xm,
    stride_wplane,
    stride_wn,
    stride_om,
    M_BUCKET,
    A_BITS: tl.constexpr,
    W_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tile_of_program(TILE_GROUP_ROWS)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)  # row offsets: M * K and M * N pass 2^31 in long prefills
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_byte = tl.arange(0, BLOCK_K // 8)
    m_mask = offs_m < M
    n_mask = offs_n < N
    result = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int64)
    tl.assume(K > 0)  # the K loops run: see the A16 kernel's assume
    for i in tl.static_range(A_BITS):
        x_popc = tl.load(x_popc_ptr + i * M + offs_m, mask=m_mask, other=0)
        for j in tl.static_range(W_BITS):
            w_popc = tl.load(w_popc_ptr + j * N + offs_n, mask=n_mask, other=0)
            plane_product = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            for k0 in range(0, K, BLOCK_K):
                byte = k0 // 8 + offs_byte
                byte_mask = byte * 8 < K
                x_byte_MB = tl.load(
                    x_ptr + i * stride_xplane + rows[:, None] * stride_xm + byte[None, :],
                    mask=m_mask[:, None] & byte_mask[None, :],
                    other=0,
                )
                w_byte_NB = tl.load(
                    w_ptr + j * stride_wplane + offs_n[:, None] * stride_wn + byte[None, :],
                    mask=n_mask[:, None] & byte_mask[None, :],
                    other=0,
                )
                # Bits past K in a last, partial byte are dropped from x: a plane product
                # then counts no pad bit whatever the planes hold there.
                bits_in_K = tl.maximum(tl.minimum(K - byte * 8, 8), 0)
                x_byte_MB &= ((1 << bits_in_K) - 1)[None, :]
                b_MK = expand_bits(x_byte_MB, BLOCK_M, BLOCK_K // 8).to(tl.int8)
                c_KN = tl.trans(expand_bits(w_byte_NB, BLOCK_N, BLOCK_K // 8).to(tl.int8))
                plane_product = tl.dot(b_MK, c_KN, plane_product, out_dtype=tl.int32)
            recovered = 4 * plane_product - 2 * x_popc[:, None] - 2 * w_popc[None, :] + K
            result += recovered.to(tl.int64) << (i + j)
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, result, mask=m_mask[:, None] & n_mask[None, :])


def plane_popcounts(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [bits, rows]: how many codes of each row have bit j set."""
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8).view(-1, 1, 1)
    return ((codes.unsqueeze(0) >> shifts) & 1).sum(-1, dtype=torch.int32).contiguous()


def bipolar_mm_int_bitplane(
    x_codes: torch.Tensor, w_codes: torch.Tensor, *, a_bits: int, w_bits: int
) -> torch.Tensor:
    """Exact int64 [M, N] bipolar product of uint8 codes [M, K] and [N, K], bit-serially."""
    if x_codes.dtype != torch.uint8 or w_codes.dtype != torch.uint8:
        raise ValueError("x_codes and w_codes must be uint8 codes")
    if x_codes.dim() != 2 or w_codes.dim() != 2 or x_codes.shape[1] != w_codes.shape[1]:
        raise ValueError(
            f"need codes [M, K] and [N, K], got {tuple(x_codes.shape)} and {tuple(w_codes.shape)}"
        )
    return bipolar_bitplane_gemm(
        pack_bitplanes(x_codes, a_bits),
        pack_bitplanes(w_codes, w_bits),
        plane_popcounts(x_codes, a_bits),
        plane_popcounts(w_codes, w_bits),
        k=x_codes.shape[1],
    )


def bipolar_bitplane_gemm(
    x_planes: torch.Tensor,
    w_planes: torch.Tensor,
    x_popcounts: torch.Tensor,
    w_popcounts: torch.Tensor,
    *,
    k: int,
) -> torch.Tensor:
    """Launch the bit-plane kernel on packed planes [a, M, ceil(K/8)], [w, N, ceil(K/8)]
    and their per-plane popcounts (int32 [a, M], [w, N])."""
    if x_planes.dim() != 3 or w_planes.dim() != 3:
        raise ValueError("x_planes and w_planes must be 3-d [bits, rows, ceil(K/8)]")
    a_bits, m = x_planes.shape[:2]
    w_bits, n = w_planes.shape[:2]
    for name, tensor, shape, dtype in (
        ("x_planes", x_planes, (a_bits, m, (k + 7) // 8), torch.uint8),
        ("w_planes", w_planes, (w_bits, n, (k + 7) // 8), torch.uint8),
        ("x_popcounts", x_popcounts, (a_bits, m), torch.int32),
        ("w_popcounts", w_popcounts, (w_bits, n), torch.int32),
    ):
        if tensor.dtype != dtype or tuple(tensor.shape) != shape or not tensor.is_contiguous():
            raise ValueError(
                f"{name} must be a contiguous {dtype} tensor of shape {shape}, got "
                f"{tensor.dtype} {tuple(tensor.shape)}"
            )
    # 4 * popc(b AND c) <= 4K must fit int32 before the int64 shift-add.
    if k >= 1 << 29:
        raise ValueError(f"K={k} is too long for the bit-plane kernel (limit 2^29)")
    out = torch.empty((m, n), dtype=torch.int64, device=x_planes.device)
    if m == 0 or n == 0:
        return out
    _bipolar_bitplane_kernel[tile_grid(m, n)](
        x_planes,
        w_planes,
        x_popcounts,
        w_popcounts,
        out,
        m,
        n,
        k,
        x_planes.stride(0),
        x_planes.stride(1),
        w_planes.stride(0),
        w_planes.stride(1),
        out.stride(0),
        m_bucket(m),
        A_BITS=a_bits,
        W_BITS=w_bits,
    )
    return out
