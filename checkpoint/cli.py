"""Inspect, verify, import and export bitscale checkpoints.

    bitscale ckpt ls ROOT
    bitscale ckpt inspect ROOT [--step N] [--tensors]
    bitscale ckpt verify ROOT [--step N] [--mode size|hash]
    bitscale ckpt export-hf ROOT OUT [--step N] [--entry model] [--dtype bf16]
    bitscale ckpt from-deepspeed ROOT DS_DIR [--tag TAG] [--step N]
    bitscale ckpt to-deepspeed ROOT OUT [--step N] [--tag TAG]
    bitscale ckpt from-dcp ROOT DCP_DIR --step N

ROOT is a bitscale checkpoint root (it holds step-XXXXXXXX/ folders). Errors on
damaged or foreign folders are reported in one line; the exit status is 1.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KIB|MIB|GIB)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _size_bytes(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000 (also KB, MB, KiB, MiB, GiB, or plain bytes)."""
    match = _SIZE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 5GB, 500MiB)")
    value = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be at least 1 byte, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    commands = parser.add_subparsers(dest="ckpt_command", metavar="ACTION", required=True)

    ls = commands.add_parser(
        "ls",
        help="committed steps of ROOT, newest last",
        description="List the committed steps of ROOT (newest last, LATEST marked) and any "
        "leftovers of interrupted saves.",
        epilog="example:\n  bitscale ckpt ls runs/demo/ckpt/hdp",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ls.add_argument("root", type=Path)

    inspect = commands.add_parser(
        "inspect",
        help="one step's manifest: entries, tensors, files",
        description="Print one step's manifest: who wrote it, its entries, files and tensors.",
        epilog="example:\n  bitscale ckpt inspect runs/demo/ckpt/hdp --step 20 --tensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inspect.add_argument("root", type=Path)
    inspect.add_argument("--step", type=int, help="default: the newest committed step")
    inspect.add_argument("--tensors", action="store_true", help="list every tensor")

    verify = commands.add_parser(
        "verify",
        help="check sizes (and hashes) of a step's files",
        description="Check a step's data files against its manifest; exit status 1 if "
        "any is missing, has the wrong size or (with --mode hash) was altered.",
        epilog="example:\n  bitscale ckpt verify runs/demo/ckpt/hdp --mode size",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("root", type=Path)
    verify.add_argument("--step", type=int, help="default: the newest committed step")
    verify.add_argument(
        "--mode",
        choices=["size", "hash"],
        default="hash",
        help="size: file sizes only; hash: also SHA-256 of every byte (default: %(default)s)",
    )

    export_hf = commands.add_parser(
        "export-hf",
        help="model weights to a Hugging Face folder",
        description="Write one module entry's weights as Hugging Face safetensors shards "
        "plus model.safetensors.index.json, streaming one tensor at a time.",
        epilog="example:\n  bitscale ckpt export-hf runs/demo/ckpt/hdp hf-model --dtype bf16",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export_hf.add_argument("root", type=Path)
    export_hf.add_argument("out", type=Path, help="new or empty folder")
    export_hf.add_argument("--step", type=int, help="default: the newest committed step")
    export_hf.add_argument(
        "--entry", default="model", help="module entry to export (default: %(default)s)"
    )
    export_hf.add_argument(
        "--dtype", choices=sorted(_DTYPES), help="cast floating tensors (default: keep them)"
    )
    export_hf.add_argument(
        "--max-shard-size",
        type=_size_bytes,
        default=5 * 10**9,
        help="largest shard file, e.g. 500MiB (default: 5GB)",
    )

    from_ds = commands.add_parser(
        "from-deepspeed",
        help="import a DeepSpeed ZeRO/universal folder",
        description="Import a DeepSpeed ZeRO-1/2/3 or universal checkpoint as one committed "
        "step of ROOT (ZeRO folders go through DeepSpeed's own ds_to_universal).",
        epilog="example:\n  bitscale ckpt from-deepspeed imported ds-checkpoints --tag global_step100",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from_ds.add_argument("root", type=Path, help="bitscale root to write the step into")
    from_ds.add_argument("ds_dir", type=Path)
    from_ds.add_argument("--tag", help="checkpoint tag (default: from latest/latest_universal)")
    from_ds.add_argument("--step", type=int, help="default: DeepSpeed's global_steps")

    to_ds = commands.add_parser(
        "to-deepspeed",
        help="export to a DeepSpeed universal folder",
        description="Export a step as a DeepSpeed universal checkpoint, which "
        "engine.load_checkpoint reads with checkpoint.load_universal=true.",
        epilog="example:\n  bitscale ckpt to-deepspeed runs/demo/ckpt/hdp ds-out",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    to_ds.add_argument("root", type=Path)
    to_ds.add_argument("out", type=Path, help="folder to write the tag folder into")
    to_ds.add_argument("--step", type=int, help="default: the newest committed step")
    to_ds.add_argument("--tag", help="tag folder name (default: global_step<STEP>_universal)")

    from_dcp = commands.add_parser(
        "from-dcp",
        help="import a torch.distributed.checkpoint folder",
        description="Import a torch.distributed.checkpoint (DCP) folder as step --step of ROOT.",
        epilog="example:\n  bitscale ckpt from-dcp imported dcp-folder --step 100",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from_dcp.add_argument("root", type=Path, help="bitscale root to write the step into")
    from_dcp.add_argument("dcp_dir", type=Path)
    from_dcp.add_argument("--step", type=int, required=True)


@contextmanager
def _progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar driven by ``update(done, total)`` callbacks. It appears at the
    first update, so a command refused before any work prints its error line alone."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=False,
        console=_console(stderr=True),
    )
    tasks: list[Any] = []

    def update(done: int, total: int) -> None:
        if not tasks:
            progress.start()
            tasks.append(progress.add_task(description, total=total))
        progress.update(tasks[0], completed=done, total=total)

    try:
        yield update
    finally:
        if tasks:
            progress.stop()


def _console(*, stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _require_root(root: Path) -> list[int]:
    from bitscale.checkpoint.storage import list_steps

    if not root.is_dir():
        raise ValueError(f"{root} does not exist or is not a folder")
    steps = list_steps(root)
    if not steps:
        raise ValueError(
            f"{root} is not a bitscale checkpoint root: it has no committed step-XXXXXXXX/ "
            "folder with a manifest.json"
        )
    return steps


def _pick_step(root: Path, step: int | None) -> int:
    steps = _require_root(root)
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ValueError(f"step {step} is not committed under {root}; committed steps: {steps}")
    return step


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def _ls(args: argparse.Namespace) -> int:
    from bitscale.checkpoint.format import read_manifest, step_dir_name
    from bitscale.checkpoint.storage import TMP_PREFIX, read_latest_pointer
    from rich.table import Table

    steps = _require_root(args.root)
    latest = read_latest_pointer(args.root)
    table = Table(title=f"bitscale checkpoints in {args.root}")
    for column in ("step", "world", "tensors", "files", "size", "created"):
        table.add_column(column, justify="right" if column != "created" else "left")
    for step in steps:
        manifest = read_manifest(args.root / step_dir_name(step))
        marker = " (LATEST)" if step == latest else ""
        table.add_row(
            f"{step}{marker}",
            str(manifest.world_size),
            str(len(manifest.tensors)),
            str(len(manifest.files)),
            _human(sum(f.size for f in manifest.files)),
            manifest.created_at,
        )
    console = _console()
    console.print(table)
    leftovers = [p.name for p in args.root.iterdir() if p.name.startswith(TMP_PREFIX)]
    if leftovers:
        console.print(f"{len(leftovers)} leftover(s) of interrupted saves: {', '.join(leftovers)}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from bitscale.checkpoint.format import read_manifest, step_dir_name
    from rich.table import Table

    step = _pick_step(args.root, args.step)
    manifest = read_manifest(args.root / step_dir_name(step))
    console = _console()
    console.print(
        f"step {manifest.step}  format_version {manifest.format_version}  saved by "
        f"{manifest.world_size} rank(s) at {manifest.created_at}  writer {manifest.writer}"
    )
    total = sum(f.size for f in manifest.files)
    console.print(f"{len(manifest.files)} data file(s), {_human(total)}")
    entries = Table(title="entries")
    entries.add_column("entry")
    entries.add_column("kind")
    for name, entry in manifest.ranks[0].entries.items():
        entries.add_row(name, str(entry["kind"]))
    console.print(entries)
    if args.tensors:
        tensors = Table(title="tensors")
        for column in ("name", "dtype", "shape", "chunks", "layout"):
            tensors.add_column(column)
        for name, record in manifest.tensors.items():
            tensors.add_row(
                name,
                record.dtype,
                str(list(record.shape)),
                str(len(record.chunks)),
                _describe_layout(record.layout),
            )
        console.print(tensors)
    else:
        numel = sum(math.prod(r.shape) for r in manifest.tensors.values())
        console.print(f"{len(manifest.tensors)} tensor(s), {numel} elements (--tensors lists them)")
    return 0


def _describe_layout(layout: Any) -> str:
    """The layout column: bitscale's descriptor in words, or the raw JSON of another."""
    from bitscale.checkpoint.layout import TensorLayout

    if layout is None:
        return ""
    try:
        return TensorLayout.from_json(layout).describe()
    except (KeyError, TypeError, ValueError):
        return str(layout)


def _verify(args: argparse.Namespace) -> int:
    from bitscale.checkpoint.format import step_dir_name
    from bitscale.checkpoint.storage import find_problems

    step = _pick_step(args.root, args.step)
    console = _console()
    with console.status(f"verifying step {step} ({args.mode})"):
        problems = find_problems(args.root / step_dir_name(step), args.mode)
    if problems:
        _console(stderr=True).print(f"step {step} is damaged:")
        for problem in problems:
            _console(stderr=True).print(f"  {problem}")
        return 1
    console.print(f"step {step}: ok ({args.mode})")
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    import torch
    from bitscale.checkpoint.interop_hf import export_hf

    _require_root(args.root)
    dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else None
    with _progress("export-hf") as update:
        out = export_hf(
            args.root,
            args.out,
            step=args.step,
            entry=args.entry,
            dtype=dtype,
            max_shard_bytes=args.max_shard_size,
            progress=update,
        )
    _console().print(f"wrote {out}")
    return 0


def _from_deepspeed(args: argparse.Namespace) -> int:
    from bitscale.checkpoint.interop_deepspeed import import_deepspeed

    with _progress("from-deepspeed") as update:
        step_dir = import_deepspeed(
            args.ds_dir, args.root, tag=args.tag, step=args.step, progress=update
        )
    _console().print(f"wrote {step_dir}")
    return 0


def _to_deepspeed(args: argparse.Namespace) -> int:
    from bitscale.checkpoint.interop_deepspeed import export_deepspeed_universal

    _require_root(args.root)
    with _progress("to-deepspeed") as update:
        tag_dir = export_deepspeed_universal(
            args.root, args.out, step=args.step, tag=args.tag, progress=update
        )
    _console().print(f"wrote {tag_dir} (load it with checkpoint.load_universal=true)")
    return 0


def _from_dcp(args: argparse.Namespace) -> int:
    from bitscale.checkpoint.interop_dcp import import_dcp

    with _progress("from-dcp") as update:
        step_dir = import_dcp(args.dcp_dir, args.root, args.step, progress=update)
    _console().print(f"wrote {step_dir}")
    return 0


_ACTIONS: dict[str, Callable[[argparse.Namespace], int]] = {
    "ls": _ls,
    "inspect": _inspect,
    "verify": _verify,
    "export-hf": _export_hf,
    "from-deepspeed": _from_deepspeed,
    "to-deepspeed": _to_deepspeed,
    "from-dcp": _from_dcp,
}


def main(args: argparse.Namespace) -> int:
    try:
        return _ACTIONS[args.ckpt_command](args)
    except (ValueError, FileNotFoundError, TypeError) as error:
        print(f"bitscale ckpt {args.ckpt_command}: error: {error}", file=sys.stderr)
        return 1
