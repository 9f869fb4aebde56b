"""bitscale.kernels: arbitrary-precision matmul in the bipolar-INT format.

An n-bit bipolar-INT code reads each bit as -1 (bit 0) or +1 (bit 1), so its
value is ``2U - (2^n - 1)`` for the unsigned reading U: odd levels, no zero.
Weights take 1..8 bits, activations 1..8 bits or stay float (``a_bits=16``).

- :func:`encode` / :func:`decode`: exact values <-> uint8 codes.
- :func:`quantize` / :func:`dequantize`: float <-> :class:`BipolarTensor`
  (per-channel / per-token scales, optional K-groups; "mse", "absmax", "meanabs").
- :func:`pack_bitplanes` / :func:`unpack_bitplanes`: the bit-plane layout along K.
  :class:`WeightLayout` says how packed weights hold their codes: bit planes, or code
  words (32 / w codes to an int32 word) for 1-, 2-, 4- and 8-bit weights.
- :func:`bipolar_mm_int`: the exact int64 product of codes, the contract every
  backend meets; :func:`bipolar_linear`: float in, float out.
- :class:`BipolarLinear` and :func:`quantize_model`: drop-in nn.Linear
  replacement (packed kernels in eval, straight-through QAT in training);
  :func:`reuse_quantized_weights` quantizes each weight once per optimizer step
  instead of once per micro-batch.
- :class:`Backend`: AUTO (compiled Triton on CUDA, the Triton interpreter with
  ``TRITON_INTERPRET=1``, else the exact torch reference), TRITON,
  TRITON_BITPLANE (the paper's bit-serial decomposition, ``bipolar_mm_int``
  only), REFERENCE.

Importing this package imports torch but never triton, and never initializes CUDA.
"""

from __future__ import annotations

from bitscale.kernels.config import Backend, BipolarConfig, QuantMethod, WeightLayout
from bitscale.kernels.dispatch import bipolar_linear, bipolar_mm_int, kernel_status
from bitscale.kernels.format import (
    BipolarTensor,
    decode,
    dequantize,
    encode,
    pack_bitplanes,
    quantize,
    unpack_bitplanes,
)
from bitscale.kernels.linear import BipolarLinear, quantize_model, reuse_quantized_weights

__all__ = [
    "Backend",
    "BipolarConfig",
    "BipolarLinear",
    "BipolarTensor",
    "QuantMethod",
    "WeightLayout",
    "bipolar_linear",
    "bipolar_mm_int",
    "decode",
    "dequantize",
    "encode",
    "kernel_status",
    "pack_bitplanes",
    "quantize",
    "quantize_model",
    "reuse_quantized_weights",
    "unpack_bitplanes",
]
