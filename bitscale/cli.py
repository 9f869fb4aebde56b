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
    "env": ("bitscale.env", "what this machine offers: torch, CUDA, triton, gloo/NCCL, deepspeed"),
}


def build_parser() -> argparse.ArgumentParser:
    from bitscale import __version__

    parser = argparse.ArgumentParser(
        prog="bitscale",
        description="Training systems for long-context LLMs.",
    )
    parser.add_argument("--version", action="version", version=f"bitscale {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in _COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
