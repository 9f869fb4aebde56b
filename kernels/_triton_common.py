"""Launch and tile helpers shared by the Triton kernel modules.

Imports triton, so only ``triton_gemm``, ``triton_a16`` and ``triton_bitplane``
import it, and :mod:`bitscale.kernels.dispatch` imports those lazily.
``TRITON_INTERPRET`` is read once, here, when the first of them is imported.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch
import triton
import triton.language as tl

__all__ = [
    "INTERPRETED",
    "autotune_configs",
    "m_bucket",
    "store_dtype",
    "tile_grid",
    "unpack_weight_codes",
]

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def autotune_configs(tiles: Iterable[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    """One config per ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` tile."""
    if INTERPRETED:
        # The interpreter ignores warps/stages and autotune would run every
        # config: one small config, BLOCK_M/N >= 16 and BLOCK_K >= 32 like the
        # GPU compiler's int8 MMA needs, so CPU tests exercise compilable tiles.
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in tiles
    ]


def m_bucket(m: int) -> int:
    """Autotune key: shapes with M in the same power-of-two bucket share a config."""
    return min(triton.next_power_of_2(max(m, 1)), 4096)


def tile_grid(m: int, n: int) -> Callable[[dict], tuple[int, int]]:
    """The launch grid of an [m, n] output: one program per BLOCK_M x BLOCK_N tile."""

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"])

    return grid


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel stores an output of ``dtype`` in. The interpreter's float32 ->
    bf16 cast truncates (GPUs round to nearest even): there the kernel stores float32
    and torch rounds."""
    return torch.float32 if INTERPRETED and dtype == torch.bfloat16 else dtype


@triton.jit
def unpack_weight_codes(
    w_ptr,
    k,
    offs_n,
    in_group,
    n_mask,
    stride_wplane,
    stride_wn,
    W_BITS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The w-bit weight codes U (int32 [BLOCK_K, BLOCK_N]) of columns ``k`` of output
    rows ``offs_n``, assembled from the weight's bit planes; 0 where masked off."""
    w_byte_KN = w_ptr + (k // 8)[:, None] + offs_n[None, :] * stride_wn
    w_shift_K1 = (k % 8)[:, None]
    w_mask = in_group[:, None] & n_mask[None, :]
    u_KN = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.int32)
    for j in tl.static_range(W_BITS):
        plane = tl.load(w_byte_KN + j * stride_wplane, mask=w_mask, other=0)
        u_KN += ((plane.to(tl.int32) >> w_shift_K1) & 1) << j
    return u_KN
