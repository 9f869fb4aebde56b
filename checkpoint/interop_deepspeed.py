"""DeepSpeed checkpoints to and from bitscale checkpoints, through DeepSpeed's own formats.

Import reads a DeepSpeed *universal* folder (``zero/<param>/{fp32,exp_avg,...}.pt`` plus
``zero/optimizer_state.pt``, as ``ds_to_universal`` writes it). A regular ZeRO-1/2/3
folder (``*_optim_states.pt``) is first converted with DeepSpeed's own
``ds_to_universal`` into a temporary folder, so the fragment bookkeeping of every ZeRO
stage stays DeepSpeed's. Parameters are written one at a time under
``<model entry>/<name>`` (fp32 master weights) and the optimizer as a by-name entry
(``Checkpointer.load`` and ``load_sharded`` restore it into a plain torch AdamW at any
world size).

Export writes a DeepSpeed universal folder that ``engine.load_checkpoint`` with
``{"checkpoint": {"load_universal": true}}`` accepts (ZeRO-1/2/3 engines, any
data-parallel size): per-parameter ``zero/<name>/*.pt``, ``zero/optimizer_state.pt``,
the model-states files and ``latest_universal``. The folder appears by one rename when complete.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from bitscale.checkpoint.format import (
    EntryKind,
    decode_skeleton,
    encode_skeleton,
    read_tensor,
)
from bitscale.checkpoint.layout import (
    DataParallel,
    RankLayout,
    StepWriter,
    TensorLayout,
    annotate,
)

__all__ = [
    "deepspeed_zero_state",
    "export_deepspeed_universal",
    "find_deepspeed_tag_dir",
    "import_deepspeed",
    "zero_fragment_layout",
]

_MOMENTS = ("exp_avg", "exp_avg_sq")


def find_deepspeed_tag_dir(ds_dir: str | os.PathLike[str], tag: str | None = None) -> Path:
    """The folder holding one DeepSpeed checkpoint: ``ds_dir/tag``, the tag named by
    ``latest_universal`` / ``latest``, or ``ds_dir`` itself when it is such a folder."""
    ds_dir = Path(ds_dir)
    if not ds_dir.is_dir():
        raise ValueError(f"{ds_dir} is not a folder")
    if tag is None:
        if _is_universal(ds_dir) or any(ds_dir.glob("*_model_states.pt")):
            return ds_dir
        for pointer in ("latest_universal", "latest"):
            if (ds_dir / pointer).is_file():
                tag = (ds_dir / pointer).read_text().strip()
                break
        else:
            raise ValueError(
                f"{ds_dir} is not a DeepSpeed checkpoint: no latest/latest_universal file and "
                "no *_model_states.pt; pass the folder of one checkpoint or tag=<its name>"
            )
    tag_dir = ds_dir / tag
    if not tag_dir.is_dir():
        raise ValueError(f"DeepSpeed checkpoint tag {tag!r} has no folder {tag_dir}")
    return tag_dir


def _is_universal(folder: Path) -> bool:
    return (folder / "zero" / "optimizer_state.pt").is_file()


def _torch_load(path: Path) -> Any:
    # DeepSpeed's files are pickles of its own classes (LossScaler, ZeroStageEnum).
    return torch.load(path, map_location="cpu", weights_only=False)


def import_deepspeed(
    ds_dir: str | os.PathLike[str],
    root: str | os.PathLike[str],
    *,
    tag: str | None = None,
    step: int | None = None,
    model_entry: str = "model",
    optimizer_entry: str = "optim",
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Import a DeepSpeed ZeRO-1/2/3 or universal checkpoint as a bitscale step.

    ``step`` defaults to DeepSpeed's ``global_steps``. Returns the committed step
    directory. Raises ``ValueError`` for folders that are not DeepSpeed checkpoints or
    lack a parameter's files; nothing is committed then.
    """
    tag_dir = find_deepspeed_tag_dir(ds_dir, tag)
    universal = _is_universal(tag_dir)
    if not universal and not any(tag_dir.glob("*_optim_states.pt")):
        raise ValueError(
            f"{tag_dir} is neither a DeepSpeed ZeRO checkpoint (no *_optim_states.pt) nor a "
            "universal one (no zero/optimizer_state.pt)"
        )
    if step is None:
        step = _global_steps(tag_dir)
    # Opened before the conversion, so a step that root cannot take is refused at once.
    with StepWriter(root, step) as writer:
        if universal:
            return _import_universal(tag_dir, writer, model_entry, optimizer_entry, progress)
        from deepspeed.checkpoint import ds_to_universal

        with tempfile.TemporaryDirectory(prefix="bitscale-ds-universal-") as tmp:
            args = argparse.Namespace(
                input_folder=str(tag_dir),
                output_folder=str(Path(tmp) / "universal"),
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                # Checkpoints saved without client_state["universal_checkpoint_info"] convert too.
                inject_missing_state=True,
            )
            with contextlib.redirect_stdout(io.StringIO()):
                ds_to_universal.main(args)
            return _import_universal(
                Path(args.output_folder), writer, model_entry, optimizer_entry, progress
            )


