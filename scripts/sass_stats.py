"""Static SASS statistics of every Triton kernel build, on a machine without a GPU.

Compiles the builds of ``tests/kernels/test_gpu_compile.py`` (every autotune tile and
launcher specialization, as the JIT builds them) and prints, per build, the registers
per thread, the stack (local memory, mostly register spills: in a K loop each costs L1
traffic), the SASS instruction count and the global loads, read from the cubin with
the ``cuobjdump`` that ships with Triton. Counts are static, not executed instructions:
they compare kernel versions, they do not time them.

    python scripts/sass_stats.py [--grep TEXT]

Another Triton version (the GPU machines run 3.6) without touching the venv:
``pip install --no-deps --target DIR triton==3.6.0``, then
``PYTHONPATH=DIR TRITON_CACHE_DIR=DIR/cache python scripts/sass_stats.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import tempfile
from pathlib import Path

_COMPILE_CHECK = Path(__file__).resolve().parents[1] / "tests" / "kernels" / "test_gpu_compile.py"
_INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", re.MULTILINE)


def _cubin_stats(cuobjdump: str, cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = subprocess.run(
            [cuobjdump, "-res-usage", file.name], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [cuobjdump, "-sass", file.name], capture_output=True, text=True, check=True
        ).stdout
    registers, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    opcodes = _INSTRUCTION.findall(sass)
    return {
        "registers": int(registers),
        "spill_bytes": int(stack),
        "instructions": len(opcodes),
        "global_loads": sum(op in ("LDG", "LDGSTS") for op in opcodes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grep", default="", help="only builds whose label contains this")
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton

    cuobjdump = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    stats: list[dict[str, int]] = []
    compile_cubin = triton.compile

    def compile_and_record(*compile_args, **compile_kwargs):
        binary = compile_cubin(*compile_args, **compile_kwargs)
        stats.append(_cubin_stats(cuobjdump, binary.asm["cubin"]))
        return binary

    triton.compile = compile_and_record
    spec = importlib.util.spec_from_file_location("test_gpu_compile", _COMPILE_CHECK)
    compile_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compile_check)
    labels = compile_check._compile_all()
    assert len(labels) == len(stats), "one triton.compile per build"
    print(f"# python scripts/sass_stats.py: triton {triton.__version__}, static counts per cubin")
    print(f"{'build':74} {'regs':>5} {'stack B':>8} {'instrs':>7} {'loads':>6}")
    for label, build in zip(labels, stats, strict=True):
        if args.grep in label:
            print(
                f"{label:74} {build['registers']:>5} {build['spill_bytes']:>8} "
                f"{build['instructions']:>7} {build['global_loads']:>6}"
            )


if __name__ == "__main__":
    main()
