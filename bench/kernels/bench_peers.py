"""Weight-only decode against the peer low-bit kernels (issue 23; conventions: bench/README.md).

GPU (``gpu`` marker), M in {1, 16} and N x K in {28672 x 8192, 8192 x 28672, 4096 x 4096}:
bitscale W{4,2,1}A16 (the code words BipolarLinear packs, per-channel scales), PyTorch's
int4 tinygemm (``torch._weight_int4pack_mm``, W4, K-groups of 128) and GemLite
(``GemLiteLinearTriton``, W{4,2,1}, K-groups of 128; an optional dependency, skipped with
the reason where ``import gemlite`` fails), each next to bf16 ``torch.matmul``.

One benchmark per provider and case: each times its kernel and bf16 back to back, both
replayed in CUDA graphs (``triton.testing.do_bench_cudagraph``: kernel time, no launch
path), and records its time as the metric ``time in a CUDA graph``. The report pairs
bitscale with every peer of the same case (one row each, peer time / bitscale time) and
with bf16 (bitscale's ``baseline``); each peer's own ratio to bf16 is in its note. The
pytest-benchmark rounds time the eager call (host launch path included), for the record.

Before timing, every provider's output is checked against its own dequantized weight in
float32 (relative Frobenius error <= CHECK_TOLERANCE), so a mis-packed peer fails instead
of being timed. The CPU test below runs the tinygemm packing through PyTorch's CPU int4
kernel and shows the check rejects a mis-packed weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from bitscale.kernels import dequantize, quantize
from bitscale.kernels.config import weight_layout
from bitscale.kernels.dispatch import linear_packed
from bitscale.kernels.reference import pack_weight

PEER_M = [1, 16]
PEER_NK = [
    pytest.param((28672, 8192), id="N28672-K8192"),
    pytest.param((8192, 28672), id="N8192-K28672"),
    pytest.param((4096, 4096), id="N4096-K4096"),
]
PROVIDERS = [
    pytest.param("bitscale", 4, id="bitscale-W4"),
    pytest.param("bitscale", 2, id="bitscale-W2"),
    pytest.param("bitscale", 1, id="bitscale-W1"),
    pytest.param("tinygemm", 4, id="tinygemm-W4"),
    pytest.param("gemlite", 4, id="gemlite-W4"),
    pytest.param("gemlite", 2, id="gemlite-W2"),
    pytest.param("gemlite", 1, id="gemlite-W1"),
]

PEER_GROUP = 128
"""K-group of the peers' scales and zero points: tinygemm's and GemLite's usual choice (and
the middle of tinygemm's 32-256)."""
INNER_K_TILES = 8
"""tinygemm's packing: 8 k-tiles of 16 per 16-byte load, torchao's default (2, 4 or 8)."""
CHECK_TOLERANCE = 0.02
"""Relative Frobenius error allowed against the float32 product with the provider's own
dequantized weight. bf16 output, bf16 scales and zero points and fp32-vs-bf16 accumulation
stay well under 1% at these sizes; a mis-packed weight (nibbles swapped, groups or rows
misplaced) is off by O(1)."""
BF16 = "torch.matmul bf16"
METRIC = "time in a CUDA graph"


# ------------------------------------------------------------------- the peers' format


