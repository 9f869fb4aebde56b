"""bitscale: training systems for long-context LLMs.

Subsystems, imported on first use so that ``import bitscale`` stays light (no
torch, no triton, no CUDA initialization):

- :mod:`bitscale.kernels`: bipolar-INT arbitrary-precision matmul (Triton + exact torch fallback)
- :mod:`bitscale.hdp`: hybrid data parallelism with dynamic context parallelism
- :mod:`bitscale.checkpoint`: lazy asynchronous, universal checkpoints
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

try:
    __version__ = version("bitscale")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

_SUBSYSTEMS = ("kernels", "hdp", "checkpoint")

__all__ = ["__version__", *_SUBSYSTEMS]

if TYPE_CHECKING:
    from bitscale import checkpoint, hdp, kernels  # noqa: F401


def __getattr__(name: str):
    if name in _SUBSYSTEMS:
        return importlib.import_module(f"bitscale.{name}")
    raise AttributeError(f"module 'bitscale' has no attribute {name!r}")
