"""The one place that checks hardware, picks a backend and imports Triton (lazily).

``AUTO`` resolves to compiled Triton for CUDA tensors, to the Triton interpreter
for CPU tensors when ``TRITON_INTERPRET=1``, and to the exact torch reference
otherwise (logged once, never an error). An explicitly requested backend that
cannot run raises ``RuntimeError`` naming what is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from enum import StrEnum
from types import ModuleType
from typing import Any

import torch
from bitscale.kernels.config import (
    FLOAT_ACTIVATION_BITS,
    Backend,
    QuantMethod,
    WeightLayout,
    check_activation_bits,
    parse_backend,
    parse_method,
    weight_layout,
)
from bitscale.kernels.format import BipolarTensor, _quantize_codes, pack_bitplanes
from bitscale.kernels.reference import (
    PackedWeight,
    bipolar_linear_reference,
    bipolar_mm_int_reference,
    centred_codes,
    check_mm_codes,
    dequantize_packed,
    dequantized_linear,
    pack_weight,
    packed_out_features,
)

__all__ = [
    "KernelMode",
    "KernelStatus",
    "bipolar_linear",
    "bipolar_mm_int",
    "check_linear_inputs",
    "check_same_device",
    "kernel_status",
    "linear_packed",
    "resolve_backend",
    "run_packed",
]

_log = logging.getLogger(__name__)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class KernelMode(StrEnum):
    """How kernels run on this machine by default."""

    COMPILED = "triton compiled"
    INTERPRETED = "triton interpreted"
    TORCH_FALLBACK = "torch fallback"


@dataclass(frozen=True, slots=True)
class KernelStatus:
    mode: KernelMode
    reason: str

    def describe(self) -> str:
        return f"{self.mode.value} ({self.reason})"


# Looked up once, at import (find_spec does not import triton): resolve_backend runs on
# every call, also inside torch.compile, and Dynamo before torch 2.13 cannot trace
# importlib.util.find_spec (a fullgraph compile of an eval layer failed there: H100,
# torch 2.11).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel_status(
    *, cuda_available: bool | None = None, triton_installed: bool | None = None
) -> KernelStatus:
    """Compiled / interpreted / torch fallback for CUDA tensors here, and why.

    Does not import triton or initialize CUDA (``bitscale env`` reports this).
    """
    if triton_installed is None:
        triton_installed = _TRITON_INSTALLED
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if not triton_installed:
        return KernelStatus(KernelMode.TORCH_FALLBACK, "triton not installed")
    if _interpreting():
        return KernelStatus(KernelMode.INTERPRETED, "TRITON_INTERPRET=1")
    if cuda_available:
        return KernelStatus(KernelMode.COMPILED, "CUDA device present")
    return KernelStatus(
        KernelMode.TORCH_FALLBACK,
        "no CUDA device; set TRITON_INTERPRET=1 to interpret triton",
    )


def _triton_unavailable_reason(device: torch.device) -> str | None:
    if not _TRITON_INSTALLED:
        return "triton is not installed"
    if device.type == "cuda" or (device.type == "cpu" and _interpreting()):
        return None
    if device.type == "cpu":
        return (
            "the tensors are on the CPU and TRITON_INTERPRET is not 1 (set it before the "
            "first kernel call to run the Triton kernels in the interpreter)"
        )
    return f"Triton kernels need CUDA tensors (or CPU ones with TRITON_INTERPRET=1), got {device}"


_logged_fallbacks: set[str] = set()


def resolve_backend(backend: Backend | str, device: torch.device) -> Backend:
    """The concrete backend (never AUTO) that runs on tensors of ``device``."""
    backend = parse_backend(backend)
    if backend is Backend.REFERENCE:
        return backend
    reason = _triton_unavailable_reason(device)
    if backend is Backend.AUTO:
        if reason is None:
            return Backend.TRITON
        if reason not in _logged_fallbacks and not torch.compiler.is_compiling():
            _logged_fallbacks.add(reason)
            _log.info("bitscale.kernels: using the torch reference because %s", reason)
        return Backend.REFERENCE
    if reason is not None:
        raise RuntimeError(f"backend {backend.value!r} cannot run: {reason}")
    return backend


def _triton_module(name: str) -> ModuleType:
    module = importlib.import_module(f"bitscale.kernels.{name}")
    if _interpreting() != module.INTERPRETED:
        raise RuntimeError(
            "TRITON_INTERPRET changed after the Triton kernels were first loaded "
            f"(loaded {'with' if module.INTERPRETED else 'without'} it); set it once, "
            "before the first kernel call"
        )
    return module


def bipolar_mm_int(
    x_codes: torch.Tensor,
    w_codes: torch.Tensor,
    *,
    a_bits: int,
    w_bits: int,
    backend: Backend | str = Backend.AUTO,
) -> torch.Tensor:
    """Exact int64 [M, N] product ``(2Ux - (2^a-1)) @ (2Uw - (2^w-1))^T``.

    ``x_codes`` [M, K] and ``w_codes`` [N, K] are uint8 bipolar codes. Every
    backend returns exactly this; ``Backend.TRITON_BITPLANE`` computes it with
    the paper's bit-plane decomposition.
    """
    check_mm_codes(x_codes, w_codes, a_bits, w_bits)
    chosen = resolve_backend(backend, x_codes.device)
    if chosen is Backend.REFERENCE:
        return bipolar_mm_int_reference(x_codes, w_codes, a_bits=a_bits, w_bits=w_bits)
    k = x_codes.shape[1]
    if k == 0:  # an empty sum, as the reference returns: no kernel has a K-tile to run
        shape = (x_codes.shape[0], w_codes.shape[0])
        return torch.zeros(shape, dtype=torch.int64, device=x_codes.device)
    if chosen is Backend.TRITON_BITPLANE:
        return _triton_module("triton_bitplane").bipolar_mm_int_bitplane(
            x_codes.contiguous(), w_codes.contiguous(), a_bits=a_bits, w_bits=w_bits
        )
    x_centred = centred_codes(x_codes, a_bits).contiguous()
    w_centred = centred_codes(w_codes, w_bits)
    return _triton_module("triton_gemm").bipolar_gemm(
        x_centred,
        x_centred.sum(1, dtype=torch.int32).unsqueeze(1),
        pack_bitplanes(w_codes, w_bits),
        w_centred.sum(1, dtype=torch.int32).unsqueeze(1),
        a_bits=a_bits,
        w_bits=w_bits,
        k=k,
        group_k=k,
    )


def check_linear_inputs(
    x: torch.Tensor, in_features: int, out_features: int, bias: torch.Tensor | None
) -> None:
    """The input checks of a linear with an [out_features, in_features] weight, shared
    by every backend."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a float32, bfloat16 or float16 tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"x must be a float32, bfloat16 or float16 tensor, got {x.dtype}; "
            "convert it with x.to(torch.bfloat16) (or float16 / float32)"
        )
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"K mismatch: x has shape {tuple(x.shape)} but the weight has K={in_features} "
            "(x must be [..., K])"
        )
    if bias is not None and (
        not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out_features,)
    ):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias must have shape ({out_features},), got {got}")


