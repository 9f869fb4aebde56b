"""Without CUDA, test_attention_triton.py runs the HDP attention kernels in Triton's
interpreter, which only takes effect if ``TRITON_INTERPRET=1`` is set when
``triton.language`` is first imported (its own @jit helpers are decorated then). So triton
is imported here, at collection, with the variable set and then restored: the other hdp
tests never import triton and keep their environment. tests/kernels/conftest.py does the
same, so either may come first.
"""

from __future__ import annotations

import importlib.util
import os
import sys

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
