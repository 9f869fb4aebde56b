"""BipolarLinear under ``torch.compile(fullgraph=True)``.

The Triton kernels enter graphs as one custom op (``bitscale::triton_linear_packed``, checked
with ``torch.library.opcheck``); compiled eval and QAT graphs are bitwise equal to
eager; compiled graphs use the weights packed by eval(), load_state_dict(), .to() and
weight assignment.
Without CUDA the Triton backend runs in the interpreter (tests/kernels/conftest.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from bitscale.kernels import BipolarLinear, bipolar_linear, dequantize, dispatch, quantize
from bitscale.kernels.config import WeightLayout, weight_layout
from bitscale.kernels.reference import pack_weight
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    """Every test compiles from scratch: BipolarLinear.forward is one code object, and
    past Dynamo's recompile limit a call would quietly run eagerly."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile(module: nn.Module, backend: str = "aot_eager") -> tuple[nn.Module, object]:
    counter = CompileCounterWithBackend(backend)
    return torch.compile(module, fullgraph=True, backend=counter), counter


def _layer(**options: object) -> BipolarLinear:
    torch.manual_seed(0)
    return BipolarLinear(64, 40, w_bits=3, **options)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize(("a_bits", "group_size"), [(16, None), (8, 16), (3, None)])
def test_compiled_eval_forward_is_bitwise_eager(
    backend: str, a_bits: int, group_size: int | None
) -> None:
    layer = _layer(a_bits=a_bits, group_size=group_size, backend=backend).eval()
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(1))
    compiled, counter = _compile(layer)
    with torch.no_grad():
        out = compiled(x)
        assert counter.frame_count == 1
        assert torch.equal(out, layer(x))


def test_compiled_eval_forward_does_no_import_lookups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamo before torch 2.13 cannot trace importlib.util.find_spec: backend resolution
    inside a compiled forward must not call it (it did, and a fullgraph compile failed
    on the H100 machine's torch 2.11)."""
    import importlib.util

    layer = _layer(a_bits=16, backend="auto").eval()
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))

    def no_lookups(name: str, package: str | None = None) -> None:
        raise AssertionError(f"find_spec({name!r}) called in the forward")

    monkeypatch.setattr(importlib.util, "find_spec", no_lookups)
    compiled, counter = _compile(layer)
    with torch.no_grad():
        assert torch.equal(compiled(x), layer(x))
    assert counter.frame_count == 1


def test_compiled_qat_step_is_bitwise_eager() -> None:
    layer = _layer(a_bits=8, group_size=16, backend="reference")
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    eager = layer(x)
    eager.square().sum().backward()
    grads = (layer.weight.grad.clone(), layer.bias.grad.clone(), x.grad.clone())
    layer.zero_grad()
    x.grad = None
    compiled, counter = _compile(layer)
    out = compiled(x)
    out.square().sum().backward()
    assert counter.frame_count == 1
    assert torch.equal(out, eager)
    for got, expected in zip((layer.weight.grad, layer.bias.grad, x.grad), grads, strict=True):
        assert torch.equal(got, expected)


def test_compiled_eval_passes_input_gradients() -> None:
    layer = _layer(a_bits=16, backend="triton").eval()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    layer(x).sum().backward()
    expected = x.grad.clone()
    x.grad = None
    compiled, counter = _compile(layer)
    compiled(x).sum().backward()
    assert counter.frame_count == 1
    assert torch.equal(x.grad, expected)


def test_compiled_graph_uses_reloaded_moved_and_replaced_weights() -> None:
    layer = _layer(backend="reference").eval()
    other = BipolarLinear(64, 40, w_bits=3, backend="reference")
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    compiled, counter = _compile(layer)
    with torch.no_grad():
        before = compiled(x)
        layer.load_state_dict(other.state_dict())
        reloaded = compiled(x)
        assert torch.equal(reloaded, other.eval()(x)) and not torch.equal(reloaded, before)
        layer.weight.data.mul_(-1)  # bypasses the version counter: eval() re-packs
        layer.eval()
        negated = compiled(x)
        assert not torch.equal(negated, reloaded)
        layer.to(torch.float64).to(torch.float32)
        assert torch.equal(compiled(x), negated)
        layer.weight = nn.Parameter(torch.randn(40, 64, generator=torch.Generator()))
        replaced = compiled(x)
        assert torch.equal(replaced, layer(x)) and not torch.equal(replaced, negated)
    assert counter.frame_count >= 1


def test_quantized_mlp_compiles_with_inductor() -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))
    for name in ("0", "2"):
        setattr(
            mlp,
            name,
            BipolarLinear.from_linear(getattr(mlp, name), w_bits=4, a_bits=8, backend="reference"),
        )
    mlp.eval()
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    compiled, counter = _compile(mlp, backend="inductor")
    with torch.no_grad():
        out = compiled(x)
        expected = mlp(x)
    assert counter.frame_count == 1
    # Inductor may fuse and reorder the float epilogue; the integer codes are the same.
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("w_bits", "a_bits", "method"),
    [(3, 16, "absmax"), (4, 16, "absmax"), (4, 8, "absmax"), (3, 4, "meanabs")],
)
def test_triton_linear_op_passes_opcheck(w_bits: int, a_bits: int, method: str) -> None:
    """The op, its fake (the output's N from either layout) and its straight-through
    backward, on bit planes (W3) and code words (W4)."""
    generator = torch.Generator().manual_seed(0)
    w = quantize(torch.randn(24, 64, generator=generator), w_bits, group_size=32)
    packed = pack_weight(w, layout=weight_layout(w_bits, 32))
    assert (packed.layout is WeightLayout.CODE_WORDS) == (w_bits == 4)
    rows = torch.randn(5, 64, generator=generator, requires_grad=True)
    bias = torch.randn(24, generator=generator, requires_grad=True)
    args = (
        rows,
        packed.data,
        packed.scales,
        packed.centred_rowsums,
        bias,
        packed.bits,
        packed.in_features,
        packed.group_size,
        a_bits,
        method,
        packed.layout.value,
    )
    torch.library.opcheck(torch.ops.bitscale.triton_linear_packed.default, args)


