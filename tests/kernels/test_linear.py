"""BipolarLinear (eval: packed kernel; train: straight-through QAT) and quantize_model."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from bitscale.kernels import (
    BipolarLinear,
    dequantize,
    quantize,
    quantize_model,
    unpack_bitplanes,
)
from bitscale.kernels.config import WeightLayout
from bitscale.kernels.reference import unpack_code_words
from torch import nn

from bitscale.testing import run_on_ranks

# AUTO runs the Triton interpreter on CPU here (conftest), compiled Triton on a GPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _linear(in_features: int, out_features: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize(
    ("w_bits", "a_bits", "group_size"), [(4, 16, None), (2, 8, 16), (1, 4, None)]
)
def test_eval_matches_dequantize_then_matmul(
    backend: str, w_bits: int, a_bits: int, group_size: int | None, fp32_error_bound: Callable
) -> None:
    linear = _linear(48, 20, seed=w_bits)
    layer = BipolarLinear.from_linear(
        linear, w_bits=w_bits, a_bits=a_bits, group_size=group_size, backend=backend
    ).eval()
    x = torch.randn(2, 9, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = layer.to(DEVICE)(x.to(DEVICE)).cpu()
    assert out.shape == (2, 9, 20)
    w_dequantized = dequantize(quantize(linear.weight.detach(), w_bits, group_size=group_size))
    x_used = x.view(18, 48)
    if a_bits != 16:
        x_used = dequantize(quantize(x_used, a_bits, group_size=group_size, method="absmax"))
    expected = x_used.double() @ w_dequantized.double().t() + linear.bias.detach().double()
    error = (out.view(18, 20).double() - expected).abs()
    assert (error <= fp32_error_bound(x_used, w_dequantized)).all()


def test_train_forward_and_straight_through_gradients(fp32_error_bound: Callable) -> None:
    layer = BipolarLinear.from_linear(_linear(32, 12, seed=1), w_bits=3, a_bits=6, group_size=8)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
    out = layer.train()(x)
    w_q = dequantize(quantize(layer.weight.detach(), 3, group_size=8))
    x_q = dequantize(quantize(x.detach(), 6, group_size=8, method="absmax"))
    expected = x_q.double() @ w_q.double().t() + layer.bias.detach().double()
    assert ((out.detach().double() - expected).abs() <= fp32_error_bound(x_q, w_q)).all()
    with torch.no_grad():
        eval_out = layer.eval()(x)
    assert ((eval_out.double() - expected).abs() <= fp32_error_bound(x_q, w_q)).all()
    grad_out = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
    out.backward(grad_out)
    # Straight-through: the gradients of y = x_q @ w_q^T + b, as if quantizing were identity.
    torch.testing.assert_close(layer.weight.grad, grad_out.t() @ x_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, grad_out @ w_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad, grad_out.sum(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("a_bits", [16, 4])
def test_eval_mode_passes_gradients_to_inputs(backend: str, a_bits: int) -> None:
    layer = BipolarLinear.from_linear(
        _linear(40, 6, seed=3), w_bits=2, a_bits=a_bits, backend=backend
    ).eval()
    layer = layer.to(DEVICE)
    x = torch.randn(3, 40, device=DEVICE, requires_grad=True)
    out = layer(x)
    grad_out = torch.randn(3, 6, device=DEVICE)
    out.backward(grad_out)
    w_q = dequantize(quantize(layer.weight.detach().cpu(), 2))
    # Frozen quantized weights; straight-through activations.
    torch.testing.assert_close(x.grad.cpu(), grad_out.cpu() @ w_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad.cpu(), grad_out.cpu().sum(0))
    assert layer.weight.grad is None
    with torch.no_grad():
        torch.testing.assert_close(layer(x), out.detach(), rtol=0, atol=0)


def test_packed_weights_follow_master_weight_updates() -> None:
    layer = BipolarLinear(16, 4, w_bits=2, backend="reference").eval()
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    first = layer.packed_weight()
    assert layer.packed_weight() is first  # cached while the weight is unchanged
    before = layer(x)
    with torch.no_grad():
        layer.weight.mul_(-1)  # what an optimizer step looks like: in place
    assert layer.packed_weight() is not first
    expected = x @ dequantize(quantize(layer.weight.detach(), 2)).t() + layer.bias
    assert torch.equal(layer(x), expected.detach())
    assert not torch.equal(layer(x), before)
    words = layer.packed_weight().data  # weight-only W2: a run of four words holds 64 codes
    assert words.shape == (4, 4) and words.dtype == torch.int32


@pytest.mark.parametrize(
    ("w_bits", "a_bits", "group_size", "layout"),
    [
        (4, 16, None, WeightLayout.CODE_WORDS),
        (2, 16, 64, WeightLayout.CODE_WORDS),
        (8, 16, 16, WeightLayout.CODE_WORDS),
        (4, 16, 12, WeightLayout.BITPLANES),  # a group would start mid-word
        (2, 16, 32, WeightLayout.BITPLANES),  # a group would start mid-run (64 codes)
        (3, 16, None, WeightLayout.BITPLANES),  # 3 bits do not tile a word
        (1, 16, None, WeightLayout.CODE_WORDS),
        (1, 16, 64, WeightLayout.BITPLANES),  # a group would start mid-run (128 codes)
        (4, 8, None, WeightLayout.CODE_WORDS),  # the integer GEMM reads code words too
    ],
)
def test_layers_pack_the_layout_their_kernels_read(
    w_bits: int, a_bits: int, group_size: int | None, layout: WeightLayout
) -> None:
    layer = BipolarLinear(192, 5, w_bits=w_bits, a_bits=a_bits, group_size=group_size).eval()
    packed = layer.packed_weight()
    assert packed.layout is layout
    codes = quantize(layer.weight.detach(), w_bits, group_size=group_size).codes
    if layout is WeightLayout.CODE_WORDS:
        assert torch.equal(unpack_code_words(packed.data, w_bits, 192), codes)
    else:
        assert torch.equal(unpack_bitplanes(packed.data, w_bits, 192), codes)


def test_from_linear_and_state_dict() -> None:
    linear = _linear(24, 6, seed=0)
    layer = BipolarLinear.from_linear(linear, w_bits=5, a_bits=8, group_size=12)
    assert torch.equal(layer.weight, linear.weight) and torch.equal(layer.bias, linear.bias)
    assert list(layer.state_dict()) == ["weight", "bias"]
    assert "w_bits=5, a_bits=8, group_size=12" in repr(layer)
    no_bias = BipolarLinear.from_linear(nn.Linear(24, 6, bias=False), w_bits=1)
    assert no_bias.bias is None
    with pytest.raises(ValueError, match="does not divide K=24"):
        BipolarLinear(24, 6, w_bits=4, group_size=10)
    with pytest.raises(TypeError, match=r"needs an nn\.Linear"):
        BipolarLinear.from_linear(nn.Conv1d(2, 2, 1), w_bits=4)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(x, x, x, need_weights=False)[0]
        return self.head(x + self.mlp(x))


def test_quantize_model_swaps_linear_layers() -> None:
    torch.manual_seed(0)
    model = _Block()
    x = torch.randn(2, 5, 16)
    reference_out = model(x)
    quantized = quantize_model(model, w_bits=8, filter=lambda name, _: name != "head")
    assert quantized is model
    assert isinstance(model.mlp[0], BipolarLinear) and isinstance(model.mlp[2], BipolarLinear)
    assert type(model.head) is nn.Linear
    # nn.MultiheadAttention reads out_proj.weight directly; its Linear subclass stays.
    assert not isinstance(model.attention.out_proj, BipolarLinear)
    model.eval()
    with torch.no_grad():
        out = model(x)
    # 8-bit weights: close to the float model, not equal to it.
    assert 0 < (out - reference_out).abs().max() < 0.05


def test_quantize_model_validation() -> None:
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 6))
    with pytest.raises(ValueError, match="does not divide in_features=8 of layer '1'"):
        quantize_model(model, w_bits=4, group_size=16)
    assert all(type(m) is nn.Linear for m in model), "nothing is swapped after an error"
    with pytest.raises(ValueError, match=r"BipolarLinear\.from_linear"):
        quantize_model(nn.Linear(4, 4), w_bits=4)
    with pytest.raises(ValueError, match=r"a_bits must be an int in 1\.\.8, or 16"):
        quantize_model(model, w_bits=4, a_bits=32)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_eval_forward_validates_inputs_on_every_backend(backend: str) -> None:
    layer = BipolarLinear(16, 8, w_bits=3, backend=backend).eval()
    with torch.no_grad():
        with pytest.raises(ValueError, match="x must be a float32, bfloat16 or float16"):
            layer(torch.ones(2, 16, dtype=torch.int64))
        with pytest.raises(ValueError, match="K mismatch"):
            layer(torch.randn(2, 15))


def _train_regression(model: nn.Module, steps: int) -> float:
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(16, 4, generator=generator)
    inputs = torch.randn(512, 16, generator=generator)
    targets = torch.tanh(inputs @ teacher) + 0.5 * (inputs[:, :4] ** 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        batch = slice((step * 64) % 512, (step * 64) % 512 + 64)
        loss = nn.functional.mse_loss(model(inputs[batch]), targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(inputs), targets))


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )


def test_w4a8_training_gets_near_the_float_loss(record_property: pytest.RecordProperty) -> None:
    steps = 150
    initial = _train_regression(_mlp(), steps=0)
    float_loss = _train_regression(_mlp(), steps=steps)
    quantized = quantize_model(_mlp(), w_bits=4, a_bits=8, backend="reference")
    quantized_loss = _train_regression(quantized, steps=steps)
    record_property("losses", {"initial": initial, "fp32": float_loss, "w4a8": quantized_loss})
    # Stated margin: the W4A8 model (evaluated in eval mode on the exact reference:
    # quantized weights and activations) ends within 1.5x + 0.01 of the fp32 loss,
    # both far below the initial loss.
    assert float_loss < initial / 5
    assert quantized_loss < float_loss * 1.5 + 0.01, (initial, float_loss, quantized_loss)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_bfloat16_layer_trains_and_evaluates(backend: str) -> None:
    layer = BipolarLinear.from_linear(
        _linear(32, 8, seed=4).to(torch.bfloat16), w_bits=4, a_bits=8, backend=backend
    ).to(DEVICE)
    x = torch.randn(6, 32, device=DEVICE, dtype=torch.bfloat16)
    out = layer.train()(x)
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16 and layer.weight.grad.dtype == torch.bfloat16
    assert layer.weight.grad.abs().sum() > 0
    with torch.no_grad():
        eval_out = layer.eval()(x)
    assert eval_out.dtype == torch.bfloat16
    # Same quantized operands in both modes; training rounds x_q and w_q to bf16
    # for F.linear and both round the output: <= 4 bf16 unit roundoffs (2^-8)
    # of sum |x_q w_q| + |b| apart (float32 accumulation error is far below that).
    x_q = dequantize(quantize(x.float().cpu(), 8, method="absmax"))
    w_q = dequantize(quantize(layer.weight.detach().float().cpu(), 4))
    bias = layer.bias.detach().float().cpu().abs()
    bound = 4 * 2.0**-8 * (x_q.abs() @ w_q.abs().t() + bias)
    assert ((eval_out.float().cpu() - out.detach().float().cpu()).abs() <= bound).all()


def _eval_under_fsdp2(rank: int, world_size: int) -> list[bool]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    sharded = BipolarLinear(256, 64, w_bits=4, a_bits=8, backend="reference")
    whole = BipolarLinear(256, 64, w_bits=4, a_bits=8, backend="reference")
    whole.load_state_dict(sharded.state_dict())
    fully_shard(sharded)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    matches = []
    for _ in range(4):
        # The weight is a DTensor shard here: packing waits for the gathered weight, which
        # FSDP2 refills in place without bumping its version counter.
        sharded.eval()
        whole.eval()
        with torch.no_grad():
            matches.append(torch.equal(sharded(x), whole(x)))
        for layer in (sharded.train(), whole.train()):
            layer(x).square().sum().backward()
            with torch.no_grad():
                layer.weight -= 0.5 * layer.weight.grad.sign()
            layer.zero_grad()
    return matches


@pytest.mark.dist
def test_eval_under_fsdp2_quantizes_the_current_gathered_weight() -> None:
    assert run_on_ranks(_eval_under_fsdp2, 2, timeout=120) == [[True] * 4] * 2


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_eval_repacks_weights_changed_behind_the_version_counter(backend: str) -> None:
    """FSDP2 refills a gathered weight in place with its version counter preserved, and
    ``.data`` writes have a counter of their own: eval() must re-pack anyway."""
    layer = BipolarLinear(64, 40, w_bits=3, backend=backend).eval()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    fresh = torch.randn(40, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = layer(x)
        with torch.autograd._unsafe_preserve_version_counter(layer.weight):
            layer.weight.copy_(fresh)
        expected = BipolarLinear(64, 40, w_bits=3, backend=backend)
        expected.weight.copy_(fresh)
        expected.bias.copy_(layer.bias)
        after = layer.eval()(x)
        assert torch.equal(after, expected.eval()(x)) and not torch.equal(after, before)


def _count_clip_searches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list whose length counts the weight quantizer's scored-candidate passes."""
    from bitscale.kernels import format as quant_format

    calls: list[int] = []
    search = quant_format._search_clip

    def counted(*args, **kwargs):
        calls.append(1)
        return search(*args, **kwargs)

    monkeypatch.setattr(quant_format, "_search_clip", counted)
    return calls