def _model_states_file(folder: Path) -> Path:
    files = sorted(folder.glob("*model_states.pt"))
    if not files:
        raise ValueError(f"{folder} has no *model_states.pt: not a DeepSpeed checkpoint")
    return files[0]


def _global_steps(folder: Path) -> int:
    """DeepSpeed's ``global_steps`` of the checkpoint in ``folder``. Memory-mapped: the
    module weights that ZeRO-1/2 model-states files hold are not read."""
    path = _model_states_file(folder)
    try:
        model_states = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:
        raise ValueError(f"{path} cannot be read ({error!r}); is it damaged?") from error
    return int(model_states.get("global_steps", 0))


def _universal_tensor(path: Path, shape: tuple[int, ...]) -> torch.Tensor:
    loaded = _torch_load(path)
    tensor = loaded["param"] if isinstance(loaded, dict) else loaded
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{path} holds no tensor")
    if tensor.numel() != math.prod(shape):
        raise ValueError(f"{path} holds {tensor.numel()} elements; the parameter has shape {shape}")
    # ZeRO-3 universal files hold the flat fp32 parameter; stages 1-2 its logical shape.
    return tensor.detach().reshape(shape).contiguous()


def _import_universal(
    folder: Path,
    writer: StepWriter,
    model_entry: str,
    optimizer_entry: str,
    progress: Callable[[int, int], None] | None,
) -> Path:
    model_file = _model_states_file(folder)
    model_states = _torch_load(model_file)
    optimizer_state = _torch_load(folder / "zero" / "optimizer_state.pt")
    param_shapes = model_states.get("param_shapes")
    groups = optimizer_state.get("param_groups")
    if not param_shapes or groups is None or len(groups) != len(param_shapes):
        raise ValueError(
            f"{folder}: param_shapes of {model_file.name} and param_groups of "
            "zero/optimizer_state.pt disagree; the folder is damaged"
        )
    # ZeRO-3 universal folders keep the step only in the flat optimizer state.
    flat_state = optimizer_state.get("optimizer_state_dict", {}).get("state", {})
    total = sum(len(shapes) for shapes in param_shapes)
    done = 0
    module_skeleton: dict[str, Any] = {}
    optimizer_skeleton: dict[str, Any] = {"state": {}, "param_groups": []}
    for group_index, (shapes, group) in enumerate(zip(param_shapes, groups, strict=True)):
        names = []
        for pname, shape in shapes.items():
            shape = tuple(int(s) for s in shape)
            param_dir = folder / "zero" / pname
            if not (param_dir / "fp32.pt").is_file():
                raise ValueError(f"{folder} lacks zero/{pname}/fp32.pt")
            name = f"{model_entry}/{pname}"
            writer.add(name, _universal_tensor(param_dir / "fp32.pt", shape))
            module_skeleton[pname] = {"$tensor": name}
            param_state: dict[str, Any] = {}
            for state_file in sorted(param_dir.glob("*.pt")):
                key = state_file.stem
                if key in ("fp32", "step"):
                    continue
                state_name = f"{optimizer_entry}/state/{name}/{key}"
                writer.add(state_name, _universal_tensor(state_file, shape))
                param_state[key] = {"$tensor": state_name}
            step_value = (
                _torch_load(param_dir / "step.pt")
                if (param_dir / "step.pt").is_file()
                else flat_state.get(group_index, {}).get("step")
            )
            if step_value is not None:
                step_name = f"{optimizer_entry}/state/{name}/step"
                writer.add(step_name, torch.as_tensor(step_value).detach().clone())
                param_state["step"] = {"$tensor": step_name}
            optimizer_skeleton["state"][name] = param_state
            names.append(name)
            done += 1
            if progress is not None:
                progress(done, total)
        hyper = {k: v for k, v in group.items() if k != "params"}
        optimizer_skeleton["param_groups"].append(
            {**encode_skeleton(hyper, _no_tensor, (optimizer_entry,)), "params": names}
        )
    module = model_states.get("module") or {}
    for buffer_name in model_states.get("buffer_names", []):
        name = f"{model_entry}/{buffer_name}"
        writer.add(name, module[buffer_name].detach().clone())
        module_skeleton[buffer_name] = {"$tensor": name}
    entries = {
        model_entry: {"kind": str(EntryKind.MODULE), "value": module_skeleton},
        optimizer_entry: {"kind": str(EntryKind.OPTIMIZER), "value": optimizer_skeleton},
        "deepspeed": {
            "kind": str(EntryKind.OBJECT),
            "value": {
                key: model_states[key]
                for key in ("global_steps", "global_samples", "skipped_steps", "ds_version")
                if isinstance(model_states.get(key), int | str)
            },
        },
    }
    return writer.commit(entries)


