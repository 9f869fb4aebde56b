"""``BipolarLinear``: an nn.Linear replacement with bipolar-INT weights (and activations).

Training keeps float master weights and fake-quantizes weights (and, for
``a_bits <= 8``, activations) in the forward pass with a straight-through
estimator, so gradients reach the master weights as if quantization were the
identity (quantization-aware training). Eval quantizes the master weights once
(cached until they change), packs them (code words for 1-, 2-, 4- and 8-bit weights,
bit planes otherwise: see ``WeightLayout``) and runs them through the dispatched
kernel.

``eval()`` always re-packs from the current weights. Between calls, eager forwards
re-pack when the weight's version counter, storage, device or dtype changed;
``load_state_dict()``, ``.to()`` and assigning a new weight re-pack at once. Writes
that bypass the version counter (``.data``, FSDP2's in-place re-gathers) and, under
torch.compile (which cannot guard on the counter), any in-place change in eval mode
(an optimizer step, ``Checkpointer.load``) are seen after the next ``eval()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from bitscale.kernels.config import (
    FLOAT_ACTIVATION_BITS,
    Backend,
    BipolarConfig,
    QuantMethod,
    check_group_size,
    weight_layout,
)
from bitscale.kernels.dispatch import (
    check_linear_inputs,
    check_same_device,
    resolve_backend,
    run_packed,
)
from bitscale.kernels.format import fake_quantize, quantize
from bitscale.kernels.reference import (
    PackedWeight,
    dequantize_packed,
    dequantized_linear,
    pack_weight,
)
from torch import nn
from torch.nn import functional as F

__all__ = ["BipolarLinear", "quantize_model", "reuse_quantized_weights"]

# Per block of reuse_quantized_weights: id(layer) -> (the weight tensor, its version counter,
# its fake-quantized values).
_REUSED_WEIGHTS: ContextVar[dict[int, tuple[torch.Tensor, int, torch.Tensor]] | None] = ContextVar(
    "bitscale_reused_quantized_weights", default=None
)


@contextmanager
def reuse_quantized_weights() -> Iterator[None]:
    """Inside the block, each training :class:`BipolarLinear` fake-quantizes its weight once
    and reuses the result in later forwards: wrap the forwards/backwards of one optimizer
    step (gradient accumulation, HDP micro-batches), where weights do not change.

    The weight quantizer (the MSE clip-ratio search: 31 scored scales per row) then runs once
    per layer and step instead of once per micro-batch. Results are bitwise those of
    quantizing in every forward. A weight changed in place inside the block (its version
    counter moves) is quantized again; step the optimizer outside the block anyway: a weight
    rewritten without a version bump (an FSDP2 re-gather) would not be seen. Forwards under
    ``torch.compile`` quantize in every call.
    """
    token = _REUSED_WEIGHTS.set({})
    try:
        yield
    finally:
        _REUSED_WEIGHTS.reset(token)


class BipolarLinear(nn.Module):
    """``y = x @ W_q^T + b`` with W quantized to ``w_bits`` bipolar-INT.

    ``a_bits=16`` keeps activations float; ``a_bits`` in 1..8 quantizes them
    per token (per K-group with ``group_size``) on the fly. The state dict holds
    only the float master ``weight`` and ``bias``, like nn.Linear's.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        w_bits: int,
        a_bits: int = FLOAT_ACTIVATION_BITS,
        group_size: int | None = None,
        bias: bool = True,
        method: QuantMethod | str = QuantMethod.MSE,
        activation_method: QuantMethod | str = QuantMethod.ABSMAX,
        backend: Backend | str = Backend.AUTO,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = BipolarConfig(
            w_bits=w_bits,
            a_bits=a_bits,
            group_size=group_size,
            method=method,
            activation_method=activation_method,
            backend=backend,
        )
        check_group_size(group_size, in_features)
        self.in_features = in_features
        self.out_features = out_features
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self._packed: PackedWeight | None = None
        self._dequantized: torch.Tensor | None = None
        self._packed_key: tuple | None = None
        self.reset_parameters()
        self.register_load_state_dict_post_hook(_pack_after_load)

    def reset_parameters(self) -> None:
        """nn.Linear's initialization."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        w_bits: int,
        a_bits: int = FLOAT_ACTIVATION_BITS,
        group_size: int | None = None,
        method: QuantMethod | str = QuantMethod.MSE,
        activation_method: QuantMethod | str = QuantMethod.ABSMAX,
        backend: Backend | str = Backend.AUTO,
    ) -> BipolarLinear:
        """A BipolarLinear whose master weights are a copy of ``linear``'s."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        layer = cls(
            linear.in_features,
            linear.out_features,
            w_bits=w_bits,
            a_bits=a_bits,
            group_size=group_size,
            bias=linear.bias is not None,
            method=method,
            activation_method=activation_method,
            backend=backend,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.train(linear.training)
        return layer

    def packed_weight(self) -> PackedWeight:
        """The quantized, packed weight used in eval (recomputed when W changes)."""
        if torch.compiler.is_compiling():
            # Dynamo cannot guard on the version counter, so compiled graphs use the
            # weights packed by eval(), load_state_dict(), .to(), assignment or the last
            # eager call.
            if self._packed is None:
                raise RuntimeError(
                    "BipolarLinear has no packed weights to compile with: call .eval() "
                    "after its weights are loaded (or run one eager forward) before "
                    "torch.compile"
                )
            return self._packed
        weight = self.weight
        # In-place updates (optimizer steps, load_state_dict, .copy_) bump the
        # version counter; .to() / replacing the parameter changes the storage.
        key = (weight._version, weight.data_ptr(), weight.device, weight.dtype)
        if self._packed is None or self._packed_key != key:
            quantized = quantize(
                weight.detach(),
                self.config.w_bits,
                group_size=self.config.group_size,
                method=self.config.method,
            )
            layout = weight_layout(self.config.w_bits, self.config.group_size)
            self._packed = pack_weight(quantized, layout=layout)
            self._dequantized = None
            self._packed_key = key
        return self._packed

    def _reference_weight(self) -> torch.Tensor:
        """The packed weight, unpacked and dequantized once for the torch fallback.

        Unpacking 2048 x 2048 bit planes on every call cost more than the fp32
        matmul itself on 2 CPU cores; the cache (float32 [N, K], the size of the
        master weight) keeps the fallback near nn.Linear's speed.
        """
        packed = self.packed_weight()
        if self._dequantized is None:
            if torch.compiler.is_compiling():
                return _dequantize_packed(packed)  # no attribute writes in a graph
            self._dequantized = _dequantize_packed(packed)
        return self._dequantized

    def train(self, mode: bool = True) -> BipolarLinear:
        """Switching to eval quantizes and packs the current weights, whatever changed
        them (optimizer steps, ``.data`` writes, FSDP2 re-gathers that keep the version
        counter), so eval forwards and compiled graphs read fresh ones."""
        super().train(mode)
        if not mode:
            self._drop_packed()
            self._pack_if_eval()
        return self

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        super().register_parameter(name, param)
        if name == "weight" and hasattr(self, "_packed"):  # not during __init__
            self._drop_packed()
            self._pack_if_eval()

    def _apply(self, fn: Callable, recurse: bool = True) -> BipolarLinear:
        super()._apply(fn, recurse)
        self._pack_if_eval()  # the cache key sees new devices, dtypes and storage
        return self

    def _drop_packed(self) -> None:
        self._packed = self._dequantized = self._packed_key = None

    def _pack_if_eval(self) -> None:
        """Prepare what the eval forward reads, so compiled graphs find it ready."""
        weight = self.weight
        # Only plain local tensors: a sharded (FSDP2 / DTensor) weight is quantized in the
        # forward, once the wrapper has gathered it; a meta one has no values yet.
        if self.training or type(weight.data) is not torch.Tensor or weight.is_meta:
            return
        try:
            backend = resolve_backend(self.config.backend, weight.device)
            if backend is Backend.REFERENCE:
                self._reference_weight()
            else:
                self.packed_weight()
        except (RuntimeError, ValueError):
            # backend="triton" on CPU weights on their way to .cuda(), or non-finite
            # weights (a diverged model being inspected): eval() and .to() must still
            # work; the forward reports either if the layer is called like this.
            self._drop_packed()

    def _eval_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        config = self.config
        backend = resolve_backend(config.backend, x.device)
        check_linear_inputs(x, self.in_features, self.out_features, bias)
        if backend is Backend.REFERENCE:
            return dequantized_linear(
                x.detach(),
                self._reference_weight(),
                group_size=config.group_size,
                a_bits=config.a_bits,
                activation_method=config.activation_method,
                bias=bias,
            )
        packed = self.packed_weight()
        check_same_device(x, packed.data.device, bias)
        return run_packed(
            x.detach(), packed, config.a_bits, config.activation_method, bias, backend
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        config = self.config
        if not self.training:
            bias = self.bias
            needs_grad = x.requires_grad or (bias is not None and bias.requires_grad)
            if torch.is_grad_enabled() and needs_grad:
                return _FrozenWeightLinear.apply(x, bias, self)
            return self._eval_forward(x, None if bias is None else bias.detach())
        weight = _straight_through(self.weight, self._fake_quantized_weight())
        if config.a_bits != FLOAT_ACTIVATION_BITS:
            x = _straight_through(
                x, fake_quantize(x, config.a_bits, config.group_size, config.activation_method)
            )
        return F.linear(x, weight.to(x.dtype), self.bias)

    def _fake_quantized_weight(self) -> torch.Tensor:
        config = self.config
        # A compiled graph cannot hold host state between calls: it quantizes every time.
        reused = None if torch.compiler.is_compiling() else _REUSED_WEIGHTS.get()
        weight = self.weight
        if reused is not None:
            held = reused.get(id(self))
            if held is not None and held[0] is weight and held[1] == weight._version:
                return held[2]
        quantized = fake_quantize(weight, config.w_bits, config.group_size, config.method)
        if reused is not None:
            reused[id(self)] = (weight, weight._version, quantized)
        return quantized

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, w_bits={c.w_bits}, a_bits={c.a_bits}, "
            f"group_size={c.group_size}, method={c.method.value}, backend={c.backend.value}"
        )


