"""Bring your own model: HDP steps, lazy checkpoints and optional bipolar QAT in one loop.

    torchrun --standalone --nproc-per-node 2 examples/train_hdp.py --steps 20 --ckpt-dir /tmp/ck
    torchrun --standalone --nproc-per-node 3 examples/train_hdp.py --steps 40 --ckpt-dir /tmp/ck

The second command resumes the first one's newest committed step on 3 processes. What a model
needs for HDP: ``forward(input_ids [T], position_ids [T]) -> logits [T, V]`` with token-major
1-D inputs, and ``bitscale.hdp.attention(q, k, v)`` wherever it would do causal attention.
The runner decides per work item whether that is packed attention on one rank or a ring.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from bitscale.checkpoint import Checkpointer
from bitscale.hdp import HDPRunner, attention, plan_batch
from bitscale.kernels import quantize_model
from torch import nn


class TinyLM(nn.Module):
    """One attention layer + MLP over byte tokens, learned absolute positions."""

    def __init__(self, dim: int = 64, heads: int = 4, max_positions: int = 4096) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(256, dim)
        self.positions = nn.Embedding(max_positions, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, 256)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids) + self.positions(position_ids)  # global positions
        q, k, v = self.qkv(F.layer_norm(x, x.shape[-1:])).chunk(3, dim=-1)
        shape = (x.shape[0], self.heads, -1)
        y = attention(q.reshape(shape), k.reshape(shape), v.reshape(shape))
        x = x + self.out(y.reshape(x.shape))
        x = x + self.mlp(F.layer_norm(x, x.shape[-1:]))
        return self.head(x)


def batch_for(step: int, docs: int, max_len: int, seed: int) -> list[torch.Tensor]:
    """A long-tailed synthetic batch that every rank derives from (seed, step) alone."""
    rng = np.random.default_rng([seed, step])
    lengths = np.clip(rng.lognormal(4.5, 1.0, docs).astype(int), 2, max_len)
    return [
        torch.as_tensor((rng.integers(256) + rng.integers(1, 8) * np.arange(n)) % 256)
        for n in lengths
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--docs", type=int, default=16, help="sequences per global batch")
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--capacity", type=int, default=256, help="tokens per rank per item")
    parser.add_argument("--ckpt-dir", default=None)
    parser.add_argument("--ckpt-every", type=int, default=5)
    parser.add_argument("--quant", type=int, default=None, help="weight bits for QAT (1-8)")
    args = parser.parse_args()

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    torch.manual_seed(0)  # identical replicas on every rank
    model = TinyLM()
    if args.quant is not None:
        quantize_model(model, w_bits=args.quant, a_bits=8, filter=lambda name, _: name != "head")
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    runner = HDPRunner(model)

    start = 0
    state = {"model": model, "optimizer": optimizer}
    checkpointer = Checkpointer(args.ckpt_dir) if args.ckpt_dir else None
    if checkpointer is not None:
        if checkpointer.latest_step() is not None:
            start = checkpointer.load(state, rng=False)  # any world size
        checkpointer.attach(optimizer)  # blocks a step only while its tensors are copied

    for step in range(start, args.steps):
        batch = batch_for(step, args.docs, args.max_len, seed=0)
        plan = plan_batch([len(s) for s in batch], world, args.capacity)
        result = runner.step(batch, plan)  # this rank's items, grads synced and normalized
        optimizer.step()
        if checkpointer is not None and (step + 1) % args.ckpt_every == 0:
            checkpointer.save(step + 1, state)  # returns at once; copies run in background
        if rank == 0:
            print(
                f"step {step + 1}: loss {result.loss:.4f}  items {len(plan.items)}  "
                f"balance {plan.stats.balance:.3f}  ring bytes {sum(result.ring_kv_bytes)}"
            )
    if checkpointer is not None:
        checkpointer.close()  # waits until the last save is durable
    dist.barrier()  # no rank closes its connections while a peer still uses them
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
