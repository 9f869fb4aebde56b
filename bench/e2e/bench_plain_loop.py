"""End to end, one device: bitscale's training step (HDP with d = 1) against a plain PyTorch
loop over the same model, the same batches and the same optimizer, with MFU.

- bitscale: ``HDPRunner`` (packed documents, bitscale's attention block, one gradient
  all-reduce in a group of one) then fused AdamW, as ``bitscale train --nproc 1`` runs it.
- plain PyTorch: each document on its own through the same model (attention is torch's
  causal SDPA over one sequence), summed cross entropy, backward, gradients divided by the
  loss-token count, the same optimizer step. One forward per document is what a loop
  without packing does; it pays a launch per short document (median ~490 tokens), so the
  ratio measures packing and bitscale's attention block together.

Both start from the same weights and see the batches of ``bitscale train``'s default data
(the standard library's top-level definitions, a token budget per step). MFU is model FLOPs
(`bitscale.throughput`) per second over the device's dense bf16 peak; "n/a" on CPU. On GPU
the case is the 1b preset in bf16 with compiled blocks (scripts/gpu_check.sh); on CPU the
tiny preset in float32 runs the same code path.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from typing import Any

import pytest

_WARMUP_STEPS = 2


def _group_of_one() -> bool:
    """Start a one-process group when none exists; True when this call started it."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1)
    return True


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(
    *, model_name: str, precision: str, compile_blocks: bool, steps: int, capacity: int
) -> dict[str, Any]:
    """Median step time, tokens/s and MFU of both loops over ``steps`` steps (the first
    ``_WARMUP_STEPS`` of each left out: compilation, allocator warm-up)."""
    import torch
    import torch.distributed as dist
    from bitscale.hdp import HDPRunner, plan_batch
    from bitscale.hdp.runtime import IGNORE_INDEX, summed_cross_entropy

    from bitscale.data import BatchSampler, load_corpus
    from bitscale.throughput import mfu, model_flops
    from bitscale.train import TrainConfig, _device, _peak_flops, build_model, cost_model_for

    started_group = _group_of_one()
    try:
        device = _device()
        config = TrainConfig(
            model=model_name, precision=precision, compile=compile_blocks, capacity=capacity
        ).resolved(1, cuda=device.type == "cuda")
        corpus = load_corpus(seed=config.seed)
        sampler = BatchSampler(
            num_docs=len(corpus), tokens_per_step=config.tokens_per_step, max_len=config.max_len
        )
        batches = [
            [torch.from_numpy(corpus.tokens(*w)) for w in sampler.windows(step, corpus.lengths)]
            for step in range(steps)
        ]
        model = build_model(config, device)
        plain_model = build_model(config, device)  # seeded: the same initial weights
        c = model.config
        cost = cost_model_for(c, config.precision)
        autocast = config.autocast_dtype
        fused = device.type == "cuda"

        def optimizer_for(m: torch.nn.Module) -> torch.optim.Optimizer:
            return torch.optim.AdamW(
                m.parameters(), lr=1e-4, fused=fused or None, foreach=None if fused else True
            )

        runner = HDPRunner(model, autocast=autocast)
        optimizer = optimizer_for(model)

        def bitscale_step(batch: list[torch.Tensor]) -> None:
            plan = plan_batch([len(t) for t in batch], 1, config.capacity, cost=cost)
            runner.step(batch, plan)
            optimizer.step()

        plain_optimizer = optimizer_for(plain_model)

        def plain_step(batch: list[torch.Tensor]) -> None:
            plain_optimizer.zero_grad(set_to_none=True)
            loss_tokens = 0
            for tokens in batch:
                tokens = tokens.to(device)
                labels = torch.cat([tokens[1:], torch.full((1,), IGNORE_INDEX, device=device)])
                positions = torch.arange(len(tokens), device=device)
                with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                    loss = summed_cross_entropy(plain_model(tokens, positions), labels)
                loss.backward()
                loss_tokens += len(tokens) - 1
            for p in plain_model.parameters():
                if p.grad is not None:
                    p.grad.div_(loss_tokens)
            plain_optimizer.step()

        results: dict[str, Any] = {}
        peak = _peak_flops(device)
        for name, step_fn in (("bitscale", bitscale_step), ("plain", plain_step)):
            times = []
            for batch in batches:
                _sync(device)
                start = time.perf_counter()
                step_fn(batch)
                _sync(device)
                times.append(time.perf_counter() - start)
            timed = slice(_WARMUP_STEPS, None) if len(times) > _WARMUP_STEPS else slice(None)
            tokens = sum(sum(len(t) for t in b) for b in batches[timed])
            flops = sum(
                model_flops(
                    [len(t) for t in b],
                    matmul_params=model.matmul_parameters(),
                    num_layers=c.num_layers,
                    attention_dim=c.num_heads * c.head_dim,
                )
                for b in batches[timed]
            )
            seconds = sum(times[timed])
            results[name] = {
                "median_step_s": statistics.median(times[timed]),
                "tokens_per_s": tokens / seconds,
                "mfu": mfu(flops, seconds, peak, 1),
                "first_step_s": times[0],
            }
        results["config"] = {
            "model": model_name,
            "parameters": model.num_parameters(),
            "precision": str(config.precision),
            "compile": compile_blocks,
            "tokens_per_step": config.tokens_per_step,
            "capacity": config.capacity,
            "steps": steps,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "peak_bf16_flops": peak,
        }
        return results
    finally:
        if started_group:
            dist.destroy_process_group()


