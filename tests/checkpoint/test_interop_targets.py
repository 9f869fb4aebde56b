"""Every interop source loads into every target, against the real DeepSpeed and DCP on CPU.

One 3-rank gloo session, shared by the tests here, writes the sources with the other
libraries' own APIs: DeepSpeed ZeRO-1/2/3 engines (torch AdamW, one and two parameter
groups with different hyperparameters; ZeRO-1 also in bf16) save their fragments live
(``deepspeed_zero_state`` + ``save_sharded``) and, with two groups, their own checkpoint
(``engine.save_checkpoint``, imported with ``import_deepspeed``); an FSDP2 model saves
``get_state_dict`` with ``torch.distributed.checkpoint.save`` (imported with
``import_dcp``). The model has odd sizes (37 -> 53 -> 5, so ZeRO fragments are uneven)
and persistent buffers (one a forward counter), plus a non-persistent one.

Each source must hold what DeepSpeed's own getters (``safe_get_full_*``) or DCP's full
state dict give, bitwise, and must load into a plain model at world 1, plain models
replicated on the 3 ranks and an FSDP2 model with AdamW on the 3 ranks (rows, where the
ZeRO sources hold flat fragments): every rank's weights, Adam moments, step, buffers and
per-group hyperparameters equal the stored values. A refused import prints one line.
"""

from __future__ import annotations

import collections
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from bitscale.checkpoint import cli
from bitscale.checkpoint.engine import Checkpointer
from bitscale.checkpoint.format import read_manifest, read_tensor, step_dir_name
from bitscale.checkpoint.interop_dcp import import_dcp
from bitscale.checkpoint.interop_deepspeed import deepspeed_zero_state, import_deepspeed
from bitscale.checkpoint.layout import save_sharded
from torch import nn

from bitscale.testing import run_on_ranks

STAGES = (1, 2, 3)
STEPS = 3
MOMENTS = ("exp_avg", "exp_avg_sq")
# (lr, weight_decay) of each parameter group of the sources, by number of groups.
HYPER = {1: [(0.01, 0.05)], 2: [(0.01, 0.05), (0.02, 0.0)]}
SOURCES = {
    **{f"import-ds{stage}": (2, f"{stage}-2") for stage in STAGES},
    "import-dcp": (2, "dcp"),
    **{
        f"live{stage}-{groups}": (groups, f"{stage}-{groups}")
        for stage in STAGES
        for groups in (1, 2)
    },
    "live1-bf16": (2, "1-bf16"),
}
"""Every bitscale folder the session leaves: its number of parameter groups, and the run
whose state it must hold (``expected-<run>.pt``, from DeepSpeed's getters or DCP)."""


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(37, 53)
        self.fc2 = nn.Linear(53, 5)
        self.register_buffer("scale", torch.rand(53) + 0.5)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        hidden = torch.tanh(self.fc1(x))
        return self.fc2(hidden * self.scale.to(hidden.dtype))