def check_same_device(
    x: torch.Tensor, weight_device: torch.device, bias: torch.Tensor | None
) -> None:
    """x, the weight and the bias on one device, or a ValueError naming both and the fix."""
    others = [("the weight", weight_device)]
    if bias is not None:
        others.append(("the bias", bias.device))
    for name, device in others:
        if device != x.device:
            raise ValueError(
                f"x is on {x.device} but {name} on {device}; move them to one device "
                f"(x.to({str(device)!r}), or the layer / weight / bias .to({str(x.device)!r}))"
            )


def _triton_linear(
    rows: torch.Tensor,
    data: torch.Tensor,
    scales: torch.Tensor,
    centred_rowsums: torch.Tensor,
    bias: torch.Tensor | None,
    w_bits: int,
    in_features: int,
    group_size: int | None,
    a_bits: int,
    activation_method: str,
    layout: str,
) -> torch.Tensor:
    """The Triton kernels on contiguous rows [M, K]: float [M, N] in rows' dtype."""
    weight = PackedWeight(
        data, scales, centred_rowsums, w_bits, in_features, group_size, WeightLayout(layout)
    )
    method = QuantMethod(activation_method)
    if a_bits == FLOAT_ACTIVATION_BITS:
        out = _triton_module("triton_a16").bipolar_linear_a16(rows, weight, bias=bias)
    else:
        gemm = _triton_module("triton_gemm")
        if method is QuantMethod.ABSMAX:
            x_centred, x_rowsums, x_scales = gemm.quantize_activations(
                rows, a_bits=a_bits, group_k=weight.group_k
            )
        else:
            codes, x_scales = _quantize_codes(rows, a_bits, weight.group_size, method)
            x_centred = centred_codes(codes, a_bits)
            x_rowsums = (
                x_centred.view(rows.shape[0], x_scales.shape[1], weight.group_k)
                .sum(-1, dtype=torch.int32)
                .contiguous()
            )
        out = gemm.bipolar_gemm(
            x_centred,
            x_rowsums,
            weight.data,
            weight.centred_rowsums,
            a_bits=a_bits,
            w_bits=weight.bits,
            k=weight.in_features,
            group_k=weight.group_k,
            x_scales=x_scales,
            w_scales=weight.scales,
            bias=bias,
            out_dtype=rows.dtype,
        )
    return out


