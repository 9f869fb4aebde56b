"""The host (Python) path of an eager weight-only decode call, on any machine.

An eager ``BipolarLinear`` call at 4096 x 4096, M = 1, cost 73-195 us on an H200 where
its kernel takes ~16 us and bf16 nn.Linear 18 us (issue 23): checks, dispatch, the
launcher's allocations and the Triton launcher. This benchmark times our part of it
with the kernel launch (``_bipolar_a16_kernel[grid](...)``) stubbed out, so it runs
without a GPU; Triton's own launcher (autotune lookup, argument binding, the driver
launch) is not in it: ``test_gpu_eager_overhead`` in bench_bipolar.py measures the
whole call on a GPU. float16 activations: the interpreter stores bfloat16 outputs as
float32 (``store_dtype``), a conversion GPUs do not make.

Both sides run in the same round: the layer's eager forward, and ``linear_packed`` on
the same packed weight (the public API's full validation and dispatch).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


class _NoLaunch:
    """Stands in for the autotuned kernel: ``kernel[grid](*args, **kwargs)`` does nothing."""

    def __getitem__(self, grid: object) -> Callable[..., None]:
        return lambda *args, **kwargs: None


@pytest.mark.benchmark(group="kernels-host-path")
def test_eager_decode_host_path(
    bench_compare: Callable, quick: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from bitscale.kernels import BipolarLinear
    from bitscale.kernels.dispatch import _triton_module, linear_packed

    triton_a16 = _triton_module("triton_a16")
    monkeypatch.setattr(triton_a16, "_bipolar_a16_kernel", _NoLaunch())
    k = n = 4096
    layer = BipolarLinear(k, n, w_bits=4, bias=False, backend="triton", dtype=torch.float16)
    layer.eval()
    x = torch.randn(1, k, dtype=torch.float16)
    with torch.no_grad():
        packed = layer.packed_weight()
        layer(x)
        comparison = bench_compare(
            lambda: layer(x),
            lambda: linear_packed(x, packed, backend="triton"),
            baseline_name="linear_packed (public API), launch stubbed",
            rounds=200 if quick else 2000,
            case=f"eager BipolarLinear host path M=1 N={n} K={k} W4A16, launch stubbed",
            shape={"M": 1, "N": n, "K": k},
            series="W4A16",
        )
    print(comparison)
