"""Option sets and validation shared by every kernels module (pure Python, no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

__all__ = [
    "ACTIVATION_BITS",
    "CODE_WORD_BITS",
    "CODE_WORD_RUN",
    "FLOAT_ACTIVATION_BITS",
    "WEIGHT_BITS",
    "Backend",
    "BipolarConfig",
    "QuantMethod",
    "WeightLayout",
    "check_activation_bits",
    "check_bits",
    "check_group_size",
    "parse_backend",
    "parse_method",
    "weight_layout",
]

WEIGHT_BITS = tuple(range(1, 9))
"""Integer code widths of the bipolar-INT format (weights and quantized activations)."""
FLOAT_ACTIVATION_BITS = 16
"""``a_bits`` value meaning: activations stay float (bf16/fp16/fp32), weight-only quantization."""
ACTIVATION_BITS = (*WEIGHT_BITS, FLOAT_ACTIVATION_BITS)


class Backend(StrEnum):
    """Which implementation runs a bipolar matmul.

    ``AUTO`` picks compiled Triton for CUDA tensors, the Triton interpreter when
    ``TRITON_INTERPRET=1``, and the exact torch reference otherwise; it never
    raises for lack of hardware. An explicit choice that cannot run raises with
    the reason.
    """

    AUTO = "auto"
    TRITON = "triton"
    """One int8 x int8 -> int32 ``tl.dot`` per tile on signed-centred codes (identity B)."""
    TRITON_BITPLANE = "triton_bitplane"
    """The paper's bit-plane decomposition: a*w binary plane products, shift-add recovery."""
    REFERENCE = "reference"
    """Pure torch, exact (int64 results); the CPU fallback and the test oracle."""


class QuantMethod(StrEnum):
    """How a quantization scale is chosen for each channel / token / K-group."""

    ABSMAX = "absmax"
    """Outer levels at +-absmax: cheap, but poor at 1-3 bits (the grid has no zero)."""
    MSE = "mse"
    """Clip-ratio search minimizing squared error; the default."""
    MEANABS = "meanabs"
    """Scale mean|x| / 2^(bits-1): the optimal 1-bit (XNOR) scale, generalized."""


class WeightLayout(StrEnum):
    """How a packed weight holds its codes (``PackedWeight.data``)."""

    BITPLANES = "bitplanes"
    """uint8 [bits, N, ceil(K / 8)] (:func:`~bitscale.kernels.pack_bitplanes`): any
    width, the fewest bytes for 3, 5, 6 and 7 bits."""
    CODE_WORDS = "code_words"
    """int32 [N, 4 * ceil(K / (128 // bits))]: codes along K, in runs of four words
    (128 bits, 128 // bits codes); widths 1, 2, 4 and 8. Code r of a run lies in word
    (r // 2) % 4, at bit 16 * (r % 2) + bits * (r // 8): K-adjacent codes 2j and 2j + 1
    share a word, 16 bits apart as two 16-bit floats in one register, and a word holds
    the pairs at K offsets 2c, 2c + 8, 2c + 16, ... (c its place in the run), exactly the
    pairs one lane of a 16-bit MMA operand fragment holds (mma.sync m16n8k16 and
    wgmma's register operand give lane l the K-pairs 2 (l % 4) mod 8). So the levels a
    lane unpacks are the ones it feeds the MMA, with no shuffle through shared memory
    between them: 3.55 against 4.38 SASS instructions per W4 code in the swapped
    (16, 64, 256) decode tile's K loop, where one code word held 32 // bits K-adjacent
    codes (Triton 3.6). A K-group starts on a run.

    A code comes out with a constant shift and mask where bit planes gather its bits
    first; the float-activation decode GEMV turns it into a float level with one
    masking LOP3 and one FADD, and the dot tiles a pair of codes into two 16-bit levels
    with one shift, one LOP3 and one HADD2 (1-bit pairs with one shift and two LOP3s:
    their bits are the sign bits of two -1s). 4.3 against 8.6 SASS instructions per W4
    code in the (1, 32, 256) GEMV's K loop, 6.6 against 11.0 in the integer GEMM's
    (16, 32, 128) (scripts/sass_stats.py, Triton 3.9)."""