def _pack_after_load(module: BipolarLinear, incompatible_keys: object) -> None:
    module._pack_if_eval()


def _dequantize_packed(packed: PackedWeight) -> torch.Tensor:
    return dequantize_packed(
        packed.data,
        packed.scales,
        packed.bits,
        packed.in_features,
        packed.group_size,
        packed.layout,
    )


class _FrozenWeightLinear(torch.autograd.Function):
    """Eval-mode kernel call with gradients for x and bias (the weights stay frozen).

    The kernels have no backward; this gives the one of y = x_q @ W_q^T + b with
    a straight-through x_q, so a quantized model in eval mode can still pass
    gradients to layers before it (adapters, inputs).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        layer: BipolarLinear,
    ) -> torch.Tensor:
        ctx.layer = layer
        ctx.bias_dtype = None if bias is None else bias.dtype
        return layer._eval_forward(x, None if bias is None else bias.detach())

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        layer: BipolarLinear = ctx.layer
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = layer._dequantized  # the torch fallback's cache, when it has one
            if weight is None:
                weight = _dequantize_packed(layer.packed_weight())
            grad_x = (grad_out.to(torch.float32) @ weight).to(grad_out.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, layer.out_features).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None


def _straight_through(value: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """``quantized`` in the forward pass, the identity's gradient in the backward pass."""
    return value + (quantized.to(value.dtype) - value).detach()


