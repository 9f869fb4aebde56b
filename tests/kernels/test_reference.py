"""The exact torch reference: bipolar_mm_int against the definition, every width pair."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from bitscale.kernels import Backend, bipolar_mm_int, dequantize, quantize
from bitscale.kernels.config import (
    CODE_WORD_BITS,
    WeightLayout,
    weight_layout,
)
from bitscale.kernels.reference import (
    _fp32_matmul_is_exact,
    bipolar_mm_int_reference,
    code_word_count,
    dequantize_packed,
    pack_code_words,
    pack_weight,
    unpack_code_words,
)
from hypothesis import given, settings
from hypothesis import strategies as st

WIDTH_PAIRS = list(itertools.product(range(1, 9), repeat=2))


@pytest.mark.parametrize(("a_bits", "w_bits"), WIDTH_PAIRS, ids=lambda b: str(b))
def test_reference_equals_definition_every_width(
    a_bits: int, w_bits: int, oracle_mm: Callable, make_codes: Callable
) -> None:
    generator = torch.Generator().manual_seed(100 * a_bits + w_bits)
    # Odd shapes: K = 131 is not a multiple of 8, 32 or any block size.
    x_codes = make_codes(7, 131, a_bits, generator)
    w_codes = make_codes(5, 131, w_bits, generator)
    out = bipolar_mm_int(x_codes, w_codes, a_bits=a_bits, w_bits=w_bits, backend="reference")
    assert out.dtype == torch.int64
    assert torch.equal(out, oracle_mm(x_codes, w_codes, a_bits, w_bits))


@pytest.mark.parametrize(("a_bits", "w_bits"), [(8, 8), (8, 1), (3, 5)])
def test_reference_exact_across_fp32_chunks(
    a_bits: int, w_bits: int, oracle_mm: Callable, make_codes: Callable
) -> None:
    # K = 2500 spans three float32 chunks at W8A8 (chunks of 1024 keep sums < 2^24).
    generator = torch.Generator().manual_seed(7)
    x_codes = make_codes(3, 2500, a_bits, generator)
    w_codes = make_codes(4, 2500, w_bits, generator)
    expected = oracle_mm(x_codes, w_codes, a_bits, w_bits)
    assert torch.equal(
        bipolar_mm_int_reference(x_codes, w_codes, a_bits=a_bits, w_bits=w_bits), expected
    )


def test_reference_extremes_do_not_overflow() -> None:
    # All codes at the top level: every product is 255 * 255, the sum 65025 * K,
    # past int32 for K = 40000 (> 2^31 / 65025 ~ 33026).
    k = 40_000
    top = torch.full((2, k), 255, dtype=torch.uint8)
    bottom = torch.zeros((3, k), dtype=torch.uint8)
    out = bipolar_mm_int_reference(top, torch.cat([top[:1], bottom[:1]]), a_bits=8, w_bits=8)
    assert out.tolist() == [[65025 * k, -65025 * k]] * 2
    assert bipolar_mm_int_reference(bottom, bottom, a_bits=8, w_bits=8).unique().tolist() == [
        65025 * k
    ]


def test_reference_exact_with_reduced_float32_precision(
    oracle_mm: Callable, make_codes: Callable
) -> None:
    # With TF32/bf16 matmul allowed, float32 would round: the reference must use float64.
    generator = torch.Generator().manual_seed(3)
    x_codes = make_codes(4, 3000, 8, generator)
    w_codes = make_codes(6, 3000, 8, generator)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        # This CPU may still multiply float32 exactly; what must hold is the choice.
        assert not _fp32_matmul_is_exact(torch.device("cpu"))
        out = bipolar_mm_int_reference(x_codes, w_codes, a_bits=8, w_bits=8)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert torch.equal(out, oracle_mm(x_codes, w_codes, 8, 8))


def test_empty_shapes() -> None:
    x_codes = torch.zeros((0, 5), dtype=torch.uint8)
    w_codes = torch.ones((3, 5), dtype=torch.uint8)
    assert bipolar_mm_int(x_codes, w_codes, a_bits=1, w_bits=1, backend="reference").shape == (0, 3)
    empty_k = bipolar_mm_int(
        torch.zeros((2, 0), dtype=torch.uint8),
        torch.zeros((3, 0), dtype=torch.uint8),
        a_bits=2,
        w_bits=2,
        backend=Backend.REFERENCE,
    )
    assert torch.equal(empty_k, torch.zeros((2, 3), dtype=torch.int64))


def test_mm_validation() -> None:
    x_codes = torch.zeros((2, 8), dtype=torch.uint8)
    w_codes = torch.zeros((3, 8), dtype=torch.uint8)
    with pytest.raises(ValueError, match="K mismatch"):
        bipolar_mm_int(x_codes, w_codes[:, :7], a_bits=2, w_bits=2)
    with pytest.raises(TypeError, match="x_codes must be a uint8"):
        bipolar_mm_int(x_codes.to(torch.int8), w_codes, a_bits=2, w_bits=2)
    with pytest.raises(ValueError, match="w_codes must be 2-d"):
        bipolar_mm_int(x_codes, w_codes[0], a_bits=2, w_bits=2)
    with pytest.raises(ValueError, match="not 2-bit codes"):
        bipolar_mm_int(x_codes, w_codes + 4, a_bits=2, w_bits=2)
    with pytest.raises(ValueError, match=r"a_bits must be an int in 1\.\.8"):
        bipolar_mm_int(x_codes, w_codes, a_bits=16, w_bits=2)
    with pytest.raises(ValueError, match=r"w_bits must be an int in 1\.\.8"):
        bipolar_mm_int(x_codes, w_codes, a_bits=2, w_bits=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        bipolar_mm_int(x_codes, w_codes, a_bits=2, w_bits=2, backend="cuda")


@given(
    bits=st.sampled_from(CODE_WORD_BITS),
    rows=st.integers(0, 3),
    k=st.integers(0, 70),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=60, deadline=None)
def test_code_words_round_trip(bits: int, rows: int, k: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, k), dtype=torch.uint8, generator=generator)
    words = pack_code_words(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (rows, code_word_count(bits, k))
    assert words.shape[1] == 4 * -(-k // (128 // bits))
    assert torch.equal(unpack_code_words(words, bits, k), codes)


def test_code_word_layout() -> None:
    """Code r of a run of four words in word (r // 2) % 4, at bit 16 * (r % 2) + w * (r // 8):
    a word holds the K-pairs 2c, 2c + 8, 2c + 16, ... of its run, each pair's even code in
    the low half; a partial last run is zero-padded."""
    codes = torch.arange(1, 34, dtype=torch.uint8)[None, :] % 16  # W4: 33 codes, two runs
    words = pack_code_words(codes, 4).view(torch.uint32).tolist()
    # Word 0 holds codes 0, 8, 16, 24 (values 1, 9, 1, 9) low and 1, 9, 17, 25 high.
    assert words == [[0xA2A29191, 0xC4C4B3B3, 0xE6E6D5D5, 0x0808F7F7, 0x1, 0, 0, 0]]
    w2 = torch.zeros(1, 64, dtype=torch.uint8)
    w2[0, [0, 1, 8, 63]] = torch.tensor([3, 2, 1, 3], dtype=torch.uint8)
    assert pack_code_words(w2, 2).view(torch.uint32).tolist() == [
        [3 | 2 << 16 | 1 << 2, 0, 0, 3 << 30]
    ]
    w8 = torch.tensor([[255, 1, 0, 0, 0, 0, 0, 0, 7]], dtype=torch.uint8)
    assert pack_code_words(w8, 8).tolist() == [[0x107FF, 0, 0, 0]]
    w1 = torch.zeros(1, 128, dtype=torch.uint8)
    w1[0, [0, 1, 2, 8, 127]] = 1  # a run of 1-bit words is 128 codes
    assert pack_code_words(w1, 1).view(torch.uint32).tolist() == [
        [1 | 1 << 16 | 1 << 1, 1, 0, 1 << 31]
    ]


@pytest.mark.parametrize(
    ("bits", "group_size"),
    [(1, None), (2, None), (4, 32), (8, 16), (3, None), (4, 12), (2, 48), (1, 32)],
)
def test_packed_weights_dequantize_like_the_tensor(bits: int, group_size: int | None) -> None:
    w = quantize(
        torch.randn(5, 96, generator=torch.Generator().manual_seed(bits)),
        bits,
        group_size=group_size,
    )
    layouts = [WeightLayout.BITPLANES]
    if weight_layout(bits, group_size) is WeightLayout.CODE_WORDS:
        layouts.append(WeightLayout.CODE_WORDS)
    for layout in layouts:
        packed = pack_weight(w, layout=layout)
        assert packed.layout is layout and packed.out_features == 5
        data = (packed.data, packed.scales, bits, 96, group_size, layout)
        assert torch.equal(dequantize_packed(*data), dequantize(w))


def test_code_words_refuse_widths_and_groups_they_cannot_hold() -> None:
    assert weight_layout(4, 64) is WeightLayout.CODE_WORDS
    assert weight_layout(2, 64) is WeightLayout.CODE_WORDS
    assert weight_layout(8, 16) is WeightLayout.CODE_WORDS
    assert weight_layout(1, 128) is WeightLayout.CODE_WORDS
    assert weight_layout(1, 64) is WeightLayout.BITPLANES  # a run of 1-bit words is 128 codes
    assert weight_layout(4, 24) is WeightLayout.BITPLANES  # a run of 4-bit words is 32 codes
    assert weight_layout(2, 32) is WeightLayout.BITPLANES
    assert weight_layout(4, 12) is WeightLayout.BITPLANES
    assert weight_layout(3, None) is WeightLayout.BITPLANES
    with pytest.raises(ValueError, match="3 bits, group_size=None: pack bit planes instead"):
        pack_weight(quantize(torch.randn(4, 16), 3), layout="code_words")
    with pytest.raises(
        ValueError, match=r"run of four words \(128 bits\); got 4 bits, group_size=8"
    ):
        pack_weight(quantize(torch.randn(4, 24), 4, group_size=8), layout="code_words")
    with pytest.raises(ValueError, match="got bits=3"):
        pack_code_words(torch.zeros(2, 8, dtype=torch.uint8), 3)
