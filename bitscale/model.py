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
from torch.utils.checkpoint import checkpoint

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
    # ~270 M parameters, head dim 64.
    "large": ModelConfig(dim=1024, num_layers=24, num_heads=16, num_kv_heads=4, ffn_dim=2816),
    # ~1.0 B parameters (45 M per layer), head dim 128: one GPU in bf16.
    "1b": ModelConfig(dim=2048, num_layers=22, num_heads=16, num_kv_heads=4, ffn_dim=5632),
}


def _rope(x_THD: torch.Tensor, positions_T: torch.Tensor, base: float) -> torch.Tensor:
    half = x_THD.shape[-1] // 2
    # Frequencies in float64 then cast: positions reach millions in long-context runs. The
    # rotation itself is float32 or wider (bf16's 8-bit mantissa would blur cos/sin), and the
    # result goes back to x's dtype.
    compute = torch.promote_types(x_THD.dtype, torch.float32)
    inv_freq = base ** (-torch.arange(half, dtype=torch.float64, device=x_THD.device) / half)
    angles = positions_T.to(torch.float64)[:, None] * inv_freq[None, :]
    cos = angles.cos().to(compute)[:, None, :]
    sin = angles.sin().to(compute)[:, None, :]
    x = x_THD.to(compute)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x_THD.dtype)


def _mark_tokens_dynamic(*tensors: torch.Tensor) -> None:
    """One compiled graph for every token count (dim 0): HDP changes it every micro-batch.
    Without the mark torch.compile specializes on the first count and recompiles on the
    next (and counts equal to another size, e.g. the model dim, would be merged with it)."""
    for tensor in tensors:
        torch._dynamo.maybe_mark_dynamic(tensor, 0)


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

        # The two halves around attention: plain methods, or their torch.compile'd versions
        # after GPT.compile_blocks().
        self._before_attention = self.before_attention
        self._after_attention = self.after_attention
        self.dynamic_tokens = False
        """Mark the token dimension of the halves' inputs dynamic (set by compile_blocks)."""
        self.checkpoint = False
        """Recompute the halves around attention in backward instead of keeping their
        activations; attention itself is never recomputed (a ring would be run twice)."""

    def before_attention(
        self, x_TD: torch.Tensor, positions_T: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of ``x_TD`` with RoPE at ``positions_T``."""
        c = self.config
        h_TD = self.attn_norm(x_TD)
        num_tokens = x_TD.shape[0]
        q = self.q_proj(h_TD).view(num_tokens, c.num_heads, c.head_dim)
        k = self.k_proj(h_TD).view(num_tokens, c.num_kv_heads, c.head_dim)
        v = self.v_proj(h_TD).view(num_tokens, c.num_kv_heads, c.head_dim)
        return _rope(q, positions_T, c.rope_base), _rope(k, positions_T, c.rope_base), v

    def after_attention(self, x_TD: torch.Tensor, attended_THD: torch.Tensor) -> torch.Tensor:
        """Output projection, residual and the SwiGLU MLP."""
        x_TD = x_TD + self.o_proj(attended_THD.reshape(x_TD.shape[0], self.config.dim))
        h_TD = self.mlp_norm(x_TD)
        return x_TD + self.down_proj(F.silu(self.gate_proj(h_TD)) * self.up_proj(h_TD))

    def forward(self, x_TD: torch.Tensor, positions_T: torch.Tensor) -> torch.Tensor:
        # Attention runs between the two halves, outside torch.compile: it is where HDP
        # dispatches to packed-document or ring attention (Python, point-to-point messages).
        # Its output is made contiguous: packed and ring attention return different strides,
        # and a compiled half would recompile for each.
        if self.dynamic_tokens:
            _mark_tokens_dynamic(x_TD, positions_T)
        if self.checkpoint and torch.is_grad_enabled():
            q, k, v = checkpoint(self._before_attention, x_TD, positions_T, use_reentrant=False)
            attended = attention(q, k, v).contiguous()
            if self.dynamic_tokens:
                _mark_tokens_dynamic(attended)
            return checkpoint(self._after_attention, x_TD, attended, use_reentrant=False)
        q, k, v = self._before_attention(x_TD, positions_T)
        attended = attention(q, k, v).contiguous()
        if self.dynamic_tokens:
            _mark_tokens_dynamic(attended)
        return self._after_attention(x_TD, attended)


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
        """Logits ``[T, V]`` of the packed ``tokens_T`` at global ``positions_T``.

        Under ``torch.autocast`` the blocks compute in the low dtype; the final norm and the
        LM head run in float32 (or the parameters' wider dtype), so logits and the loss keep
        float32 precision. They are ~0.05% of the FLOPs with 256 byte tokens."""
        x_TD = self.embed(tokens_T)
        for block in self.blocks:
            x_TD = block(x_TD, positions_T)
        device_type = x_TD.device.type
        if torch.is_autocast_enabled(device_type):
            wide = torch.promote_types(self.lm_head.weight.dtype, torch.float32)
            with torch.autocast(device_type, enabled=False):
                return self.lm_head(self.norm(x_TD.to(wide)))
        return self.lm_head(self.norm(x_TD))

    def compile_blocks(self) -> None:
        """``torch.compile`` each block's halves around attention, with the token count
        marked dynamic so varying micro-batch sizes reuse one graph (sizes 0 and 1 aside,
        which torch always specializes)."""
        for block in self.blocks:
            block._before_attention = torch.compile(block.before_attention)
            block._after_attention = torch.compile(block.after_attention)
            block.dynamic_tokens = True

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's projections and MLP in backward (attention is kept)."""
        for block in self.blocks:
            block.checkpoint = enabled

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def matmul_parameters(self) -> int:
        """Weights used in matrix products (every token pays 2 FLOPs each forward): all but
        the embedding (a lookup) and the norms."""
        return sum(
            p.numel()
            for name, p in self.named_parameters()
            if p.dim() == 2 and name != "embed.weight"
        )


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
