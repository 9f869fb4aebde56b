"""Shared by every test directory.

Without CUDA, the Triton kernels (bitscale.kernels, bitscale.hdp's attention block) run in
Triton's interpreter, which only takes effect if ``TRITON_INTERPRET=1`` is set when
``triton.language`` is first imported (its own @jit helpers, such as ``tl.max``, are
decorated then). So triton is imported here, at collection, with the variable set, and the
environment is restored: tests that want the interpreter set the variable themselves
(Triton also reads it at each launch), and the others keep AUTO = the torch reference on CPU.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

if (
    not torch.cuda.is_available()
    and importlib.util.find_spec("triton") is not None
    and "triton.language" not in sys.modules
):
    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.language  # noqa: F401

    if _previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _previous


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """Tests tune into a cache of their own, never the user's ~/.cache/bitscale (autotune
    choices would otherwise leak between test runs and into the user's processes)."""
    previous = os.environ.get("BITSCALE_CACHE_DIR")
    os.environ["BITSCALE_CACHE_DIR"] = str(tmp_path_factory.mktemp("bitscale-cache"))
    yield
    if previous is None:
        del os.environ["BITSCALE_CACHE_DIR"]
    else:
        os.environ["BITSCALE_CACHE_DIR"] = previous
