"""Every Triton kernel, autotune tile and specialization compiles to cubins on a machine
without a GPU.

The interpreter accepts programs the GPU compiler rejects (tl.dot tiles under
16, dtype mixes), so CPU-only CI also runs the real compiler: Triton's
``triton.compile`` lowers to PTX and assembles with its bundled ptxas without
a device. Compiling needs ``TRITON_INTERPRET`` unset when the kernels are
decorated, so the check runs this file as a script in a fresh process.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("triton", reason="triton is not installed")


# Per-block shared memory a kernel may opt into: 227 KiB on H100 (sm_90), 163 KiB on
# A100 (sm_80) (CUDA programming guide, compute capabilities table).
_SHARED_MEMORY_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
_ALIGNED_INTS = frozenset(
    ("N", "K", "GROUP_K", "stride_xm", "stride_xplane", "stride_wplane", "stride_wn", "stride_om")
)


# The builds of one _compile_all call, read by its forked workers (by index: sources hold
# JIT functions, which do not pickle).
_BUILDS: list[tuple[str, Any, Any, dict[str, int]]] = []
_INSPECT: Callable[[Any, Any], Any] | None = None


def _compile_build(index: int) -> tuple[str, Any, str | None]:
    """Compile build ``index`` of ``_BUILDS``: (label, what ``_INSPECT`` says of it, error)."""
    import triton

    label, source, target, options = _BUILDS[index]
    try:
        binary = triton.compile(source, target=target, options=options)
    except Exception as error:  # a CompilationError's own pickling loses its message
        return label, None, f"{type(error).__name__}: {error}"
    # Compiling does not check shared memory against the device; launching would fail
    # with OutOfResources past the per-block opt-in limit.
    shared, limit = binary.metadata.shared, _SHARED_MEMORY_LIMIT[target.arch]
    if shared > limit:
        return label, None, f"{shared} B shared > {limit} B"
    return label, None if _INSPECT is None else _INSPECT(source, binary), None


def _compile_all(inspect: Callable[[Any, Any], Any] | None = None) -> list[tuple[str, Any]]:
    """Compile every autotune tile of every kernel for sm_90, on bit planes, code words
    and expanded weights, and each constexpr specialization a launcher can pick (output
    dtypes, int64 recovery and accumulation, float32 dots, 1 and 8 bits, the per-code
    unpack) for sm_90 and sm_80, and for odd shapes, one process per core (each compile is
    single-threaded). Returns a ``kernel[label]`` line per build, with
    ``inspect(source, compiled_kernel)`` (None without ``inspect``), run in the worker;
    raises naming every build that failed."""
    global _INSPECT
    import triton
    from bitscale.kernels import triton_a16, triton_bitplane, triton_expand, triton_gemm
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    hopper, ampere = GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)
    _BUILDS.clear()

    def build(
        kernel,
        signature: dict[str, str],
        constexprs: dict,
        label: str,
        *,
        tile: tuple[int, ...] = (16, 32, 128, 4, 4),
        targets: tuple[GPUTarget, ...] = (hopper,),
        odd_shapes: bool = False,
    ) -> None:
        jit = kernel
        while not isinstance(jit, triton.runtime.JITFunction):  # Autotuner, Heuristics
            jit = jit.fn
        block_m, block_n, block_k, warps, stages, *split_k = tile
        if "BLOCK_M" in jit.arg_names:
            constexprs = {**constexprs, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}
        if "SPLIT_K" in jit.arg_names:
            constexprs = {**constexprs, "SPLIT_K": split_k[0] if split_k else 1}
        if "SWAP_AB" in jit.arg_names:
            constexprs = {"SWAP_AB": False, **constexprs}
        full = {**signature, **dict.fromkeys(constexprs, "constexpr")}
        # Triton's JIT marks pointers and ints divisible by 16 (model shapes: N, K, group
        # sizes, strides); only then are the K-loop loads vectorized and pipelined through
        # shared memory (cp.async), so that is the build that meets the shared-memory
        # limit and the register budget. Odd shapes (K = 77) get the plain build.
        aligned = {
            (jit.arg_names.index(name),): [["tt.divisibility", 16]]
            for name, kind in signature.items()
            if kind.startswith("*") or name in _ALIGNED_INTS
        }
        builds = [(target, aligned, constexprs, "") for target in targets]
        if odd_shapes:
            # K = 77: K-tiles run past the row's end, so the plane loads keep their K mask.
            uneven = constexprs | ({"EVEN_K": False} if "EVEN_K" in constexprs else {})
            builds.append((hopper, {}, uneven, " odd shapes"))
        for target, attrs, target_constexprs, variant in builds:
            _BUILDS.append(
                (
                    f"{jit.__name__}[{label}{variant} sm_{target.arch}]",
                    ASTSource(jit, full, target_constexprs, attrs=attrs),
                    target,
                    {"num_warps": warps, "num_stages": stages},
                )
            )

    def sweep(kernel, signature: dict[str, str], constexprs: dict, tiles, label: str) -> None:
        """Every autotune tile, grouped (NUM_GROUPS a runtime int), and as the JIT
        specializes ungrouped weights (NUM_GROUPS == 1 becomes a constant), with decode's
        M == 1 too on the 16-row and GEMV (1-row) tiles."""
        for tile in tiles:
            # Grouped as by group_size=128 (EVEN_K where the K-tile divides the group);
            # ungrouped at a model's K, a multiple of every BLOCK_K.
            grouped = constexprs | {"EVEN_K": 128 % tile[2] == 0}
            build(kernel, signature, grouped, f"tile {tile}{label}", tile=tile)
            decode = tile[0] <= 16
            ones = {"NUM_GROUPS": 1, "EVEN_K": True}
            ones |= {"M": 1, "M_BUCKET": 1} if decode else {}
            variant = " decode M=1" if decode else " ungrouped"
            build(kernel, signature, constexprs | ones, f"tile {tile}{label}{variant}", tile=tile)

    ints = dict.fromkeys(
        ("M", "N", "K", "GROUP_K", "NUM_GROUPS", "stride_xm", "stride_om", "M_BUCKET"), "i32"
    )
    plane_strides = {"stride_wplane": "i32", "stride_wn": "i32"}

    def gemm_signature(out: str) -> dict[str, str]:
        return {
            "x_ptr": "*i8",
            "x_rowsum_ptr": "*i32",
            "x_scale_ptr": "*fp32",
            "w_ptr": "*u8",
            "w_rowsum_ptr": "*i32",
            "w_scale_ptr": "*fp32",
            "bias_ptr": "*fp32",
            "out_ptr": out,
            **ints,
            **plane_strides,
        }

    def gemm_flags(
        w_bits: int,
        *,
        int_out: bool = False,
        wide: bool = False,
        narrow: bool = True,
        byte_aligned: bool = True,
    ) -> dict:
        return {
            "W_BITS": w_bits,
            "BYTE_ALIGNED": byte_aligned,
            "EVEN_K": byte_aligned,
            "W_CODES": False,
            "INT_OUT": int_out,
            "WIDE_ACC": wide,
            "NARROW_RECOVERY": narrow,
            "HAS_BIAS": not int_out,
        }

    sweep(
        triton_gemm._bipolar_gemm_kernel,
        gemm_signature("*bf16"),
        gemm_flags(4),
        triton_gemm._GEMM_TILES,
        "",
    )
    # 1-, 2-, 4- and 8-bit layers pack code words (WeightLayout.CODE_WORDS).
    sweep(
        triton_gemm._bipolar_gemm_kernel,
        {**gemm_signature("*bf16"), "w_ptr": "*i32"},
        gemm_flags(4),
        triton_gemm._GEMM_TILES,
        " code words",
    )
    for out, w_bits in (("*fp16", 2), ("*i64", 8), ("*bf16", 1)):
        build(
            triton_gemm._bipolar_gemm_kernel,
            {**gemm_signature(out), "w_ptr": "*i32"},
            gemm_flags(w_bits, int_out=out == "*i64"),
            f"w{w_bits} {out[1:]} code words",
            targets=(hopper, ampere),
            odd_shapes=True,
        )
    # Large M: the weight arrives expanded to int8 codes (triton_expand), and any tile
    # may win the autotune there.
    sweep(
        triton_gemm._bipolar_gemm_kernel,
        {**gemm_signature("*bf16"), "w_ptr": "*i8"},
        {**gemm_flags(8), "W_CODES": True},
        triton_gemm._GEMM_TILES,
        " expanded",
    )
    both = (hopper, ampere)
    # (output, W_BITS, INT_OUT, WIDE_ACC, NARROW_RECOVERY, BYTE_ALIGNED): each float output
    # dtype, int64 products, the int64 recovery, the int64 tile accumulator W8A8
    # switches to past G ~ 131k, and the code-by-code weight unpack of K-groups that
    # split a plane byte.
    for out, w_bits, int_out, wide, narrow, byte_aligned in (
        ("*bf16", 1, False, False, True, True),
        ("*fp16", 8, False, True, False, True),
        ("*fp32", 3, False, False, False, True),
        ("*i64", 5, True, False, True, True),
        ("*i64", 8, True, True, False, True),
        ("*bf16", 4, False, False, True, False),
    ):
        build(
            triton_gemm._bipolar_gemm_kernel,
            gemm_signature(out),
            gemm_flags(
                w_bits, int_out=int_out, wide=wide, narrow=narrow, byte_aligned=byte_aligned
            ),
            f"w{w_bits} {out[1:]}{' int64 accumulate' if wide else ''}"
            f"{'' if narrow else ' int64 recovery'}{'' if byte_aligned else ' per-code unpack'}",
            targets=both,
            odd_shapes=True,
        )

    quantize_signature = {
        "codes_ptr": "*i8",
        "rowsum_ptr": "*i32",
        "scale_ptr": "*fp32",
        "GROUP_K": "i32",
        "NUM_GROUPS": "i32",
        "stride_xm": "i32",
    }
    for x_dtype, a_bits, block in (("*bf16", 8, 1024), ("*fp16", 1, 32), ("*fp32", 4, 256)):
        build(
            triton_gemm._quantize_activations_kernel,
            {"x_ptr": x_dtype, **quantize_signature},
            {"LEVELS": (1 << a_bits) - 1, "HALF": 1 << (a_bits - 1), "BLOCK": block},
            f"a{a_bits} {x_dtype[1:]} block {block}",
            targets=both,
            odd_shapes=True,
        )

    def a16_signature(x: str) -> dict[str, str]:
        return {
            "x_ptr": x,
            "w_ptr": "*u8",
            "w_scale_ptr": "*fp32",
            "bias_ptr": "*fp32",
            "out_ptr": x,
            "workspace_ptr": "*fp32",
            "counter_ptr": "*i32",
            **ints,
            **plane_strides,
        }

    def a16_flags(w_bits: int, *, fp32: bool = False, byte_aligned: bool = True) -> dict:
        return {
            "W_BITS": w_bits,
            "BYTE_ALIGNED": byte_aligned,
            "EVEN_K": byte_aligned,
            "W_LEVELS": False,
            "HAS_BIAS": True,
            "DOT_FP32": fp32,
            "PRECISION": "ieee" if fp32 else "tf32",
        }

    sweep(
        triton_a16._bipolar_a16_kernel,
        a16_signature("*bf16"),
        a16_flags(4),
        triton_a16._A16_TILES + triton_a16._A16_SPLIT_K_TILES,
        "",
    )
    # (activations, flags, label): each activation dtype, 1 and 8 bits, float32 "ieee"
    # dots, and the code-by-code unpack.
    for x_dtype, flags, label in (
        ("*fp16", a16_flags(1), "w1 fp16"),
        ("*bf16", a16_flags(8), "w8 bf16"),
        ("*fp32", a16_flags(2, fp32=True), "w2 fp32 ieee"),
        ("*bf16", a16_flags(4, byte_aligned=False), "w4 bf16 per-code unpack"),
    ):
        build(
            triton_a16._bipolar_a16_kernel,
            a16_signature(x_dtype),
            flags,
            label,
            targets=both,
            odd_shapes=True,
        )
    # 1-bit decode applies the levels' sign bits to x (GEMV tiles only), from whole plane
    # bytes and from the code-by-code unpack.
    for byte_aligned, label in ((True, "w1 bf16 gemv"), (False, "w1 bf16 gemv per-code unpack")):
        build(
            triton_a16._bipolar_a16_kernel,
            a16_signature("*bf16"),
            a16_flags(1, byte_aligned=byte_aligned) | {"M": 1, "M_BUCKET": 1},
            label,
            tile=(1, 32, 256, 4, 3),
            targets=both,
            odd_shapes=byte_aligned,
        )
    # Weight-only 1-, 2-, 4- and 8-bit layers pack code words (WeightLayout.CODE_WORDS):
    # the GEMV tiles decode them with scaled levels, the others unpack their codes (16-bit
    # levels from pairs of them; at 1 bit, signs).
    sweep(
        triton_a16._bipolar_a16_kernel,
        {**a16_signature("*bf16"), "w_ptr": "*i32"},
        a16_flags(4),
        triton_a16._A16_TILES + triton_a16._A16_SPLIT_K_TILES,
        " code words",
    )
    for x_dtype, w_bits, tile in (
        ("*fp16", 2, (1, 32, 256, 4, 3)),
        ("*fp32", 8, (1, 32, 256, 4, 3)),
        ("*fp16", 8, (16, 32, 128, 4, 4)),
        ("*bf16", 2, (16, 32, 128, 4, 4)),
        ("*fp16", 1, (1, 32, 256, 4, 3)),
        ("*bf16", 1, (16, 32, 128, 4, 4)),
    ):
        build(
            triton_a16._bipolar_a16_kernel,
            {**a16_signature(x_dtype), "w_ptr": "*i32"},
            a16_flags(w_bits, fp32=x_dtype == "*fp32") | {"M": 1, "M_BUCKET": 1},
            f"w{w_bits} {x_dtype[1:]} code words",
            tile=tile,
            targets=both,
            odd_shapes=True,
        )
    # Swapped tiles (out^T = levels @ x^T) on planes and code words; with float32 "ieee"
    # dots and for sm_80's mma.sync.
    for weight, label in (("*u8", " swapped"), ("*i32", " code words swapped")):
        sweep(
            triton_a16._bipolar_a16_kernel,
            {**a16_signature("*bf16"), "w_ptr": weight},
            a16_flags(4) | {"SWAP_AB": True},
            triton_a16._A16_SWAPPED_TILES,
            label,
        )
    for x_dtype, label in (
        ("*bf16", "w4 bf16 code words swapped"),
        ("*fp32", "w4 fp32 ieee swapped"),
    ):
        build(
            triton_a16._bipolar_a16_kernel,
            {**a16_signature(x_dtype), "w_ptr": "*i32"},
            a16_flags(4, fp32=x_dtype == "*fp32") | {"SWAP_AB": True},
            label,
            tile=triton_a16._A16_SWAPPED_TILES[0],
            targets=both,
            odd_shapes=True,
        )
    # 2- and 1-bit decode on the swapped (16, 64, 256) tiles, whole and split, and the
    # (16, 128, 256) tile: a run of words holds 64 and 128 codes.
    for w_bits, tile in (
        (2, triton_a16._A16_SWAPPED_TILES[1]),
        (1, triton_a16._A16_SWAPPED_TILES[1]),
        (1, triton_a16._A16_SWAPPED_TILES[3]),
        (2, triton_a16._A16_SWAPPED_TILES[4]),
        (1, triton_a16._A16_SWAPPED_TILES[4]),
    ):
        build(
            triton_a16._bipolar_a16_kernel,
            {**a16_signature("*bf16"), "w_ptr": "*i32"},
            a16_flags(w_bits) | {"SWAP_AB": True, "M": 1, "M_BUCKET": 1, "NUM_GROUPS": 1},
            f"w{w_bits} bf16 code words swapped decode M=1 {tile}",
            tile=tile,
        )
    build(
        triton_a16._bipolar_a16_kernel,
        {**a16_signature("*fp16"), "w_ptr": "*i32"},
        a16_flags(1) | {"SWAP_AB": True},
        "w1 fp16 code words swapped",
        tile=triton_a16._A16_SWAPPED_TILES[0],
        targets=both,
        odd_shapes=True,
    )
    sweep(
        triton_a16._bipolar_a16_kernel,
        {**a16_signature("*bf16"), "w_ptr": "*bf16"},
        {**a16_flags(4), "W_LEVELS": True},
        triton_a16._A16_TILES + triton_a16._A16_SPLIT_K_TILES,
        " expanded",
    )
    build(
        triton_a16._bipolar_a16_kernel,
        {**a16_signature("*fp32"), "w_ptr": "*fp32"},
        {**a16_flags(4, fp32=True), "W_LEVELS": True},
        "w4 fp32 ieee expanded",
        targets=both,
        odd_shapes=True,
    )

    expand_signature = {
        "w_ptr": "*u8",
        "out_ptr": "*i8",
        "N": "i32",
        "K": "i32",
        **plane_strides,
    }
    block_n, block_k = triton_expand._EXPAND_TILE
    for w_bits, weight, out in (
        (1, "*u8", "*i8"),
        (5, "*u8", "*i8"),
        (4, "*u8", "*bf16"),
        (8, "*u8", "*fp16"),
        (3, "*u8", "*fp32"),
        (4, "*i32", "*bf16"),
        (2, "*i32", "*fp16"),
        (8, "*i32", "*fp32"),
        (1, "*i32", "*bf16"),
    ):
        build(
            triton_expand._expand_weight_kernel,
            {**expand_signature, "w_ptr": weight, "out_ptr": out},
            {
                "W_BITS": w_bits,
                "LEVELS": out != "*i8",
                "EVEN_K": True,
                "BLOCK_N": block_n,
                "BLOCK_K": block_k,
            },
            f"w{w_bits} {out[1:]}{' code words' if weight == '*i32' else ''}",
            tile=(16, block_n, block_k, 4, 3),  # the launch defaults: 4 warps, 3 stages
            targets=both,
            odd_shapes=True,
        )

    bitplane_signature = {
        "x_ptr": "*u8",
        "w_ptr": "*u8",
        "x_popc_ptr": "*i32",
        "w_popc_ptr": "*i32",
        "out_ptr": "*i64",
        "M": "i32",
        "N": "i32",
        "K": "i32",
        "stride_xplane": "i32",
        "stride_xm": "i32",
        **plane_strides,
        "stride_om": "i32",
        "M_BUCKET": "i32",
    }
    for tile in triton_bitplane._BITPLANE_TILES:
        build(
            triton_bitplane._bipolar_bitplane_kernel,
            bitplane_signature,
            {"A_BITS": 2, "W_BITS": 2},
            f"tile {tile}",
            tile=tile,
        )
    build(
        triton_bitplane._bipolar_bitplane_kernel,
        bitplane_signature,
        {"A_BITS": 1, "W_BITS": 8},
        "a1 w8",
        targets=both,
        odd_shapes=True,
    )
    _INSPECT = inspect
    # fork: the workers inherit _BUILDS and _INSPECT, and triton already imported.
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        results = pool.map(_compile_build, range(len(_BUILDS)), chunksize=1)
    failed = [f"{label}: {error}" for label, _, error in results if error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} builds failed:\n" + "\n".join(failed))
    return [(label, inspected) for label, inspected, _ in results]


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90() -> None:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    # With a cold Triton cache 337 of these 347 builds took 2.1 min on this machine's 2
    # cores, under pytest's 300 s timeout.
    result = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    built = result.stdout.splitlines()
    kernels = {line.split("[")[0] for line in built}
    assert kernels == {
        "_bipolar_gemm_kernel",
        "_quantize_activations_kernel",
        "_bipolar_a16_kernel",
        "_bipolar_bitplane_kernel",
        "_expand_weight_kernel",
    }
    # every autotune config (split-K too), on planes, code words and expanded weights,
    # grouped and ungrouped, and the A16 kernel's 9 swapped tiles on planes and code words
    assert sum("tile" in line for line in built) == (
        2 * 2 * (12 + 15 + 4) + 2 * (12 + 19) + 3 + 2 * 2 * 9
    )
    # per kernel: GEMM, activation quantizer, A16, expansion, bit-plane
    assert sum("sm_80" in line for line in built) == 9 + 3 + 16 + 9 + 1
    assert sum("odd shapes" in line for line in built) == 9 + 3 + 15 + 9 + 1


if __name__ == "__main__":
    print("\n".join(label for label, _ in _compile_all()))
