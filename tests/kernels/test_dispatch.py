"""The dispatch point: backend choice, reported kernel mode, input validation."""

from __future__ import annotations

import pytest
import torch
from bitscale.kernels import (
    Backend,
    BipolarConfig,
    QuantMethod,
    bipolar_linear,
    bipolar_mm_int,
    dequantize,
    kernel_status,
    quantize,
)
from bitscale.kernels.dispatch import KernelMode, _triton_module, linear_packed, resolve_backend
from bitscale.kernels.reference import pack_weight

CPU = torch.device("cpu")


def test_kernel_status_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kernel_status(cuda_available=True, triton_installed=True).mode is KernelMode.COMPILED
    fallback = kernel_status(cuda_available=False, triton_installed=True)
    assert fallback.mode is KernelMode.TORCH_FALLBACK
    assert "TRITON_INTERPRET=1" in fallback.describe()
    missing = kernel_status(cuda_available=True, triton_installed=False)
    assert missing.describe() == "torch fallback (triton not installed)"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    interpreted = kernel_status(cuda_available=False, triton_installed=True)
    assert interpreted.describe() == "triton interpreted (TRITON_INTERPRET=1)"


def test_env_reports_the_dispatch_answer() -> None:
    from bitscale.env import collect_env

    assert collect_env()["kernel_mode"] == kernel_status().describe()


def test_resolve_backend_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend("auto", CPU) is Backend.REFERENCE
    assert resolve_backend(Backend.REFERENCE, CPU) is Backend.REFERENCE
    for explicit in (Backend.TRITON, Backend.TRITON_BITPLANE):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET is not 1"):
            resolve_backend(explicit, CPU)
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        resolve_backend("triton", torch.device("meta"))
    assert resolve_backend("auto", torch.device("meta")) is Backend.REFERENCE
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'triton'"):
        resolve_backend("gpu", CPU)


def test_resolve_backend_interpreted(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", CPU) is Backend.TRITON
    assert resolve_backend("triton_bitplane", CPU) is Backend.TRITON_BITPLANE


def test_auto_without_hardware_runs_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    generator = torch.Generator().manual_seed(0)
    x_codes = torch.randint(0, 8, (3, 20), dtype=torch.uint8, generator=generator)
    w_codes = torch.randint(0, 4, (5, 20), dtype=torch.uint8, generator=generator)
    auto = bipolar_mm_int(x_codes, w_codes, a_bits=3, w_bits=2)
    assert torch.equal(
        auto, bipolar_mm_int(x_codes, w_codes, a_bits=3, w_bits=2, backend="reference")
    )


def test_changed_interpret_flag_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    from bitscale.kernels import triton_gemm

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_gemm, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET changed"):
        _triton_module("triton_gemm")


def test_reference_linear_is_dequantize_then_matmul() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, generator=generator)
    w = quantize(torch.randn(6, 16, generator=generator), 3, group_size=8)
    bias = torch.randn(6, generator=generator)
    out = bipolar_linear(x, w, bias=bias, backend="reference")
    assert torch.equal(out, x @ dequantize(w).t() + bias)
    out_a4 = bipolar_linear(x, w, a_bits=4, backend="reference")
    x_q = dequantize(quantize(x, 4, group_size=8, method="absmax"))
    assert torch.equal(out_a4, x_q @ dequantize(w).t())


