"""DeepSpeed round trip against the real DeepSpeed on CPU (gloo, 2 ranks).

Train with ZeRO-1, 2 and 3, save; import each folder (and a ``ds_to_universal`` folder)
into bitscale, and also save each live engine's own fp32 fragments directly (layouts from
DeepSpeed's partition bookkeeping, each rank writing only its fragments); resume with plain torch AdamW at world 1 (through the lazy
``Checkpointer``) and as 3 ZeRO-style flat shards: weights and Adam moments equal
DeepSpeed's own gathered fp32 state bitwise. Export back to a DeepSpeed universal folder
and resume ZeRO-2 and ZeRO-3 engines from it with ``load_universal``: again bitwise, and
they train.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from bitscale.checkpoint.engine import Checkpointer
from bitscale.checkpoint.format import read_manifest
from bitscale.checkpoint.interop_deepspeed import (
    deepspeed_zero_state,
    export_deepspeed_universal,
    find_deepspeed_tag_dir,
    import_deepspeed,
)
from bitscale.checkpoint.layout import (
    DataParallel,
    RankLayout,
    TensorLayout,
    load_shard,
    save_sharded,
)
from bitscale.checkpoint.reshard import ChunkReader
from torch import nn

from bitscale.testing import run_on_ranks

STAGES = (1, 2, 3)


def build_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def make_engine(stage: int, seed: int, *, load_universal: bool = False):
    import deepspeed

    model = build_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": stage},
        # A client torch optimizer: no DeepSpeed C++ optimizer build on CPU.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**6,
        "checkpoint": {"load_universal": load_universal},
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def train(engine, rank: int, steps: int) -> float:
    loss = torch.zeros(())
    for step in range(steps):
        generator = torch.Generator().manual_seed(10 * step + rank)
        loss = engine(torch.randn(2, 5, generator=generator)).pow(2).sum()
        engine.backward(loss)
        engine.step()
    return float(loss)


def full_state(engine) -> dict[str, list]:
    """DeepSpeed's own gathered fp32 weights and Adam moments, as lists (picklable)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    state = {}
    for name, param in engine.module.named_parameters():
        state[name] = [
            safe_get_full_fp32_param(param).tolist(),
            safe_get_full_optimizer_state(param, "exp_avg").tolist(),
            safe_get_full_optimizer_state(param, "exp_avg_sq").tolist(),
        ]
    return state


def deepspeed_round_trip(rank: int, world_size: int, root: str) -> dict:
    import deepspeed.ops
    from deepspeed.checkpoint import ds_to_universal

    # The CPU accelerator would JIT-build a shared-memory allreduce op (minutes); gloo does.
    deepspeed.ops.__compatible_ops__ = collections.defaultdict(bool)
    out: dict = {}
    for stage in STAGES:
        engine = make_engine(stage, seed=stage)
        train(engine, rank, 2)
        engine.save_checkpoint(f"{root}/ds{stage}", tag="t2")
        out[stage] = full_state(engine)
        # The live engine's own fragments, saved without DeepSpeed's files or a conversion.
        state, kinds = deepspeed_zero_state(engine)
        save_sharded(f"{root}/live{stage}", 2, state, kinds=kinds)
    dist.barrier()
    if rank == 0:
        for stage in STAGES:
            import_deepspeed(f"{root}/ds{stage}", f"{root}/bs{stage}")
        args = argparse.Namespace(
            input_folder=f"{root}/ds2/t2",
            output_folder=f"{root}/ds2u/t2_universal",
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,
        )
        with contextlib.redirect_stdout(io.StringIO()):
            ds_to_universal.main(args)
        import_deepspeed(f"{root}/ds2u/t2_universal", f"{root}/bs2u", step=7)
        for stage in (2, 3):
            export_deepspeed_universal(f"{root}/bs{stage}", f"{root}/back{stage}")
    dist.barrier()
    for stage in (2, 3):
        engine = make_engine(stage, seed=99, load_universal=True)
        engine.load_checkpoint(f"{root}/back{stage}")
        out[f"resumed{stage}"] = full_state(engine)
        out[f"resumed_steps{stage}"] = engine.global_steps
        out[f"resumed_loss{stage}"] = train(engine, rank, 1)
    return out


