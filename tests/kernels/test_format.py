"""The bipolar-INT format: codes, bit planes, quantization (pure torch)."""

from __future__ import annotations

import pytest
import torch
from bitscale.kernels import (
    BipolarTensor,
    decode,
    dequantize,
    encode,
    pack_bitplanes,
    quantize,
    unpack_bitplanes,
)
from bitscale.kernels.config import QuantMethod
from bitscale.kernels.format import fake_quantize
from hypothesis import given, settings
from hypothesis import strategies as st

BITS = st.integers(min_value=1, max_value=8)


@settings(max_examples=60, deadline=None)
@given(
    bits=BITS, shape=st.lists(st.integers(0, 9), min_size=1, max_size=3), seed=st.integers(0, 2**16)
)
def test_encode_decode_round_trip(bits: int, shape: list[int], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8, generator=generator)
    values = decode(codes, bits)
    assert values.dtype == torch.int32
    assert torch.equal(encode(values, bits), codes)
    assert torch.equal(encode(values.to(torch.float64), bits), codes)
    if values.numel():
        assert (values % 2 != 0).all()
        assert values.abs().max() <= 2**bits - 1


@pytest.mark.parametrize("bits", range(1, 9))
def test_levels_are_the_odd_integers(bits: int) -> None:
    codes = torch.arange(2**bits, dtype=torch.uint8)
    expected = torch.arange(-(2**bits - 1), 2**bits, 2, dtype=torch.int32)
    assert torch.equal(decode(codes, bits), expected)
    # Every bit reads as -1 (0) or +1 (1): value = sum_i (2 b_i - 1) 2^i.
    bit_values = ((codes[:, None].long() >> torch.arange(bits)) & 1) * 2 - 1
    assert torch.equal((bit_values * 2 ** torch.arange(bits)).sum(1).int(), expected)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (torch.tensor([0]), "odd integers"),
        (torch.tensor([2, 3]), "odd integers"),
        (torch.tensor([17]), r"\[-15, 15\]"),
        (torch.tensor([1.5]), "not integers"),
        (torch.tensor([float("nan")]), "NaN"),
        (torch.tensor([float("inf")]), "NaN or Inf"),
    ],
)
def test_encode_rejects_values_off_the_grid(values: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode(values, 4)


def test_decode_and_bits_validation() -> None:
    with pytest.raises(TypeError, match="uint8"):
        decode(torch.tensor([1, 2]), 2)
    with pytest.raises(ValueError, match="not 2-bit codes"):
        decode(torch.tensor([4], dtype=torch.uint8), 2)
    for bad in (0, 9, 16, 2.0, True):
        with pytest.raises(ValueError, match=r"bits must be an int in 1\.\.8"):
            decode(torch.tensor([0], dtype=torch.uint8), bad)


def test_pack_layout_is_bit_planes_along_k() -> None:
    # K = 10: element k lives in byte k // 8 at bit k % 8 of plane j = bit j of its code.
    codes = torch.tensor([[3, 0, 1, 2, 0, 0, 0, 0, 2, 1]], dtype=torch.uint8)
    packed = pack_bitplanes(codes, 2)
    assert packed.shape == (2, 1, 2) and packed.dtype == torch.uint8
    assert packed[0].tolist() == [[0b00000101, 0b10]]
    assert packed[1].tolist() == [[0b00001001, 0b01]]


@settings(max_examples=60, deadline=None)
@given(
    bits=BITS,
    lead=st.lists(st.integers(0, 4), max_size=2),
    k=st.integers(0, 70),
    seed=st.integers(0, 2**16),
)
def test_pack_unpack_round_trip(bits: int, lead: list[int], k: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (*lead, k), dtype=torch.uint8, generator=generator)
    packed = pack_bitplanes(codes, bits)
    assert packed.shape == (bits, *lead, (k + 7) // 8)
    assert torch.equal(unpack_bitplanes(packed, bits, k), codes)


def test_unpack_validation() -> None:
    codes = torch.randint(0, 8, (4, 13), dtype=torch.uint8)
    packed = pack_bitplanes(codes, 3)
    with pytest.raises(ValueError, match="contiguous"):
        unpack_bitplanes(packed.transpose(1, 2), 3, 13)
    with pytest.raises(ValueError, match=r"need shape \(3, ..., 3\)"):
        unpack_bitplanes(packed, 3, 17)
    with pytest.raises(ValueError, match=r"need shape \(2, ..., 2\)"):
        unpack_bitplanes(packed, 2, 13)
    with pytest.raises(TypeError, match="uint8"):
        unpack_bitplanes(packed.to(torch.int32), 3, 13)
    corrupt = packed.clone()
    corrupt[0, 0, 1] |= 0x80  # bit 15 of a K = 13 row
    with pytest.raises(ValueError, match="past K"):
        unpack_bitplanes(corrupt, 3, 13)
    with pytest.raises(ValueError, match="not 2-bit codes"):
        pack_bitplanes(codes, 2)


@pytest.mark.parametrize(
    ("shape", "axis", "group_size", "scales_shape"),
    [
        ((6, 12), -1, None, (6, 1)),
        ((6, 12), 1, 4, (6, 3)),
        ((6, 12), 0, 3, (2, 12)),
        ((2, 3, 8), 1, None, (2, 1, 8)),
        ((2, 3, 8), -1, 2, (2, 3, 4)),
    ],
)
@pytest.mark.parametrize("method", ["absmax", "mse", "meanabs"])
def test_quantize_scales_shape_and_dequantize(
    shape: tuple[int, ...],
    axis: int,
    group_size: int | None,
    scales_shape: tuple[int, ...],
    method: str,
) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    q = quantize(x, 3, axis=axis, group_size=group_size, method=method)
    assert q.codes.shape == x.shape and q.codes.dtype == torch.uint8
    assert q.scales.shape == scales_shape and q.scales.dtype == torch.float32
    # dequantize is (2U - 7) * the scale of the element's group, element by element.
    scale_index = torch.arange(x.shape[axis]) // (group_size or x.shape[axis])
    per_element = q.scales.index_select(axis, scale_index)
    expected = (q.codes.float() * 2 - 7) * per_element
    assert torch.equal(dequantize(q), expected)
    assert torch.equal(q.dequantize(torch.float64), expected.double())


@pytest.mark.parametrize("method", ["absmax", "mse", "meanabs"])
@pytest.mark.parametrize(("bits", "group_size"), [(1, None), (4, 8), (8, None)])
def test_fake_quantize_is_dequantize_of_quantize(
    method: str, bits: int, group_size: int | None
) -> None:
    """The torch fallback and QAT use fake_quantize in place of the codes round trip."""
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(bits), dtype=torch.bfloat16)
    expected = dequantize(quantize(x, bits, group_size=group_size, method=method))
    assert torch.equal(fake_quantize(x, bits, group_size, QuantMethod(method)), expected)


@pytest.mark.parametrize("bits", range(1, 9))
def test_absmax_codes_are_the_nearest_level(bits: int) -> None:
    x = torch.randn(8, 40, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    q = quantize(x.float(), bits, method="absmax")
    scale = q.scales.double()
    levels = torch.arange(-(2**bits - 1), 2**bits, 2, dtype=torch.float64)
    distance = (x[..., None] - levels * scale[..., None]).abs()
    chosen = (q.codes.double() * 2 - (2**bits - 1)) * scale
    # Within float32 rounding of x / scale, the chosen level is the nearest one.
    assert ((x - chosen).abs() <= distance.min(-1).values + 1e-5 * scale).all()


def test_zero_groups_dequantize_to_zero() -> None:
    x = torch.zeros(3, 16)
    x[1, 8:] = torch.linspace(-1, 1, 8)
    for method in ("absmax", "mse", "meanabs"):
        q = quantize(x, 2, group_size=8, method=method)
        out = dequantize(q)
        assert torch.equal(out[0], torch.zeros(16)) and torch.equal(out[1, :8], torch.zeros(8))


def test_quantize_validation() -> None:
    x = torch.randn(4, 12)
    with pytest.raises(ValueError, match=r"bits must be an int in 1\.\.8"):
        quantize(x, 16)
    with pytest.raises(ValueError, match="does not divide K=12"):
        quantize(x, 4, group_size=5)
    with pytest.raises(ValueError, match="positive int"):
        quantize(x, 4, group_size=0)
    with pytest.raises(ValueError, match="method must be one of"):
        quantize(x, 4, method="max")
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        quantize(x, 4, axis=2)
    with pytest.raises(TypeError, match="floating-point"):
        quantize(torch.ones(4, 12, dtype=torch.int32), 4)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[2, 3] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            quantize(y, 4)
    with pytest.raises(ValueError, match="past float32's range"):  # Inf once in float32
        quantize(x.double() * 1e300, 4)


def test_bipolar_tensor_validation() -> None:
    codes = torch.zeros(4, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"expected \(4, 2\)"):
        BipolarTensor(codes, torch.ones(4, 1), 2, -1, 4)
    with pytest.raises(TypeError, match="float32"):
        BipolarTensor(codes, torch.ones(4, 1, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="not 2-bit codes"):
        BipolarTensor(codes + 4, torch.ones(4, 1), 2)
    assert BipolarTensor(codes, torch.ones(4, 2), 2, -1, 4).axis == 1


def _grouped_weight() -> BipolarTensor:
    generator = torch.Generator().manual_seed(0)
    return quantize(torch.randn(4, 8, generator=generator), 3, group_size=4)


def _same_quantization(moved: BipolarTensor, w: BipolarTensor) -> None:
    assert (moved.bits, moved.axis, moved.group_size) == (w.bits, w.axis, w.group_size)
    assert moved.codes.dtype == torch.uint8 and moved.scales.dtype == torch.float32


def test_bipolar_tensor_moves_between_devices_like_a_tensor() -> None:
    """to / cpu as torch.Tensor: itself when nothing changes, new storage with copy=True,
    codes and scales together; a move to "meta" (no values to check) proves the move
    skips the constructor's checks, a host sync on the codes."""
    w = _grouped_weight()
    assert w.device == torch.device("cpu")
    assert w.to("cpu") is w and w.to() is w and w.cpu() is w
    copied = w.to("cpu", copy=True)
    assert copied.codes.data_ptr() != w.codes.data_ptr()
    assert torch.equal(copied.codes, w.codes) and torch.equal(copied.scales, w.scales)
    _same_quantization(copied, w)
    meta = w.to(torch.device("meta"))
    assert meta.device.type == "meta" and meta.scales.device.type == "meta"
    assert meta.shape == w.shape
    _same_quantization(meta, w)
    with pytest.raises(ValueError, match=r"dequantize\(torch.bfloat16\)"):
        w.to(torch.bfloat16)


def test_bipolar_tensor_cuda_and_pin_memory_follow_the_tensor_methods(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """cuda() passes its device and non_blocking to Tensor.cuda for codes and scales, and
    pin_memory() pins both (both stubbed here: this machine may have no CUDA device)."""
    calls = []

    def fake_cuda(tensor, device=None, non_blocking=False):
        calls.append((tensor.dtype, device, non_blocking))
        return tensor.to("meta")

    def fake_pin_memory(tensor):
        calls.append((tensor.dtype, "pinned"))
        return tensor.clone()

    w = _grouped_weight()
    monkeypatch.setattr(torch.Tensor, "cuda", fake_cuda)
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin_memory)
    moved = w.cuda(1, non_blocking=True)
    assert moved.device.type == "meta" and moved.scales.device.type == "meta"
    _same_quantization(moved, w)
    assert calls == [(torch.uint8, 1, True), (torch.float32, 1, True)]
    calls.clear()
    pinned = w.pin_memory()
    assert calls == [(torch.uint8, "pinned"), (torch.float32, "pinned")]
    assert torch.equal(pinned.codes, w.codes) and pinned is not w
    assert not w.is_pinned()


def _relative_mse(x: torch.Tensor, bits: int, method: str, group_size: int | None = None) -> float:
    q = quantize(x, bits, method=method, group_size=group_size)
    return float((dequantize(q) - x).square().sum() / x.square().sum())


def test_quantization_quality_per_bit_width(record_property: pytest.RecordProperty) -> None:
    """Relative MSE on Gaussian data; the default (mse) beats absmax, by far at 1-3 bits."""
    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    table = {}
    for bits in range(1, 9):
        table[bits] = {m: _relative_mse(x, bits, m) for m in ("absmax", "mse", "meanabs")}
        record_property(f"relative_mse_w{bits}", table[bits])
        assert table[bits]["mse"] <= table[bits]["absmax"] * (1 + 1e-6), table[bits]
    # Research note 1.2 (Gaussian, per-tensor clip): absmax 9.48 / 0.574 / 0.099 and
    # best clip 0.368 / 0.122 / 0.039 at 1 / 2 / 3 bits. Per-row absmax over 1024
    # values is smaller than per-tensor, so absmax is less bad here, but still:
    assert table[1]["mse"] < table[1]["absmax"] / 10
    assert table[2]["mse"] < table[2]["absmax"] / 3
    assert table[3]["mse"] < table[3]["absmax"] / 2
    # 1-bit optimum is E|x|^2 / E x^2 away: 1 - 2/pi = 0.3634 for a Gaussian.
    assert table[1]["mse"] == pytest.approx(1 - 2 / torch.pi, abs=0.01)
    assert table[1]["meanabs"] == pytest.approx(1 - 2 / torch.pi, abs=0.01)
    assert table[4]["mse"] < 0.0125 and table[8]["mse"] < 1e-4
    grouped = _relative_mse(x, 2, "mse", group_size=32)
    assert grouped < table[2]["mse"]


@settings(max_examples=40, deadline=None)
@given(
    bits=BITS,
    rows=st.integers(1, 5),
    groups=st.integers(1, 4),
    group=st.integers(1, 12),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_absmax_error_is_at_most_half_a_step(
    bits: int, rows: int, groups: int, group: int, scale: float, seed: int
) -> None:
    # Levels are 2 * scale apart and the outer ones sit at +-absmax: every
    # element is within one scale (half a step) of its level, up to float32 rounding.
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, groups * group, generator=generator) * scale
    q = quantize(x, bits, group_size=group, method="absmax")
    per_element = q.scales.repeat_interleave(group, dim=1)
    error = (dequantize(q) - x).abs()
    assert (error <= per_element * (1 + 1e-5) + 1e-30).all()
    absmax = x.view(rows, groups, group).abs().amax(-1)
    assert torch.equal(q.scales, absmax / (2**bits - 1))