def test_linear_validation() -> None:
    x = torch.randn(4, 16)
    w = quantize(torch.randn(6, 16), 2)
    with pytest.raises(ValueError, match="K mismatch"):
        bipolar_linear(torch.randn(4, 15), w)
    with pytest.raises(ValueError, match=r"float16 tensor, got torch\.int32; convert it"):
        bipolar_linear(x.to(torch.int32), w)
    with pytest.raises(
        ValueError, match=r"float32, bfloat16 or float16 tensor, got torch\.float64"
    ):
        bipolar_linear(x.double(), w)
    with pytest.raises(TypeError, match="x must be a float32, bfloat16 or float16"):
        bipolar_linear(x.tolist(), w)
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        bipolar_linear(x, w, bias=torch.zeros(5))
    with pytest.raises(TypeError, match="w must be a BipolarTensor"):
        bipolar_linear(x, torch.randn(6, 16))
    with pytest.raises(ValueError, match=r"quantized along K \(axis=-1\)"):
        bipolar_linear(x, quantize(torch.randn(16, 6), 2, axis=0))
    with pytest.raises(ValueError, match="or 16 for float"):
        bipolar_linear(x, w, a_bits=12)
    with pytest.raises(ValueError, match="method must be one of"):
        bipolar_linear(x, w, a_bits=4, activation_method="minmax")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_linear_inputs_on_another_device_than_the_weight(backend: str) -> None:
    """x, the weight and the bias on different devices: a ValueError naming both devices
    and the fix, before any packing or kernel ("meta" tensors stand in for a second
    device; TRITON_INTERPRET lets the triton backend run on CPU tensors)."""
    if backend == "triton":
        pytest.importorskip("triton")
    x = torch.randn(4, 16)
    w = quantize(torch.randn(6, 16), 2)
    with pytest.raises(ValueError, match=r"x is on cpu but the weight on meta; move them"):
        bipolar_linear(x, w.to("meta"), backend=backend)
    with pytest.raises(ValueError, match=r"x is on cpu but the bias on meta"):
        bipolar_linear(x, w, bias=torch.zeros(6, device="meta"), backend=backend)
    packed = pack_weight(w)
    with pytest.raises(ValueError, match=r"x is on meta but the weight on cpu"):
        linear_packed(x.to("meta"), packed, backend="reference")
    with pytest.raises(ValueError, match=r"x is on cpu but the bias on meta"):
        linear_packed(x, packed, bias=torch.zeros(6, device="meta"), backend=backend)


def test_linear_takes_non_contiguous_x() -> None:
    """The public linear's contract: any strides (rows made contiguous when they are not);
    the same values as a contiguous x."""
    x = torch.randn(16, 8).t()  # [8, 16], strides (1, 8)
    w = quantize(torch.randn(6, 16), 3)
    assert not x.is_contiguous()
    expected = bipolar_linear(x.contiguous(), w, backend="reference")
    assert torch.equal(bipolar_linear(x, w, backend="reference"), expected)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize(("w_bits", "group_size"), [(2, None), (4, 32), (8, None)])
@pytest.mark.parametrize("a_bits", [8, 3])
def test_quantized_activations_on_code_words_equal_bit_planes(
    backend: str, w_bits: int, group_size: int | None, a_bits: int
) -> None:
    """The integer GEMM's products are exact and its float epilogue per element is the
    same whichever layout the codes came from (and whichever tile autotune picks), so
    the outputs are equal bit for bit, on every backend."""
    pytest.importorskip("triton")
    generator = torch.Generator().manual_seed(w_bits + a_bits)
    w = quantize(torch.randn(9, 96, generator=generator), w_bits, group_size=group_size)
    x = torch.randn(5, 96, generator=generator)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on CPU
    words = pack_weight(w.to(device), layout="code_words")
    planes = pack_weight(w.to(device))
    out = linear_packed(x.to(device), words, a_bits=a_bits, backend=backend)
    assert torch.equal(out, linear_packed(x.to(device), planes, a_bits=a_bits, backend=backend))


def test_bitplane_backend_is_for_mm_int_only(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = quantize(torch.randn(6, 16), 2).to(device)
    with pytest.raises(ValueError, match="implements bipolar_mm_int only"):
        bipolar_linear(torch.randn(4, 16, device=device), w, backend="triton_bitplane")


def test_config_validation() -> None:
    config = BipolarConfig(w_bits=4, a_bits=8, group_size=64, method="absmax", backend="reference")
    assert config.backend is Backend.REFERENCE and config.method is QuantMethod.ABSMAX
    with pytest.raises(ValueError, match="implements bipolar_mm_int only"):
        BipolarConfig(w_bits=4, backend="triton_bitplane")
    with pytest.raises(ValueError, match=r"w_bits must be an int in 1\.\.8"):
        BipolarConfig(w_bits=16)
    with pytest.raises(ValueError, match=r"a_bits must be an int in 1\.\.8, or 16"):
        BipolarConfig(w_bits=4, a_bits=0)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        BipolarConfig(w_bits=4, group_size=-8)
    with pytest.raises(ValueError, match="method must be one of"):
        BipolarConfig(w_bits=4, method="l2")