@dataclass(frozen=True, kw_only=True)
class AffineGroups:
    """Asymmetric min-max quantization along K in groups (the format tinygemm and GemLite
    read): ``weight ~ codes * scales + mins`` per group, codes in [0, 2^bits)."""

    codes: torch.Tensor
    """uint8 [N, K]."""
    scales: torch.Tensor
    """float32 [N, K / group], bf16-representable."""
    mins: torch.Tensor
    """float32 [N, K / group], bf16-representable."""
    bits: int
    group: int

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        codes = self.codes.float().view(n, k // self.group, self.group)
        return (codes * self.scales[..., None] + self.mins[..., None]).view(n, k)


def affine_groups(weight: torch.Tensor, bits: int, group: int) -> AffineGroups:
    """Min-max codes of ``weight`` [N, K]. Scales and minima are rounded to bf16 first (what
    the peers store) and the codes computed from the rounded values, so the float reference
    is the weight the peers hold, up to the rounding of tinygemm's and GemLite's own zero
    points."""
    n, k = weight.shape
    if k % group:
        raise ValueError(f"group={group} does not divide K={k}")
    grouped = weight.float().view(n, k // group, group)
    lo, hi = grouped.amin(-1), grouped.amax(-1)
    levels = 2**bits - 1
    scales = ((hi - lo).clamp(min=1e-6) / levels).bfloat16().float()
    mins = lo.bfloat16().float()
    codes = ((grouped - mins[..., None]) / scales[..., None]).round().clamp(0, levels)
    return AffineGroups(
        codes=codes.to(torch.uint8).view(n, k),
        scales=scales,
        mins=mins,
        bits=bits,
        group=group,
    )


def tinygemm_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K / 2] from 4-bit codes [N, K]: byte j holds code 2j in its high nibble and
    2j + 1 in its low one, the order ``_convert_weight_to_int4pack`` reads on CUDA
    (aten/src/ATen/native/cuda/int4mm.cu; test_linalg.py's ``_group_quantize_tensor``)."""
    codes = codes.to(torch.uint8)
    return (codes[:, ::2] << 4) | codes[:, 1::2]


def unpack_tinygemm_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """int32 codes [N, K] back from :func:`tinygemm_nibbles` (the CPU kernel's input)."""
    high, low = (nibbles >> 4).to(torch.int32), (nibbles & 0xF).to(torch.int32)
    return torch.stack((high, low), dim=-1).flatten(1)


def tinygemm_scales_and_zeros(q: AffineGroups, dtype: torch.dtype) -> torch.Tensor:
    """[K / group, N, 2] (scale, zero): tinygemm dequantizes ``(code - 8) * scale + zero``,
    so ``zero = min + 8 * scale``."""
    if q.bits != 4:
        raise ValueError(f"tinygemm reads 4-bit codes, got {q.bits}-bit")
    zeros = q.mins + 8 * q.scales
    return torch.stack((q.scales, zeros), dim=-1).transpose(0, 1).contiguous().to(dtype)


def gemlite_zero_points(q: AffineGroups) -> torch.Tensor:
    """GemLite's (HQQ's) zero points: ``weight ~ (code - zero) * scale``, so
    ``zero = -min / scale``."""
    return -q.mins / q.scales


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.float()
    return float((out.float() - reference).norm() / reference.norm())


def check_close(out: torch.Tensor, reference: torch.Tensor, provider: str) -> None:
    """Fails the benchmark when ``provider``'s output is not its weight's product."""
    error = relative_error(out, reference)
    assert error <= CHECK_TOLERANCE, (
        f"{provider}: relative error {error:.3g} against its dequantized weight exceeds "
        f"{CHECK_TOLERANCE}: the weight is mis-packed or the kernel's format changed"
    )


# ------------------------------------------------------------------------------ CPU


def test_cpu_tinygemm_packing() -> None:
    """The tinygemm packing above through PyTorch's CPU int4 kernel, and GemLite's zero
    points, against the float reference; a weight packed with its nibbles swapped must fail
    the check. On CUDA, tinygemm takes the nibbles themselves (the CPU kernel takes int32
    codes) and a 4-d tiled layout: only the GPU run checks that."""
    for op in ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"):
        if not hasattr(torch, op):
            pytest.skip(f"torch {torch.__version__} has no torch.{op}")
    m, n, k = 3, 64, 512
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=generator).bfloat16()
    weight = torch.randn(n, k, generator=generator)
    q = affine_groups(weight, 4, PEER_GROUP)
    dequantized = q.dequantize()
    # The quantizer itself: every weight within half a step of its level.
    step = q.scales.repeat_interleave(PEER_GROUP, dim=1)
    assert ((weight - dequantized).abs() <= step / 2 + 1e-6 * weight.abs()).all()
    reference = x.float() @ dequantized.t()
    scales_and_zeros = tinygemm_scales_and_zeros(q, torch.bfloat16)

    def tinygemm_cpu(nibbles: torch.Tensor) -> torch.Tensor:
        packed = torch._convert_weight_to_int4pack_for_cpu(
            unpack_tinygemm_nibbles(nibbles), INNER_K_TILES
        )
        return torch._weight_int4pack_mm_for_cpu(x, packed, PEER_GROUP, scales_and_zeros)

    nibbles = tinygemm_nibbles(q.codes)
    assert torch.equal(unpack_tinygemm_nibbles(nibbles), q.codes.to(torch.int32))
    check_close(tinygemm_cpu(nibbles), reference, "tinygemm (CPU)")
    swapped = (nibbles << 4) | (nibbles >> 4)
    with pytest.raises(AssertionError, match="mis-packed"):
        check_close(tinygemm_cpu(swapped), reference, "tinygemm (CPU), nibbles swapped")

    # GemLite's form, (code - zero) * scale, with its bf16 zero points.
    for bits in (4, 2, 1):
        q = affine_groups(weight, bits, PEER_GROUP)
        zeros = gemlite_zero_points(q).bfloat16().float()
        codes = q.codes.float().view(n, k // PEER_GROUP, PEER_GROUP)
        gemlite_weight = ((codes - zeros[..., None]) * q.scales[..., None]).view(n, k)
        check_close(x.float() @ gemlite_weight.t(), x.float() @ q.dequantize().t(), "GemLite")


# ------------------------------------------------------------------------------ GPU


@dataclass(frozen=True, kw_only=True)
class _Provider:
    name: str
    run: Callable[[], torch.Tensor]
    dequantized: Callable[[], torch.Tensor]
    """float32 [N, K]: the weight the kernel multiplies by (made for the check only, 1 GB at
    28672 x 8192)."""
    weight_bytes: int
    """Packed weight plus its scales and zero points: what a decode step streams."""
    note: str


def _bitscale(x: torch.Tensor, weight: torch.Tensor, bits: int) -> _Provider:
    quantized = quantize(weight.float(), bits, method="absmax")
    packed = pack_weight(quantized, layout=weight_layout(bits, None))
    return _Provider(
        name="bitscale",
        run=lambda: linear_packed(x, packed, backend="triton"),
        dequantized=lambda: dequantize(quantized),
        weight_bytes=packed.data.nbytes + packed.scales.nbytes,
        note="code words, one float32 scale per output channel",
    )


def _tinygemm(x: torch.Tensor, weight: torch.Tensor, bits: int) -> _Provider:
    for op in ("_convert_weight_to_int4pack", "_weight_int4pack_mm"):
        if not hasattr(torch, op):
            pytest.skip(f"torch {torch.__version__} has no torch.{op} (int4 tinygemm)")
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("int4 tinygemm needs sm80 or newer")
    q = affine_groups(weight, bits, PEER_GROUP)
    packed = torch._convert_weight_to_int4pack(tinygemm_nibbles(q.codes), INNER_K_TILES)
    scales_and_zeros = tinygemm_scales_and_zeros(q, torch.bfloat16)
    return _Provider(
        name=f"torch tinygemm W4 g{PEER_GROUP}",
        run=lambda: torch._weight_int4pack_mm(x, packed, PEER_GROUP, scales_and_zeros),
        dequantized=q.dequantize,
        weight_bytes=packed.nbytes + scales_and_zeros.nbytes,
        note=f"torch {torch.__version__}, inner_k_tiles={INNER_K_TILES}",
    )


def _gemlite(x: torch.Tensor, weight: torch.Tensor, bits: int) -> _Provider:
    gemlite = pytest.importorskip(
        "gemlite",
        reason="GemLite is an optional benchmark dependency (`pip install gemlite`), "
        "not importable here",
    )
    n, k = weight.shape
    q = affine_groups(weight, bits, PEER_GROUP)
    layer = gemlite.GemLiteLinearTriton(
        W_nbits=bits,
        group_size=PEER_GROUP,
        in_features=k,
        out_features=n,
        input_dtype=gemlite.DType.BF16,
        output_dtype=gemlite.DType.BF16,
    )
    layer.pack(q.codes, q.scales.bfloat16(), gemlite_zero_points(q).bfloat16(), bias=None)
    return _Provider(
        name=f"GemLite W{bits} g{PEER_GROUP}",
        run=lambda: layer(x),
        dequantized=q.dequantize,
        weight_bytes=sum(t.nbytes for t in (layer.W_q, layer.scales, layer.zeros) if t is not None),
        note=f"gemlite {getattr(gemlite, '__version__', '?')}, default autotune",
    )


_BUILDERS = {"bitscale": _bitscale, "tinygemm": _tinygemm, "gemlite": _gemlite}


def _graph_seconds(fn: Callable[[], object], rep_ms: int) -> float:
    """Median over do_bench_cudagraph's replays of ``fn`` unrolled in one CUDA graph."""
    import triton.testing

    fn()  # autotune and compile outside the capture
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median") * 1e-3


@pytest.mark.gpu
@pytest.mark.benchmark(group="kernels-gpu-peers")
@pytest.mark.parametrize(("provider", "w_bits"), PROVIDERS)
@pytest.mark.parametrize("nk", PEER_NK)
@pytest.mark.parametrize("m", PEER_M)
def test_gpu_decode_peers(
    benchmark, bench_record: Callable, limits, quick: bool, provider: str, w_bits: int, nk, m: int
) -> None:
    """One provider of one decode case, and bf16 torch.matmul beside it, in CUDA graphs."""
    n, k = nk
    torch.manual_seed(0)  # every provider of a case multiplies the same x and weight
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    peer = _BUILDERS[provider](x, weight, w_bits)
    with torch.no_grad():
        check_close(peer.run(), x.float() @ peer.dequantized().t(), peer.name)
        rep_ms = 5 if quick else 10
        bf16_seconds = _graph_seconds(lambda: x @ weight.t(), rep_ms)
        seconds = _graph_seconds(peer.run, rep_ms)

        def eager() -> None:
            peer.run()
            torch.cuda.synchronize()

        benchmark.pedantic(eager, rounds=5 if quick else 20, warmup_rounds=1)
    limit = limits.gpu_peak("hbm")
    bytes_moved = peer.weight_bytes + (m * k + m * n) * 2
    bf16_ratio = bf16_seconds / seconds
    common = {
        "case": f"M={m} N={n} K={k} W{w_bits}A16",
        "shape": {"M": m, "N": n, "K": k},
        "x_name": "M",
        "x": m,
        "series": f"W{w_bits}A16",
        "metric": METRIC,
        "value": seconds,
        "unit": "s",
        "higher_is_better": False,
        "achieved": None if limit is None else bytes_moved / seconds,
        "limit": limit,
        "weight_bytes": peer.weight_bytes,
        "bf16_graph_seconds": bf16_seconds,
        "graph_ratio_to_bf16": bf16_ratio,
    }
    if provider == "bitscale":
        bench_record(baseline=BF16, baseline_value=bf16_seconds, note=peer.note, **common)
    else:
        note = f"{bf16_ratio:.2f}x bf16 in a CUDA graph; {peer.note}"
        bench_record(provider=peer.name, note=note, **common)
