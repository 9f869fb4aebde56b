"""What a ``bitscale train`` step costs: model FLOPs, MFU and memory estimates (pure).

Model FLOPs count the arithmetic the model needs, not what the hardware ran: no activation
recomputation, no padding, no ring merges. Per document of S tokens, with N the weights used
in matrix products (all but the embedding and the norms), L layers and D query width:

- matrix products: 6 N FLOPs per token (forward 2 N, backward 4 N);
- causal attention: S (S + 1) / 2 query-key pairs per layer, each 4 D FLOPs forward (scores
  and weighted values, 2 FLOPs per multiply-add) and twice that backward: 6 L D S (S + 1)
  for the document.

MFU is those FLOPs per second over the device's dense bf16 peak (`bitscale.bench`'s
datasheet table), summed over the processes' devices; without a known peak (a CPU, an
unlisted GPU) it is None and printed "n/a".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MemoryEstimate",
    "estimate_memory",
    "mfu",
    "model_flops",
]


def model_flops(
    lengths: Sequence[int], *, matmul_params: int, num_layers: int, attention_dim: int
) -> int:
    """Training FLOPs (forward + backward) of one global batch of documents ``lengths``."""
    tokens = sum(lengths)
    pairs_x2 = sum(s * (s + 1) for s in lengths)
    return 6 * matmul_params * tokens + 6 * num_layers * attention_dim * pairs_x2


def mfu(flops: float, seconds: float, peak_flops: float | None, devices: int) -> float | None:
    """Model FLOPs utilization: ``flops / seconds`` over ``devices`` peaks; None without a
    peak or a time."""
    if peak_flops is None or seconds <= 0 or devices < 1:
        return None
    return flops / seconds / (peak_flops * devices)


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """A rough per-process memory need of one training run, in bytes."""

    states: int
    """Weights, gradients, AdamW's two moments and the gradient all-reduce's flat copy."""
    activations: int
    """Tensors saved for backward over one micro-batch of ``capacity`` tokens."""

    @property
    def total(self) -> int:
        return self.states + self.activations


def estimate_memory(
    *,
    params: int,
    dim: int,
    kv_dim: int,
    ffn_dim: int,
    num_layers: int,
    capacity: int,
    param_bytes: int,
    compute_bytes: int,
    checkpointing: bool,
) -> MemoryEstimate:
    """Weights, gradients and both AdamW moments in the parameters' dtype, plus one flat
    gradient copy while they are all-reduced: 5 x ``param_bytes`` per parameter. Saved
    activations per token and layer, in the compute dtype: the block input, its normed copy,
    q, k, v, roped q and k, the attention output, the residual after it, its normed copy and
    the MLP's gate, up, activation and product (about 7 D + 4 kv + 4 F values); with
    checkpointing only the block input, q, k, v and the attention output stay
    (3 D + 2 kv). Allocator slack and the autograd graph are not counted."""
    per_token_layer = 3 * dim + 2 * kv_dim if checkpointing else 7 * dim + 4 * kv_dim + 4 * ffn_dim
    return MemoryEstimate(
        states=5 * param_bytes * params,
        activations=compute_bytes * per_token_layer * num_layers * capacity,
    )
