"""Triton kernels against the exact oracle.

Without CUDA they run in the Triton interpreter (a conftest fixture sets
TRITON_INTERPRET=1 for every kernels test), on small odd shapes and a sample of width pairs; every
pair is covered by the torch reference tests and by the ``gpu`` tests below,
which compile the kernels on a CUDA device.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import pytest
import torch
from bitscale.kernels import (
    Backend,
    bipolar_linear,
    bipolar_mm_int,
    dequantize,
    pack_bitplanes,
    quantize,
)
from bitscale.kernels.config import CODE_WORD_RUN, WeightLayout, weight_layout
from bitscale.kernels.dispatch import linear_packed
from bitscale.kernels.reference import (
    bipolar_mm_int_reference,
    centred_codes,
    pack_code_words,
    pack_weight,
)
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Corners (1 and 8 bits on either side) plus mixed odd widths.
SAMPLED_PAIRS = [(1, 1), (8, 8), (1, 8), (8, 1), (3, 5), (5, 3), (2, 7), (4, 4), (6, 2), (7, 6)]
# M = 17 and N = 19 cross a 16-wide tile; K = 77 is no multiple of 8 or of BLOCK_K.
ODD_SHAPES = [(5, 19, 77), (17, 3, 40)]


@pytest.fixture(params=["planes", "expanded"])
def weight_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on both weight paths: planes unpacked in the K loop, and the planes
    expanded once before the kernel (what the launchers pick for large M)."""
    from bitscale.kernels import triton_expand

    if request.param == "expanded":
        monkeypatch.setattr(triton_expand, "EXPAND_MIN_M", 1)
    return request.param


