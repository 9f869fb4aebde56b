"""The ``bitscale`` command line.

Each subcommand lives in its own module with two functions,
``add_arguments(parser)`` and ``main(args) -> int``; heavy imports (torch,
triton) happen inside ``main`` so ``bitscale --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help, description, examples). Order is the order of
# `bitscale --help`.
_COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "train": (
        "bitscale.train",
        "train a GPT (up to 1B) with HDP, bf16, lazy checkpoints and bipolar QAT",
        "Train a GPT (0.14M to 1B parameters) on local processes: each step is planned by\n"
        "HDP (or the static DP x CP mesh), with lazy checkpoints and optional bipolar-INT\n"
        "QAT; bf16 compute over float32 weights on CUDA. The summary reports tokens/s and\n"
        "MFU. Ctrl-C stops after the current step and says which checkpoint is safe. Under\n"
        "torchrun, run `python -m bitscale.train` with the same options and no --nproc.",
        "  bitscale train --nproc 2 --model tiny --steps 30 --schedule both \\\n"
        "      --ckpt-dir runs/demo/ckpt --ckpt-every 10 --plot runs/demo/train.png\n"
        "  bitscale train --nproc 3 --steps 60 --ckpt-dir runs/demo/ckpt/hdp --resume"
        "   # on 3 processes\n"
        "  bitscale train --nproc 8 --model 1b --compile --metrics m.json"
        "   # 8 GPUs: bf16, MFU in m.json",
    ),
    "simulate": (
        "bitscale.hdp.simulate",
        "cluster-scale simulator: static DP x CP mesh vs HDP",
        "Simulate training steps of a model on a GPU cluster and compare the static DP x CP\n"
        "mesh with the HDP strategies, with an ablation table. A preset sets the model, the\n"
        "cluster and the length distribution; the other options override it. docs/hdp.md\n"
        "describes the cost model.",
        "  bitscale simulate --preset llama-7b-2m\n"
        "  bitscale simulate --preset llama-70b-1m --sweep context=256K,512K,1M --plot out.png",
    ),
    "ckpt": (
        "bitscale.checkpoint.cli",
        "list, inspect, verify, import and export checkpoints",
        "List, inspect and verify bitscale checkpoints; export them to Hugging Face or\n"
        "DeepSpeed folders; import DeepSpeed and torch.distributed.checkpoint folders.\n"
        "ROOT is a checkpoint root (the folder holding step-XXXXXXXX/). Errors are\n"
        "reported in one line with exit status 1. `bitscale ckpt ACTION --help` for one\n"
        "action's options.",
        "  bitscale ckpt ls runs/demo/ckpt/hdp\n"
        "  bitscale ckpt verify runs/demo/ckpt/hdp --mode hash\n"
        "  bitscale ckpt export-hf runs/demo/ckpt/hdp hf-model --dtype bf16",
    ),
    "bench": (
        "bitscale.bench",
        "run the benchmark suite (bench/) and render bench/RESULTS.md",
        "Run the benchmarks in bench/ (from a repository checkout), append the results to\n"
        "bench/results/<device>-<date>.json, and render them into bench/RESULTS.md.\n"
        "docs/benchmarks.md says how to read the report and add a case.",
        "  bitscale bench run --quick\n"
        "  bitscale bench run --only kernels\n"
        "  bitscale bench report",
    ),
    "env": (
        "bitscale.env",
        "what this machine offers: torch, CUDA, triton, gloo/NCCL, deepspeed",
        "Print what this machine offers to bitscale: the torch build, CUDA devices, Triton\n"
        "and how the kernels will run, gloo/NCCL, DeepSpeed.",
        "  bitscale env\n  bitscale env --json",
    ),
}

_EPILOG = """\
examples:
  make demo                      # what the README starts with: bitscale train, 2 processes
  bitscale train --nproc 2 --schedule both
  bitscale ckpt ls runs/demo/ckpt/hdp
  bitscale COMMAND --help        # one command's options, with defaults and examples

docs: README.md (users), docs/*.md (internals), bench/RESULTS.md (measurements)"""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with ``only`` just that subcommand's, so running one command
    never imports the others' modules (and cannot break on them)."""
    from bitscale import __version__

    parser = argparse.ArgumentParser(
        prog="bitscale",
        description="Training systems for long-context LLMs: hybrid data parallelism (HDP),\n"
        "lazy universal checkpoints and bipolar-INT low-bit kernels for PyTorch.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bitscale {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text, description, examples) in _COMMANDS.items():
        if only is not None and name != only:
            continue
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(
            name,
            help=help_text,
            description=description,
            epilog=f"examples:\n{examples}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
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
