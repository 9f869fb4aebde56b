"""Static SASS statistics of every Triton kernel build, on a machine without a GPU.

Compiles the builds of ``tests/kernels/test_gpu_compile.py`` (every autotune tile and
launcher specialization, as the JIT builds them) and prints, per build, the registers
per thread, the stack (local memory, mostly register spills: in a K loop each costs L1
traffic), the SASS instruction count and the global loads, read from the cubin with
the ``cuobjdump`` that ships with Triton, and the K loop's cost: the instructions of the
innermost loop that loads from global memory, and those per weight code a thread handles
in one iteration (32 * num_warps threads share BLOCK_N * BLOCK_K codes), and for Hopper's
wgmma the waits that drain every wgmma in flight against the wgmmas (8/8: serialized,
each waiting out the last; ptxas does that on its own, for reasons only its -v output
names). A decode kernel
is ALU-bound once codes per weight byte times instructions per code passes ~9: an H100
issues at most ~30 T thread instructions/s (132 SMs x 128 lanes x 1.75 GHz; integer ones
at half that) against 3.35 TB/s of HBM, so W4 (2 codes a byte) is past 4.4 per code.
Counts are static, not executed instructions: they compare kernel versions, they do not
time them.

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
import sys
import tempfile
from pathlib import Path

_COMPILE_CHECK = Path(__file__).resolve().parents[1] / "tests" / "kernels" / "test_gpu_compile.py"
_INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", re.MULTILINE)
_ADDRESSED = re.compile(
    r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)([^;]*);", re.MULTILINE
)
_GLOBAL_LOADS = ("LDG", "LDGSTS")


def _k_loop(sass: str) -> list[tuple[str, str]]:
    """(opcode, operands) of the innermost loop (a backward branch's range) holding a global
    load: the K loop of every kernel here, one iteration's worth (Triton does not unroll it)."""
    code = [
        (int(address, 16), opcode, operands)
        for address, opcode, operands in _ADDRESSED.findall(sass)
    ]
    loops = []
    for address, opcode, operands in code:
        target = re.search(r"0x([0-9a-f]+)", operands) if opcode == "BRA" else None
        if target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    bodies = [
        [(op, operands) for at, op, operands in code if start <= at <= end]
        for start, end in sorted(loops, key=lambda loop: loop[1] - loop[0])
    ]
    return next((body for body in bodies if any(op in _GLOBAL_LOADS for op, _ in body)), [])


def _wgmma_waits(loop: list[tuple[str, str]]) -> str:
    """The K loop's waits that drain every wgmma in flight (WARPGROUP.DEPBAR.LE gsb0, 0x0)
    over its wgmmas, as "waits/wgmmas"; as many waits as wgmmas means ptxas serialized them
    (its C7515 "Potential Performance Loss"), each waiting out the last one's latency."""
    wgmmas = sum(op in ("HGMMA", "IGMMA") for op, _ in loop)
    waits = sum(
        op == "WARPGROUP" and re.match(r"\.DEPBAR\.LE gsb0, 0x0\b", operands) is not None
        for op, operands in loop
    )
    return f"{waits}/{wgmmas}" if wgmmas else ""


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
    loop = _k_loop(sass)
    return {
        "registers": int(registers),
        "spill_bytes": int(stack),
        "instructions": len(opcodes),
        "global_loads": sum(op in _GLOBAL_LOADS for op in opcodes),
        "loop_instructions": len(loop),
        "wgmma_waits": _wgmma_waits(loop),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grep", default="", help="only builds whose label contains this")
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton

    cuobjdump = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")

    def build_stats(source, binary) -> dict[str, int]:
        build = _cubin_stats(cuobjdump, binary.asm["cubin"])
        meta = {source.fn.arg_names[index]: value for (index,), value in source.constants.items()}
        threads = 32 * binary.metadata.num_warps
        codes = meta.get("BLOCK_N", 0) * meta.get("BLOCK_K", 0)
        build["per_code"] = (
            build["loop_instructions"] * threads / codes
            if codes and build["loop_instructions"]
            else None
        )
        return build

    spec = importlib.util.spec_from_file_location("test_gpu_compile", _COMPILE_CHECK)
    compile_check = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = compile_check  # its forked workers unpickle its functions by name
    spec.loader.exec_module(compile_check)
    builds = compile_check._compile_all(inspect=build_stats)
    print(f"# python scripts/sass_stats.py: triton {triton.__version__}, static counts per cubin")
    print(
        f"{'build':74} {'regs':>5} {'stack B':>8} {'instrs':>7} {'loads':>6} "
        f"{'K loop':>7} {'/code':>6} {'waits':>6}"
    )
    for label, build in builds:
        if args.grep in label:
            per_code = "" if build["per_code"] is None else f"{build['per_code']:.2f}"
            print(
                f"{label:74} {build['registers']:>5} {build['spill_bytes']:>8} "
                f"{build['instructions']:>7} {build['global_loads']:>6} "
                f"{build['loop_instructions']:>7} {per_code:>6} {build['wgmma_waits']:>6}"
            )


if __name__ == "__main__":
    main()