@pytest.mark.parametrize("a_bits", [16, 8])
def test_triton_linear_backward_is_straight_through(a_bits: int) -> None:
    """d/dx of x @ W_q^T + b is W_q (activation rounding passes the gradient through)."""
    generator = torch.Generator().manual_seed(0)
    w = quantize(torch.randn(24, 48, generator=generator), 3)
    bias = torch.randn(24, generator=generator, requires_grad=True)
    x = torch.randn(2, 5, 48, generator=generator, requires_grad=True)
    grad_out = torch.randn(2, 5, 24, generator=generator)
    bipolar_linear(x, w, a_bits=a_bits, bias=bias, backend="triton").backward(grad_out)
    assert torch.equal(x.grad, grad_out @ dequantize(w))
    assert torch.equal(bias.grad, grad_out.sum((0, 1)))


def test_only_calls_that_need_its_autograd_or_a_graph_go_through_the_op(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Eager inference runs the op's body directly (the dispatcher's host time is more
    than a decode kernel's); gradients, compiled graphs and dispatch modes still go
    through the op."""
    op_calls: list[bool] = []
    op = dispatch._triton_linear_op

    def counting_op(*args: object) -> torch.Tensor:
        op_calls.append(torch.compiler.is_compiling())
        return op(*args)

    monkeypatch.setattr(dispatch, "_triton_linear_op", counting_op)
    generator = torch.Generator().manual_seed(0)
    packed = pack_weight(quantize(torch.randn(24, 48, generator=generator), 3))
    bias = torch.randn(24, generator=generator, requires_grad=True)
    x = torch.randn(5, 48, generator=generator)
    with torch.no_grad():
        inference = dispatch.linear_packed(x, packed, bias=bias, backend="triton")
    assert op_calls == []
    with_grad = dispatch.linear_packed(x, packed, bias=bias, backend="triton")
    assert op_calls == [False] and with_grad.requires_grad
    assert torch.equal(inference, with_grad.detach())
    with_grad.sum().backward()
    assert torch.equal(bias.grad, torch.full((24,), 5.0))
    compiled = torch.compile(
        lambda rows: dispatch.linear_packed(rows, packed, backend="triton"),
        fullgraph=True,
        backend="aot_eager",
    )
    with torch.no_grad():
        no_bias = dispatch.linear_packed(x, packed, backend="triton")
        assert torch.equal(compiled(x), no_bias)
    assert op_calls == [False, True]

    class OpNames(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), OpNames() as mode:  # a dispatch mode sees the op, not its insides
        assert torch.equal(dispatch.linear_packed(x, packed, backend="triton"), no_bias)
    assert "bitscale.triton_linear_packed.default" in mode.names


def test_compiling_an_unpacked_eval_layer_stops_with_the_fix() -> None:
    layer = BipolarLinear(64, 40, w_bits=3, backend="reference", device="meta").eval()
    compiled, _ = _compile(layer)
    with pytest.raises(RuntimeError) as excinfo:  # Dynamo's Unsupported, caused by ours
        compiled(torch.randn(2, 64, device="meta"))
    assert "call .eval() after its weights are loaded" in str(excinfo.value.__cause__)


def test_eval_before_moving_a_triton_layer_to_its_device_does_not_raise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(
        "TRITON_INTERPRET", raising=False
    )  # backend="triton" cannot run on these CPU weights
    layer = _layer(backend="triton").eval()
    assert layer._packed is None
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run"):
        layer(torch.randn(2, 64))


@pytest.mark.gpu
@pytest.mark.autotune  # autotuning must happen outside the graph capture
@pytest.mark.parametrize(
    ("a_bits", "activation_method"), [(16, "absmax"), (8, "absmax"), (4, "meanabs")]
)
def test_gpu_decode_step_under_cuda_graphs(a_bits: int, activation_method: str) -> None:
    """The decode shape (M=1, bf16) through inductor with CUDA graphs: the custom op's
    launches are captured and replayed, with eager's exact output."""
    torch.manual_seed(0)
    layer = BipolarLinear(
        1024, 512, w_bits=4, a_bits=a_bits, activation_method=activation_method, backend="triton"
    )
    layer = layer.to("cuda", torch.bfloat16).eval()
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    counters = torch._dynamo.utils.counters
    counters.clear()
    with torch.no_grad():
        expected = layer(x)  # autotunes outside the capture
        compiled = torch.compile(layer, fullgraph=True, mode="reduce-overhead")
        for _ in range(3):  # warm-up, record, replay
            out = compiled(x)
        torch.cuda.synchronize()
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert torch.equal(out, expected)


def test_eval_of_a_diverged_layer_does_not_raise_but_its_forward_does() -> None:
    layer = _layer(backend="reference")
    with torch.no_grad():
        layer.weight[0, 0] = float("inf")
    layer.eval()  # switching a diverged model to eval for inspection must work
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer(torch.randn(2, 64))