def _qat_micro_batches(layer: BipolarLinear, micro_batches: int) -> dict[str, torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(5)
    for _ in range(micro_batches):
        layer(torch.randn(7, 2048, generator=gen)).square().sum().backward()
    return {n: p.grad.clone() for n, p in layer.named_parameters()}


def test_reused_quantized_weights_search_once_per_step_and_change_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The QAT step's weight quantizer: two scored passes (coarse, fine) per layer and step,
    whatever the number of micro-batches; not one per row or per micro-batch."""
    from bitscale.kernels import reuse_quantized_weights

    layer = BipolarLinear.from_linear(_linear(2048, 512, seed=3), w_bits=4, a_bits=8)
    calls = _count_clip_searches(monkeypatch)
    plain = _qat_micro_batches(layer, 3)
    assert len(calls) == 3 * 2  # 512 rows of 2048 fit one slice: no loop over rows
    calls.clear()
    with reuse_quantized_weights():
        reused = _qat_micro_batches(layer, 3)
        assert len(calls) == 2
        with torch.no_grad():
            layer.weight.mul_(0.5)  # an in-place change inside the block is seen
        _qat_micro_batches(layer, 1)
        assert len(calls) == 4
    assert all(torch.equal(reused[n], plain[n]) for n in plain)
    calls.clear()
    _qat_micro_batches(layer, 1)  # outside the block nothing is kept
    assert len(calls) == 2


@pytest.mark.gpu
def test_gpu_qat_forward_and_backward_never_sync_with_the_host() -> None:
    from bitscale.kernels import reuse_quantized_weights

    layer = BipolarLinear.from_linear(_linear(1024, 512, seed=4), w_bits=4, a_bits=8).cuda()
    x = torch.randn(64, 1024, device="cuda")
    layer(x).sum().backward()  # first call: lazy initializations may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with reuse_quantized_weights():
            for _ in range(2):
                layer(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