def _no_tensor(path: tuple[str, ...], tensor: torch.Tensor) -> str:
    raise TypeError(f"unexpected tensor in DeepSpeed param_groups at {'/'.join(path)!r}")


def export_deepspeed_universal(
    root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    step: int | None = None,
    tag: str | None = None,
    model_entry: str = "model",
    optimizer_entry: str = "optim",
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write step ``step`` (default: newest) as a DeepSpeed universal checkpoint:
    ``out_dir/<tag>/`` plus ``out_dir/latest_universal``. Returns the tag folder.

    Load it with ``{"checkpoint": {"load_universal": true}}`` and
    ``engine.load_checkpoint(out_dir)`` under ZeRO-1, 2 or 3 at any data-parallel size.
    """
    import deepspeed
    from bitscale.checkpoint.storage import (
        LocalStorage,
        fsync_dir,
        list_steps,
        new_token,
        read_step_manifest,
    )

    if step is not None and step not in (committed := list_steps(root)):
        raise ValueError(
            f"{root} has no committed step {step}; its committed steps are {committed}; "
            "pass step=<one of them> or step=None for the newest"
        )
    step, step_dir, manifest = read_step_manifest(root, step)
    entries = manifest.ranks[0].entries
    for entry, kind in ((model_entry, EntryKind.MODULE), (optimizer_entry, EntryKind.OPTIMIZER)):
        if entries.get(entry, {}).get("kind") != str(kind):
            raise ValueError(
                f"step {step} has no {kind} entry {entry!r} (entries: {sorted(entries)}); pass "
                f"{'model' if kind is EntryKind.MODULE else 'optimizer'}_entry=<its name>"
            )
    out_dir = Path(out_dir)
    tag = tag or f"global_step{step}_universal"
    if (out_dir / tag).exists():
        raise ValueError(f"{out_dir / tag} exists already; choose another out_dir or tag")

    def tensor(name: str) -> torch.Tensor:
        return read_tensor(step_dir, manifest.tensors[name])

    model_refs = entries[model_entry]["value"]
    optimizer = decode_skeleton(entries[optimizer_entry]["value"], lambda name: name)
    prefix = f"{model_entry}/"
    storage = LocalStorage()
    token = new_token()
    storage.makedirs(out_dir)
    tmp = out_dir / f".tmp-{tag}-{token}"
    storage.makedirs(tmp / "zero")
    try:
        param_shapes = []
        group_states = []
        first_step = None
        total = sum(len(group["params"]) for group in optimizer["param_groups"])
        done = 0
        for group in optimizer["param_groups"]:
            shapes: dict[str, torch.Size] = collections.OrderedDict()
            for name in group["params"]:
                if not name.startswith(prefix):
                    raise ValueError(
                        f"optimizer parameter {name!r} belongs to no module entry {model_entry!r}"
                    )
                pname = name[len(prefix) :]
                param_dir = tmp / "zero" / pname
                storage.makedirs(param_dir)
                weights = tensor(name).float()
                shapes[pname] = weights.shape
                _save_durable({"param": weights, "cat_dim": 0}, param_dir / "fp32.pt")
                for key, value in optimizer["state"].get(name, {}).items():
                    if key == "step":
                        step_value = tensor(value) if isinstance(value, str) else value
                        _save_durable(step_value, param_dir / "step.pt")
                        if first_step is None:
                            first_step = step_value
                    elif isinstance(value, str):
                        _save_durable(
                            {"param": tensor(value).float(), "cat_dim": 0}, param_dir / f"{key}.pt"
                        )
                fsync_dir(param_dir)
                done += 1
                if progress is not None:
                    progress(done, total)
            param_shapes.append(shapes)
            group_states.append(
                {
                    **{k: v for k, v in group.items() if k != "params"},
                    "params": list(range(len(shapes))),
                }
            )
        # Stages 1-2 read param_groups; stage 3 reads optimizer_state_dict (one step for all).
        _save_durable(
            {
                "param_groups": group_states,
                "optimizer_state_dict": {
                    "state": {0: {"step": first_step}} if first_step is not None else {},
                    "param_groups": group_states,
                },
                "ds_version": deepspeed.__version__,
            },
            tmp / "zero" / "optimizer_state.pt",
        )
        params = {pname for shapes in param_shapes for pname in shapes}
        module = {
            key: tensor(ref["$tensor"])
            for key, ref in model_refs.items()
            if isinstance(ref, Mapping) and "$tensor" in ref
        }
        saved_info = decode_skeleton(entries.get("deepspeed", {"value": {}})["value"], tensor)
        global_steps = int(saved_info.get("global_steps", step))
        model_states = {
            "module": module,
            "buffer_names": [key for key in module if key not in params],
            "optimizer": None,
            "param_shapes": param_shapes,
            "frozen_param_shapes": collections.OrderedDict(),
            "shared_params": {},
            "frozen_param_fragments": collections.OrderedDict(),
            "lr_scheduler": None,
            "data_sampler": None,
            "random_ltd": None,
            "sparse_tensor_module_names": set(),
            "skipped_steps": int(saved_info.get("skipped_steps", 0)),
            "global_steps": global_steps,
            "global_samples": int(saved_info.get("global_samples", 0)),
            "dp_world_size": 1,
            "mp_world_size": 1,
            "ds_config": {},
            "ds_version": deepspeed.__version__,
            "universal_checkpoint_info": {},
        }
        # ZeRO-1/2 engines read mp_rank_00; ZeRO-3 ones read zero_pp_rank_0 under load_universal.
        for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
            _save_durable(model_states, tmp / name)
        fsync_dir(tmp / "zero")
        fsync_dir(tmp)
        storage.rename(tmp, out_dir / tag)
    except BaseException:
        storage.remove_tree(tmp)
        raise
    storage.write_atomic(out_dir / "latest_universal", (tag + "\n").encode(), token)
    return out_dir / tag


def _save_durable(obj: Any, path: Path) -> None:
    """``torch.save`` that returns only once the file's bytes are on disk."""
    with open(path, "wb") as file:
        torch.save(obj, file)
        file.flush()
        os.fsync(file.fileno())


# ----------------------------------------------------------------------------- live engines


def zero_fragment_layout(param: torch.nn.Parameter, *, stage: int) -> RankLayout:
    """The layout of this rank's fp32 fragment of a live DeepSpeed ZeRO parameter, from
    DeepSpeed's own partition bookkeeping: ``_hp_mapping.lp_fragment_address`` (ZeRO-1/2:
    an uneven flat fragment, absent on ranks that hold none) or the ZeRO-3 partition
    (``partition_numel`` elements at ``rank * partition_numel``, the last one padded)."""
    import torch.distributed as dist

    if stage == 3:
        numel = param.partition_numel()
        rank = dist.get_rank(group=param.ds_process_group)
        return RankLayout(
            layout=TensorLayout(shape=tuple(param.ds_shape), source="deepspeed zero-3"),
            dp=DataParallel.FLAT,
            dp_start=rank * numel,
            dp_length=numel,
        )
    mapping = getattr(param, "_hp_mapping", None)
    address = mapping.lp_fragment_address if mapping is not None else None
    return RankLayout(
        layout=TensorLayout(shape=tuple(param.shape), source=f"deepspeed zero-{stage}"),
        dp=DataParallel.FLAT,
        dp_start=address.start if address is not None else 0,
        dp_length=address.numel if address is not None else 0,
    )


def deepspeed_zero_state(
    engine: Any, *, model_entry: str = "model", optimizer_entry: str = "optim"
) -> tuple[dict[str, Any], dict[str, EntryKind]]:
    """This rank's fp32 weights and optimizer state of a live ZeRO-1/2/3 ``engine``, each
    an annotated flat fragment, and the module's persistent buffers, as ``(state, kinds)``
    for ``save_sharded(..., kinds=kinds)``: every rank writes only its fragments, and the
    result loads into a plain torch model and optimizer (``Checkpointer.load`` /
    ``load_sharded``) at any world size.

    Each parameter group keeps its hyperparameters, as :func:`import_deepspeed` keeps
    them. Optimizer state is read from the state of each group's flat fp32 partition, not
    from DeepSpeed's per-parameter views: ZeRO-1/2 link those once, right after the first
    group's first step, so the views of every later group stay empty. Raises
    ``ValueError`` for a parameter in no optimizer group (a frozen one)."""
    stage = engine.zero_optimization_stage()
    torch_optimizer = engine.optimizer.optimizer
    names = {id(param): pname for pname, param in engine.module.named_parameters()}
    weights: dict[str, torch.Tensor] = {}
    optimizer_state: dict[str, Any] = {}
    groups: list[dict[str, Any]] = [
        {**{k: v for k, v in group.items() if k != "params"}, "params": []}
        for group in torch_optimizer.param_groups
    ]
    for group_index, fragments, flat in _flat_partitions(engine.optimizer, stage):
        flat_state = torch_optimizer.state.get(flat, {})
        # The moments: the state tensors shaped like the partition (DeepSpeed's own rule).
        keys = sorted(
            key
            for key, value in flat_state.items()
            if isinstance(value, torch.Tensor) and value.shape == flat.shape
        )
        step = flat_state.get("step")
        for param, start, numel in fragments:
            pname = names[id(param)]
            name = f"{model_entry}/{pname}"
            layout = zero_fragment_layout(param, stage=stage)
            weights[pname] = annotate(flat.detach().narrow(0, start, numel), layout)
            state: dict[str, Any] = {
                key: annotate(flat_state[key].detach().narrow(0, start, numel), layout)
                for key in keys
            }
            if step is not None:
                state["step"] = step.detach().clone() if isinstance(step, torch.Tensor) else step
            optimizer_state[name] = state
            groups[group_index]["params"].append(name)
    frozen = sorted(pname for pname in names.values() if pname not in weights)
    if frozen:
        raise ValueError(
            f"parameters {frozen} are in no optimizer parameter group (frozen?), so DeepSpeed "
            "keeps no fp32 copy of them to save; save with engine.save_checkpoint() and "
            "import the folder with import_deepspeed (bitscale ckpt from-deepspeed)"
        )
    param_names = {pname for pname, _ in engine.module.named_parameters(remove_duplicate=False)}
    for key, value in engine.module.state_dict(keep_vars=True).items():
        if key not in param_names and isinstance(value, torch.Tensor):
            weights[key] = value.detach()  # a persistent buffer: whole on every rank
    state = {
        model_entry: weights,
        optimizer_entry: {"state": optimizer_state, "param_groups": groups},
    }
    return state, {model_entry: EntryKind.MODULE, optimizer_entry: EntryKind.OPTIMIZER}


def _flat_partitions(
    ds_optimizer: Any, stage: int
) -> list[tuple[int, list[tuple[torch.nn.Parameter, int, int]], torch.Tensor]]:
    """Each flat fp32 partition DeepSpeed steps on this rank (one per group under ZeRO-1/2,
    one per ``sub_group_size`` sub-group under ZeRO-3) as ``(torch param group index,
    [(parameter, start, numel) of its fragment in the partition], partition)``."""
    if stage == 3:
        partitions = []
        for index, params in enumerate(ds_optimizer.fp16_groups):
            # A sub-group's partition is its parameters' partitions in order.
            fragments, start = [], 0
            for param in params:
                fragments.append((param, start, param.partition_numel()))
                start += param.partition_numel()
            partitions.append(
                (
                    ds_optimizer.sub_group_to_group_id[index],
                    fragments,
                    ds_optimizer.fp32_partitioned_groups_flat[index],
                )
            )
        return partitions
    if hasattr(ds_optimizer, "bit16_groups"):
        params_per_group = ds_optimizer.bit16_groups
        flats = ds_optimizer.single_partition_of_fp32_groups
    else:  # BF16_Optimizer: bf16 weights with fp32 gradient accumulation under ZeRO-1
        params_per_group = ds_optimizer.bf16_groups
        flats = ds_optimizer.fp32_groups_flat_partition
    partitions = []
    for index, (params, flat) in enumerate(zip(params_per_group, flats, strict=True)):
        fragments = []
        for param in params:
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is None:  # this rank holds no element of the parameter
                fragments.append((param, 0, 0))
            else:
                address = mapping.hp_fragment_address
                fragments.append((param, address.start, address.numel))
        partitions.append((index, fragments, flat))
    return partitions
