"""A small GPT for ``bitscale train``: byte tokens, RoPE, causal attention through HDP's seam.

The model never decides how attention is computed across ranks. Its forward takes the
packed tokens one rank holds for one work item (one or more whole documents, or the
zigzag shards of one long document) and their *global* positions (RoPE must see where a
token sits in its document, not in the shard), and calls :func:`bitscale.hdp.attention`,
which the HDP runner points at block-diagonal causal attention for packed short documents
or at ring attention for a document spread over several ranks. Outside a runner it is
plain causal attention over all tokens (one sequence).

Shape legend: T tokens of the item, H query heads, G key/value heads, Dh head dim,
D model dim, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import nn

from bitscale.hdp import attention

__all__ = [
    "GPT",
    "PRESETS",
    "ModelConfig",
    "QuantScope",
    "preset",
    "quant_filter",
]


class QuantScope(StrEnum):
    """Which projections ``--quant`` turns into ``BipolarLinear``."""

    MLP = "mlp"
    ATTN = "attn"
    ALL = "all"


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    vocab_size: int = 256
    """Byte-level tokens."""
    dim: int = 64
    """Model (residual) width D."""
    num_layers: int = 2
    num_heads: int = 4
    """Query heads H; ``dim`` must be a multiple."""
    num_kv_heads: int = 4
    """Key/value heads G (grouped-query attention when < num_heads); divides num_heads."""
    ffn_dim: int = 256
    """Hidden width of the SwiGLU MLP."""
    rope_base: float = 10_000.0
    version: int = 1

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "ffn_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ValueError(
                f"ModelConfig.dim={self.dim} is not a multiple of num_heads={self.num_heads}"
            )
        if (self.dim // self.num_heads) % 2:
            raise ValueError(
                f"head dim {self.dim // self.num_heads} must be even for RoPE; "
                "change dim or num_heads"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_kv_heads={self.num_kv_heads} must divide "
                f"num_heads={self.num_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


PRESETS: dict[str, ModelConfig] = {
    # ~0.14 M parameters: the CPU demo and the e2e tests.
    "tiny": ModelConfig(dim=64, num_layers=2, num_heads=4, num_kv_heads=4, ffn_dim=192),
    # ~3.0 M parameters, grouped-query attention.
    "small": ModelConfig(dim=256, num_layers=4, num_heads=8, num_kv_heads=2, ffn_dim=704),
    # ~35 M parameters: a GPU run.
    "medium": ModelConfig(dim=640, num_layers=8, num_heads=10, num_kv_heads=2, ffn_dim=1728),
}


def _rope(x_THD: torch.Tensor, positions_T: torch.Tensor, base: float) -> torch.Tensor:
    half = x_THD.shape[-1] // 2
    # Frequencies in float64 then cast: positions reach millions in long-context runs.
    inv_freq = base ** (-torch.arange(half, dtype=torch.float64, device=x_THD.device) / half)
    angles = positions_T.to(torch.float64)[:, None] * inv_freq[None, :]
    cos = angles.cos().to(x_THD.dtype)[:, None, :]
    sin = angles.sin().to(x_THD.dtype)[:, None, :]
    x1, x2 = x_THD[..., :half], x_THD[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class _Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        kv_dim = config.num_kv_heads * config.head_dim
        self.attn_norm = nn.RMSNorm(config.dim)
        self.q_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.k_proj = nn.Linear(config.dim, kv_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, kv_dim, bias=False)
        self.o_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.mlp_norm = nn.RMSNorm(config.dim)
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x_TD: torch.Tensor, positions_T: torch.Tensor) -> torch.Tensor:
        c = self.config
        h_TD = self.attn_norm(x_TD)
        num_tokens = x_TD.shape[0]
        q = self.q_proj(h_TD).view(num_tokens, c.num_heads, c.head_dim)
        k = self.k_proj(h_TD).view(num_tokens, c.num_kv_heads, c.head_dim)
        v = self.v_proj(h_TD).view(num_tokens, c.num_kv_heads, c.head_dim)
        q, k = _rope(q, positions_T, c.rope_base), _rope(k, positions_T, c.rope_base)
        x_TD = x_TD + self.o_proj(attention(q, k, v).reshape(num_tokens, c.dim))
        h_TD = self.mlp_norm(x_TD)
        return x_TD + self.down_proj(F.silu(self.gate_proj(h_TD)) * self.up_proj(h_TD))


class GPT(nn.Module):
    """Decoder-only transformer over packed tokens; see the module docstring for the seam."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.dim)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2 style: N(0, 0.02), residual outputs scaled down by sqrt(2 * layers) so the
        # residual stream's variance does not grow with depth.
        for name, param in self.named_parameters():
            if param.dim() < 2:
                continue
            std = 0.02
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                std /= math.sqrt(2 * self.config.num_layers)
            nn.init.normal_(param, mean=0.0, std=std)

    def forward(self, tokens_T: torch.Tensor, positions_T: torch.Tensor) -> torch.Tensor:
        """Logits ``[T, V]`` of the packed ``tokens_T`` at global ``positions_T``."""
        x_TD = self.embed(tokens_T)
        for block in self.blocks:
            x_TD = block(x_TD, positions_T)
        return self.lm_head(self.norm(x_TD))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def quant_filter(scope: QuantScope) -> Callable[[str, nn.Module], bool]:
    """The ``filter`` for ``bitscale.kernels.quantize_model``: the projections inside the
    transformer blocks that ``scope`` names; the embedding and the LM head stay float."""
    attn = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp = ("gate_proj", "up_proj", "down_proj")
    names = {QuantScope.ATTN: attn, QuantScope.MLP: mlp, QuantScope.ALL: attn + mlp}[scope]

    def wanted(name: str, module: nn.Module) -> bool:
        return (
            isinstance(module, nn.Linear)
            and name.startswith("blocks.")
            and (name.rsplit(".", 1)[-1] in names)
        )

    return wanted


def preset(name: str, **overrides: int) -> ModelConfig:
    """A preset of :data:`PRESETS` by name, with fields replaced by ``overrides``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)
