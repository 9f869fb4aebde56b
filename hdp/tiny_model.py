"""A small decoder-only transformer written against the HDP model contract.

It is what the runtime tests and benchmarks train, and the template for plugging any model
into :class:`bitscale.hdp.HDPRunner`: token-major 1-D inputs, RoPE from the runner's global
``position_ids``, and ``bitscale.hdp.attention`` as the only attention call. Nothing in it
knows whether it runs on one rank, packed documents, or a zigzag ring shard.
"""

from __future__ import annotations

import torch
from torch import nn

from .dispatch import attention

__all__ = ["TinyTransformer"]


def _rotary(x_THD: torch.Tensor, position_ids: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    half = x_THD.shape[-1] // 2
    freqs = base ** (-torch.arange(half, dtype=x_THD.dtype, device=x_THD.device) / half)
    angles_TF = position_ids.to(x_THD.dtype).unsqueeze(-1) * freqs
    cos, sin = angles_TF.cos().unsqueeze(1), angles_TF.sin().unsqueeze(1)
    x1, x2 = x_THD[..., :half], x_THD[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.attn_norm = nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.proj = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.mlp_norm = nn.RMSNorm(dim)
        self.up = nn.Linear(dim, mlp_dim, bias=False)
        self.down = nn.Linear(mlp_dim, dim, bias=False)

    def forward(self, x_TC: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        tokens = x_TC.shape[0]
        qkv = self.qkv(self.attn_norm(x_TC))
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q = qkv[:, :q_size].view(tokens, self.heads, self.head_dim)
        k = qkv[:, q_size : q_size + kv_size].view(tokens, self.kv_heads, self.head_dim)
        v = qkv[:, q_size + kv_size :].view(tokens, self.kv_heads, self.head_dim)
        q, k = _rotary(q, position_ids), _rotary(k, position_ids)
        x_TC = x_TC + self.proj(attention(q, k, v).reshape(tokens, q_size))
        return x_TC + self.down(nn.functional.silu(self.up(self.mlp_norm(x_TC))))


class TinyTransformer(nn.Module):
    """Pre-norm transformer with RoPE, GQA and a SiLU MLP; ``forward(input_ids [T],
    position_ids [T]) -> logits [T, vocab]``."""

    def __init__(
        self,
        *,
        vocab_size: int = 64,
        dim: int = 32,
        heads: int = 4,
        kv_heads: int = 2,
        layers: int = 2,
        mlp_dim: int = 64,
    ) -> None:
        super().__init__()
        if dim % heads or heads % kv_heads or (dim // heads) % 2:
            raise ValueError(
                f"need dim % heads == 0, heads % kv_heads == 0 and an even head dim; got "
                f"dim={dim}, heads={heads}, kv_heads={kv_heads}"
            )
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, kv_heads, mlp_dim) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x_TC = self.embed(input_ids)
        for block in self.blocks:
            x_TC = block(x_TC, position_ids)
        return self.head(self.norm(x_TC))
