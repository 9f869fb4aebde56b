"""Print what this machine offers to bitscale: torch build, CUDA devices, triton
and how kernels will run, gloo/NCCL, deepspeed."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
from typing import Any


def _package_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _kernel_mode(cuda_available: bool, triton_version: str | None) -> str:
    # The kernels' own dispatch point decides; this only reports its answer.
    from bitscale.kernels.dispatch import kernel_status

    status = kernel_status(
        cuda_available=cuda_available, triton_installed=triton_version is not None
    )
    return status.describe()


def collect_env() -> dict[str, Any]:
    """Everything ``bitscale env`` reports, as plain JSON-able values."""
    import torch
    import torch.distributed as dist

    cuda_available = torch.cuda.is_available()
    devices = []
    if cuda_available:
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append(
                {
                    "index": index,
                    "name": props.name,
                    "memory_gib": round(props.total_memory / 2**30, 1),
                    "capability": f"{props.major}.{props.minor}",
                }
            )
    triton_version = _package_version("triton")
    return {
        "bitscale": _package_version("bitscale"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_build": f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU",
        "cuda_available": cuda_available,
        "cuda_devices": devices,
        "triton": triton_version,
        "kernel_mode": _kernel_mode(cuda_available, triton_version),
        "gloo": dist.is_available() and dist.is_gloo_available(),
        "nccl": dist.is_available() and dist.is_nccl_available(),
        "deepspeed": _package_version("deepspeed") or "not installed",
        "safetensors": _package_version("safetensors"),
        "numpy": _package_version("numpy"),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of a table"
    )


def main(args: argparse.Namespace) -> int:
    info = collect_env()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="bitscale env", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for key, value in info.items():
        if key == "cuda_devices":
            value = (
                "; ".join(
                    f"{d['index']}: {d['name']} ({d['memory_gib']} GiB, sm {d['capability']})"
                    for d in value
                )
                or "none"
            )
        table.add_row(key, str(value))
    Console().print(table)
    return 0
