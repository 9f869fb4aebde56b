"""Launch and tile helpers shared by the Triton kernel modules.

Imports triton, so only the ``triton_*`` kernel modules import it, and
:mod:`bitscale.kernels.dispatch` imports those lazily.
``TRITON_INTERPRET`` is read once, here, when the first of them is imported.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch
import triton
import triton.language as tl
from bitscale.kernels.config import CODE_WORD_RUN

__all__ = [
    "INTERPRETED",
    "TILE_GROUP_ROWS",
    "autotune_configs",
    "bipolar_levels",
    "byte_aligned",
    "cdiv",
    "code_level_unscale",
    "code_word_levels_16",
    "even_k",
    "expand_bits",
    "expand_sign_bits",
    "k_tile_heuristics",
    "load_code_words",
    "m_bucket",
    "scaled_code_levels",
    "store_dtype",
    "tile_config",
    "tile_grid",
    "tile_of_program",
    "tiles_for_rows",
    "unpack_weight_codes",
    "weight_strides",
    "zero_arrival_counters",
]

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def zero_arrival_counters(named_args: dict) -> None:
    """The pre-launch hook of split-K tiles: their programs count arrivals per output tile
    in ``counter_ptr``, which must start at zero. Only those tiles pay for it (a memset
    per launch, a node in CUDA graphs), and autotune times them with it."""
    named_args["counter_ptr"].zero_()


def tile_config(tile: tuple[int, ...], *, swap_ab: bool = False) -> triton.Config:
    """The config of a ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, SPLIT_K])``
    tile (SPLIT_K only for kernels that split K, which default it to 1); ``swap_ab`` sets
    SWAP_AB (only for kernels that take it, which default it to False)."""
    block_m, block_n, block_k, warps, stages, *split_k = tile
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}
    if swap_ab:
        meta["SWAP_AB"] = True
    if not split_k:
        return triton.Config(meta, num_warps=warps, num_stages=stages)
    (meta["SPLIT_K"],) = split_k
    return triton.Config(meta, num_warps=warps, num_stages=stages, pre_hook=zero_arrival_counters)


def autotune_configs(
    tiles: Iterable[tuple[int, ...]], swapped_tiles: Iterable[tuple[int, ...]] = ()
) -> list[triton.Config]:
    """One config per tile, and per swapped tile with SWAP_AB set (:func:`tile_config`)."""
    if INTERPRETED:
        # The interpreter ignores warps/stages and autotune would run every
        # config: one small config, BLOCK_M/N >= 16 and BLOCK_K >= 32 like the
        # GPU compiler's int8 MMA needs, so CPU tests exercise compilable tiles;
        # BLOCK_K = 64 holds a run of 2-bit code words (k_tile_heuristics widens it
        # to 128 for 1-bit ones).
        return [tile_config((16, 16, 64, 4, 3))]
    configs = [tile_config(tile) for tile in tiles]
    return configs + [tile_config(tile, swap_ab=True) for tile in swapped_tiles]


def tiles_for_rows(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """An autotune ``early_config_prune``: tiles no taller than the rows' M_BUCKET, 16 at
    least (the shortest MMA tile), whose K-tiles hold whole runs of code words where the
    weight (``w_ptr``) is code words. Rows past M are padding, and each tile autotune
    weighs is one more compile and timing per shape, on GPU leases of minutes."""
    rows = max(named_args["M_BUCKET"], 16)
    run = _k_run({**named_args, **kwargs})
    return [
        config
        for config in configs
        if config.kwargs["BLOCK_M"] <= rows and config.kwargs["BLOCK_K"] % run == 0
    ]


def _k_run(args: dict) -> int:
    """The codes a K-tile must hold whole: a run of code words where the weight
    (``w_ptr``) is code words (128 // W_BITS), 1 for any other layout."""
    weight = args.get("w_ptr")
    if weight is None or weight.dtype != torch.int32:
        return 1
    return CODE_WORD_RUN // args["W_BITS"]


def byte_aligned(group_k: int, num_groups: int) -> bool:
    """Whether every K-tile of a grouped kernel starts on a plane byte (``BYTE_ALIGNED``):
    tiles start at ``g * group_k`` plus multiples of BLOCK_K (>= 32)."""
    return num_groups == 1 or group_k % 8 == 0


def even_k(args: dict) -> bool:
    """``EVEN_K`` (a ``triton.heuristics`` rule, evaluated after autotune picks BLOCK_K):
    every K-tile lies inside its K-group, so none reads past the end of a weight row and
    the plane loads need no K mask. A per-byte mask (``8 * byte < k_stop``: a new value
    every byte) kept Triton from vectorizing them: the W4 GEMV tile (1, 32, 256) issued
    33 one-byte loads per iteration, against 4 eight-byte loads without the mask, and 10.6
    SASS instructions per weight code against 8.6 (scripts/sass_stats.py, Triton 3.9)."""
    return args["GROUP_K"] % args["BLOCK_K"] == 0


def _interpreted_block_k(args: dict) -> int:
    """The interpreter's BLOCK_K: its one tile's, or a run of code words where that
    tile's does not hold one (128 codes at 1 bit; both are powers of two)."""
    return max(args["BLOCK_K"], _k_run(args))


def k_tile_heuristics() -> dict[str, Callable[[dict], object]]:
    """The ``triton.heuristics`` of the kernels that read code words: :func:`even_k`, and
    in the interpreter first a BLOCK_K that holds a run of code words. On a GPU
    :func:`tiles_for_rows` prunes the tiles that do not; the interpreter keeps its one
    config, since autotune there cannot time configs (that needs a GPU), and Triton 3.6
    times even the single config a prune leaves."""
    rules = {"EVEN_K": even_k}
    return {"BLOCK_K": _interpreted_block_k, **rules} if INTERPRETED else rules


# Plain-Python launch arithmetic: these run on every call, and triton.cdiv /
# triton.next_power_of_2 are constexpr-function wrappers in Triton 3.9 that cost
# microseconds a call (3 calls were 10% of a decode launch's host time here).
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def m_bucket(m: int) -> int:
    """Autotune key: shapes with M in the same power-of-two bucket share a config."""
    return min(1 << (max(m, 1) - 1).bit_length(), 4096)


def tile_grid(m: int, n: int) -> Callable[[dict], tuple[int, int, int]]:
    """The launch grid of an [m, n] output: one program per BLOCK_M x BLOCK_N tile, times
    SPLIT_K for kernels that split K."""

    def grid(meta: dict) -> tuple[int, int, int]:
        return cdiv(m, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"]), meta.get("SPLIT_K", 1)

    return grid


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel stores an output of ``dtype`` in. The interpreter's float32 ->
    bf16 cast truncates (GPUs round to nearest even): there the kernel stores float32
    and torch rounds."""
    return torch.float32 if INTERPRETED and dtype == torch.bfloat16 else dtype


def weight_strides(weight: torch.Tensor) -> tuple[int, int]:
    """The kernels' (stride_wplane, stride_wn) of a weight operand: bit planes are
    [bits, N, bytes]; code words [N, words] and expanded weights [N, K] have one plane."""
    return (0, weight.stride(0)) if weight.dim() == 2 else weight.stride()[:2]


# Output tiles launch in bands of this many row tiles (tile_of_program).
TILE_GROUP_ROWS: tl.constexpr = tl.constexpr(8)


@triton.jit
def tile_of_program(GROUP_ROWS: tl.constexpr):
    """The (row tile, column tile) of this program's output tile, GROUP_ROWS row tiles at
    a time. Programs launch with program_id(0) fastest; taken as is, a wave of 132 (one
    per H100 SM) would sweep every row tile of 4-8 column tiles, so at M = 4096 each wave
    streams all of x again (235 MB of bf16 at K = 28672, past the 50 MB L2). In bands of
    8 row tiles, a wave reads 8 row tiles of x and ~16 column tiles of the weight. With
    at most GROUP_ROWS row tiles (M <= 1024 on 128-row tiles) the order is unchanged."""
    num_m = tl.num_programs(0)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if num_m > GROUP_ROWS:  # skips four integer divisions at decode
        pid = pid_n * num_m + pid_m
        per_band = GROUP_ROWS * tl.num_programs(1)
        first_m = (pid // per_band) * GROUP_ROWS
        rows = tl.minimum(num_m - first_m, GROUP_ROWS)
        pid_m = first_m + (pid % per_band) % rows
        pid_n = (pid % per_band) // rows
    return pid_m, pid_n


@triton.jit
def expand_bits(bytes_RB, ROWS: tl.constexpr, BYTES: tl.constexpr):
    """The bits of uint8/int32 ``bytes_RB`` [ROWS, BYTES] as int32 0/1 [ROWS, 8 * BYTES],
    bit i of byte b landing in column 8b + i (the pack_bitplanes order along K)."""
    bit_118 = tl.arange(0, 8)[None, None, :]
    bits_RB8 = (bytes_RB.to(tl.int32)[:, :, None] >> bit_118) & 1
    return tl.reshape(bits_RB8, (ROWS, 8 * BYTES))


@triton.jit
def expand_sign_bits(bytes_RB, ROWS: tl.constexpr, BYTES: tl.constexpr):
    """The float32 sign bits of the 1-bit levels in ``bytes_RB`` [ROWS, BYTES], as uint32
    [ROWS, 8 * BYTES] in the :func:`expand_bits` order: 0 for a set bit (level +1),
    0x80000000 for a clear one (-1). Bit i moves to bit 31 with one shift, and the mask
    and flip fold into the LOP3 that applies it to x (``x ^ sign`` is ``x * level``)."""
    shift_118 = (31 - tl.arange(0, 8)).to(tl.uint32)[None, None, :]
    signs_RB8 = ((bytes_RB.to(tl.uint32)[:, :, None] << shift_118) & 0x80000000) ^ 0x80000000
    return tl.reshape(signs_RB8, (ROWS, 8 * BYTES))


@triton.jit
def bipolar_levels(u, W_BITS: tl.constexpr):
    """float32 levels 2U - (2^w - 1) of w-bit codes U (int32), without an int -> float
    conversion (16 per SM-clock on sm_90, against 64-128 for integer and FMA ops): the
    bits 0x4B000000 + 2U + 1 read as float32 are 2^23 + 2U + 1, and subtracting
    2^23 + 2^w from that is exact (Sterbenz)."""
    magic = (2 * u + 0x4B000001).to(tl.float32, bitcast=True)
    return magic - (8388608.0 + (1 << W_BITS))


@triton.jit
def gather_codes(words_RB, ROWS: tl.constexpr, BYTES: tl.constexpr):
    """4-bit codes int32 [ROWS, 8 * BYTES] from uint32 words [ROWS, BYTES] holding four
    plane bytes each (plane j in byte j): code 8b + i takes bit i of each byte of word b.

    Bits i, 8 + i, 16 + i, 24 + i of ``words >> i`` masked to 0x01010101, times
    0x01020408 (bits 24, 17, 10, 3), land at bits 24..27; every other partial product
    falls on a distinct bit below 24 or past 31, so nothing carries into the code.
    """
    bit_118 = tl.arange(0, 8).to(tl.uint32)[None, None, :]
    spread_RB8 = (words_RB[:, :, None] >> bit_118) & 0x01010101
    codes_RB8 = (spread_RB8 * 0x01020408) >> 24
    return tl.reshape(codes_RB8, (ROWS, 8 * BYTES)).to(tl.int32)


# Code words (WeightLayout.CODE_WORDS): field f of a 32-bit word lies in bits
# 16 * (f % 2) + W * (f // 2) and up, pair f // 2 at K offset 8 * (f // 2) + 2c + f % 2
# of its run of four words (c the word's place in the run). A word's fields come out as
# a [..., 32 // W] tensor by nested tl.join, whose new dimensions stay in each thread's
# registers, so every field's shift and mask is a constant: the [..., 2, 2, 2] of a W4
# word flattens to fields 0..7; _runs_in_k_order then puts the run's fields in K order,
# a permutation of dimensions that moves no data. SCALED selects the decode GEMV's form,
# from the word's two halves (see scaled_code_levels); PAIR_MAGIC the 16-bit float
# fields of pair C in one int32 (see code_word_levels_16); otherwise a field's U comes
# from the word itself.
@triton.jit
def _code_word_field(
    word,
    high,
    C: tl.constexpr,
    PER_WORD: tl.constexpr,
    W_BITS: tl.constexpr,
    SCALED: tl.constexpr,
    PAIR_MAGIC: tl.constexpr,
):
    if SCALED:
        # Code j of a half, moved to bit 1 + j * W by the caller, over the magic bits.
        j: tl.constexpr = C // 2
        shift: tl.constexpr = 1 + j * W_BITS
        half = word if C % 2 == 0 else high
        field = half & ((((1 << W_BITS) - 1) << shift) | 0x4B000000)
        offset: tl.constexpr = 8388608.0 + (1 << (W_BITS - 1 + shift)) - (1 << (shift - 1))
        return field.to(tl.float32, bitcast=True) - offset
    elif PAIR_MAGIC and W_BITS == 1:
        # 1 bit: pair C's bits C and 16 + C, shifted to bits 15 and 31, flip the sign bits
        # of PAIR_MAGIC's two -1s where set (+1 for bit 1, -1 for bit 0).
        return ((word << (15 - C)) & 0x80008000) ^ PAIR_MAGIC
    elif PAIR_MAGIC:
        # Pair C's codes start at bits C * W and 16 + C * W; shifted to bits 1 and 17 they
        # read 2U (mask) and 2U + 1 over the magic (PAIR_MAGIC's bits 0 and 16).
        fields: tl.constexpr = (((1 << W_BITS) - 1) << 1) * 0x10001
        twice = (word << 1) if C == 0 else (word >> (C * W_BITS - 1))
        return (twice & fields) | PAIR_MAGIC
    else:
        shift: tl.constexpr = 16 * (C % 2) + W_BITS * (C // 2)
        return ((word >> shift) & ((1 << W_BITS) - 1)).to(tl.int32)


@triton.jit
def _code_word_tree(
    word,
    high,
    C: tl.constexpr,
    STEP: tl.constexpr,
    COUNT: tl.constexpr,
    PER_WORD: tl.constexpr,
    W_BITS: tl.constexpr,
    SCALED: tl.constexpr,
    PAIR_MAGIC: tl.constexpr = 0,
):
    """Fields C, C + STEP, ..., C + (COUNT - 1) * STEP as a [..., 2, ..., 2] tensor that
    flattens in that order: the even-numbered half joined with the odd-numbered half."""
    if COUNT == 1:
        return _code_word_field(word, high, C, PER_WORD, W_BITS, SCALED, PAIR_MAGIC)
    else:
        half: tl.constexpr = COUNT // 2
        return tl.join(
            _code_word_tree(word, high, C, 2 * STEP, half, PER_WORD, W_BITS, SCALED, PAIR_MAGIC),
            _code_word_tree(
                word, high, C + STEP, 2 * STEP, half, PER_WORD, W_BITS, SCALED, PAIR_MAGIC
            ),
        )


@triton.jit
def _runs_in_k_order(fields, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, W_BITS: tl.constexpr):
    """Fields of code words [ROWS, BLOCK_K // (32 // W), ...] that flatten in field order
    as [ROWS, BLOCK_K], in K order: pair C of a run's word c is K-pair 4C + c."""
    PAIRS: tl.constexpr = 16 // W_BITS
    runs = tl.reshape(fields, (ROWS, BLOCK_K // (8 * PAIRS), 4, PAIRS, 2))
    return tl.reshape(tl.permute(runs, (0, 1, 3, 2, 4)), (ROWS, BLOCK_K))


@triton.jit
def _code_word_fields(
    word,
    high,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    W_BITS: tl.constexpr,
    SCALED: tl.constexpr,
):
    """The fields of words [ROWS, BLOCK_K // (32 // W)] as [ROWS, BLOCK_K], in K order."""
    PER_WORD: tl.constexpr = 32 // W_BITS
    fields = _code_word_tree(word, high, 0, 1, PER_WORD, PER_WORD, W_BITS, SCALED)
    return _runs_in_k_order(fields, ROWS, BLOCK_K, W_BITS)


@triton.jit
def load_code_words(
    w_ptr,
    k_start,
    k_stop,
    offs_n,
    n_mask,
    stride_wn,
    W_BITS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """uint32 code words [BLOCK_N, BLOCK_K // (32 // W)] of columns ``k_start`` ..
    ``k_start + BLOCK_K`` (``k_start`` a multiple of a run's 128 // W codes), rows
    ``offs_n``; runs from ``k_stop`` on, and rows off ``n_mask``, load as 0."""
    PER_WORD: tl.constexpr = 32 // W_BITS
    tl.static_assert(BLOCK_K % (4 * PER_WORD) == 0, "a K-tile holds whole runs of code words")
    offs_word = k_start // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
    mask = n_mask[:, None]
    if not EVEN_K:
        mask = mask & (offs_word // 4 * (4 * PER_WORD) < k_stop)[None, :]
    words = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_word[None, :], mask=mask, other=0)
    return words.to(tl.uint32, bitcast=True)


@triton.jit
def scaled_code_levels(words, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, W_BITS: tl.constexpr):
    """float32 ``level * 2^(j * W)`` [ROWS, BLOCK_K] of code words [ROWS, BLOCK_K // (32 // W)],
    j the code's pair in its word (:func:`code_level_unscale` undoes the power).

    Each half word, shifted so its code j starts at bit s = 1 + j * W and OR-ed with the
    float32 bits of 2^23 (two instructions a word), holds every code in place, under bit
    17: one LOP3 masks a code onto 2^23, reading 2^23 + U * 2^s, and one FADD of
    -(2^23 + 2^(W - 1 + s) - 2^(s - 1)) leaves (2U - 2^W + 1) * 2^(s - 1) exactly (both
    operands are integers in [2^23, 2^24), all of which float32 holds). The LOP3 and FADD
    are all a code costs before its FMA: the (1, 32, 256) GEMV's K loop runs 4.4 SASS
    instructions per W4 code, against 8.6 gathering bit planes. The powers (at most 2^15,
    at 1 bit) leave the products exact and the sums' roundings unchanged while the partial
    sums stay normal floats: below 2^112 in magnitude (float32 overflows at 2^128) and above
    its subnormals."""
    low = (words << 1) | 0x4B000000
    high = (words >> 15) | 0x4B000000
    return _code_word_fields(low, high, ROWS, BLOCK_K, W_BITS, True)


@triton.jit
def code_level_unscale(BLOCK_K: tl.constexpr, W_BITS: tl.constexpr):
    """float32 [BLOCK_K]: 2^-(j * W), undoing :func:`scaled_code_levels`' powers."""
    j = tl.arange(0, BLOCK_K) % (128 // W_BITS) // 8
    return ((127 - j * W_BITS) << 23).to(tl.float32, bitcast=True)


# The interpreter keeps bfloat16 tensors as uint16 and runs their arithmetic on those
# integers (Triton 3.9: 128 - 144 in bfloat16 came out NaN), so there
# code_word_levels_16 subtracts in float32; both results are exact.
_INTERPRETED_BF16: tl.constexpr = tl.constexpr(INTERPRETED)


@triton.jit
def code_word_levels_16(
    words, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, W_BITS: tl.constexpr, dtype: tl.constexpr
):
    """Levels 2U - (2^w - 1) [ROWS, BLOCK_K] in the 16-bit float ``dtype`` of code words
    [ROWS, BLOCK_K // (32 // W)], without a float32 detour.

    The bits MAGIC + 2U + 1 read as ``dtype`` are BASE + 2U + 1 (BASE = 128 in bfloat16,
    whose 7 fraction bits hold 2U + 1 up to w = 6; 1024 in float16, 10 bits), and
    subtracting BASE + 2^w is exact. K-adjacent codes lie 16 bits apart in a word, so one
    shift and one LOP3 build both fields of a pair in one register, the layout of two
    16-bit floats, and one HADD2 subtracts both: the W4 (16, 64, 128) decode tile's K loop
    ran 4.7 SASS instructions per code, against 6.9 building float32 levels and converting
    them (Triton 3.9). A thread's pairs are the ones its MMA operand fragment holds
    (WeightLayout.CODE_WORDS), which swapped tiles feed from registers. 1-bit levels are
    +-1: a pair's two bits become the sign bits of two -1s, with no subtraction (one shift
    and two LOP3s, since a LOP3 takes one immediate and this takes a mask and the -1s):
    2.95 SASS instructions per W1 code in the swapped (16, 64, 256) decode tile's K loop,
    3.55 per W4 code (Triton 3.6)."""
    tl.static_assert(
        dtype == tl.bfloat16 or dtype == tl.float16, "16-bit levels are bfloat16 or float16"
    )
    if W_BITS == 1:
        magic: tl.constexpr = 0xBF80 if dtype == tl.bfloat16 else 0xBC00  # -1.0
    elif dtype == tl.bfloat16:
        tl.static_assert(W_BITS <= 6, "bfloat16 holds 2U + 1 in its fraction up to 6 bits")
        magic: tl.constexpr = 0x4301
    else:
        magic: tl.constexpr = 0x6401
    PAIRS: tl.constexpr = 16 // W_BITS
    pairs = _code_word_tree(words, words, 0, 1, PAIRS, 32 // W_BITS, W_BITS, False, magic * 0x10001)
    halves = tl.join(pairs.to(tl.uint16), (pairs >> 16).to(tl.uint16))
    fields = _runs_in_k_order(halves, ROWS, BLOCK_K, W_BITS).to(dtype, bitcast=True)
    if W_BITS == 1:
        return fields
    base: tl.constexpr = 128.0 if dtype == tl.bfloat16 else 1024.0
    if _INTERPRETED_BF16 and dtype == tl.bfloat16:
        return (fields.to(tl.float32) - (base + (1 << W_BITS))).to(dtype)
    return fields - (base + (1 << W_BITS))


@triton.jit
def unpack_weight_codes(
    w_ptr,
    k_start,
    k_stop,
    offs_n,
    n_mask,
    stride_wplane,
    stride_wn,
    W_BITS: tl.constexpr,
    BYTE_ALIGNED: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SIGN_BITS: tl.constexpr = False,
):
    """The w-bit weight codes U (int32 [BLOCK_K, BLOCK_N]) of columns ``k_start`` ..
    ``k_start + BLOCK_K`` of output rows ``offs_n``, from the weight's bit planes (uint8
    ``w_ptr``) or code words (int32 ``w_ptr``, :func:`load_code_words`).
    Rows off ``n_mask`` and bytes from ``k_stop`` on load as 0; the callers zero the other
    operand past ``k_stop``, so the codes there (pad bits of a last, partial byte) never count.
    ``EVEN_K`` promises the tile ends by ``k_stop`` (:func:`even_k`): no K mask then.
    ``SIGN_BITS`` (1-bit weights) returns the levels' float32 sign bits instead
    (:func:`expand_sign_bits`).

    With ``BYTE_ALIGNED`` (``k_start`` a multiple of 8; ``k_stop`` too, or K itself) each
    plane byte is loaded once and its 8 bits expanded in registers. Otherwise every code
    loads its own byte, 8 loads per byte: at BLOCK_K = 512, W4 that is 64K loads per tile
    where the byte path issues 8K (scripts/sass_stats.py counts both).
    """
    tl.static_assert(not SIGN_BITS or W_BITS == 1, "sign bits are the levels of 1-bit weights")
    if w_ptr.dtype.element_ty == tl.int32:
        words_NW = load_code_words(
            w_ptr, k_start, k_stop, offs_n, n_mask, stride_wn, W_BITS, EVEN_K, BLOCK_K
        )
        tl.static_assert(not SIGN_BITS, "sign bits come from bit planes")
        return tl.trans(_code_word_fields(words_NW, words_NW, BLOCK_N, BLOCK_K, W_BITS, False))
    elif BYTE_ALIGNED:
        offs_byte = k_start // 8 + tl.arange(0, BLOCK_K // 8)
        if EVEN_K:
            byte_mask_NB = n_mask[:, None]
        else:
            byte_mask_NB = n_mask[:, None] & (offs_byte * 8 < k_stop)[None, :]
        byte_NB = w_ptr + offs_n[:, None] * stride_wn + offs_byte[None, :]
        if W_BITS == 1:
            bytes_NB = tl.load(byte_NB, mask=byte_mask_NB, other=0)
            if SIGN_BITS:
                u_NK = expand_sign_bits(bytes_NB, BLOCK_N, BLOCK_K // 8)
            else:
                u_NK = expand_bits(bytes_NB, BLOCK_N, BLOCK_K // 8)
        else:
            # Planes 0-3 (4-7) interleaved into one word per byte position b: byte j of the
            # word is plane j's byte b, whose bit i belongs to code 8b + i, and one multiply
            # gathers a code's four bits (gather_codes). 4 ops per code for w <= 4, against
            # 3 per plane.
            low_NB = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.uint32)
            high_NB = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.uint32)
            for j in tl.static_range(W_BITS):
                plane_NB = tl.load(byte_NB + j * stride_wplane, mask=byte_mask_NB, other=0)
                if j < 4:
                    low_NB |= plane_NB.to(tl.uint32) << (8 * j)
                else:
                    high_NB |= plane_NB.to(tl.uint32) << (8 * (j - 4))
            u_NK = gather_codes(low_NB, BLOCK_N, BLOCK_K // 8)
            if W_BITS > 4:
                u_NK += gather_codes(high_NB, BLOCK_N, BLOCK_K // 8) << 4
        return tl.trans(u_NK)
    else:
        k = k_start + tl.arange(0, BLOCK_K)
        w_byte_KN = w_ptr + (k // 8)[:, None] + offs_n[None, :] * stride_wn
        w_shift_K1 = (k % 8)[:, None]
        w_mask = (k < k_stop)[:, None] & n_mask[None, :]
        u_KN = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.int32)
        for j in tl.static_range(W_BITS):
            plane = tl.load(w_byte_KN + j * stride_wplane, mask=w_mask, other=0)
            u_KN += ((plane.to(tl.int32) >> w_shift_K1) & 1) << j
        if SIGN_BITS:
            u_KN = (u_KN ^ 1).to(tl.uint32) << 31
        return u_KN
