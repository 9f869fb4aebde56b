"""Selective activation offloading: move a fraction of the tensors autograd saves for
backward to host memory during forward, and bring them back when backward needs them.

ByteScale offloads part of the activations of *long* sequences only: their attention
compute grows with s^2/d while the bytes to copy grow with s/d, so the copies hide behind
compute, and the freed device memory lets the sequence use fewer ranks. The planner decides
which items offload and how much (``WorkItem.offload_ratio``); :class:`ActivationOffload`
is the mechanism (``torch.autograd.graph.saved_tensors_hooks``).

Copies are exact (same dtype, same values) and the tensor that comes back has the layout of
the one that left: the same sizes and strides (a transposed view stays transposed) and the same
data-pointer alignment modulo 64 bytes. Backward's kernels then take the same path as without
offloading: BLAS libraries pick kernels by transposition and alignment, and on some x86 CPUs
those kernels sum in another order (a contiguous copy of a transposed view made gradients
differ in the last bit on another machine, though not on ours). So results are bitwise
identical with and without offloading. On a CPU-only machine host and device are the same
memory; the copy and the byte accounting still happen, which is what the tests check.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["ActivationOffload", "OffloadStats"]

_ALIGNMENT = 64
"""Bytes: the widest vector loads (AVX-512) and the CPU allocator's alignment."""


def _overlaps(tensor: torch.Tensor) -> bool:
    """Whether two elements share memory (a broadcast view: some stride 0 over size > 1)."""
    dims = sorted((s, n) for n, s in zip(tensor.shape, tensor.stride(), strict=True) if n > 1)
    reach = 1
    for stride, size in dims:
        if stride < reach:
            return True
        reach = stride * size
    return False


def _empty_like_layout(
    tensor: torch.Tensor, device: torch.device, misalignment: int, pin: bool = False
) -> torch.Tensor:
    """Uninitialized: ``tensor``'s sizes, strides and dtype on ``device``, with its data pointer
    ``misalignment`` bytes past a multiple of ``_ALIGNMENT``. A view with gaps (a slice of a
    fused projection) comes back with its gaps: its strides are part of its layout."""
    itemsize = tensor.element_size()
    span = 1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride(), strict=True))
    if tensor.numel() == 0:
        span = 0
    slack = _ALIGNMENT // itemsize
    storage = torch.empty(span + slack, dtype=tensor.dtype, device=device, pin_memory=pin)
    offset = ((misalignment - storage.data_ptr()) % _ALIGNMENT) // itemsize
    return storage.as_strided(tensor.shape, tensor.stride(), offset)


@dataclass
class OffloadStats:
    """Bytes of saved activations, summed over the micro-batches that offloaded."""

    offloaded_bytes: int = 0
    """Copied to host in forward."""
    reloaded_bytes: int = 0
    """Copied back in backward (equals offloaded_bytes once every backward ran)."""
    kept_bytes: int = 0
    """Saved activation bytes that stayed on the device, in micro-batches that offloaded
    (so offloaded_bytes / (offloaded_bytes + kept_bytes) is the achieved ratio)."""
    peak_kept_bytes: int = 0
    """Max over micro-batches of the saved bytes kept on the device at the end of forward
    (the activation peak of that micro-batch); counts every micro-batch, offloading or not."""
    micro_batches: int = 0
    """Micro-batches that offloaded (ratio > 0)."""

    def as_dict(self) -> dict[str, int]:
        return {
            "offloaded_bytes": self.offloaded_bytes,
            "reloaded_bytes": self.reloaded_bytes,
            "kept_bytes": self.kept_bytes,
            "peak_kept_bytes": self.peak_kept_bytes,
            "micro_batches": self.micro_batches,
        }


class ActivationOffload:
    """Saved-tensor hooks that move about ``ratio`` of the saved activation bytes to host.

    Parameters (and anything in ``keep``) are never moved: they are not activations and live
    on the device anyway. Tensors are chosen greedily in save order: a tensor moves if that
    keeps the moved bytes at most ``ratio`` of the bytes saved so far, so the moved share
    tracks ``ratio`` to within one tensor at every point of the forward pass.
    """

    def __init__(self, keep: Iterable[torch.Tensor] = (), stats: OffloadStats | None = None):
        self._keep = {t.data_ptr() for t in keep}
        self.stats = stats if stats is not None else OffloadStats()

    @contextmanager
    def offloading(self, ratio: float) -> Iterator[None]:
        """Run a forward pass inside this block; its backward may run after the block ends."""
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"offload ratio must be in [0, 1], got {ratio}")
        seen = moved = kept = 0
        stats = self.stats

        def pack(tensor: torch.Tensor) -> object:
            nonlocal seen, moved, kept
            if tensor.data_ptr() in self._keep or isinstance(tensor, torch.nn.Parameter):
                return tensor
            nbytes = tensor.numel() * tensor.element_size()
            seen += nbytes
            # Broadcast views stay: a copy with their strides would write one element twice.
            if ratio > 0.0 and moved + nbytes <= ratio * seen and not _overlaps(tensor):
                moved += nbytes
                stats.offloaded_bytes += nbytes
                misalignment = tensor.data_ptr() % _ALIGNMENT
                pin = tensor.device.type == "cuda"
                host = _empty_like_layout(tensor, torch.device("cpu"), misalignment, pin)
                host.copy_(tensor)
                return (tensor.device, misalignment, host)
            kept += nbytes
            return tensor

        def unpack(packed: object) -> torch.Tensor:
            if isinstance(packed, torch.Tensor):
                return packed
            device, misalignment, host = packed  # type: ignore[misc]
            stats.reloaded_bytes += host.numel() * host.element_size()
            # A fresh buffer even on CPU, as a device copy would be.
            return _empty_like_layout(host, device, misalignment).copy_(host)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
        stats.peak_kept_bytes = max(stats.peak_kept_bytes, kept)
        if ratio > 0.0:
            stats.kept_bytes += kept
            stats.micro_batches += 1
