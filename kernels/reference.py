"""Exact pure-torch bipolar matmul: the CPU fallback and the oracle for every kernel.

Notation (research note 1.3): activations X = 2*Ux - (2^a - 1), weights
W = 2*Uw - (2^w - 1). With the signed-centred codes S = Ux - 2^(a-1) and
T = Uw - 2^(w-1) (both in [-128, 127]), X = 2S + 1, W = 2T + 1 and

    X @ W^T = 4 * (S @ T^T) + 2 * rowsum(S) 1^T + 2 * 1 rowsum(T)^T + K     (identity B)

Torch's CPU integer matmul is orders of magnitude slower than float (27.7 s
vs 0.28 s at 512x4096x4096 on 2 cores, research note 4), so S @ T^T runs as a
float32 matmul over K-chunks short enough that every partial sum is an integer
below 2^24 and therefore exact, and the chunks are summed in int64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from bitscale.kernels.config import (
    CODE_WORD_BITS,
    CODE_WORD_RUN,
    FLOAT_ACTIVATION_BITS,
    QuantMethod,
    WeightLayout,
    check_bits,
    parse_method,
    weight_layout,
)
from bitscale.kernels.format import (
    BipolarTensor,
    _dequantize_codes,
    _unpack_trusted,
    dequantize,
    fake_quantize,
    pack_bitplanes,
)

__all__ = [
    "PackedWeight",
    "bipolar_linear_reference",
    "bipolar_mm_int_reference",
    "centred_codes",
    "check_mm_codes",
    "code_word_count",
    "dequantize_packed",
    "dequantized_linear",
    "pack_code_words",
    "pack_weight",
    "packed_out_features",
    "unpack_code_words",
]

_FP32_EXACT_INTEGERS = 1 << 24


def centred_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed-centred int8 codes ``U - 2^(bits-1)`` (range [-128, 127] for bits <= 8)."""
    return (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def check_mm_codes(x_codes: torch.Tensor, w_codes: torch.Tensor, a_bits: int, w_bits: int) -> None:
    """Validate the inputs of ``bipolar_mm_int``: uint8 [M, K] and [N, K] codes."""
    check_bits(a_bits, "a_bits")
    check_bits(w_bits, "w_bits")
    for name, codes, bits in (("x_codes", x_codes, a_bits), ("w_codes", w_codes, w_bits)):
        if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
            got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise TypeError(f"{name} must be a uint8 tensor of bipolar codes, got {got}")
        if codes.dim() != 2:
            raise ValueError(f"{name} must be 2-d, got shape {tuple(codes.shape)}")
        if bits < 8 and codes.numel() and int(codes.max()) >> bits:
            raise ValueError(f"{name} hold values >= 2^{bits}; they are not {bits}-bit codes")
    if x_codes.shape[1] != w_codes.shape[1]:
        raise ValueError(
            f"K mismatch: x_codes is {tuple(x_codes.shape)} ([M, K]) but w_codes is "
            f"{tuple(w_codes.shape)} ([N, K]); both must share K"
        )
    if x_codes.device != w_codes.device:
        raise ValueError(f"x_codes are on {x_codes.device} but w_codes on {w_codes.device}")


def _fp32_matmul_is_exact(device: torch.device) -> bool:
    # TF32 / bf16 reduced-precision matmul would round the integer partial sums.
    return device.type == "cpu" and torch.get_float32_matmul_precision() == "highest"


def _centred_product(s: torch.Tensor, t: torch.Tensor, a_bits: int, w_bits: int) -> torch.Tensor:
    """Exact int64 S @ T^T for float-held integer codes s [..., M, K], t [..., N, K]."""
    k = s.shape[-1]
    if not _fp32_matmul_is_exact(s.device):
        # |sum S*T| <= K * 2^14 < 2^53: float64 is exact at any realistic K.
        return (s.double() @ t.double().transpose(-1, -2)).to(torch.int64)
    # |S| <= 2^(a-1) and |T| <= 2^(w-1), so a chunk of this length keeps every
    # partial sum below 2^24 (1024 for W8A8, 2^24 for W1A1).
    chunk = max(1, _FP32_EXACT_INTEGERS >> (a_bits + w_bits - 2))
    total = torch.zeros((*s.shape[:-1], t.shape[-2]), dtype=torch.int64, device=s.device)
    for start in range(0, k, chunk):
        part = s[..., start : start + chunk] @ t[..., start : start + chunk].transpose(-1, -2)
        total += part.to(torch.int64)
    return total


def bipolar_mm_int_reference(
    x_codes: torch.Tensor, w_codes: torch.Tensor, *, a_bits: int, w_bits: int
) -> torch.Tensor:
    """Exact int64 ``(2Ux - (2^a-1)) @ (2Uw - (2^w-1))^T`` for uint8 codes [M, K], [N, K]."""
    check_mm_codes(x_codes, w_codes, a_bits, w_bits)
    k = x_codes.shape[1]
    s = x_codes.to(torch.float32) - (1 << (a_bits - 1))
    t = w_codes.to(torch.float32) - (1 << (w_bits - 1))
    product = _centred_product(s, t, a_bits, w_bits)
    row_s = s.sum(1, dtype=torch.float64).to(torch.int64)
    row_t = t.sum(1, dtype=torch.float64).to(torch.int64)
    return 4 * product + 2 * row_s[:, None] + 2 * row_t[None, :] + k


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A [N, K] weight in kernel layout: its packed codes plus what the epilogue needs."""

    data: torch.Tensor
    """The codes, as ``layout`` says (:class:`~bitscale.kernels.config.WeightLayout`)."""
    scales: torch.Tensor
    """float32 [N, groups]."""
    centred_rowsums: torch.Tensor
    """int32 [N, groups]: sum of T = U - 2^(bits-1) over each K-group."""
    bits: int
    in_features: int
    group_size: int | None
    layout: WeightLayout = WeightLayout.BITPLANES

    @property
    def out_features(self) -> int:
        return packed_out_features(self.data, self.layout)

    @property
    def group_k(self) -> int:
        return self.in_features if self.group_size is None else self.group_size


def packed_out_features(data: torch.Tensor, layout: WeightLayout | str) -> int:
    """N of packed weight data: planes are [bits, N, bytes], code words [N, words]."""
    return data.shape[1] if layout == WeightLayout.BITPLANES else data.shape[0]


def _code_word_places(
    bits: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each code r of a run of four code words lies (``WeightLayout.CODE_WORDS``):
    its word in the run, (r // 2) % 4, and its first bit, 16 * (r % 2) + bits * (r // 8);
    int64 [CODE_WORD_RUN // bits] each."""
    r = torch.arange(CODE_WORD_RUN // bits, device=device, dtype=torch.int64)
    return (r // 2) % 4, 16 * (r % 2) + bits * (r // 8)


def code_word_count(bits: int, k: int) -> int:
    """Code words per row of K codes: whole runs of four (``WeightLayout.CODE_WORDS``)."""
    return 4 * -(-k // (CODE_WORD_RUN // bits))


def pack_code_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [N, code_word_count(bits, K)] code words (``WeightLayout.CODE_WORDS``) of
    uint8 codes [N, K]; a last, partial run of words is padded with zero codes."""
    if bits not in CODE_WORD_BITS:
        raise ValueError(
            f"code words hold {', '.join(map(str, CODE_WORD_BITS))}-bit codes, got bits={bits}"
        )
    n, k = codes.shape
    per_run = CODE_WORD_RUN // bits
    runs = -(-k // per_run)
    padded = torch.zeros((n, runs * per_run), dtype=torch.int64, device=codes.device)
    padded[:, :k] = codes
    word, shift = _code_word_places(bits, codes.device)
    # Each word's codes occupy disjoint bits, so adding them is OR-ing them.
    words = torch.zeros((n, runs, 4), dtype=torch.int64, device=codes.device)
    words.index_add_(2, word, padded.view(n, runs, per_run) << shift)
    words = words.view(n, 4 * runs)
    return (words - ((words >> 31) << 32)).to(torch.int32)  # the uint32 bits, as int32


def unpack_code_words(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """uint8 codes [N, K] of int32 code words [N, code_word_count(bits, K)]."""
    word, shift = _code_word_places(bits, words.device)
    runs = words.view(*words.shape[:-1], words.shape[-1] // 4, 4).to(torch.int64)
    codes = (runs[..., word] >> shift) & ((1 << bits) - 1)
    return codes.flatten(-2)[..., :k].to(torch.uint8)


def dequantize_packed(
    data: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    k: int,
    group_size: int | None,
    layout: WeightLayout | str = WeightLayout.BITPLANES,
) -> torch.Tensor:
    """float32 [N, K]: what dequantize() gives for a packed weight's data and scales,
    without its checks of data this package packed (they would stop torch.compile)."""
    if layout == WeightLayout.BITPLANES:
        codes = _unpack_trusted(data, bits, k)
    else:
        codes = unpack_code_words(data, bits, k)
    return _dequantize_codes(codes, scales, bits, 1, group_size)


def pack_weight(
    w: BipolarTensor, *, layout: WeightLayout | str = WeightLayout.BITPLANES
) -> PackedWeight:
    """Kernel layout of a 2-d weight quantized along K (its last axis): bit planes, or
    code words (:class:`~bitscale.kernels.config.WeightLayout`) where ``weight_layout``
    allows them."""
    if not isinstance(w, BipolarTensor):
        raise TypeError(f"the weight must be a BipolarTensor, got {type(w).__name__}")
    if w.codes.dim() != 2 or w.axis != 1:
        raise ValueError(
            f"the weight must be 2-d [N, K] quantized along K (axis=-1), got shape "
            f"{tuple(w.shape)} with axis={w.axis}"
        )
    layout = WeightLayout(layout)
    n, k = w.shape
    if (
        layout is WeightLayout.CODE_WORDS
        and weight_layout(w.bits, w.group_size) is not WeightLayout.CODE_WORDS
    ):
        raise ValueError(
            f"code words hold {', '.join(map(str, CODE_WORD_BITS))}-bit weights whose "
            f"K-groups start on a run of four words ({CODE_WORD_RUN} bits); got {w.bits} "
            f"bits, group_size={w.group_size}: pack bit planes instead"
        )
    group = k if w.group_size is None else w.group_size
    centred = w.codes.to(torch.int32) - (1 << (w.bits - 1))
    rowsums = centred.view(n, k // group, group).sum(-1, dtype=torch.int32)
    if layout is WeightLayout.BITPLANES:
        data = pack_bitplanes(w.codes, w.bits)
    else:
        data = pack_code_words(w.codes, w.bits)
    return PackedWeight(
        data=data,
        scales=w.scales.contiguous(),
        centred_rowsums=rowsums.contiguous(),
        bits=w.bits,
        in_features=k,
        group_size=w.group_size,
        layout=layout,
    )


def dequantized_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    group_size: int | None,
    a_bits: int = FLOAT_ACTIVATION_BITS,
    activation_method: QuantMethod | str = QuantMethod.ABSMAX,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ weight^T (+ bias)`` in float32 for an already dequantized float32 weight [N, K].

    With ``a_bits <= 8`` the activations are first quantized per token (per
    K-group of ``group_size``) with ``activation_method`` and dequantized.
    Output in ``x.dtype``.
    """
    if a_bits != FLOAT_ACTIVATION_BITS:
        # fake_quantize is dequantize(quantize(x)) exactly, without the uint8 codes round
        # trip and quantize's NaN check (a host sync): 6.2 -> 3.0 ms for 256 x 2048
        # activations on one core. NaN activations give NaN rows, as in nn.Linear.
        activations = fake_quantize(x, a_bits, group_size, parse_method(activation_method))
    else:
        activations = x.to(torch.float32)
    out = activations @ weight.t()
    if bias is not None:
        out += bias.to(torch.float32)
    return out.to(x.dtype)


def bipolar_linear_reference(
    x: torch.Tensor,
    w: BipolarTensor,
    *,
    a_bits: int = FLOAT_ACTIVATION_BITS,
    activation_method: QuantMethod | str = QuantMethod.ABSMAX,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ dequantize(w)^T (+ bias)`` in float32, output in ``x.dtype``.

    With ``a_bits <= 8`` the activations are first quantized per token (per
    K-group when ``w`` is grouped) with ``activation_method``. The product of
    dequantized operands equals the scaled integer identity up to float32
    rounding; the integer core itself is checked exactly by bipolar_mm_int.
    """
    return dequantized_linear(
        x,
        dequantize(w),
        group_size=w.group_size,
        a_bits=a_bits,
        activation_method=activation_method,
        bias=bias,
    )
