"""DeepSpeed round trip against the real DeepSpeed on CPU (gloo, 2 ranks).

Train with ZeRO-1, 2 and 3, save; import each folder (and a ``ds_to_universal`` folder)
into bitscale, and also save each live engine's own fp32 fragments directly (layouts from
DeepSpeed's partition bookkeeping, each rank writing only its fragments); resume with plain
torch AdamW through the lazy ``Checkpointer`` at world 1 and on 3 real gloo ranks (an FSDP2
``fully_shard`` model, uneven ``Shard(0)`` rows, and parameters annotated as uneven, padded
ZeRO-style flat fragments), and read each folder as 3 flat shards: every rank's weights and
Adam moments equal its slice of DeepSpeed's own gathered fp32 state bitwise. Export back to
a DeepSpeed universal folder and resume ZeRO-2 and ZeRO-3 engines from it with
``load_universal``: again bitwise, and they train.
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


def flat_fragment(full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Elements ``[rank * n, (rank + 1) * n)`` of ``full`` flattened and zero-padded to
    ``world_size * n`` (ZeRO's partitioning: the last rank's fragment may be all padding)."""
    per_rank = -(-full.numel() // world_size)
    padding = torch.zeros(world_size * per_rank - full.numel(), dtype=full.dtype)
    return torch.cat([full.reshape(-1), padding])[rank * per_rank : (rank + 1) * per_rank]


def annotated_flat_model(rank: int, world_size: int) -> nn.Module:
    """The model with each parameter replaced by this rank's flat ZeRO fragment (NaN, so
    a value the load does not fill shows), annotated with its place in the logical tensor."""
    from bitscale.checkpoint.layout import annotate

    model = build_model(7)
    for module in model.modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            per_rank = -(-param.numel() // world_size)
            fragment = nn.Parameter(torch.full((per_rank,), float("nan")))
            shard = RankLayout(
                layout=TensorLayout(shape=tuple(param.shape)),
                dp=DataParallel.FLAT,
                dp_start=rank * per_rank,
                dp_length=per_rank,
            )
            setattr(module, pname, annotate(fragment, shard))
    return model


def fsdp2_model(world_size: int) -> nn.Module:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    model = build_model(7)
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))  # a value the load does not fill shows
    mesh = DeviceMesh("cpu", list(range(world_size)))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def local_slice(kind: str, full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """The part of the logical tensor ``full`` that ``rank`` holds in a ``kind`` model."""
    if kind == "fsdp2":
        # FSDP2 splits dim 0 as torch.chunk does: 7 rows over 3 ranks -> 3, 3, 1.
        return torch.chunk(full, world_size, dim=0)[rank]
    return flat_fragment(full, rank, world_size)


def resume_on_3_ranks(rank: int, world_size: int, root: str, states: dict) -> list[str]:
    """Load every imported / live-saved folder into an FSDP2 model and an annotated flat
    model on this rank, each with a fresh AdamW; compare this rank's local weights, Adam
    moments and step with its slice of DeepSpeed's gathered fp32 state. Returns the
    mismatches (empty when all are bitwise equal)."""
    mismatches: list[str] = []
    for stage in STAGES:
        expected = expected_tensors(states[stage])
        for folder in (f"bs{stage}", f"live{stage}"):
            for kind in ("fsdp2", "flat"):
                if kind == "fsdp2":
                    model = fsdp2_model(world_size)
                else:
                    model = annotated_flat_model(rank, world_size)
                optimizer = torch.optim.AdamW(model.parameters(), lr=0.5)
                with Checkpointer(f"{root}/{folder}") as checkpointer:
                    step = checkpointer.load({"model": model, "optim": optimizer}, rng=False)
                where = f"{folder} {kind} rank {rank}"
                if step != 2:
                    mismatches.append(f"{where}: loaded step {step}")
                if optimizer.param_groups[0]["lr"] != 0.01:
                    mismatches.append(f"{where}: lr {optimizer.param_groups[0]['lr']}")
                for name, param in model.named_parameters():
                    local = param.to_local() if kind == "fsdp2" else param
                    want = local_slice(kind, expected[f"model/{name}"], rank, world_size)
                    if not torch.equal(local.detach(), want):
                        mismatches.append(f"{where}: {name} {local.tolist()} != {want.tolist()}")
                    state = optimizer.state[param]
                    for key in ("exp_avg", "exp_avg_sq"):
                        got = state[key].to_local() if kind == "fsdp2" else state[key]
                        want = local_slice(
                            kind, expected[f"optim/state/model/{name}/{key}"], rank, world_size
                        )
                        if not torch.equal(got, want):
                            mismatches.append(
                                f"{where}: {name} {key} {got.tolist()} != {want.tolist()}"
                            )
                    if float(state["step"]) != 2.0:
                        mismatches.append(f"{where}: {name} step {float(state['step'])}")
    return mismatches


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

    states = {stage: results[0][stage] for stage in STAGES}
    per_rank = run_on_ranks(resume_on_3_ranks, 3, str(tmp_path), states, timeout=240)
    mismatches = [mismatch for rank_mismatches in per_rank for mismatch in rank_mismatches]
    assert len(per_rank) == 3 and not mismatches, "\n".join(mismatches)

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
    (tmp_path / "empty" / "nope" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"mp_rank_00_model_states\.pt cannot be read"):
        import_deepspeed(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_of_a_missing_or_uncommitted_step_is_rejected(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters())
    save_sharded(tmp_path / "ckpt", 3, {"model": model, "optim": optimizer})
    (tmp_path / "ckpt" / "step-00000005").mkdir()
    for missing in (5, 4):
        with pytest.raises(ValueError, match=rf"no committed step {missing}.*\[3\]"):
            export_deepspeed_universal(tmp_path / "ckpt", tmp_path / "ds", step=missing)
    assert not (tmp_path / "ds").exists()
