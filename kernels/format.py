"""The bipolar-INT format in pure torch: codes, quantization, bit-plane packing.

An n-bit bipolar-INT code reads every bit as -1 (bit 0) or +1 (bit 1). With U
the unsigned reading of the bits, ``value = 2U - (2^n - 1)``: the levels are the
odd integers in ``[-(2^n - 1), 2^n - 1]`` and there is no zero. Codes are stored
as ``uint8`` holding U.

Quantization is symmetric: ``x ~= value * scale`` with one float32 scale per
channel (or token), optionally per K-group of ``group_size`` elements along
``axis``. Every function here is exact integer logic or plain float32 torch
arithmetic, so the Triton activation quantizer can reproduce codes bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from bitscale.kernels.config import QuantMethod, check_bits, check_group_size, parse_method

__all__ = [
    "BipolarTensor",
    "codes_from_scales",
    "decode",
    "dequantize",
    "encode",
    "fake_quantize",
    "pack_bitplanes",
    "quantize",
    "unpack_bitplanes",
]

# QuantMethod.MSE searches the clip ratio (scale = ratio * absmax / levels) in
# two passes: 16 coarse ratios i/16, then 15 fine ones j/128 around each row's
# best. The best ratio on Gaussian data is ~0.21 at 1 bit and ~0.67 at 4 bits
# (research note 1.2) and K-groups push it up, so (0, 1] is searched; 31 error
# evaluations with a 1/128 resolution cost half of a flat 1/64 grid.
_COARSE_CLIP_COUNT = 16
_FINE_CLIP_COUNT = 14  # the best coarse ratio, then +-1/128 .. +-7/128 around it
_CLIP_SEARCH_ELEMENTS = 1 << 24


def _clip_candidates(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The coarse ratios i/16 and the fine steps j/128 (j != 0), made on ``device``: a
    copy from host memory would sync the stream, which CUDA-graph capture forbids (the
    activation quantizer runs inside the kernels' custom op)."""
    coarse = torch.arange(1, _COARSE_CLIP_COUNT + 1, dtype=torch.float32, device=device) / 16
    half = _FINE_CLIP_COUNT // 2
    below = torch.arange(-half, 0, dtype=torch.float32, device=device)
    steps = torch.cat([below, -below.flip(0)]) / 128
    return coarse, steps


def _levels(bits: int) -> int:
    return (1 << bits) - 1