def build_model(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net()


def make_optimizer(model: Net, hyper: list[tuple[float, float]]) -> torch.optim.AdamW:
    """AdamW with one group, or two (weights, biases), with ``hyper``'s (lr, weight_decay)."""
    params = [list(model.parameters())]
    if len(hyper) == 2:
        params = [[model.fc1.weight, model.fc2.weight], [model.fc1.bias, model.fc2.bias]]
    groups = [
        {"params": group, "lr": lr, "weight_decay": weight_decay}
        for group, (lr, weight_decay) in zip(params, hyper, strict=True)
    ]
    return torch.optim.AdamW(groups)


def batch(rank: int, step: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(2, 37, generator=torch.Generator().manual_seed(10 * step + rank)).to(dtype)


def deepspeed_view(engine, stage: int, groups: int) -> dict[str, torch.Tensor]:
    """DeepSpeed's own gathered fp32 state (a collective) and the module's buffers."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    view = {}
    for pname, param in engine.module.named_parameters():
        view[f"model/{pname}"] = safe_get_full_fp32_param(param)
        # DeepSpeedZeroOptimizer (ZeRO-1/2) links every group's moment views once, right
        # after group 0's first step, when the biases' group has no state yet, so its own
        # getter raises for them (BF16_Optimizer steps all groups first). Their reference
        # is DeepSpeed's checkpoint, converted by ds_to_universal (see the test below).
        if stage == 3 or groups == 1 or pname.endswith("weight") or engine.bfloat16_enabled():
            for key in MOMENTS:
                view[f"optim/state/model/{pname}/{key}"] = safe_get_full_optimizer_state(param, key)
    for name in ("scale", "calls"):
        view[f"model/{name}"] = getattr(engine.module, name).clone()
    return view


def write_deepspeed_sources(root: str, rank: int) -> None:
    import deepspeed
    import deepspeed.ops

    # The CPU accelerator would JIT-build a shared-memory allreduce op (minutes); gloo does.
    deepspeed.ops.__compatible_ops__ = collections.defaultdict(bool)
    runs = [(stage, groups, False) for stage in STAGES for groups in (1, 2)] + [(1, 2, True)]
    for stage, groups, bf16 in runs:
        label = f"{stage}-bf16" if bf16 else f"{stage}-{groups}"
        model = build_model(seed=stage)
        optimizer = make_optimizer(model, HYPER[groups])
        config = {
            "train_micro_batch_size_per_gpu": 2,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,  # a client torch optimizer: no C++ build
            "steps_per_print": 10**6,
        }
        if bf16:
            # bf16 weights with fp32 gradient accumulation: DeepSpeed's BF16_Optimizer.
            config |= {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        dtype = torch.bfloat16 if bf16 else torch.float32
        for step in range(STEPS):
            loss = engine(batch(rank, step, dtype)).float().pow(2).sum()
            engine.backward(loss)
            engine.step()
        state, kinds = deepspeed_zero_state(engine)
        save_sharded(f"{root}/live{label}", STEPS, state, kinds=kinds)
        if groups == 2 and not bf16:
            engine.save_checkpoint(f"{root}/ds{stage}", tag=f"t{STEPS}")
        view = deepspeed_view(engine, stage, groups)
        if rank == 0:
            torch.save(view, f"{root}/expected-{label}.pt")
        engine.destroy()


def fully_shard_net(model: Net, world_size: int) -> Net:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    mesh = DeviceMesh("cpu", list(range(world_size)))
    fully_shard(model.fc1, mesh=mesh)
    fully_shard(model.fc2, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def write_dcp_source(root: str, rank: int, world_size: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model = fully_shard_net(build_model(seed=4), world_size)
    optimizer = make_optimizer(model, HYPER[2])
    for step in range(STEPS):
        model(batch(rank, step)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=f"{root}/dcp")
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full_model, full_optim = get_state_dict(model, optimizer, options=options)
    if rank == 0:
        view = {f"model/{name}": value for name, value in full_model.items()}
        for fqn, state in full_optim["state"].items():
            for key, value in state.items():
                view[f"optim/state/model/{fqn}/{key}"] = value
        torch.save(view, f"{root}/expected-dcp.pt")


def write_and_load(rank: int, world_size: int, root: str) -> list[str]:
    """The session: every rank writes the sources, rank 0 imports the foreign folders,
    then every rank loads every source into each target; returns the mismatches."""
    write_deepspeed_sources(root, rank)
    write_dcp_source(root, rank, world_size)
    if rank == 0:
        for stage in STAGES:
            import_deepspeed(f"{root}/ds{stage}", f"{root}/import-ds{stage}")
        import_dcp(f"{root}/dcp", f"{root}/import-dcp", STEPS)
    dist.barrier()
    return load_on_ranks(rank, world_size, root)


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """One 3-rank session for every test here: the folder of the sources, and the
    mismatches its ranks found loading them."""
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("interop")
    per_rank = run_on_ranks(write_and_load, 3, str(root), timeout=300)
    return root, [problem for rank_problems in per_rank for problem in rank_problems]


def stored(folder: Path) -> tuple[dict[str, torch.Tensor], list[tuple[float, float]]]:
    """Every tensor of the folder's step, whole, and its optimizer's (lr, weight_decay)."""
    step_dir = folder / step_dir_name(STEPS)
    manifest = read_manifest(step_dir)
    tensors = {name: read_tensor(step_dir, record) for name, record in manifest.tensors.items()}
    groups = manifest.ranks[0].entries["optim"]["value"]["param_groups"]
    return tensors, [(group["lr"], group["weight_decay"]) for group in groups]


def differences(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> list[str]:
    """Names missing from ``got`` or not bitwise equal (dtype too); steps by value."""
    problems = []
    for name, value in want.items():
        if name not in got:
            problems.append(f"{name}: missing")
        elif name.endswith("/step"):
            if float(got[name]) != float(value):
                problems.append(f"{name}: {float(got[name])} != {float(value)}")
        elif got[name].dtype != value.dtype or not torch.equal(got[name], value):
            problems.append(f"{name}: {got[name].dtype} {got[name]} != {value.dtype} {value}")
    return problems


@pytest.mark.dist
@pytest.mark.slow
def test_sources_hold_deepspeeds_and_dcps_own_state(session: tuple[Path, list[str]]) -> None:
    sources, _ = session
    problems = []
    for label, (groups, run) in SOURCES.items():
        tensors, hyper = stored(sources / label)
        if hyper != HYPER[groups]:
            problems.append(f"{label}: hyperparameters {hyper} != {HYPER[groups]}")
        if "model/scratch" in tensors:
            problems.append(f"{label}: holds the non-persistent buffer")
        steps = {name: t for name, t in tensors.items() if name.endswith("/step")}
        if len(steps) != 4 or any(float(t) != STEPS for t in steps.values()):
            problems.append(f"{label}: steps {steps}")
        want = torch.load(sources / f"expected-{run}.pt")
        problems += [f"{label}: {p}" for p in differences(tensors, want)]
        names = {f"model/{p}" for p in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")}
        names |= {"model/scale", "model/calls"}
        names |= {
            f"optim/state/{p}/{key}" for p in names if "fc" in p for key in (*MOMENTS, "step")
        }
        if set(tensors) != names:
            problems.append(f"{label}: tensors {sorted(set(tensors) ^ names)} differ")
    # Everything, the biases' moments DeepSpeed's getters cannot give included: the live
    # fragments must equal DeepSpeed's own checkpoint, converted by ds_to_universal.
    for stage in STAGES:
        live, _ = stored(sources / f"live{stage}-2")
        imported, _ = stored(sources / f"import-ds{stage}")
        problems += [f"live{stage}-2 vs import-ds{stage}: {p}" for p in differences(live, imported)]
    assert not problems, "\n".join(problems)


def check_target(
    model: Net, optimizer, tensors: dict, hyper: list, rank: int, world_size: int
) -> list[str]:
    """Mismatches between what ``model``/``optimizer`` hold on this rank and the stored
    tensors (``DTensor``s: this rank's ``torch.chunk`` rows)."""

    def local(value: torch.Tensor, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(value, "to_local"):
            return value.to_local(), torch.chunk(full, world_size, dim=0)[rank]
        return value, full

    loaded = [(f"model/{name}", getattr(model, name)) for name in ("scale", "calls")]
    problems = []
    for pname, param in model.named_parameters():
        state = optimizer.state[param]
        loaded.append((f"model/{pname}", param.detach()))
        loaded += [(f"optim/state/model/{pname}/{key}", state.get(key)) for key in MOMENTS]
        if float(state.get("step", -1)) != STEPS:
            problems.append(f"{pname} step {state.get('step')}")
    for name, value in loaded:
        if name not in tensors or value is None:
            problems.append(f"{name}: not in the checkpoint, or not loaded")
            continue
        got, want = local(value, tensors[name])
        if not torch.equal(got, want):
            problems.append(f"{name}: {got} != {want}")
    got_hyper = [(group["lr"], group["weight_decay"]) for group in optimizer.param_groups]
    if got_hyper != hyper:
        problems.append(f"hyperparameters {got_hyper} != {hyper}")
    return problems


def load_into(folder: Path, model: Net, groups: int) -> tuple[Net, torch.optim.Optimizer]:
    """``model`` and a fresh AdamW whose hyperparameters the load must replace, loaded."""
    optimizer = make_optimizer(model, [(0.5, 0.5), (0.25, 0.75)][:groups])
    with Checkpointer(folder) as checkpointer:
        assert checkpointer.load({"model": model, "optim": optimizer}, rng=False) == STEPS
    return model, optimizer


def load_on_ranks(rank: int, world_size: int, root: str) -> list[str]:
    problems = []
    for label, (groups, _) in SOURCES.items():
        tensors, hyper = stored(Path(root) / label)
        for target in ("replicated", "fsdp2"):
            model = build_model(seed=100 + rank)
            if target == "fsdp2":
                model = fully_shard_net(model, world_size)
            try:
                model, optimizer = load_into(Path(root) / label, model, groups)
            except ValueError as error:
                problems.append(f"{label} into {target} on rank {rank}: {error}")
                continue
            found = check_target(model, optimizer, tensors, hyper, rank, world_size)
            problems += [f"{label} into {target} on rank {rank}: {p}" for p in found]
    return problems


@pytest.mark.dist
@pytest.mark.slow
def test_every_source_loads_into_every_target(session: tuple[Path, list[str]]) -> None:
    sources, problems_on_ranks = session
    problems = list(problems_on_ranks)
    for label, (groups, _) in SOURCES.items():
        tensors, hyper = stored(sources / label)
        model, optimizer = load_into(sources / label, build_model(seed=100), groups)
        found = check_target(model, optimizer, tensors, hyper, 0, 1)
        problems += [f"{label} into a plain model: {p}" for p in found]
    assert not problems, "\n".join(problems)


def run_cli(*argv: str) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="bitscale ckpt")
    cli.add_arguments(parser)
    return cli.main(parser.parse_args(argv))


@pytest.mark.dist
@pytest.mark.slow
def test_imports_into_a_root_holding_the_step_are_refused_before_any_work(
    session: tuple[Path, list[str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sources, _ = session
    from deepspeed.checkpoint import ds_to_universal

    def no_conversion(args: object) -> None:
        raise AssertionError("ds_to_universal ran before the step was checked")

    monkeypatch.setattr(ds_to_universal, "main", no_conversion)
    root = tmp_path / "root"
    shutil.copytree(sources / "import-ds2", root)  # holds step 3, DeepSpeed's global_steps
    before = sorted(p.name for p in root.iterdir())
    for argv in (
        ("from-deepspeed", str(root), str(sources / "ds2")),
        ("from-deepspeed", str(root), str(sources / "ds3"), "--step", "2"),
        ("from-dcp", str(root), str(sources / "dcp"), "--step", "3"),
    ):
        assert run_cli(*argv) == 1, argv
        out, err = capsys.readouterr()
        assert out == "", argv
        (line,) = err.strip().splitlines()
        assert line.startswith(f"bitscale ckpt {argv[0]}: error: cannot write step "), line
        assert "already holds committed steps [3]" in line, line
    assert sorted(p.name for p in root.iterdir()) == before
