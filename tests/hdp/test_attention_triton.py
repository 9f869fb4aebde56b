"""The Triton attention block kernels (bitscale.hdp._attention_triton) against a float64 dense
oracle written here, and their sm_90 builds.

Without CUDA the kernels run in Triton's interpreter in float32 (its float32 tl.dot is exact
numpy; its bf16 one is not), on 16 x 16 tiles, so the few dozen tokens of each case cross
several query and key tiles and documents cross tile borders. With CUDA the same cases run
on the GPU in float32 ("ieee" dots).

Tolerance: every result is a float32 computation of depth ~ D + Tk (a D = 16 dot product,
then an online softmax and a probability-weighted sum over at most a few dozen keys per
query, each term rounded once), so its error is at most ~ (D + Tk + 10) * 2^-24 ~ 5e-6
relative to the magnitudes summed, which are O(1) (gradients up to a few) for N(0, 1)
inputs. The checks use 2e-5, relative and absolute; every check here also passes at 1e-6
(several fail at 5e-7).

The compile check builds the three kernels for sm_90 (bf16 and fp16, D = 64 and 128) in a
fresh process without TRITON_INTERPRET and prints registers, spill stack and shared memory.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
RTOL = ATOL = 2e-5


@pytest.fixture
def kernels(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The kernel module, decorated and launched under the interpreter when there is no
    CUDA (Triton reads TRITON_INTERPRET at both), which only this file's tests see."""
    if DEVICE.type == "cuda":
        from bitscale.hdp import _attention_triton

        return _attention_triton
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import triton.language as tl
    from bitscale.hdp import _attention_triton
    from triton.runtime.interpreter import InterpretedFunction

    if not (isinstance(tl.max, InterpretedFunction) and _attention_triton._interpreted()):
        pytest.fail(
            "triton was imported without TRITON_INTERPRET=1 before tests/conftest.py, so "
            "the interpreter cannot run the kernels; run with TRITON_INTERPRET=1 set"
        )
    return _attention_triton


# ---------------------------------------------------------------------------------------
# Tokens and the dense oracle


@dataclass(frozen=True)
class Tokens:
    doc: torch.Tensor  # int32 [T]
    pos: torch.Tensor  # int32 [T]

    def __len__(self) -> int:
        return self.doc.shape[0]

    def subset(self, keep: torch.Tensor) -> Tokens:
        """The tokens where ``keep`` is true, in order (a subsequence stays sorted)."""
        return Tokens(self.doc[keep].contiguous(), self.pos[keep].contiguous())

    def to(self, device: torch.device) -> Tokens:
        return Tokens(self.doc.to(device), self.pos.to(device))


def packed(lengths: list[int], doc_ids: list[int] | None = None) -> Tokens:
    """Documents of ``lengths`` one after the other (doc ids 0, 1, ... unless given)."""
    doc_ids = list(range(len(lengths))) if doc_ids is None else doc_ids
    doc = torch.cat(
        [torch.full((n,), d, dtype=torch.int32) for d, n in zip(doc_ids, lengths, strict=True)]
    )
    pos = torch.cat([torch.arange(n, dtype=torch.int32) for n in lengths])
    return Tokens(doc, pos)


def visible(q: Tokens, k: Tokens, causal: bool) -> torch.Tensor:
    mask = q.doc[:, None] == k.doc[None, :]
    if causal:
        mask &= k.pos[None, :] <= q.pos[:, None]
    return mask