def encode(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Exact codes (uint8 U) of bipolar values: odd integers in [-(2^bits-1), 2^bits-1]."""
    check_bits(bits)
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if values.is_complex() or values.dtype == torch.bool:
        raise TypeError(f"values must be a real integer or float tensor, got {values.dtype}")
    if values.is_floating_point():
        if not torch.isfinite(values).all():
            raise ValueError("values contain NaN or Inf; bipolar values are odd integers")
        if not torch.equal(values, values.round()):
            raise ValueError("values are not integers; bipolar values are odd integers")
    integers = values.to(torch.int64)
    top = _levels(bits)
    if integers.numel() and (integers.abs().max() > top or (integers % 2 == 0).any()):
        raise ValueError(
            f"values must be odd integers in [-{top}, {top}] for bits={bits}; "
            "use quantize() to map arbitrary floats onto the grid"
        )
    return ((integers + top) // 2).to(torch.uint8)


def _check_codes(codes: torch.Tensor, bits: int, name: str = "codes") -> None:
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise TypeError(f"{name} must be a uint8 tensor of bipolar codes, got {got}")
    if bits < 8 and codes.numel() and int(codes.max()) >> bits:
        raise ValueError(f"{name} hold values >= 2^{bits}; they are not {bits}-bit codes")


def decode(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The bipolar values (int32) of uint8 codes: ``2U - (2^bits - 1)``."""
    check_bits(bits)
    _check_codes(codes, bits)
    return codes.to(torch.int32) * 2 - _levels(bits)


def codes_from_scales(x: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest-level codes of float32 ``x`` given broadcastable float32 ``scales``.

    ``U = clamp(floor(x / (2 * scale) + 2^(bits-1)), 0, 2^bits - 1)``: one IEEE
    division and one add, in this order, so the Triton quantizer (``div_rn``)
    reproduces it exactly. A zero scale (an all-zero group) gives level +1, and
    dequantizes to exactly 0.
    """
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    half_range = float(1 << (bits - 1))
    return torch.floor(x / (safe * 2) + half_range).clamp_(0, _levels(bits)).to(torch.uint8)


@dataclass(frozen=True, eq=False)
class BipolarTensor:
    """A quantized tensor: ``dequantize(q) = (2 * codes - (2^bits - 1)) * scales``.

    ``scales`` has the shape of ``codes`` with dimension ``axis`` replaced by the
    number of K-groups (1 when ``group_size`` is None).
    """

    codes: torch.Tensor
    """uint8 codes U, the shape of the quantized tensor."""
    scales: torch.Tensor
    """float32 scales, one per channel (and K-group) along ``axis``."""
    bits: int
    """Code width, 1..8."""
    axis: int = -1
    """The reduction (K) dimension the scales are shared along; stored non-negative."""
    group_size: int | None = None
    """K elements per scale; None = one scale over the whole axis."""

    def __post_init__(self) -> None:
        check_bits(self.bits)
        _check_codes(self.codes, self.bits)
        if self.codes.dim() == 0:
            raise ValueError("codes must have at least one dimension")
        ndim = self.codes.dim()
        if not -ndim <= self.axis < ndim:
            raise ValueError(f"axis={self.axis} is out of range for a {ndim}-d tensor")
        object.__setattr__(self, "axis", self.axis % ndim)
        k = self.codes.shape[self.axis]
        check_group_size(self.group_size, k)
        if not isinstance(self.scales, torch.Tensor) or self.scales.dtype != torch.float32:
            raise TypeError("scales must be a float32 tensor")
        expected = list(self.codes.shape)
        expected[self.axis] = self.num_groups
        if list(self.scales.shape) != expected:
            raise ValueError(
                f"scales have shape {tuple(self.scales.shape)}, expected {tuple(expected)} "
                f"for codes {tuple(self.codes.shape)}, axis={self.axis}, "
                f"group_size={self.group_size}"
            )
        if self.scales.device != self.codes.device:
            raise ValueError(f"scales are on {self.scales.device} but codes on {self.codes.device}")

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def num_groups(self) -> int:
        k = self.codes.shape[self.axis]
        return 1 if self.group_size is None else k // self.group_size

    def values(self) -> torch.Tensor:
        """The integer levels (int32), without scales."""
        return decode(self.codes, self.bits)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)

    @property
    def device(self) -> torch.device:
        """Where the codes and scales are (always the same device)."""
        return self.codes.device

    # Device moves follow torch.Tensor's: ``self`` when nothing changes, ``non_blocking``
    # copies from pinned memory. The codes and scales move as they are, without
    # __post_init__'s checks (a host sync on the codes' maximum): they were checked once.
    def to(
        self,
        device: torch.device | str | int | None = None,
        *,
        non_blocking: bool = False,
        copy: bool = False,
    ) -> BipolarTensor:
        """This tensor on ``device`` (None: where it is); ``copy`` forces new storage.
        Codes stay uint8 and scales float32: ``dequantize(dtype)`` gives floats."""
        if isinstance(device, torch.dtype):
            raise ValueError(
                f"a BipolarTensor keeps uint8 codes and float32 scales and cannot become "
                f"{device}; use .dequantize({device}) for a float tensor"
            )
        device = self.device if device is None else torch.device(device)
        return self._moved(
            self.codes.to(device, non_blocking=non_blocking, copy=copy),
            self.scales.to(device, non_blocking=non_blocking, copy=copy),
        )

    def cuda(
        self, device: torch.device | str | int | None = None, *, non_blocking: bool = False
    ) -> BipolarTensor:
        """On a CUDA device (the current one when ``device`` is None), as Tensor.cuda."""
        return self._moved(
            self.codes.cuda(device, non_blocking=non_blocking),
            self.scales.cuda(device, non_blocking=non_blocking),
        )

    def cpu(self) -> BipolarTensor:
        return self._moved(self.codes.cpu(), self.scales.cpu())

    def pin_memory(self) -> BipolarTensor:
        """Codes and scales in page-locked host memory, for ``.to("cuda", non_blocking=True)``
        (CPU tensors only, as Tensor.pin_memory)."""
        return self._moved(self.codes.pin_memory(), self.scales.pin_memory())

    def is_pinned(self) -> bool:
        return self.codes.is_pinned() and self.scales.is_pinned()

    def _moved(self, codes: torch.Tensor, scales: torch.Tensor) -> BipolarTensor:
        if codes is self.codes and scales is self.scales:
            return self
        moved = object.__new__(BipolarTensor)
        for name, value in (
            ("codes", codes),
            ("scales", scales),
            ("bits", self.bits),
            ("axis", self.axis),
            ("group_size", self.group_size),
        ):
            object.__setattr__(moved, name, value)
        return moved


def _grouped(x: torch.Tensor, axis: int, group_size: int | None) -> torch.Tensor:
    """View ``x`` as [..., num_groups, group] with the grouped axis moved last."""
    moved = x.movedim(axis, -1)
    k = moved.shape[-1]
    group = k if group_size is None else group_size
    return moved.reshape(*moved.shape[:-1], k // group, group)


def _ungrouped(grouped: torch.Tensor, axis: int) -> torch.Tensor:
    return grouped.flatten(-2).movedim(-1, axis)


def _scaled_error(x: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Squared error of quantizing ``x`` [..., group] with ``scales`` [..., 1], up to rounding.

    Computed in the level domain, ``4 * scale^2 * sum((U - L/2 - x / (2 scale))^2)``,
    with in-place ops: it only ranks candidate scales.
    """
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    half_steps = x * (0.5 / safe)
    codes = (half_steps + float(1 << (bits - 1))).floor_().clamp_(0, _levels(bits))
    deviation = codes.sub_(half_steps).sub_(_levels(bits) / 2)
    return deviation.square_().sum(-1, keepdim=True) * (4 * scales.square())


def _search_clip(
    x: torch.Tensor, absmax: torch.Tensor, ratios: torch.Tensor, bits: int
) -> torch.Tensor:
    """Per-row best clip ratio: x [R, G], absmax [R, 1], candidates [C, R or 1, 1] -> [R, 1].

    All candidates are scored in one broadcast pass; ties keep the first
    candidate (argmin returns the first minimum).
    """
    ratios = ratios.expand(-1, x.shape[0], 1)
    errors = _scaled_error(x.unsqueeze(0), absmax * ratios / _levels(bits), bits)
    return ratios.gather(0, errors.argmin(0, keepdim=True)).squeeze(0)


def _choose_scales(x: torch.Tensor, bits: int, method: QuantMethod) -> torch.Tensor:
    """Scales [..., groups, 1] for float32 ``x`` of shape [..., groups, group]."""
    top = _levels(bits)
    if method is QuantMethod.MEANABS:
        return x.abs().mean(-1, keepdim=True) / float(1 << (bits - 1))
    absmax = x.abs().amax(-1, keepdim=True)
    if method is QuantMethod.ABSMAX:
        return absmax / top
    # Rows are searched in slices of <= 2^24 candidate-elements (64 MiB of float32
    # per temporary; one row at a time past 2^20 elements a row), so memory stays
    # bounded for any weight (an 8192 x 28672 one would need 29 GiB at once) while
    # each pass is a few large ops: a 4096 x 4096 weight takes 4 slices, where 2^18
    # took 1,024 (about 20 kernel launches each on a GPU, per QAT forward: the
    # 15-19 s QAT steps measured on an H200).
    rows_x = x.reshape(-1, x.shape[-1])
    rows_absmax = absmax.reshape(-1, 1)
    count = max(_COARSE_CLIP_COUNT, _FINE_CLIP_COUNT + 1)
    step = max(1, _CLIP_SEARCH_ELEMENTS // (count * max(1, x.shape[-1])))
    coarse, steps = (candidates.view(-1, 1, 1) for candidates in _clip_candidates(x.device))
    ratios = []
    for start in range(0, rows_x.shape[0], step):
        part_x = rows_x[start : start + step]
        part_absmax = rows_absmax[start : start + step]
        best = _search_clip(part_x, part_absmax, coarse, bits)
        fine = torch.cat([best.unsqueeze(0), (best.unsqueeze(0) + steps).clamp_(1 / 128, 1.0)])
        ratios.append(_search_clip(part_x, part_absmax, fine, bits))
    best_ratio = torch.cat(ratios).view_as(absmax) if ratios else torch.ones_like(absmax)
    return absmax * best_ratio / top


def quantize(
    x: torch.Tensor,
    bits: int,
    *,
    axis: int = -1,
    group_size: int | None = None,
    method: QuantMethod | str = QuantMethod.MSE,
) -> BipolarTensor:
    """Quantize a float tensor onto the ``bits``-bit bipolar grid.

    One scale per slice along ``axis`` (per output channel for a weight [N, K],
    per token for activations [M, K], both with ``axis=-1``), or per K-group of
    ``group_size`` elements. ``method``: "mse" (clip-ratio search, the default),
    "absmax", or "meanabs" (the natural 1-bit choice).
    """
    check_bits(bits)
    method = parse_method(method)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"quantize needs a floating-point tensor, got {got}")
    if x.dim() == 0:
        raise ValueError("quantize needs a tensor with at least one dimension")
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis={axis} is out of range for a {x.dim()}-d tensor")
    axis %= x.dim()
    group_size = check_group_size(group_size, x.shape[axis])
    if x.shape[axis] == 0:
        raise ValueError("quantize needs a non-empty axis to compute scales over")
    x = x.detach().to(torch.float32)  # what the scales are computed in
    if not torch.isfinite(x).all():
        raise ValueError(
            "x contains NaN or Inf (or values past float32's range, 3.4e38); quantize "
            "needs finite values"
        )
    codes, scales = _grouped_codes(x, bits, axis, group_size, method)
    return BipolarTensor(
        codes=_ungrouped(codes, axis).contiguous(),
        scales=scales.squeeze(-1).movedim(-1, axis).contiguous(),
        bits=bits,
        axis=axis,
        group_size=group_size,
    )


def fake_quantize(
    x: torch.Tensor, bits: int, group_size: int | None, method: QuantMethod
) -> torch.Tensor:
    """``dequantize(quantize(x, ...))`` along the last axis, without input checks.

    The training-time path (no host sync for a NaN check); float32 result,
    detached from ``x``. Callers validate bits and group_size once up front.
    """
    codes, scales = _grouped_codes(x, bits, -1, group_size, method)
    return _ungrouped((codes.to(torch.float32) * 2 - _levels(bits)) * scales, -1)


def _quantize_codes(
    x: torch.Tensor, bits: int, group_size: int | None, method: QuantMethod
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize(x, ...)``'s codes (uint8 [..., K]) and scales (float32 [..., K / group])
    along the last axis, without its checks: no host sync, so kernels can run it inside
    CUDA-graph capture. Callers validate bits and group_size."""
    codes, scales = _grouped_codes(x, bits, -1, group_size, method)
    return _ungrouped(codes, -1).contiguous(), scales.squeeze(-1).contiguous()


def dequantize(q: BipolarTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float tensor ``(2U - (2^bits - 1)) * scale`` that ``q`` stands for."""
    if not isinstance(q, BipolarTensor):
        raise TypeError(f"dequantize needs a BipolarTensor, got {type(q).__name__}")
    return _dequantize_codes(q.codes, q.scales, q.bits, q.axis, q.group_size).to(dtype)


def _grouped_codes(
    x: torch.Tensor, bits: int, axis: int, group_size: int | None, method: QuantMethod
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [..., groups, group] of float ``x`` moved to groups along ``axis``, and their
    scales [..., groups, 1]: the quantizer shared by quantize and its unchecked forms."""
    grouped = _grouped(x.detach().to(torch.float32), axis, group_size)
    scales = _choose_scales(grouped, bits, method)
    return codes_from_scales(grouped, scales, bits), scales


def _dequantize_codes(
    codes: torch.Tensor, scales: torch.Tensor, bits: int, axis: int, group_size: int | None
) -> torch.Tensor:
    """float32 ``(2U - (2^bits - 1)) * scale`` without validating the codes."""
    levels = _grouped(codes.to(torch.float32) * 2 - _levels(bits), axis, group_size)
    return _ungrouped(levels * scales.movedim(axis, -1).unsqueeze(-1), axis)


def pack_bitplanes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-plane layout along K (the paper's matrix preprocessing).

    ``codes`` [..., K] (uint8) becomes ``packed`` [bits, ..., ceil(K / 8)]
    (uint8): plane j holds bit j of every code, element k in byte k // 8 at bit
    k % 8. Bits past K in the last byte are zero. Any K works.
    """
    check_bits(bits)
    _check_codes(codes, bits)
    if codes.dim() == 0:
        raise ValueError("codes must have at least one dimension (K is the last)")
    k = codes.shape[-1]
    padded = torch.nn.functional.pad(codes, (0, (-k) % 8))
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    planes = (padded.unsqueeze(0) >> shifts.view(-1, *([1] * codes.dim()))) & 1
    planes = planes.reshape(*planes.shape[:-1], padded.shape[-1] // 8, 8)
    weights = torch.tensor([1 << i for i in range(8)], device=codes.device, dtype=torch.uint8)
    return (planes * weights).sum(-1, dtype=torch.uint8).contiguous()


def unpack_bitplanes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_bitplanes`: uint8 codes [..., k] from planes [bits, ..., ceil(k/8)]."""
    check_bits(bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise TypeError(f"packed must be a uint8 tensor, got {got}")
    if not packed.is_contiguous():
        raise ValueError("packed bit planes must be contiguous; call .contiguous() first")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    num_bytes = (k + 7) // 8
    if packed.dim() < 2 or packed.shape[0] != bits or packed.shape[-1] != num_bytes:
        raise ValueError(
            f"packed has shape {tuple(packed.shape)}; {bits}-bit planes of K={k} need "
            f"shape ({bits}, ..., {num_bytes})"
        )
    if k % 8 and (packed[..., -1] >> (k % 8)).any():
        raise ValueError("packed has set bits past K in its last byte; it is not a packing of K")
    return _unpack_trusted(packed, bits, k)


def _unpack_trusted(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """:func:`unpack_bitplanes` without its checks, for planes this package packed itself.

    Nothing in it depends on the data, so it traces under torch.compile.
    """
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    planes = ((packed.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., :k]
    plane_weights = torch.tensor([1 << j for j in range(bits)], device=packed.device)
    plane_weights = plane_weights.to(torch.uint8).view(-1, *([1] * (planes.dim() - 1)))
    return (planes * plane_weights).sum(0, dtype=torch.uint8)