CODE_WORD_BITS = (1, 2, 4, 8)
"""Widths with a :attr:`WeightLayout.CODE_WORDS` layout: those that tile a 32-bit word."""

CODE_WORD_RUN = 128
"""Bits in a run of four code words, the unit :attr:`WeightLayout.CODE_WORDS` orders
codes in: 128 // bits codes (128 at 1 bit, 64 at 2, 32 at 4, 16 at 8)."""


def weight_layout(w_bits: int, group_size: int | None) -> WeightLayout:
    """The layout layers pack into: code words where the width tiles a word and every
    K-group starts on a run of code words, bit planes otherwise."""
    if w_bits in CODE_WORD_BITS and (
        group_size is None or group_size % (CODE_WORD_RUN // w_bits) == 0
    ):
        return WeightLayout.CODE_WORDS
    return WeightLayout.BITPLANES


_Choice = TypeVar("_Choice", bound=StrEnum)


def _parse_choice(choices: type[_Choice], value: object, name: str) -> _Choice:
    """``value`` as a member of ``choices``, or a ValueError listing the allowed names."""
    try:
        return choices(value)
    except ValueError:
        allowed = ", ".join(repr(choice.value) for choice in choices)
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}") from None


def parse_method(method: object) -> QuantMethod:
    """Return ``method`` as a QuantMethod, or raise ValueError listing the allowed names."""
    return _parse_choice(QuantMethod, method, "method")


def parse_backend(backend: object) -> Backend:
    """Return ``backend`` as a Backend, or raise ValueError listing the allowed names."""
    return _parse_choice(Backend, backend, "backend")


def check_bits(bits: object, name: str = "bits") -> int:
    """Return ``bits`` if it is an integer code width in 1..8, else raise ValueError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in WEIGHT_BITS:
        raise ValueError(f"{name} must be an int in 1..8, got {bits!r}")
    return bits


def check_activation_bits(bits: object, name: str = "a_bits") -> int:
    """Return ``bits`` if it is 1..8 or 16 (float activations), else raise ValueError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ACTIVATION_BITS:
        raise ValueError(
            f"{name} must be an int in 1..8, or 16 for float (weight-only) activations, "
            f"got {bits!r}"
        )
    return bits


def check_group_size(group_size: object, k: int) -> int | None:
    """Validate a K-group size against the reduction length ``k``; None means one group."""
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
    if k % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide K={k}; pick a divisor of K "
            "or group_size=None (one scale per channel/token)"
        )
    return group_size


@dataclass(frozen=True, kw_only=True, slots=True)
class BipolarConfig:
    """How :class:`~bitscale.kernels.BipolarLinear` layers quantize and run."""

    w_bits: int
    """Weight code width, 1..8."""
    a_bits: int = FLOAT_ACTIVATION_BITS
    """Activation code width, 1..8 (dynamic per-token quantization), or 16 (float activations)."""
    group_size: int | None = None
    """K elements sharing one scale; None = one scale per output channel / token."""
    method: QuantMethod = QuantMethod.MSE
    """Weight scale selection."""
    activation_method: QuantMethod = QuantMethod.ABSMAX
    """Dynamic activation scale selection (the fused Triton quantizer implements absmax)."""
    backend: Backend = Backend.AUTO
    """Which implementation runs the matmul in eval mode."""

    def __post_init__(self) -> None:
        check_bits(self.w_bits, "w_bits")
        check_activation_bits(self.a_bits, "a_bits")
        if self.group_size is not None:
            check_group_size(self.group_size, self.group_size)
        object.__setattr__(self, "method", parse_method(self.method))
        object.__setattr__(self, "activation_method", parse_method(self.activation_method))
        object.__setattr__(self, "backend", parse_backend(self.backend))
        if self.backend is Backend.TRITON_BITPLANE:
            raise ValueError(
                "backend 'triton_bitplane' implements bipolar_mm_int only; a BipolarLinear "
                "runs on 'auto', 'triton' or 'reference'"
            )