def expected_tensors(state: dict[str, list]) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, (weights, exp_avg, exp_avg_sq) in state.items():
        tensors[f"model/{name}"] = torch.tensor(weights, dtype=torch.float32)
        tensors[f"optim/state/model/{name}/exp_avg"] = torch.tensor(exp_avg, dtype=torch.float32)
        tensors[f"optim/state/model/{name}/exp_avg_sq"] = torch.tensor(
            exp_avg_sq, dtype=torch.float32
        )
    return tensors


def resume_with_torch_at_world_1(root: Path, expected: dict[str, torch.Tensor]) -> None:
    model = build_model(123)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5)
    with Checkpointer(root) as checkpointer:
        assert checkpointer.load({"model": model, "optim": optimizer}, rng=False) == 2
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), expected[f"model/{name}"]), name
        for key in ("exp_avg", "exp_avg_sq"):
            got = optimizer.state[param][key]
            assert torch.equal(got, expected[f"optim/state/model/{name}/{key}"]), (name, key)
        assert float(optimizer.state[param]["step"]) == 2.0
    assert optimizer.param_groups[0]["lr"] == 0.01, "hyperparameters come from the checkpoint"


def resume_as_3_flat_shards(root: Path, expected: dict[str, torch.Tensor]) -> None:
    step_dir = root / "step-00000002"
    manifest = read_manifest(step_dir)
    with ChunkReader(step_dir) as reader:
        for name, full in expected.items():
            per_rank = -(-full.numel() // 3)
            flat = torch.cat([full.reshape(-1), torch.zeros(3 * per_rank - full.numel())])
            for rank in range(3):
                shard = RankLayout(
                    layout=TensorLayout(shape=tuple(full.shape)),
                    dp=DataParallel.FLAT,
                    dp_start=rank * per_rank,
                    dp_length=per_rank,
                )
                local = torch.full((per_rank,), float("nan"))
                load_shard(reader, name, manifest.tensors[name], local, shard)
                assert torch.equal(local, flat[rank * per_rank : (rank + 1) * per_rank]), name


@pytest.mark.dist
@pytest.mark.slow
def test_deepspeed_zero_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    results = run_on_ranks(deepspeed_round_trip, 2, str(tmp_path), timeout=400)
    for stage in STAGES:
        assert results[0][stage] == results[1][stage], "DeepSpeed's gathered state is global"
        expected = expected_tensors(results[0][stage])
        for folder in (f"bs{stage}", f"live{stage}"):
            resume_with_torch_at_world_1(tmp_path / folder, expected)
            resume_as_3_flat_shards(tmp_path / folder, expected)

    direct = read_manifest(tmp_path / "bs2" / "step-00000002")
    via_universal = read_manifest(tmp_path / "bs2u" / "step-00000007")
    assert direct.tensors.keys() == via_universal.tensors.keys()

    for rank in range(2):
        for stage in (2, 3):
            assert results[rank][f"resumed{stage}"] == results[0][stage], "resumes bitwise"
            assert results[rank][f"resumed_steps{stage}"] == 2
            assert math.isfinite(results[rank][f"resumed_loss{stage}"])


def test_foreign_and_damaged_deepspeed_folders(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a folder"):
        find_deepspeed_tag_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a DeepSpeed checkpoint"):
        import_deepspeed(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "empty" / "latest").write_text("nope")
    with pytest.raises(ValueError, match="tag 'nope' has no folder"):
        import_deepspeed(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "empty" / "nope").mkdir()
    (tmp_path / "empty" / "nope" / "mp_rank_00_model_states.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="neither a DeepSpeed ZeRO checkpoint"):
        import_deepspeed(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()
