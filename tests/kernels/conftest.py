"""Shared fixtures for the kernels tests.

Without CUDA, the Triton kernels run in the interpreter: tests/conftest.py imports
``triton.language`` at collection with ``TRITON_INTERPRET=1``, and an autouse fixture here
sets the variable for each kernels test (dispatch reads it when it first imports
``bitscale.kernels.triton_*``, lazily, inside a kernels test); between those it is
restored, so tests of other areas in the same pytest run keep AUTO = the torch reference.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator

import pytest
import torch

if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    import triton.language
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(triton.language.max, InterpretedFunction):
        raise RuntimeError(
            "triton was imported before tests/conftest.py without TRITON_INTERPRET=1, "
            "so the interpreter cannot run its kernels; run with TRITON_INTERPRET=1 set"
        )


@pytest.fixture(autouse=True)
def _triton_interpreter_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _one_intra_op_thread() -> Iterator[None]:
    """Run each kernels test on one torch thread, then restore the setting.

    The tests run many small ops; a second intra-op thread only adds
    synchronization, and on a shared 2-core machine it waits for a core (the
    QAT training test took 63 s with 2 threads at load 13, 7 s with one).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The tile each gpu test pins per kernel (module: kernel, its tile table, the tile):
# mid-sized tiles that the test shapes cross; test_gpu_every_tile checks every tile.
_PINNED_TILES = {
    "triton_gemm": ("_bipolar_gemm_kernel", "_GEMM_TILES", (64, 64, 128, 4, 4)),
    "triton_a16": ("_bipolar_a16_kernel", "_A16_TILES", (16, 64, 128, 4, 4)),
    "triton_bitplane": ("_bipolar_bitplane_kernel", "_BITPLANE_TILES", (64, 64, 128, 4, 4)),
}


@pytest.fixture(autouse=True)
def _one_tile_per_kernel_on_gpu(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pin each autotuned kernel to one tile in the gpu tests, except those marked
    ``autotune``.

    Autotune compiles and times every tile for each new key: on the H100 machine the
    first 26 gpu tests took 170 s on 8 workers, almost all of it compiling 11-16 tiles
    per width pair. One tile per kernel checks the arithmetic; test_gpu_every_tile
    checks each tile.
    """
    node = request.node
    if (
        not torch.cuda.is_available()
        or node.get_closest_marker("gpu") is None
        or node.get_closest_marker("autotune") is not None
    ):
        return
    from bitscale.kernels._triton_common import autotune_configs

    for module_name, (kernel_name, tiles_name, tile) in _PINNED_TILES.items():
        module = importlib.import_module(f"bitscale.kernels.{module_name}")
        assert tile in getattr(module, tiles_name), (module_name, tile)
        monkeypatch.setattr(getattr(module, kernel_name), "configs", autotune_configs([tile]))


def naive_bipolar_mm(
    x_codes: torch.Tensor, w_codes: torch.Tensor, a_bits: int, w_bits: int
) -> torch.Tensor:
    """The definition, independent of identity B: int64 sum_k X[m, k] * W[n, k]."""
    x = x_codes.cpu().to(torch.int64) * 2 - (2**a_bits - 1)
    w = w_codes.cpu().to(torch.int64) * 2 - (2**w_bits - 1)
    return (x[:, None, :] * w[None, :, :]).sum(-1)


@pytest.fixture
def oracle_mm() -> Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]:
    return naive_bipolar_mm


def random_codes(rows: int, k: int, bits: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2**bits, (rows, k), dtype=torch.uint8, generator=generator)


@pytest.fixture
def make_codes() -> Callable[[int, int, int, torch.Generator], torch.Tensor]:
    return random_codes


@pytest.fixture
def fp32_error_bound() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Worst-case float32 error of a length-K dot product: K * 2^-24 * sum_k |x_k w_k|.

    The standard bound gamma_K = K u / (1 - K u) (Higham, Accuracy and Stability
    of Numerical Algorithms, 3.1), plus one rounding each for the scale products
    and the output; the tests check kernels against a float64 oracle with it.
    """

    def bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        unit = 2.0**-24
        return (k + 4) * unit * (x.abs().double() @ w.abs().double().t())

    return bound