def _record(bench_record: Any, results: dict[str, Any]) -> None:
    ours, plain, config = results["bitscale"], results["plain"], results["config"]

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    bench_record(
        baseline="plain PyTorch loop",
        case=(
            f"{config['model']} GPT, {config['precision']}"
            f"{', compiled' if config['compile'] else ''}, 1 device, "
            f"{config['tokens_per_step']} tokens per step"
        ),
        shape=config,
        metric="median step time",
        value=ours["median_step_s"],
        baseline_value=plain["median_step_s"],
        unit="s",
        higher_is_better=False,
        ratio=plain["median_step_s"] / ours["median_step_s"],
        bitscale_tokens_per_s=ours["tokens_per_s"],
        plain_tokens_per_s=plain["tokens_per_s"],
        bitscale_mfu=ours["mfu"],
        plain_mfu=plain["mfu"],
        bitscale_first_step_s=ours["first_step_s"],
        note=f"MFU (bf16 peak): bitscale {pct(ours['mfu'])}, plain {pct(plain['mfu'])}",
    )


@pytest.mark.benchmark(group="train step: bitscale vs plain PyTorch, 1 device")
def test_train_step_vs_plain_loop_cpu(benchmark: Any, bench_record: Any, quick: bool) -> None:
    """The GPU case's code path on CPU: tiny preset, float32, small steps."""
    results: dict[str, Any] = {}

    def run() -> None:
        results.update(
            compare(
                model_name="tiny",
                precision="float32",
                compile_blocks=False,
                steps=4 if quick else 8,
                capacity=1024,
            )
        )

    benchmark.pedantic(run, rounds=1, warmup_rounds=0, iterations=1)
    _record(bench_record, results)


@pytest.mark.gpu
@pytest.mark.benchmark(group="train step: bitscale vs plain PyTorch, 1 device")
def test_train_step_vs_plain_loop_gpu(benchmark: Any, bench_record: Any, quick: bool) -> None:
    """1b preset, bf16 autocast over float32 masters, compiled blocks, 16K-token micro-batches."""
    results: dict[str, Any] = {}

    def run() -> None:
        results.update(
            compare(
                model_name="1b",
                precision="bf16",
                compile_blocks=True,
                steps=5 if quick else 8,
                capacity=16384,
            )
        )

    benchmark.pedantic(run, rounds=1, warmup_rounds=0, iterations=1)
    _record(bench_record, results)
