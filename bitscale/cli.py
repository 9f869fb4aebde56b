"""The ``bitscale`` command line.

Each subcommand lives in its own module with two functions,
``add_arguments(parser)`` and ``main(args) -> int``; heavy imports (torch,
triton) happen inside ``main`` so ``bitscale --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Order is the order of `bitscale --help`.
_COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("bitscale.train", "train a small GPT with HDP, lazy checkpoints and bipolar QAT"),
    "simulate": ("bitscale.hdp.simulate", "cluster-scale simulator: static DP x CP mesh vs HDP"),
    "ckpt": ("bitscale.checkpoint.cli", "list, inspect, verify, import and export checkpoints"),
    "bench": ("bitscale.bench", "run the benchmark suite (bench/) and render bench/RESULTS.md"),
    "env": ("bitscale.env", "what this machine offers: torch, CUDA, triton, gloo/NCCL, deepspeed"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with ``only`` just that subcommand's, so running one command
    never imports the others' modules (and cannot break on them)."""
    from bitscale import __version__

    parser = argparse.ArgumentParser(
        prog="bitscale",
        description="Training systems for long-context LLMs.",
    )
    parser.add_argument("--version", action="version", version=f"bitscale {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in _COMMANDS.items():
        if only is not None and name != only:
            continue
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(only=argv[0] if argv and argv[0] in _COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._main(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