def dense(q_THD, k_TGD, v_TGD, q: Tokens, k: Tokens, causal: bool, scale: float):
    """float64 masked softmax attention: (out [T, H, D], lse [H, T]); rows that see nothing
    get 0 and -inf. Differentiable by autograd."""
    group = q_THD.shape[1] // k_TGD.shape[1]
    scores = torch.einsum("qhd,khd->hqk", q_THD, k_TGD.repeat_interleave(group, 1)) * scale
    scores = scores.masked_fill(~visible(q, k, causal), -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.masked_fill(lse == -math.inf, 0.0)[..., None])
    out = torch.einsum("hqk,khd->qhd", probs, v_TGD.repeat_interleave(group, 1))
    return out, lse


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 union of (out [T, H, D], lse [H, T]) pairs through their log-sum-exp."""
    lse = torch.logsumexp(torch.stack([p[1].double() for p in parts]), dim=0)
    base = lse.masked_fill(lse == -math.inf, 0.0)
    out = sum(torch.exp(p[1].double() - base).T[..., None] * p[0].double() for p in parts)
    return out, lse


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert not actual.isnan().any()
    torch.testing.assert_close(actual.double().cpu(), expected.detach().cpu(), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------
# Cases: queries, and keys split into two blocks as a ring splits them


@dataclass(frozen=True)
class Case:
    name: str
    queries: Tokens
    blocks: tuple[Tokens, Tokens]
    heads: int
    kv_heads: int
    causal: bool


def _split(tokens: Tokens, keep_q: float, seed: int) -> tuple[Tokens, tuple[Tokens, Tokens]]:
    """A random subsequence as the queries, and every token as a key of block A or B."""
    gen = torch.Generator().manual_seed(seed)
    queries = tokens.subset(torch.rand(len(tokens), generator=gen) < keep_q)
    in_a = torch.rand(len(tokens), generator=gen) < 0.5
    return queries, (tokens.subset(in_a), tokens.subset(~in_a))


def _cases() -> list[Case]:
    cases = []
    # Documents crossing 16-token tiles, odd lengths, a one-token document.
    crossing = packed([5, 23, 1, 11, 17])
    for causal in (True, False):
        for heads, kv_heads in ((2, 2), (4, 2), (4, 1)):
            queries, blocks = _split(crossing, 0.8, seed=heads + 10 * kv_heads + causal)
            kind = "causal" if causal else "full"
            cases.append(
                Case(
                    f"crossing {kind} H{heads}G{kv_heads}", queries, blocks, heads, kv_heads, causal
                )
            )
    # Doc ids skipping (empty documents in between) and one-token documents.
    skipping = packed([1, 1, 19, 1, 14, 1], doc_ids=[0, 3, 4, 9, 10, 15])
    queries, blocks = _split(skipping, 0.9, seed=3)
    cases.append(Case("skipping ids causal", queries, blocks, 4, 2, True))
    cases.append(Case("skipping ids full", queries, blocks, 4, 2, False))
    # Queries with no visible key: the queries' first document has no key at all, and a
    # zigzag-like key block holds only the late half of each document (early queries see
    # nothing of it in causal attention); Tq != Tk.
    docs = packed([9, 20, 13])
    late = docs.pos >= torch.tensor([5, 10, 7], dtype=torch.int32).repeat_interleave(
        torch.tensor([9, 20, 13])
    )
    queries = docs.subset(torch.ones(len(docs), dtype=torch.bool))
    keys_a = docs.subset(late & (docs.doc > 0))
    keys_b = docs.subset(~late & (docs.doc == 2))
    cases.append(Case("unseen queries causal", queries, (keys_a, keys_b), 2, 1, True))
    cases.append(Case("unseen queries full", queries, (keys_a, keys_b), 2, 1, False))
    return cases


CASES = _cases()


def _tensors(case: Case, dim: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tq = len(case.queries)
    tk = [len(b) for b in case.blocks]
    # q as a view into a fused qkv-like buffer: its token stride is not H * D.
    fused = torch.randn(tq, case.heads + 2, dim, generator=gen)
    q = fused[:, : case.heads]
    ks = [torch.randn(t, case.kv_heads, dim, generator=gen) for t in tk]
    vs = [torch.randn(t, case.kv_heads, dim, generator=gen) for t in tk]
    dout = torch.randn(tq, case.heads, dim, generator=gen)
    return q, ks, vs, dout


def _device(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_blocks_match_dense_attention_and_its_gradients(kernels: ModuleType, case: Case) -> None:
    """Each key block's (out, lse) matches the dense oracle on that block; merged through
    their lse they are the attention over all keys; and with the final lse, the blocks'
    gradients sum to the float64 autograd gradient of that attention."""
    scale = 0.25
    q, ks, vs, dout = _tensors(case)
    q_tok = case.queries.to(DEVICE)
    parts = []
    for k, v, k_tokens in zip(ks, vs, case.blocks, strict=True):
        k_tok = k_tokens.to(DEVICE)
        out, lse = kernels.block_forward(
            *_device(q, k, v),
            q_tok.doc,
            q_tok.pos,
            k_tok.doc,
            k_tok.pos,
            causal=case.causal,
            scale=scale,
        )
        assert out.dtype == lse.dtype == torch.float32
        expected_out, expected_lse = dense(
            q.double(), k.double(), v.double(), case.queries, k_tokens, case.causal, scale
        )
        assert_close(out, expected_out)
        assert_close(lse, expected_lse)
        parts.append((out.cpu(), lse.cpu()))

    all_keys = Tokens(
        *(torch.cat([b.doc for b in case.blocks]), torch.cat([b.pos for b in case.blocks]))
    )
    q64, k64, v64 = (
        q.double().requires_grad_(),
        torch.cat(ks).double().requires_grad_(),
        torch.cat(vs).double().requires_grad_(),
    )
    expected_out, expected_lse = dense(q64, k64, v64, case.queries, all_keys, case.causal, scale)
    out, lse = merge(parts)
    assert_close(out, expected_out)
    assert_close(lse, expected_lse)
    expected_out.backward(dout.double())

    lse32 = lse.float()
    # delta as the ring computes it: a transposed (non-contiguous) view.
    delta = (dout.double() * out).sum(-1).float().transpose(0, 1)
    dq = torch.zeros(q.shape, dtype=torch.float64)
    dks, dvs = [], []
    for k, v, k_tokens in zip(ks, vs, case.blocks, strict=True):
        k_tok = k_tokens.to(DEVICE)
        block_dq, dk, dv = kernels.block_backward(
            *_device(q, k, v, dout, lse32, delta),
            q_tok.doc,
            q_tok.pos,
            k_tok.doc,
            k_tok.pos,
            causal=case.causal,
            scale=scale,
        )
        for grad in (block_dq, dk, dv):
            assert grad.dtype == torch.float32 and not grad.isnan().any()
        dq += block_dq.double().cpu()
        dks.append(dk)
        dvs.append(dv)
    assert_close(dq, q64.grad)
    assert_close(torch.cat([dk.cpu() for dk in dks]), k64.grad)
    assert_close(torch.cat([dv.cpu() for dv in dvs]), v64.grad)
    # Queries that see no key anywhere get exactly zero gradient.
    unseen = expected_lse.isinf().T  # [T, H]
    assert unseen.any() == case.name.startswith("unseen")
    assert (dq[unseen] == 0).all()


@pytest.mark.parametrize("dim", [8, 24])
def test_head_dims_below_and_between_powers_of_two(kernels: ModuleType, dim: int) -> None:
    """D = 8 and 24 run on 16- and 32-wide tiles, the padding masked."""
    case = CASES[0]
    q, ks, vs, dout = _tensors(case, dim=dim, seed=1)
    k_tokens = case.blocks[0]
    q_tok, k_tok = case.queries.to(DEVICE), k_tokens.to(DEVICE)
    scale = dim**-0.5
    out, lse = kernels.block_forward(
        *_device(q, ks[0], vs[0]),
        q_tok.doc,
        q_tok.pos,
        k_tok.doc,
        k_tok.pos,
        causal=True,
        scale=scale,
    )
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, ks[0], vs[0]))
    expected_out, expected_lse = dense(q64, k64, v64, case.queries, k_tokens, True, scale)
    assert_close(out, expected_out)
    assert_close(lse, expected_lse)
    expected_out.backward(dout.double())
    delta = (dout * out.cpu()).sum(-1).transpose(0, 1)
    dq, dk, dv = kernels.block_backward(
        *_device(q, ks[0], vs[0], dout, lse, delta),
        q_tok.doc,
        q_tok.pos,
        k_tok.doc,
        k_tok.pos,
        causal=True,
        scale=scale,
    )
    assert_close(dq, q64.grad)
    assert_close(dk, k64.grad)
    assert_close(dv, v64.grad)


@pytest.mark.parametrize("empty", ["queries", "keys"])
def test_empty_blocks_return_zeros_without_launching(kernels: ModuleType, empty: str) -> None:
    tq, tk = (0, 5) if empty == "queries" else (5, 0)
    q = torch.randn(tq, 4, 16, device=DEVICE)
    k = torch.randn(tk, 2, 16, device=DEVICE)
    q_tok, k_tok = packed([tq]).to(DEVICE), packed([tk]).to(DEVICE)
    out, lse = kernels.block_forward(
        q, k, k, q_tok.doc, q_tok.pos, k_tok.doc, k_tok.pos, causal=True, scale=0.25
    )
    assert out.shape == (tq, 4, 16) and lse.shape == (4, tq)
    assert (out == 0).all() and (lse == -math.inf).all()
    dq, dk, dv = kernels.block_backward(
        q,
        k,
        k,
        q,
        lse,
        torch.zeros_like(lse),
        q_tok.doc,
        q_tok.pos,
        k_tok.doc,
        k_tok.pos,
        causal=True,
        scale=0.25,
    )
    assert dq.shape == q.shape and dk.shape == dv.shape == k.shape
    assert not dq.any() and not dk.any() and not dv.any()


def _bad_inputs():
    q, k = torch.randn(6, 4, 16), torch.randn(6, 2, 16)
    tok = packed([6])
    ok = dict(q=q, k=k, v=k, q_doc=tok.doc, q_pos=tok.pos, k_doc=tok.doc, k_pos=tok.pos)
    return [
        ("batch dim", ok | dict(q=q[None]), "no batch dimension"),
        ("heads", ok | dict(q=torch.randn(6, 3, 16)), "multiple of k/v heads"),
        (
            "head dim",
            ok | dict(q=torch.randn(6, 4, 256), k=torch.randn(6, 2, 256), v=torch.randn(6, 2, 256)),
            "head dim 256",
        ),
        ("dtype", ok | dict(q=q.double(), k=k.double(), v=k.double()), "share one dtype"),
        ("mixed dtypes", ok | dict(k=k.half()), "share one dtype"),
        ("int64 doc", ok | dict(q_doc=tok.doc.long()), "q_doc must be a contiguous 1-D int32"),
        (
            "strided pos",
            ok | dict(k_pos=torch.arange(12, dtype=torch.int32)[::2]),
            "k_pos must be a contiguous",
        ),
        ("short doc", ok | dict(k_doc=tok.doc[:5]), "k_doc has 5 entries for 6 tokens"),
    ]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [(inputs, message) for _, inputs, message in _bad_inputs()],
    ids=[name for name, _, _ in _bad_inputs()],
)
def test_bad_inputs_raise_value_errors(kernels: ModuleType, inputs: dict, message: str) -> None:
    args = [inputs[name].to(DEVICE) for name in ("q", "k", "v", "q_doc", "q_pos", "k_doc", "k_pos")]
    with pytest.raises(ValueError, match=re.escape(message)):
        kernels.block_forward(*args, causal=True, scale=0.25)


def test_backward_checks_its_statistics(kernels: ModuleType) -> None:
    q, k = torch.randn(6, 4, 16, device=DEVICE), torch.randn(6, 2, 16, device=DEVICE)
    tok = packed([6]).to(DEVICE)
    lse = torch.zeros(4, 6, device=DEVICE)
    with pytest.raises(ValueError, match=r"lse_HT must be float32 \[H, Tq\] = \[4, 6\]"):
        kernels.block_backward(
            q, k, k, q, lse.T, lse, tok.doc, tok.pos, tok.doc, tok.pos, causal=True, scale=0.25
        )
    with pytest.raises(ValueError, match="dout must match q's shape"):
        kernels.block_backward(
            q, k, k, q[:5], lse, lse, tok.doc, tok.pos, tok.doc, tok.pos, causal=True, scale=0.25
        )


# ---------------------------------------------------------------------------------------
# sm_90 builds

# Per-block shared memory a kernel may opt into on sm_90 (CUDA programming guide).
_SM90_SHARED = 227 * 1024
_REPORT = re.compile(
    r"^(?P<label>\S+ \S+ D=\d+) tile (?P<tile>\S+) registers (?P<regs>\d+) "
    r"stack (?P<stack>\d+) shared (?P<shared>\d+)$"
)


def _compile_all() -> list[str]:
    """Compile every kernel for sm_90 as the launcher configures it (bf16 and fp16, D 64 and
    128, causal; D 128 full too) and report each build's registers per thread and spill
    stack (cuobjdump -res-usage on the cubin) and shared memory (compile metadata)."""
    import triton
    from bitscale.hdp import _attention_triton as kernels
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    builds = (
        ("forward", kernels._forward_kernel),
        ("backward_kv", kernels._backward_kv_kernel),
        ("backward_q", kernels._backward_q_kernel),
    )
    statistics_strides = ("stride_lh", "stride_lt", "stride_eh", "stride_et")
    lines = []
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        for dim in (64, 128):
            for causal in (True, False) if dim == 128 and name == "bf16" else (True,):
                tiles = kernels._tiles(dim, dtype)
                for label, kernel in builds:
                    block_m, block_n, warps, stages = getattr(tiles, label)
                    signature = {}
                    for arg in kernel.arg_names:
                        if arg.isupper():
                            continue
                        if arg in ("q_ptr", "k_ptr", "v_ptr", "dout_ptr"):
                            signature[arg] = f"*{name}"
                        elif arg.endswith("_ptr"):
                            integer = any(s in arg for s in ("doc", "pos", "start", "end"))
                            signature[arg] = "*i32" if integer else "*fp32"
                        else:
                            signature[arg] = "fp32" if "scale" in arg else "i32"
                    constants = dict(
                        CAUSAL=causal,
                        HEAD_DIM=dim,
                        BLOCK_D=dim,
                        BLOCK_M=block_m,
                        BLOCK_N=block_n,
                        PRECISION=kernels._precision(dtype),
                    )
                    # As the JIT specializes model shapes: 16-byte aligned pointers and
                    # token/head strides (multiples of D); the [H, T] statistics' strides
                    # may be anything.
                    aligned = {
                        (kernel.arg_names.index(arg),): [["tt.divisibility", 16]]
                        for arg in signature
                        if arg.endswith("_ptr")
                        or (arg.startswith("stride") and arg not in statistics_strides)
                    }
                    source = ASTSource(
                        kernel,
                        {**signature, **dict.fromkeys(constants, "constexpr")},
                        constants,
                        attrs=aligned,
                    )
                    binary = triton.compile(
                        source,
                        target=GPUTarget("cuda", 90, 64),
                        options={"num_warps": warps, "num_stages": stages},
                    )
                    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
                        cubin.write(binary.asm["cubin"])
                        cubin.flush()
                        usage = subprocess.run(
                            [str(cuobjdump), "-res-usage", cubin.name],
                            capture_output=True,
                            text=True,
                            check=True,
                        ).stdout
                    registers, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
                    kind = "causal" if causal else "full"
                    lines.append(
                        f"{label} {name}/{kind} D={dim} tile {block_m}x{block_n}x{warps}w{stages}s "
                        f"registers {registers} stack {stack} shared {binary.metadata.shared}"
                    )
    return lines


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_spills() -> None:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    print(result.stdout)
    reports = [_REPORT.match(line) for line in result.stdout.splitlines()]
    assert all(reports) and len(reports) == 3 * (2 * 2 + 1), result.stdout
    for report in reports:
        assert int(report["shared"]) <= _SM90_SHARED, report.string
        assert int(report["stack"]) == 0, f"spills: {report.string}"
        assert int(report["regs"]) <= 255, report.string


if __name__ == "__main__":
    print("\n".join(_compile_all()))