def _codes(rows: int, k: int, bits: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, (rows, k), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize(("a_bits", "w_bits"), SAMPLED_PAIRS, ids=str)
@pytest.mark.parametrize(("m", "n", "k"), ODD_SHAPES, ids=str)
def test_triton_mm_int_is_exact(
    weight_path: str, a_bits: int, w_bits: int, m: int, n: int, k: int, oracle_mm: Callable
) -> None:
    x_codes = _codes(m, k, a_bits, seed=a_bits * 10 + w_bits)
    w_codes = _codes(n, k, w_bits, seed=a_bits * 10 + w_bits + 1)
    out = bipolar_mm_int(
        x_codes.to(DEVICE), w_codes.to(DEVICE), a_bits=a_bits, w_bits=w_bits, backend="triton"
    )
    assert out.dtype == torch.int64
    assert torch.equal(out.cpu(), oracle_mm(x_codes, w_codes, a_bits, w_bits))


@pytest.mark.parametrize("w_bits", [1, 2, 4, 8])
@pytest.mark.parametrize("a_bits", [1, 5, 8])
@pytest.mark.parametrize("k", [77, 96])
def test_triton_gemm_on_code_words_is_exact(
    a_bits: int, w_bits: int, k: int, oracle_mm: Callable
) -> None:
    """The integer GEMM on code words (what 1/2/4/8-bit BipolarLinear layers pack), in the
    K loop and expanded: K = 77 ends mid-word."""
    from bitscale.kernels.triton_gemm import bipolar_gemm

    x_codes = _codes(5, k, a_bits, seed=a_bits + k)
    w_codes = _codes(19, k, w_bits, seed=w_bits + k)
    x_centred = centred_codes(x_codes, a_bits).to(DEVICE)
    words = pack_code_words(w_codes, w_bits).to(DEVICE)
    w_rowsums = centred_codes(w_codes, w_bits).sum(1, dtype=torch.int32)[:, None]
    for expand_weight in (False, True):
        out = bipolar_gemm(
            x_centred,
            x_centred.sum(1, dtype=torch.int32)[:, None].contiguous(),
            words,
            w_rowsums.contiguous().to(DEVICE),
            a_bits=a_bits,
            w_bits=w_bits,
            k=k,
            group_k=k,
            expand_weight=expand_weight,
        )
        assert torch.equal(out.cpu(), oracle_mm(x_codes, w_codes, a_bits, w_bits)), expand_weight


@pytest.mark.parametrize(("a_bits", "w_bits"), [(1, 1), (2, 3), (1, 8)], ids=str)
@pytest.mark.parametrize(("m", "n", "k"), ODD_SHAPES, ids=str)
def test_triton_bitplane_mm_int_is_exact(
    a_bits: int, w_bits: int, m: int, n: int, k: int, oracle_mm: Callable
) -> None:
    x_codes = _codes(m, k, a_bits, seed=1)
    w_codes = _codes(n, k, w_bits, seed=2)
    out = bipolar_mm_int(
        x_codes.to(DEVICE),
        w_codes.to(DEVICE),
        a_bits=a_bits,
        w_bits=w_bits,
        backend=Backend.TRITON_BITPLANE,
    )
    assert torch.equal(out.cpu(), oracle_mm(x_codes, w_codes, a_bits, w_bits))


def test_triton_bitplane_gemm_ignores_pad_bits(oracle_mm: Callable) -> None:
    from bitscale.kernels.triton_bitplane import bipolar_bitplane_gemm, plane_popcounts

    # K = 77: the last plane byte holds 5 codes and 3 pad bits, here set in both operands.
    x_codes, w_codes = _codes(5, 77, 3, seed=6), _codes(19, 77, 2, seed=7)
    x_planes, w_planes = pack_bitplanes(x_codes, 3), pack_bitplanes(w_codes, 2)
    x_planes[..., -1] |= 0xE0
    w_planes[..., -1] |= 0xE0
    out = bipolar_bitplane_gemm(
        x_planes.to(DEVICE),
        w_planes.to(DEVICE),
        plane_popcounts(x_codes, 3).to(DEVICE),
        plane_popcounts(w_codes, 2).to(DEVICE),
        k=77,
    )
    assert torch.equal(out.cpu(), oracle_mm(x_codes, w_codes, 3, 2))


@settings(max_examples=8, deadline=None)
@given(
    a_bits=st.integers(1, 8),
    w_bits=st.integers(1, 8),
    m=st.integers(1, 20),
    n=st.integers(1, 20),
    k=st.integers(1, 70),
    seed=st.integers(0, 2**16),
)
def test_triton_mm_int_random_shapes(
    a_bits: int, w_bits: int, m: int, n: int, k: int, seed: int
) -> None:
    x_codes = _codes(m, k, a_bits, seed=seed)
    w_codes = _codes(n, k, w_bits, seed=seed + 1)
    out = bipolar_mm_int(
        x_codes.to(DEVICE), w_codes.to(DEVICE), a_bits=a_bits, w_bits=w_bits, backend="triton"
    )
    assert torch.equal(out.cpu(), naive_bipolar_mm(x_codes, w_codes, a_bits, w_bits))


@pytest.mark.parametrize("grid", [(1, 5), (8, 3), (10, 3), (17, 2)], ids=str)
def test_output_tiles_launch_in_bands_of_row_tiles(
    grid: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """tile_of_program: every output tile exactly once; programs in launch order fill
    bands of TILE_GROUP_ROWS row tiles one after another; with no more row tiles than
    that, the launch order itself."""
    import triton
    import triton.language as tl
    from bitscale.kernels._triton_common import TILE_GROUP_ROWS, tile_of_program

    # Triton resolves a kernel's names in its module's globals; the kernel modules load
    # lazily here (with the interpreter set), so they are not imported at the top.
    monkeypatch.setitem(globals(), "tile_of_program", tile_of_program)
    monkeypatch.setitem(globals(), "TILE_GROUP_ROWS", TILE_GROUP_ROWS)

    @triton.jit
    def tiles_kernel(out_ptr):
        pid_m, pid_n = tile_of_program(TILE_GROUP_ROWS)
        program = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        tl.store(out_ptr + 2 * program, pid_m)
        tl.store(out_ptr + 2 * program + 1, pid_n)

    num_m, num_n = grid
    out = torch.full((num_m * num_n, 2), -1, dtype=torch.int32, device=DEVICE)
    tiles_kernel[grid](out)
    tiles = [tuple(tile) for tile in out.cpu().tolist()]
    assert sorted(tiles) == [(m, n) for m in range(num_m) for n in range(num_n)]
    band = int(TILE_GROUP_ROWS) * num_n
    for first in range(0, len(tiles), band):
        rows = {m for m, _ in tiles[first : first + band]}
        assert rows == set(range(first // num_n, min(num_m, first // num_n + int(TILE_GROUP_ROWS))))
    if num_m <= int(TILE_GROUP_ROWS):
        assert tiles == [(m, n) for n in range(num_n) for m in range(num_m)]


@pytest.mark.parametrize("block_k", [32, 64, 128, 256, 512])
def test_even_k_only_where_every_k_tile_ends_inside_its_group(block_k: int) -> None:
    """even_k drops the plane loads' K mask, so it may hold only where no K-tile the
    kernels walk (``kk`` in ``range(0, GROUP_K, BLOCK_K)`` of each group) runs past its
    group, and with it past the weight row; it should hold wherever that is so."""
    from bitscale.kernels._triton_common import even_k

    for group_k in range(1, 2 * block_k + 3):
        for num_groups in (1, 2, 3):
            tiles_inside = all(
                g * group_k + kk + block_k <= (g + 1) * group_k
                for g in range(num_groups)
                for kk in range(0, group_k, block_k)
            )
            args = {"GROUP_K": group_k, "BLOCK_K": block_k, "K": group_k * num_groups}
            assert even_k(args) == tiles_inside, (group_k, num_groups)


@pytest.mark.parametrize("module", ["triton_a16", "triton_gemm"])
def test_even_k_sees_the_tile_autotune_picked(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The heuristic runs inside autotune, on each launch's BLOCK_K: at K = 128 tiles that
    divide it (the interpreter's BLOCK_K = 64; 64 and 128 on a GPU) take the unmasked plane
    loads, and at K = 77 every tile keeps the mask."""
    import importlib

    from bitscale.kernels._triton_common import even_k

    kernel = getattr(
        importlib.import_module(f"bitscale.kernels.{module}"), f"_bipolar_{module[7:]}_kernel"
    )
    seen = []

    def recording_even_k(args: dict) -> bool:
        seen.append((args["GROUP_K"], args["BLOCK_K"], even_k(args)))
        return seen[-1][2]

    monkeypatch.setitem(kernel.fn.values, "EVEN_K", recording_even_k)
    for k in (128, 77):
        x = torch.randn(3, k, dtype=torch.float32)
        w = quantize(torch.randn(5, k), 4)
        a_bits = 16 if module == "triton_a16" else 8
        bipolar_linear(x.to(DEVICE), w.to(DEVICE), a_bits=a_bits, backend="triton")
    assert {group_k for group_k, _, _ in seen} == {128, 77}
    assert any(even for group_k, _, even in seen if group_k == 128)
    assert not any(even for group_k, _, even in seen if group_k == 77)
    if not torch.cuda.is_available():
        assert seen == [(128, 64, True), (77, 64, False)]


@pytest.mark.parametrize("module", ["triton_gemm", "triton_a16"])
def test_interpreter_widens_k_tiles_to_a_run_of_code_words(module: str) -> None:
    """The interpreter runs one tile (BLOCK_K = 64), whose K-tiles a run of 1-bit code
    words (128 codes) does not fit in: a heuristic widens them, before EVEN_K reads
    BLOCK_K. On a GPU autotune prunes such tiles instead (tiles_for_rows)."""
    import importlib

    from bitscale.kernels._triton_common import INTERPRETED, k_tile_heuristics

    kernel = getattr(
        importlib.import_module(f"bitscale.kernels.{module}"), f"_bipolar_{module[7:]}_kernel"
    )
    rules = kernel.fn.values
    if not INTERPRETED:
        assert list(rules) == ["EVEN_K"]
        return
    assert list(rules) == ["BLOCK_K", "EVEN_K"] and list(k_tile_heuristics()) == list(rules)
    words, planes = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.uint8)
    assert rules["BLOCK_K"]({"w_ptr": words, "W_BITS": 1, "BLOCK_K": 64}) == 128
    assert rules["BLOCK_K"]({"w_ptr": words, "W_BITS": 2, "BLOCK_K": 64}) == 64
    assert rules["BLOCK_K"]({"w_ptr": planes, "W_BITS": 1, "BLOCK_K": 64}) == 64


def test_triton_kernels_across_bands_of_row_tiles(
    oracle_mm: Callable, fp32_error_bound: Callable
) -> None:
    """M = 150 is 10 row tiles of 16 (the interpreter's tile): two bands, the second
    partial. Every kernel writes every output tile, where it belongs."""
    from bitscale.kernels import triton_a16

    x_codes, w_codes = _codes(150, 40, 5, seed=8), _codes(40, 40, 3, seed=9)
    expected = oracle_mm(x_codes, w_codes, 5, 3)
    for backend in ("triton", "triton_bitplane"):
        out = bipolar_mm_int(
            x_codes.to(DEVICE), w_codes.to(DEVICE), a_bits=5, w_bits=3, backend=backend
        )
        assert torch.equal(out.cpu(), expected), backend
    w = quantize(torch.randn(40, 40, generator=torch.Generator().manual_seed(10)), 3)
    x = torch.randn(150, 40, generator=torch.Generator().manual_seed(11))
    out = triton_a16.bipolar_linear_a16(
        x.to(DEVICE), pack_weight(w.to(DEVICE)), expand_weight=False
    )
    w_dequantized = dequantize(w)
    error = (out.cpu().double() - _oracle_linear(x, w_dequantized, None)).abs()
    assert (error <= fp32_error_bound(x, w_dequantized)).all()


def naive_bipolar_mm(
    x_codes: torch.Tensor, w_codes: torch.Tensor, a_bits: int, w_bits: int
) -> torch.Tensor:
    x = x_codes.to(torch.int64) * 2 - (2**a_bits - 1)
    w = w_codes.to(torch.int64) * 2 - (2**w_bits - 1)
    return (x[:, None, :] * w[None, :, :]).sum(-1)


def test_int64_tile_accumulator_is_exact(oracle_mm: Callable) -> None:
    # The int64 path (used past G * 2^(a+w-2) >= 2^31) forced on a small shape.
    from bitscale.kernels.triton_gemm import bipolar_gemm

    x_codes, w_codes = _codes(5, 70, 8, seed=3), _codes(6, 70, 8, seed=4)
    x_centred = centred_codes(x_codes, 8)
    w_centred = centred_codes(w_codes, 8)
    out = bipolar_gemm(
        x_centred.to(DEVICE),
        x_centred.sum(1, dtype=torch.int32)[:, None].to(DEVICE),
        pack_bitplanes(w_codes, 8).to(DEVICE),
        w_centred.sum(1, dtype=torch.int32)[:, None].to(DEVICE),
        a_bits=8,
        w_bits=8,
        k=70,
        group_k=70,
        accumulate_int64=True,
    )
    assert torch.equal(out.cpu(), oracle_mm(x_codes, w_codes, 8, 8))


def test_int64_recovery_of_int32_tiles_is_exact() -> None:
    # W8A8 at K = 34,000: every tile fits int32 (K * 2^14 < 2^31), the recovered product
    # K * 255^2 = 2.2e9 does not, so the launcher recovers in int64.
    k = 34_000
    x_codes = torch.full((2, k), 255, dtype=torch.uint8)
    w_codes = torch.cat([torch.full((1, k), 255, dtype=torch.uint8), _codes(2, k, 8, seed=5)])
    out = bipolar_mm_int(
        x_codes.to(DEVICE), w_codes.to(DEVICE), a_bits=8, w_bits=8, backend="triton"
    ).cpu()
    assert out[0, 0] == k * 255**2 > 2**31
    assert torch.equal(out, bipolar_mm_int_reference(x_codes, w_codes, a_bits=8, w_bits=8))


@pytest.mark.parametrize(("a_bits", "group_k"), [(8, 48), (3, 16), (1, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_activation_quantizer_matches_quantize(
    a_bits: int, group_k: int, dtype: torch.dtype
) -> None:
    from bitscale.kernels.triton_gemm import quantize_activations

    x = torch.randn(6, 96, generator=torch.Generator().manual_seed(a_bits)).to(dtype)
    x[2] = 0  # an all-zero token: scale 0, level +1, dequantizes to 0
    codes, rowsums, scales = quantize_activations(x.to(DEVICE), a_bits=a_bits, group_k=group_k)
    q = quantize(x, a_bits, group_size=group_k, method="absmax")
    expected_codes = centred_codes(q.codes, a_bits)
    assert torch.equal(codes.cpu(), expected_codes)
    assert torch.equal(scales.cpu(), q.scales)
    expected_rowsums = expected_codes.view(6, -1, group_k).sum(-1, dtype=torch.int32)
    assert torch.equal(rowsums.cpu(), expected_rowsums)


def _oracle_linear(
    x: torch.Tensor, w_dequantized: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    out = x.double() @ w_dequantized.double().t()
    return out if bias is None else out + bias.double()


# 12 splits plane bytes: the code-by-code unpack (BYTE_ALIGNED off).
@pytest.mark.parametrize("group_size", [None, 32, 12])
@pytest.mark.parametrize(
    ("dtype", "output_unit"),
    [(torch.float32, 0.0), (torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)],
    ids=["fp32", "bf16", "fp16"],
)
# 2, 4 and 8 pack code words, whose dot tiles build float16 levels, and bfloat16 ones up to
# 6 bits (bipolar_levels_16): W8 in bfloat16 takes float32 levels.
@pytest.mark.parametrize("w_bits", [1, 2, 4, 7, 8])
def test_triton_a16_linear_within_float32_rounding(
    weight_path: str,
    group_size: int | None,
    dtype: torch.dtype,
    output_unit: float,
    w_bits: int,
    fp32_error_bound: Callable,
) -> None:
    generator = torch.Generator().manual_seed(w_bits)
    x = torch.randn(3, 7, 96, generator=generator).to(dtype)
    w = quantize(torch.randn(33, 96, generator=generator), w_bits, group_size=group_size)
    bias = torch.randn(33, generator=generator)
    out = bipolar_linear(x.to(DEVICE), w.to(DEVICE), bias=bias.to(DEVICE), backend="triton")
    assert out.dtype == dtype and out.shape == (3, 7, 33)
    w_dequantized = dequantize(w)
    expected = _oracle_linear(x.float().view(21, 96), w_dequantized, bias)
    bound = fp32_error_bound(x.float().view(21, 96), w_dequantized) + expected.abs() * output_unit
    error = (out.cpu().view(21, 33).double() - expected).abs()
    assert (error <= bound).all(), (error - bound).max()


@pytest.mark.parametrize("group_size", [None, 32, 12])
@pytest.mark.parametrize(
    ("dtype", "output_unit"), [(torch.float32, 0.0), (torch.bfloat16, 2.0**-8)]
)
@pytest.mark.parametrize("w_bits", [1, 5])
def test_triton_a16_gemv_tiles(
    weight_path: str,
    group_size: int | None,
    dtype: torch.dtype,
    output_unit: float,
    w_bits: int,
    monkeypatch: pytest.MonkeyPatch,
    fp32_error_bound: Callable,
) -> None:
    """The decode GEMV tiles (BLOCK_M = 1), forced: autotune offers them only at M = 1,
    and the interpreter pins one 16-row tile. K-tiles of 32, or a run of 1-bit code
    words (128 codes, what ungrouped W1 layers pack)."""
    import triton
    from bitscale.kernels import triton_a16

    words = weight_layout(w_bits, group_size) is WeightLayout.CODE_WORDS
    block_k = max(32, CODE_WORD_RUN // w_bits) if words else 32
    gemv = triton.Config({"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": block_k}, num_warps=4)
    monkeypatch.setattr(triton_a16._bipolar_a16_kernel, "configs", [gemv])
    generator = torch.Generator().manual_seed(w_bits)
    x = torch.randn(3, 96, generator=generator).to(dtype)  # one program per row
    w = quantize(torch.randn(33, 96, generator=generator), w_bits, group_size=group_size)
    bias = torch.randn(33, generator=generator)
    out = bipolar_linear(x.to(DEVICE), w.to(DEVICE), bias=bias.to(DEVICE), backend="triton")
    w_dequantized = dequantize(w)
    expected = _oracle_linear(x.float(), w_dequantized, bias)
    bound = fp32_error_bound(x.float(), w_dequantized) + expected.abs() * output_unit
    assert ((out.cpu().double() - expected).abs() <= bound).all()


@pytest.mark.parametrize("group_size", [None, 32, 12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_bit_gemv_sign_flips_equal_the_level_products(
    group_size: int | None, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1-bit decode on planes flips x's sign bit where the FMA path multiplies by a +-1
    level: bit for bit the same outputs as the expanded weight's levels on the same GEMV
    tile (the same additions in the same order), across byte-aligned tiles, K-groups and
    the code-by-code unpack (group_size=12 splits plane bytes)."""
    import triton
    from bitscale.kernels import triton_a16
    from bitscale.kernels.reference import pack_weight

    gemv = triton.Config({"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4)
    monkeypatch.setattr(triton_a16._bipolar_a16_kernel, "configs", [gemv])
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(2, 96, generator=generator).to(dtype).to(DEVICE)
    x[0, 5] = 0.0  # a zero, whose flipped sign must still add nothing
    w = quantize(torch.randn(33, 96, generator=generator), 1, group_size=group_size)
    packed = pack_weight(w.to(DEVICE))
    signs = triton_a16.bipolar_linear_a16(x, packed, expand_weight=False)
    levels = triton_a16.bipolar_linear_a16(x, packed, expand_weight=True)
    assert torch.equal(signs, levels)
    assert signs.abs().sum() > 0


# (BLOCK_M, BLOCK_N, num_warps, num_stages[, SPLIT_K]); BLOCK_K = 64, or 128 at 1 bit:
# a K-tile holds whole runs of code words (64 codes at 2 bits, 128 at 1).
_CODE_WORD_TILES = {
    "gemv": (1, 16, 4, 3),
    "gemv-split3": (1, 16, 4, 3, 3),
    "dot": (16, 16, 4, 3),
    "expanded": (16, 16, 4, 3),
}


@pytest.mark.parametrize("tile", list(_CODE_WORD_TILES))
@pytest.mark.parametrize(("group_runs", "k"), [(None, 96), (None, 77), (1, 384), (2, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("w_bits", [1, 2, 4, 8])
def test_a16_on_code_words_matches_bit_planes(
    w_bits: int,
    dtype: torch.dtype,
    group_runs: int | None,
    k: int,
    tile: str,
    monkeypatch: pytest.MonkeyPatch,
    fp32_error_bound: Callable,
) -> None:
    """Code words (what weight-only 1/2/4/8-bit layers pack) against the bit planes of the
    same weight, on each forced tile: the GEMV's levels scaled by 2^(j * w), undone once
    per group, the split-K GEMV, the 16-row dot and the expanded weight. Their products
    and sums are the planes' bit for bit (powers of two rescale exactly); on a GPU the two
    builds may reduce across threads in another order, so there only the float32 bound of
    the oracle holds. K = 77 ends mid-run; groups of one run of words (64 codes at 2 bits,
    16 at 8) leave K-tiles past a group's end, and split-K shares groups between programs."""
    from bitscale.kernels import triton_a16
    from bitscale.kernels._triton_common import tile_config

    block_m, block_n, *launch = _CODE_WORD_TILES[tile]
    block_k = max(64, CODE_WORD_RUN // w_bits)
    monkeypatch.setattr(
        triton_a16._bipolar_a16_kernel,
        "configs",
        [tile_config((block_m, block_n, block_k, *launch))],
    )
    generator = torch.Generator().manual_seed(w_bits + k)
    rows = 1 if tile.startswith("gemv") else 3
    x = torch.randn(rows, k, generator=generator).to(dtype)
    x[0, 5] = 0.0
    group_size = None if group_runs is None else group_runs * 128 // w_bits
    w = quantize(torch.randn(33, k, generator=generator), w_bits, group_size=group_size)
    words = pack_weight(w.to(DEVICE), layout=WeightLayout.CODE_WORDS)
    planes = pack_weight(w.to(DEVICE))
    expand = tile == "expanded"
    out = triton_a16.bipolar_linear_a16(x.to(DEVICE), words, expand_weight=expand)
    if DEVICE == "cpu":
        expected = triton_a16.bipolar_linear_a16(x, planes, expand_weight=expand)
        assert torch.equal(out, expected)
    w_dequantized = dequantize(w)
    oracle = _oracle_linear(x.float(), w_dequantized, None)
    unit = 0.0 if dtype == torch.float32 else 2.0**-8
    bound = fp32_error_bound(x.float(), w_dequantized) + oracle.abs() * unit
    assert ((out.cpu().double() - oracle).abs() <= bound).all()


@pytest.mark.parametrize("split_k", [(), (3,)], ids=["whole-k", "split3"])
@pytest.mark.parametrize(
    ("w_bits", "layout", "group_size"),
    [
        (3, WeightLayout.BITPLANES, None),
        (5, WeightLayout.BITPLANES, 12),
        (4, WeightLayout.CODE_WORDS, 32),
        (2, WeightLayout.CODE_WORDS, None),
        (1, WeightLayout.CODE_WORDS, None),
    ],
    ids=["w3-planes", "w5-planes-g12", "w4-words-g32", "w2-words", "w1-words"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_a16_swapped_tiles(
    dtype: torch.dtype,
    w_bits: int,
    layout: WeightLayout,
    group_size: int | None,
    split_k: tuple[int, ...],
    monkeypatch: pytest.MonkeyPatch,
    fp32_error_bound: Callable,
) -> None:
    """Swapped tiles (out^T = levels @ x^T), forced: the accumulators transposed, the
    scales broadcast along the output's columns, the transpose back before the split-K
    partials and the store. BLOCK_N = 32 against BLOCK_M = 16 makes a transposition
    slip a shape error; M = 3, N = 33 and K = 96 leave tiles partial in every dimension
    (1-bit code words take K-tiles of 128, a run: there one K-tile, over 3 programs)."""
    from bitscale.kernels import triton_a16
    from bitscale.kernels._triton_common import tile_config

    block_k = 128 if w_bits == 1 else 64
    tile = tile_config((16, 32, block_k, 4, 3, *split_k), swap_ab=True)
    monkeypatch.setattr(triton_a16._bipolar_a16_kernel, "configs", [tile])
    generator = torch.Generator().manual_seed(w_bits)
    x = torch.randn(3, 96, generator=generator).to(dtype)
    w = quantize(torch.randn(33, 96, generator=generator), w_bits, group_size=group_size)
    bias = torch.randn(33, generator=generator)
    packed = pack_weight(w.to(DEVICE), layout=layout)
    out = triton_a16.bipolar_linear_a16(
        x.to(DEVICE), packed, bias=bias.to(DEVICE), expand_weight=False
    )
    w_dequantized = dequantize(w)
    expected = _oracle_linear(x.float(), w_dequantized, bias)
    unit = 0.0 if dtype == torch.float32 else 2.0**-8
    bound = fp32_error_bound(x.float(), w_dequantized) + expected.abs() * unit
    assert ((out.cpu().double() - expected).abs() <= bound).all()


@pytest.mark.parametrize(
    ("w_bits", "layout"),
    [(3, WeightLayout.BITPLANES), (4, WeightLayout.CODE_WORDS)],
    ids=["w3-planes", "w4-words"],
)
def test_triton_a16_swapped_tiles_across_row_tiles(
    w_bits: int,
    layout: WeightLayout,
    monkeypatch: pytest.MonkeyPatch,
    fp32_error_bound: Callable,
) -> None:
    """The shape class of the swapped tile that failed on an H200 (test_gpu_every_tile:
    grouped 3-bit planes, M = 300 over two 256-row tiles, 2 K-tiles per group), scaled to
    the interpreter: M = 19 over two 16-row tiles (the second holds 3 rows), N = 33 over
    two 32-column tiles, K = 256 in groups of 128, two 64-wide K-tiles each, bf16 x. The
    swapped test above runs one row tile only; here the transposed store of a second,
    partial row tile and the group loop's scales cross both tiles."""
    from bitscale.kernels import triton_a16
    from bitscale.kernels._triton_common import tile_config

    tile = tile_config((16, 32, 64, 4, 3), swap_ab=True)
    monkeypatch.setattr(triton_a16._bipolar_a16_kernel, "configs", [tile])
    generator = torch.Generator().manual_seed(39)
    x = torch.randn(19, 256, generator=generator).to(torch.bfloat16)
    w = quantize(torch.randn(33, 256, generator=generator), w_bits, group_size=128)
    packed = pack_weight(w.to(DEVICE), layout=layout)
    out = triton_a16.bipolar_linear_a16(x.to(DEVICE), packed, expand_weight=False)
    w_dequantized = dequantize(w)
    expected = _oracle_linear(x.float(), w_dequantized, None)
    bound = fp32_error_bound(x.float(), w_dequantized) + expected.abs() * 2.0**-8
    assert ((out.cpu().double() - expected).abs() <= bound).all()


def test_autotune_tiles_no_taller_than_the_rows() -> None:
    """Every autotuned kernel weighs only tiles up to M's bucket rows, 16 at least."""
    from bitscale.kernels import triton_bitplane, triton_gemm
    from bitscale.kernels._triton_common import tile_config, tiles_for_rows

    tiles = [tile_config((rows, 64, 64, 4, 3)) for rows in (16, 32, 64, 128)]
    assert tiles_for_rows(tiles, {"M_BUCKET": 1}) == tiles[:1]
    assert tiles_for_rows(tiles, {"M_BUCKET": 16}) == tiles[:1]
    assert tiles_for_rows(tiles, {"M_BUCKET": 64}) == tiles[:3]
    assert tiles_for_rows(tiles, {"M_BUCKET": 4096}) == tiles
    # On code words, only K-tiles that hold whole runs (128 // w codes).
    short, long = tile_config((16, 64, 64, 4, 3)), tile_config((16, 64, 128, 4, 3))
    words = {"M_BUCKET": 16, "w_ptr": torch.zeros(1, dtype=torch.int32)}
    planes = {"M_BUCKET": 16, "w_ptr": torch.zeros(1, dtype=torch.uint8)}
    assert tiles_for_rows([short, long], words, W_BITS=1) == [long]
    assert tiles_for_rows([short, long], words, W_BITS=2) == [short, long]
    assert tiles_for_rows([short, long], planes, W_BITS=1) == [short, long]
    for kernel in (triton_gemm._bipolar_gemm_kernel, triton_bitplane._bipolar_bitplane_kernel):
        assert kernel.early_config_prune is tiles_for_rows


def test_a16_autotune_candidates_by_rows() -> None:
    """GEMV tiles only at M = 1; tiles no taller than M's bucket (16 at least); split-K
    tiles only up to SPLIT_K_MAX_M rows, where the launcher allocates their workspace;
    swapped tiles only on packed weights."""
    from bitscale.kernels._triton_common import tile_config
    from bitscale.kernels.triton_a16 import SPLIT_K_MAX_M, _rows_fit

    gemv = tile_config((1, 32, 128, 4, 3))
    dot = tile_config((16, 32, 128, 4, 3))
    gemv_split = tile_config((1, 32, 128, 4, 3, 4))
    dot_split = tile_config((16, 32, 128, 4, 3, 8))
    swapped = tile_config((16, 64, 128, 4, 3), swap_ab=True)
    swapped_split = tile_config((16, 64, 128, 4, 3, 8), swap_ab=True)
    configs = [gemv, dot, gemv_split, dot_split, swapped, swapped_split]
    packed = {"W_LEVELS": False}
    assert _rows_fit(configs, {"M_BUCKET": 1}, **packed) == configs
    assert _rows_fit(configs, {"M_BUCKET": 2}, **packed) == [
        dot,
        dot_split,
        swapped,
        swapped_split,
    ]
    assert _rows_fit(configs, {"M_BUCKET": SPLIT_K_MAX_M}, **packed) == [
        dot,
        dot_split,
        swapped,
        swapped_split,
    ]
    assert _rows_fit(configs, {"M_BUCKET": 2 * SPLIT_K_MAX_M}, **packed) == [dot, swapped]
    tall = tile_config((128, 128, 64, 8, 3))
    assert _rows_fit([dot, tall], {"M_BUCKET": 64}, **packed) == [dot]
    assert _rows_fit([dot, tall], {"M_BUCKET": 128}, **packed) == [dot, tall]
    # Expanded weights load their levels through shared memory, as the swapped tiles' x.
    assert _rows_fit(configs, {"M_BUCKET": 1}, W_LEVELS=True) == configs[:4]


@pytest.mark.parametrize("group_size", [None, 32, 12])
@pytest.mark.parametrize(
    "tile", [(1, 16, 32, 4, 3, 3), (16, 16, 64, 4, 3, 8)], ids=["gemv-split3", "dot-split8"]
)
def test_triton_a16_split_k_tiles(
    weight_path: str,
    group_size: int | None,
    tile: tuple[int, ...],
    monkeypatch: pytest.MonkeyPatch,
    fp32_error_bound: Callable,
) -> None:
    """Split-K tiles, forced (autotune offers them up to 16 rows). Ungrouped, K = 200 is
    7 K-tiles of 32 (the last partial) over 3 programs, or 4 of 64 over 8 (4 programs
    with none); groups of 32 and 12 (K = 192) are split or shared between programs. The
    launcher leaves the arrival counters uninitialized (filled with 5s here, as stale
    memory): the tile's pre-launch hook zeroes them, and each counts SPLIT_K arrivals."""
    from bitscale.kernels import triton_a16
    from bitscale.kernels._triton_common import tile_config

    monkeypatch.setattr(triton_a16._bipolar_a16_kernel, "configs", [tile_config(tile)])
    generator = torch.Generator().manual_seed(len(tile) + (group_size or 0))
    k = 200 if group_size is None else 192
    x = torch.randn(3, k, generator=generator)
    w = quantize(torch.randn(33, k, generator=generator), 3, group_size=group_size)
    bias = torch.randn(33, generator=generator)
    int32_buffers = []

    def stale_int32_empty(*args: object, **kwargs: object) -> torch.Tensor:
        tensor = torch_empty(*args, **kwargs)
        if tensor.dtype == torch.int32:
            int32_buffers.append(tensor.fill_(5))
        return tensor

    torch_empty = torch.empty
    with monkeypatch.context() as patch:
        patch.setattr(torch, "empty", stale_int32_empty)
        out = bipolar_linear(x.to(DEVICE), w.to(DEVICE), bias=bias.to(DEVICE), backend="triton")
    w_dequantized = dequantize(w)
    expected = _oracle_linear(x, w_dequantized, bias)
    assert ((out.cpu().double() - expected).abs() <= fp32_error_bound(x, w_dequantized)).all()
    (counters,) = int32_buffers
    block_m, block_n, _, _, _, split_k = tile
    tiles = -(-3 // block_m) * -(-33 // block_n)
    assert (counters[:tiles] == split_k).all() and not counters[tiles:].any()


@pytest.mark.parametrize("w_bits", [1, 5, 8])
def test_triton_a16_linear_odd_k(weight_path: str, w_bits: int, fp32_error_bound: Callable) -> None:
    # K = 77, one group: the last plane byte holds 5 codes and 3 pad bits.
    generator = torch.Generator().manual_seed(w_bits)
    x = torch.randn(6, 77, generator=generator)
    w = quantize(torch.randn(19, 77, generator=generator), w_bits)
    out = bipolar_linear(x.to(DEVICE), w.to(DEVICE), backend="triton")
    w_dequantized = dequantize(w)
    expected = _oracle_linear(x, w_dequantized, None)
    error = (out.cpu().double() - expected).abs()
    assert (error <= fp32_error_bound(x, w_dequantized)).all()


@pytest.mark.parametrize(("a_bits", "w_bits"), [(8, 4), (3, 2), (1, 1), (5, 8)], ids=str)
@pytest.mark.parametrize("group_size", [None, 24, 12])
@pytest.mark.parametrize("method", ["absmax", "mse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_quantized_activation_linear(
    weight_path: str,
    a_bits: int,
    w_bits: int,
    group_size: int | None,
    method: str,
    dtype: torch.dtype,
    fp32_error_bound: Callable,
) -> None:
    generator = torch.Generator().manual_seed(a_bits * 10 + w_bits)
    x = torch.randn(17, 72, generator=generator).to(dtype)
    w = quantize(torch.randn(19, 72, generator=generator), w_bits, group_size=group_size)
    bias = torch.randn(19, generator=generator)
    out = bipolar_linear(
        x.to(DEVICE),
        w.to(DEVICE),
        a_bits=a_bits,
        bias=bias.to(DEVICE),
        activation_method=method,
        backend="triton",
    )
    assert out.dtype == dtype
    x_dequantized = dequantize(quantize(x, a_bits, group_size=group_size, method=method))
    w_dequantized = dequantize(w)
    expected = _oracle_linear(x_dequantized, w_dequantized, bias)
    output_unit = 2.0**-8 if dtype == torch.bfloat16 else 0.0
    bound = fp32_error_bound(x_dequantized, w_dequantized) + expected.abs() * output_unit
    error = (out.cpu().double() - expected).abs()
    assert (error <= bound).all(), (error - bound).max()


def test_launcher_validation() -> None:
    from bitscale.kernels.triton_gemm import bipolar_gemm, quantize_activations

    x_codes = _codes(4, 64, 4, seed=5)
    w = quantize(torch.randn(8, 64), 4)
    packed = pack_weight(w)
    x_centred = centred_codes(x_codes, 4)
    rowsums = x_centred.sum(1, dtype=torch.int32)[:, None]
    args = (x_centred, rowsums, packed.data, packed.centred_rowsums)
    with pytest.raises(ValueError, match=r"x_centred must be torch\.int8"):
        bipolar_gemm(x_codes, *args[1:], a_bits=4, w_bits=4, k=64, group_k=64)
    with pytest.raises(ValueError, match="w_packed must have shape"):
        bipolar_gemm(*args, a_bits=4, w_bits=3, k=64, group_k=64)
    words = pack_weight(w, layout=WeightLayout.CODE_WORDS).data
    word_args = (x_centred, rowsums, words, packed.centred_rowsums)
    with pytest.raises(ValueError, match=r"w_packed must have shape \(8, 8\), got \(8, 7\)"):
        short = words[:, :-1].contiguous()
        bipolar_gemm(
            x_centred, rowsums, short, packed.centred_rowsums, a_bits=4, w_bits=4, k=64, group_k=64
        )
    with pytest.raises(ValueError, match="got w_bits=3, group_k=64: pass bit planes"):
        bipolar_gemm(*word_args, a_bits=4, w_bits=3, k=64, group_k=64)
    with pytest.raises(ValueError, match="got w_bits=4, group_k=4: pass bit planes"):
        bipolar_gemm(*word_args, a_bits=4, w_bits=4, k=64, group_k=4)
    with pytest.raises(ValueError, match="divide K=64"):
        bipolar_gemm(*args, a_bits=4, w_bits=4, k=64, group_k=48)
    with pytest.raises(ValueError, match="both x_scales and w_scales"):
        bipolar_gemm(*args, a_bits=4, w_bits=4, k=64, group_k=64, x_scales=torch.ones(4, 1))
    with pytest.raises(ValueError, match="contiguous"):
        bipolar_gemm(
            x_centred.t().contiguous().t(), *args[1:], a_bits=4, w_bits=4, k=64, group_k=64
        )
    with pytest.raises(ValueError, match="unit stride"):
        quantize_activations(torch.randn(64, 4).t(), a_bits=4, group_k=64)
    with pytest.raises(
        ValueError, match=r"all inputs must be on one device, got \['cpu', 'meta'\]"
    ):
        bipolar_gemm(*args[:3], args[3].to("meta"), a_bits=4, w_bits=4, k=64, group_k=64)


def test_a16_launcher_validation() -> None:
    """The weight-only launcher names the bad input and the fix: strides, dtype, devices."""
    from bitscale.kernels.triton_a16 import bipolar_linear_a16

    x = torch.randn(4, 64)
    packed = pack_weight(quantize(torch.randn(8, 64), 4))
    with pytest.raises(ValueError, match=r"strides \(1, 4\); call x.reshape\(-1, K\)"):
        bipolar_linear_a16(torch.randn(64, 4).t(), packed)
    with pytest.raises(ValueError, match=r"float32, bfloat16 or float16, got torch\.float64"):
        bipolar_linear_a16(x.double(), packed)
    with pytest.raises(ValueError, match="must share a device, got cpu, meta, meta"):
        meta = {"data": packed.data.to("meta"), "scales": packed.scales.to("meta")}
        bipolar_linear_a16(x, dataclasses.replace(packed, **meta))
    with pytest.raises(ValueError, match="must share a device, got cpu, cpu, cpu, meta"):
        bipolar_linear_a16(x, packed, bias=torch.zeros(8, device="meta"))


@pytest.mark.parametrize("a_bits", [16, 4])
def test_triton_linear_takes_non_contiguous_x(a_bits: int) -> None:
    """bipolar_linear's contract: x of any strides gives what its contiguous copy gives."""
    generator = torch.Generator().manual_seed(a_bits)
    x = torch.randn(40, 5, generator=generator).t()  # [5, 40], strides (1, 5)
    w = quantize(torch.randn(19, 40, generator=generator), 3)
    expected = bipolar_linear(x.contiguous(), w, a_bits=a_bits, backend="triton")
    assert torch.equal(bipolar_linear(x, w, a_bits=a_bits, backend="triton"), expected)


@pytest.mark.parametrize("bits", range(1, 9))
def test_expanded_weight_matches_the_codes(bits: int) -> None:
    from bitscale.kernels.triton_expand import expand_weight_codes, expand_weight_levels

    # N = 19 and K = 77 cross the interpreter's 16 x 32 expansion tile.
    codes = _codes(19, 77, bits, seed=bits)
    planes = pack_bitplanes(codes, bits).to(DEVICE)
    expected_levels = codes.to(torch.int32) * 2 - (2**bits - 1)
    assert torch.equal(expand_weight_codes(planes, bits, 77).cpu(), centred_codes(codes, bits))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        levels = expand_weight_levels(planes, bits, 77, dtype).cpu()
        assert levels.dtype == dtype and torch.equal(levels.to(torch.int32), expected_levels)


def test_launchers_expand_from_expand_min_m(monkeypatch: pytest.MonkeyPatch) -> None:
    from bitscale.kernels import triton_expand

    calls = []

    def counted(expand: Callable) -> Callable:
        def expand_and_count(*args, **kwargs) -> torch.Tensor:
            calls.append(expand.__name__)
            return expand(*args, **kwargs)

        return expand_and_count

    for name in ("expand_weight_codes", "expand_weight_levels"):
        monkeypatch.setattr(triton_expand, name, counted(getattr(triton_expand, name)))
    monkeypatch.setattr(triton_expand, "EXPAND_MIN_M", 9)
    w = quantize(torch.randn(5, 40), 3).to(DEVICE)
    for m, expanded in ((8, 0), (9, 1)):
        for a_bits in (16, 4):
            calls.clear()
            bipolar_linear(torch.randn(m, 40, device=DEVICE), w, a_bits=a_bits, backend="triton")
            assert len(calls) == expanded, (m, a_bits)


@pytest.mark.parametrize(
    ("a_bits", "method"), [(16, "absmax"), (4, "absmax"), (4, "meanabs"), (4, "mse")]
)
def test_triton_empty_batch(a_bits: int, method: str) -> None:
    w = quantize(torch.randn(5, 32), 2, group_size=16).to(DEVICE)
    out = bipolar_linear(
        torch.randn(0, 32, device=DEVICE),
        w,
        a_bits=a_bits,
        activation_method=method,
        backend="triton",
    )
    assert out.shape == (0, 5) and out.dtype == torch.float32


@pytest.mark.parametrize("backend", ["triton", "triton_bitplane"])
@pytest.mark.parametrize(("m", "n", "k"), [(0, 5, 24), (4, 0, 24), (4, 5, 0)], ids=str)
def test_triton_mm_int_empty_shapes(backend: str, m: int, n: int, k: int) -> None:
    x_codes, w_codes = _codes(m, k, 3, seed=1), _codes(n, k, 2, seed=2)
    out = bipolar_mm_int(
        x_codes.to(DEVICE), w_codes.to(DEVICE), a_bits=3, w_bits=2, backend=backend
    )
    assert out.dtype == torch.int64
    assert torch.equal(out.cpu(), bipolar_mm_int_reference(x_codes, w_codes, a_bits=3, w_bits=2))


def test_triton_linear_takes_a_strided_bias() -> None:
    """Any bias strides, as the reference takes: the same output as a contiguous copy."""
    generator = torch.Generator().manual_seed(4)
    w = quantize(torch.randn(6, 32, generator=generator), 3).to(DEVICE)
    bias = torch.randn(6, 2, generator=generator)[:, 0].to(DEVICE)  # stride 2
    x = torch.randn(3, 32, generator=generator).to(DEVICE)
    for a_bits in (16, 8):
        out = bipolar_linear(x, w, a_bits=a_bits, bias=bias, backend="triton")
        expected = bipolar_linear(x, w, a_bits=a_bits, bias=bias.contiguous(), backend="triton")
        assert torch.equal(out, expected), a_bits


# ---------------------------------------------------------------- compiled, on a GPU

ALL_PAIRS = list(itertools.product(range(1, 9), repeat=2))


@pytest.mark.gpu
@pytest.mark.parametrize(("a_bits", "w_bits"), ALL_PAIRS, ids=str)
def test_gpu_mm_int_every_width(a_bits: int, w_bits: int) -> None:
    for m, n, k in ((1, 257, 1000), (33, 130, 4099), (300, 64, 96)):
        x_codes = _codes(m, k, a_bits, seed=m).cuda()
        w_codes = _codes(n, k, w_bits, seed=n).cuda()
        expected = bipolar_mm_int_reference(x_codes, w_codes, a_bits=a_bits, w_bits=w_bits)
        out = bipolar_mm_int(x_codes, w_codes, a_bits=a_bits, w_bits=w_bits, backend="triton")
        assert torch.equal(out, expected), (m, n, k)


@pytest.mark.gpu
@pytest.mark.parametrize(("a_bits", "w_bits"), [(1, 1), (2, 2), (4, 3), (8, 8)], ids=str)
def test_gpu_bitplane_mm_int(a_bits: int, w_bits: int) -> None:
    x_codes = _codes(65, 1000, a_bits, seed=1).cuda()
    w_codes = _codes(129, 1000, w_bits, seed=2).cuda()
    expected = bipolar_mm_int_reference(x_codes, w_codes, a_bits=a_bits, w_bits=w_bits)
    out = bipolar_mm_int(
        x_codes, w_codes, a_bits=a_bits, w_bits=w_bits, backend=Backend.TRITON_BITPLANE
    )
    assert torch.equal(out, expected)


@pytest.mark.gpu
@pytest.mark.parametrize(("a_bits", "w_bits"), [(8, 8), (4, 3), (1, 1)], ids=str)
def test_gpu_mm_int_expanded_weight(a_bits: int, w_bits: int) -> None:
    from bitscale.kernels import triton_expand

    m = triton_expand.EXPAND_MIN_M + 77  # the launcher's own choice: expand the planes
    x_codes = _codes(m, 1001, a_bits, seed=3).cuda()  # K = 1001: a partial last byte
    w_codes = _codes(130, 1001, w_bits, seed=4).cuda()
    expected = bipolar_mm_int_reference(x_codes, w_codes, a_bits=a_bits, w_bits=w_bits)
    out = bipolar_mm_int(x_codes, w_codes, a_bits=a_bits, w_bits=w_bits, backend="triton")
    assert torch.equal(out, expected)


def _gpu_tiles() -> list:
    """(kernel module name, tile, swapped) for every autotune tile of the two GEMM kernels.
    The kernel modules are imported only with CUDA: imported at collection on CPU, they
    would miss the interpreter the kernels tests switch on (conftest.py)."""
    if not torch.cuda.is_available():
        return [pytest.param("triton_gemm", None, False, id="every-tile")]  # skipped: gpu
    from bitscale.kernels import triton_a16, triton_gemm

    a16_tiles = triton_a16._A16_TILES + triton_a16._A16_SPLIT_K_TILES
    return (
        [("triton_gemm", tile, False) for tile in triton_gemm._GEMM_TILES]
        + [("triton_a16", tile, False) for tile in a16_tiles]
        + [("triton_a16", tile, True) for tile in triton_a16._A16_SWAPPED_TILES]
    )


@pytest.mark.gpu
@pytest.mark.parametrize(("module", "tile", "swap_ab"), _gpu_tiles())
def test_gpu_every_tile(
    module: str,
    tile: tuple,
    swap_ab: bool,
    monkeypatch: pytest.MonkeyPatch,
    fp32_error_bound: Callable,
) -> None:
    """Each tile forced in turn (autotune elsewhere runs only the tile it picks), on planes,
    code words and expanded weights (swapped tiles on packed ones only): M = 300 and
    N = 260 cross the 128- and 256-wide tiles; the split-K tiles, offered up to 16 rows,
    run M = 13."""
    from bitscale.kernels import triton_a16, triton_gemm
    from bitscale.kernels._triton_common import tile_config

    config = tile_config(tile, swap_ab=swap_ab)
    if module == "triton_gemm":
        monkeypatch.setattr(triton_gemm._bipolar_gemm_kernel, "configs", [config])
        x_codes = _codes(300, 1001, 8, seed=5).cuda()  # K = 1001: a partial last byte
        x_centred = centred_codes(x_codes, 8)
        # 5 planes (both gathered words), and W4 code words (a partial last word)
        for w_bits, pack in ((5, pack_bitplanes), (4, pack_code_words)):
            w_codes = _codes(260, 1001, w_bits, seed=6).cuda()
            expected = bipolar_mm_int_reference(x_codes, w_codes, a_bits=8, w_bits=w_bits)
            for expand_weight in (False, True):
                out = triton_gemm.bipolar_gemm(
                    x_centred,
                    x_centred.sum(1, dtype=torch.int32)[:, None].contiguous(),
                    pack(w_codes, w_bits),
                    centred_codes(w_codes, w_bits).sum(1, dtype=torch.int32)[:, None].contiguous(),
                    a_bits=8,
                    w_bits=w_bits,
                    k=1001,
                    group_k=1001,
                    expand_weight=expand_weight,
                )
                assert torch.equal(out, expected), (w_bits, expand_weight)
    else:
        monkeypatch.setattr(triton_a16._bipolar_a16_kernel, "configs", [config])
        generator = torch.Generator().manual_seed(7)
        rows = 13 if "SPLIT_K" in config.kwargs else 300
        x = torch.randn(rows, 1024, generator=generator).to(torch.bfloat16)
        for bits, layout in ((3, WeightLayout.BITPLANES), (4, WeightLayout.CODE_WORDS)):
            w = quantize(torch.randn(260, 1024, generator=generator), bits, group_size=128)
            w_dequantized = dequantize(w)
            expected = _oracle_linear(x.float(), w_dequantized, None)
            bound = fp32_error_bound(x.float(), w_dequantized) + expected.abs() * 2.0**-8
            packed = pack_weight(w.to("cuda"), layout=layout)
            for expand_weight in (False,) if swap_ab else (False, True):
                out = triton_a16.bipolar_linear_a16(x.cuda(), packed, expand_weight=expand_weight)
                error = (out.cpu().double() - expected).abs()
                assert (error <= bound).all(), (layout, expand_weight, (error - bound).max())


@pytest.mark.gpu
@pytest.mark.parametrize("group_size", [None, 128])
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("w_bits", [1, 2, 4, 8])
def test_gpu_decode_on_code_words(
    w_bits: int, m: int, group_size: int | None, fp32_error_bound: Callable
) -> None:
    """Weight-only decode as BipolarLinear packs it (code words), autotuned, at K = 4096."""
    generator = torch.Generator().manual_seed(w_bits + m)
    x = torch.randn(m, 4096, generator=generator).to(torch.bfloat16)
    w = quantize(torch.randn(512, 4096, generator=generator), w_bits, group_size=group_size)
    packed = pack_weight(w.to("cuda"), layout=WeightLayout.CODE_WORDS)
    out = linear_packed(x.cuda(), packed, backend="triton")
    w_dequantized = dequantize(w)
    expected = _oracle_linear(x.float(), w_dequantized, None)
    bound = fp32_error_bound(x.float(), w_dequantized) + expected.abs() * 2.0**-8
    assert ((out.cpu().double() - expected).abs() <= bound).all()


@pytest.mark.gpu
def test_gpu_long_prefill_passes_int32_offsets(fp32_error_bound: Callable) -> None:
    """M * K past 2^31 (65537 tokens at K = 32768): x's rows and the output's past it
    are addressed with int64 offsets; only the last 3 rows are nonzero."""
    m, k = 65537, 32768
    generator = torch.Generator().manual_seed(8)
    tail = torch.randn(3, k, generator=generator).to(torch.bfloat16)
    w = quantize(torch.randn(16, k, generator=generator), 2)
    x = torch.zeros(m, k, dtype=torch.bfloat16, device="cuda")
    x[-3:] = tail.cuda()
    for a_bits in (16, 8):
        out = bipolar_linear(x, w.cuda(), a_bits=a_bits, backend="triton")
        assert not out[:-3].any(), a_bits
        x_used = tail.float()
        if a_bits != 16:
            x_used = dequantize(quantize(x_used, a_bits, method="absmax"))
        w_dequantized = dequantize(w)
        expected = _oracle_linear(x_used, w_dequantized, None)
        bound = fp32_error_bound(x_used, w_dequantized) + expected.abs() * 2.0**-8
        assert ((out[-3:].cpu().double() - expected).abs() <= bound).all(), a_bits


@pytest.mark.gpu
def test_gpu_w8a8_long_k_does_not_overflow() -> None:
    # 65025 * K passes int32 at K ~ 33k; 140000 also passes the int32 tile limit (131072).
    for k in (40_000, 140_000):
        x_codes = torch.full((16, k), 255, dtype=torch.uint8, device="cuda")
        w_codes = torch.zeros((32, k), dtype=torch.uint8, device="cuda")
        w_codes[::2] = 255
        out = bipolar_mm_int(x_codes, w_codes, a_bits=8, w_bits=8, backend="triton")
        expected = torch.tensor([65025 * k, -65025 * k], device="cuda").repeat(16, 16)
        assert torch.equal(out, expected), k


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("a_bits", [16, 8, 4, 2])
@pytest.mark.parametrize("group_size", [None, 128])
@pytest.mark.parametrize("m", [77, 1100], ids=["planes", "expanded"])
def test_gpu_linear(
    dtype: torch.dtype, a_bits: int, group_size: int | None, m: int, fp32_error_bound: Callable
) -> None:
    generator = torch.Generator().manual_seed(a_bits)
    x = torch.randn(m, 1024, generator=generator).to(dtype)
    w = quantize(torch.randn(384, 1024, generator=generator), 4, group_size=group_size)
    out = bipolar_linear(x.cuda(), w.to("cuda"), a_bits=a_bits, backend="triton")
    x_dequantized = x.float()
    if a_bits != 16:
        x_dequantized = dequantize(
            quantize(x_dequantized, a_bits, group_size=group_size, method="absmax")
        )
    output_unit = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
    w_dequantized = dequantize(w)
    expected = _oracle_linear(x_dequantized, w_dequantized, None)
    bound = fp32_error_bound(x_dequantized, w_dequantized) + expected.abs() * output_unit[dtype]
    error = (out.cpu().double() - expected).abs()
    assert (error <= bound).all(), (error - bound).max()
