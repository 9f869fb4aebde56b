"""Resharded load: one target rank's fragment by byte ranges vs reading whole parameters.

A 4-way ZeRO-style checkpoint of one parameter is loaded as the fragment of rank 1 of M
target ranks. bitscale reads only the overlapping byte ranges (``load_shard``); the
baseline is what DeepSpeed's universal loader does per rank: materialize the whole
parameter, then narrow to the fragment.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bitscale.checkpoint.format import read_manifest, read_tensor
from bitscale.checkpoint.layout import (
    DataParallel,
    RankLayout,
    StepWriter,
    TensorLayout,
    load_shard,
)
from bitscale.checkpoint.reshard import ChunkReader


def flat_shard(shape: tuple[int, ...], rank: int, ranks: int) -> RankLayout:
    numel = shape[0] * shape[1]
    per_rank = -(-numel // ranks)
    return RankLayout(
        layout=TensorLayout(shape=shape),
        dp=DataParallel.FLAT,
        dp_start=rank * per_rank,
        dp_length=per_rank,
    )


@pytest.mark.benchmark(group="universal_load")
@pytest.mark.parametrize("target_ranks", [2, 8])
def test_load_fragment(bench_compare, quick: bool, tmp_path: Path, target_ranks: int) -> None:
    rows = 1024 if quick else 8192
    shape = (rows, 4096)  # 16 MiB (quick) or 128 MiB of float32
    values = torch.randn(shape)
    with StepWriter(tmp_path, 1) as writer:
        for rank in range(4):
            shard = flat_shard(shape, rank, 4)
            for piece in shard.pieces():
                writer.add_chunk(
                    "w", values[piece.logical.slices()], piece.logical, logical_shape=shape
                )
        writer.commit({"w": {"kind": "tensor", "value": {"$tensor": "w"}}}, world_size=4)
    step_dir = tmp_path / "step-00000001"
    record = read_manifest(step_dir).tensors["w"]
    target = flat_shard(shape, 1, target_ranks)
    local = torch.empty(target.local_shape)
    fragment = slice(target.dp_start, target.dp_start + target.dp_length)

    def bitscale() -> None:
        with ChunkReader(step_dir) as reader:
            load_shard(reader, "w", record, local, target)

    def whole_parameter() -> None:
        local.copy_(read_tensor(step_dir, record).view(-1)[fragment])

    bitscale()
    assert torch.equal(local, values.view(-1)[fragment])
    bench_compare(
        bitscale,
        whole_parameter,
        baseline_name="read whole parameter, narrow (DeepSpeed UCP load)",
        rounds=5 if quick else 15,
        case=f"{shape[0]}x{shape[1]} fp32 saved by 4, fragment of rank 1/{target_ranks}",
        shape={"rows": shape[0], "cols": shape[1], "target_ranks": target_ranks},
        x_name="target ranks",
        x=target_ranks,
        series="fragment load",
    )