# One opaque op for torch.compile: Dynamo and AOTAutograd see its output shape (the
# fake below) instead of tracing into Triton's launcher and autotuner, so compiled
# graphs (and CUDA graphs) hold the kernel call whole. No host syncs inside (CUDA-graph
# capture); a straight-through backward below.
_triton_linear_op = torch.library.custom_op(
    "bitscale::triton_linear_packed", _triton_linear, mutates_args=()
)


@_triton_linear_op.register_fake
def _(rows: torch.Tensor, data: torch.Tensor, *weight_and_options: object) -> torch.Tensor:
    layout = weight_and_options[-1]
    return rows.new_empty((rows.shape[0], packed_out_features(data, layout)))


def _setup_backward(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    rows, data, scales, _, bias, w_bits, in_features, group_size, *_, layout = inputs
    ctx.save_for_backward(data, scales)
    ctx.weight_meta = (w_bits, in_features, group_size, layout)
    ctx.rows_dtype = rows.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Straight-through: the gradient of ``rows @ W_q^T + bias`` with the dequantized
    weight fixed (and, for quantized activations, the identity for their rounding)."""
    data, scales = ctx.saved_tensors
    grad_rows = grad_bias = None
    if ctx.needs_input_grad[0]:
        weight = dequantize_packed(data, scales, *ctx.weight_meta)
        grad_rows = (grad_out.to(torch.float32) @ weight).to(ctx.rows_dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[4]:
        grad_bias = grad_out.sum(0).to(ctx.bias_dtype)
    return grad_rows, None, None, None, grad_bias, None, None, None, None, None, None


_triton_linear_op.register_autograd(_backward, setup_context=_setup_backward)


def linear_packed(
    x: torch.Tensor,
    weight: PackedWeight,
    *,
    a_bits: int = FLOAT_ACTIVATION_BITS,
    activation_method: QuantMethod | str = QuantMethod.ABSMAX,
    bias: torch.Tensor | None = None,
    backend: Backend | str = Backend.AUTO,
) -> torch.Tensor:
    """``bipolar_linear`` on a weight already in kernel layout (what BipolarLinear holds)."""
    check_activation_bits(a_bits)
    activation_method = parse_method(activation_method)
    check_linear_inputs(x, weight.in_features, weight.out_features, bias)
    check_same_device(x, weight.data.device, bias)
    return run_packed(
        x, weight, a_bits, activation_method, bias, resolve_backend(backend, x.device)
    )


def run_packed(
    x: torch.Tensor,
    weight: PackedWeight,
    a_bits: int,
    activation_method: QuantMethod,
    bias: torch.Tensor | None,
    chosen: Backend,
) -> torch.Tensor:
    """:func:`linear_packed` on inputs it has checked and a backend already resolved
    (BipolarLinear's eager forward, whose config was checked once, at construction)."""
    if chosen is Backend.TRITON_BITPLANE:
        raise ValueError(
            "backend 'triton_bitplane' implements bipolar_mm_int only; use 'triton' or "
            "'reference' for bipolar_linear"
        )
    if chosen is Backend.REFERENCE:
        dequantized = dequantize_packed(
            weight.data,
            weight.scales,
            weight.bits,
            weight.in_features,
            weight.group_size,
            weight.layout,
        )
        return dequantized_linear(
            x,
            dequantized,
            group_size=weight.group_size,
            a_bits=a_bits,
            activation_method=activation_method,
            bias=bias,
        )
    rows = x.reshape(-1, weight.in_features).contiguous()
    if bias is not None:
        bias = bias.contiguous()  # the reference takes any strides; the kernels read it flat
    # Plain eager calls that need no gradient run the op's body directly: the custom op's
    # dispatcher and autograd wrapping were 19 of the 49 us of host time a W4A16 decode
    # call took on 2 CPU cores (kernel launch stubbed out); the H100 kernel takes 16 us.
    # Gradients, graphs, tensor subclasses (FakeTensor, DTensor) and dispatch modes
    # (FakeTensorMode, FlopCounterMode) need the op.
    needs_grad = torch.is_grad_enabled() and (
        rows.requires_grad or (bias is not None and bias.requires_grad)
    )
    plain_eager = (
        type(rows) is torch.Tensor
        and not torch.compiler.is_compiling()
        and not torch._C._len_torch_dispatch_stack()
    )
    run = _triton_linear if plain_eager and not needs_grad else _triton_linear_op
    out = run(
        rows,
        weight.data,
        weight.scales,
        weight.centred_rowsums,
        bias,
        weight.bits,
        weight.in_features,
        weight.group_size,
        a_bits,
        activation_method.value,
        weight.layout.value,
    )
    return out.view(*x.shape[:-1], weight.out_features)


def bipolar_linear(
    x: torch.Tensor,
    w: BipolarTensor,
    *,
    a_bits: int = FLOAT_ACTIVATION_BITS,
    bias: torch.Tensor | None = None,
    backend: Backend | str = Backend.AUTO,
    activation_method: QuantMethod | str = QuantMethod.ABSMAX,
) -> torch.Tensor:
    """Float ``x`` [..., K] times a quantized weight ``w`` [N, K]: float [..., N] in x's dtype.

    ``a_bits=16`` keeps activations float (weight-only); ``a_bits`` in 1..8
    quantizes them per token (per K-group if ``w`` is grouped) on the fly.

    ``x`` may have any strides (its rows are copied to a contiguous [M, K] only when
    they are not already); ``x``, ``w`` and ``bias`` must share a device.
    """
    check_activation_bits(a_bits)
    activation_method = parse_method(activation_method)
    if not isinstance(w, BipolarTensor):
        raise TypeError(f"w must be a BipolarTensor, got {type(w).__name__}")
    if w.codes.dim() != 2 or w.axis != 1:
        raise ValueError(
            f"w must be a 2-d [N, K] weight quantized along K (axis=-1), got shape "
            f"{tuple(w.shape)} with axis={w.axis}"
        )
    check_linear_inputs(x, w.shape[1], w.shape[0], bias)
    check_same_device(x, w.codes.device, bias)
    chosen = resolve_backend(backend, x.device)
    if chosen is Backend.REFERENCE:
        return bipolar_linear_reference(
            x, w, a_bits=a_bits, activation_method=activation_method, bias=bias
        )
    return linear_packed(
        x,
        pack_weight(w, layout=weight_layout(w.bits, w.group_size)),
        a_bits=a_bits,
        activation_method=activation_method,
        bias=bias,
        backend=chosen,
    )
