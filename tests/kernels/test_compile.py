"""Every Triton kernel compiles to an sm_90 cubin, on a machine without a GPU.

The interpreter accepts programs the GPU compiler rejects (tl.dot tiles under
16, dtype mixes), so CPU-only CI also runs the real compiler: Triton's
``triton.compile`` lowers to PTX and assembles with its bundled ptxas without
a device. Compiling needs ``TRITON_INTERPRET`` unset when the kernels are
decorated, so the check runs this file as a script in a fresh process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed")


def _compile_all() -> list[str]:
    import triton
    from bitscale.kernels import triton_a16, triton_bitplane, triton_gemm
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    compiled = []

    def build(kernel, signature: dict[str, str], constexprs: dict[str, object]) -> None:
        jit = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        full = {**signature, **dict.fromkeys(constexprs, "constexpr")}
        triton.compile(ASTSource(jit, full, constexprs), target=target)
        compiled.append(jit.__name__)

    ints = dict.fromkeys(
        ("M", "N", "K", "GROUP_K", "NUM_GROUPS", "stride_xm", "stride_om", "M_BUCKET"), "i32"
    )
    plane_strides = {"stride_wplane": "i32", "stride_wn": "i32"}
    build(
        triton_gemm._bipolar_gemm_kernel,
        {
            "x_ptr": "*i8",
            "x_rowsum_ptr": "*i32",
            "x_scale_ptr": "*fp32",
            "w_ptr": "*u8",
            "w_rowsum_ptr": "*i32",
            "w_scale_ptr": "*fp32",
            "bias_ptr": "*fp32",
            "out_ptr": "*bf16",
            **ints,
            **plane_strides,
        },
        {
            "W_BITS": 3,
            "INT_OUT": False,
            "WIDE_ACC": False,
            "HAS_BIAS": True,
            "BLOCK_M": 16,
            "BLOCK_N": 32,
            "BLOCK_K": 128,
        },
    )
    build(
        triton_gemm._quantize_activations_kernel,
        {
            "x_ptr": "*bf16",
            "codes_ptr": "*i8",
            "rowsum_ptr": "*i32",
            "scale_ptr": "*fp32",
            "GROUP_K": "i32",
            "NUM_GROUPS": "i32",
            "stride_xm": "i32",
        },
        {"LEVELS": 255, "HALF": 128, "BLOCK": 1024},
    )
    build(
        triton_a16._bipolar_a16_kernel,
        {
            "x_ptr": "*bf16",
            "w_ptr": "*u8",
            "w_scale_ptr": "*fp32",
            "bias_ptr": "*fp32",
            "out_ptr": "*bf16",
            **ints,
            **plane_strides,
        },
        {
            "W_BITS": 4,
            "HAS_BIAS": True,
            "DOT_FP32": False,
            "PRECISION": "tf32",
            "BLOCK_M": 16,
            "BLOCK_N": 32,
            "BLOCK_K": 128,
        },
    )
    build(
        triton_bitplane._bipolar_bitplane_kernel,
        {
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
        },
        {"A_BITS": 2, "W_BITS": 2, "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128},
    )
    return compiled


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90() -> None:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=280
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split() == [
        "_bipolar_gemm_kernel",
        "_quantize_activations_kernel",
        "_bipolar_a16_kernel",
        "_bipolar_bitplane_kernel",
    ]


if __name__ == "__main__":
    print("\n".join(_compile_all()))