def quantize_model(
    model: nn.Module,
    *,
    w_bits: int,
    a_bits: int = FLOAT_ACTIVATION_BITS,
    group_size: int | None = None,
    filter: Callable[[str, nn.Linear], bool] | None = None,
    method: QuantMethod | str = QuantMethod.MSE,
    activation_method: QuantMethod | str = QuantMethod.ABSMAX,
    backend: Backend | str = Backend.AUTO,
) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` (in place) by a BipolarLinear; returns ``model``.

    ``filter(qualified_name, linear)`` picks which layers to swap (default: all).
    """
    BipolarConfig(
        w_bits=w_bits,
        a_bits=a_bits,
        group_size=group_size,
        method=method,
        activation_method=activation_method,
        backend=backend,
    )
    if isinstance(model, nn.Linear):
        raise ValueError(
            "quantize_model swaps child modules; for a bare nn.Linear use "
            "BipolarLinear.from_linear(linear, ...)"
        )
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and (filter is None or filter(name, module))
    ]
    for name, linear in targets:
        if group_size is not None and linear.in_features % group_size:
            raise ValueError(
                f"group_size={group_size} does not divide in_features={linear.in_features} "
                f"of layer {name!r}; pick a common divisor or exclude it with filter"
            )
    for name, linear in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(
            parent,
            child_name,
            BipolarLinear.from_linear(
                linear,
                w_bits=w_bits,
                a_bits=a_bits,
                group_size=group_size,
                method=method,
                activation_method=activation_method,
                backend=backend,
            ),
        )
    return model
