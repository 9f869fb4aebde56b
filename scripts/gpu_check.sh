#!/usr/bin/env bash
# The GPU checks in one command, for a short lease on a GPU machine (15 minutes of device
# time per session, start-up included): install, then sections in priority order, each in
# its own time box and all under one deadline, so the script ends within 8 minutes
# (TOTAL_SECONDS, default 450, after the install) whatever a section does:
#
#   1. kernels: weight-only decode at M = 1 and 16 with the peers (GemLite, tinygemm), where
#      issue 23's goals are set;
#   2. every `gpu`-marked test (kernels against the exact oracle, HDP attention, CUDA
#      checkpoint staging);
#   3. HDP attention: the Triton block against FlexAttention and SDPA (issue 21);
#   4. end to end: `bitscale train --model 1b --compile` with MFU, bitscale against a plain
#      PyTorch loop, and QAT's step cost (issue 22);
#   5. the autotune cache: the first call of a new shape in a fresh process, cold then warm;
#   6. the remaining kernel benchmarks, as time allows;
#   7. `bitscale bench goals`: the kernel goals against every results file.
#
# Benchmarks append runs to bench/results/<device>-<date>.json (copied to $OUT); logs land
# in $OUT (default runs/gpu-check). Commit the results file with the device named.
# E2E_MODEL=tiny dry-runs section 4's trainer on a CPU.
set -u -o pipefail

out=${OUT:-runs/gpu-check}
python=${PYTHON:-python3}
total_seconds=${TOTAL_SECONDS:-450}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# Triton >= 3.9 warns unless this is set; the kernels are written for fused multiply-add.
export TRITON_DEFAULT_FP_FUSION=1

stamp() { echo "[gpu_check $(date -u +%H:%M:%S)] $*"; }

stamp "install (setuptools $("$python" -c 'import setuptools; print(setuptools.__version__)'))"
if ! "$python" -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1; then
    cat "$out/install.log"
    exit 1
fi
# Benchmark-only packages the GPU machine lacks (GemLite for the peers) travel as wheels in
# .whl/ (ignored by git; carry it): `pip wheel --no-deps -w .whl gemlite==0.6.0.post2` builds
# its pure-Python wheel from the sdist.
if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/bitscale-site .whl/*.whl \
        && export PYTHONPATH=/tmp/bitscale-site${PYTHONPATH:+:$PYTHONPATH}
fi
"$python" -m bitscale env 2>&1 | tee "$out/env.txt"
deadline=$((SECONDS + total_seconds))

# boxed SECONDS LABEL COMMAND...: run COMMAND for at most SECONDS, fewer if the deadline is
# nearer; skip it when under 20 s are left. Returns the command's exit code (124: cut).
boxed() {
    local want=$1 label=$2
    shift 2
    local left=$((deadline - SECONDS))
    local box=$((want < left ? want : left))
    if ((box < 20)); then
        stamp "skipped (${left} s left): $label"
        return 0
    fi
    stamp "$label (time box ${box} s)"
    timeout "$box" "$@"
    local status=$?
    stamp "$label: exit code $status (124: cut by the time box)"
    return "$status"
}

bench() {  # bench SECONDS SUBSYSTEM SELECTION [--quick]
    boxed "$1" "bench $2: $3" "$python" -m bitscale bench run ${4:-} --only "$2" -- -m gpu -k "$3" \
        2>&1 | tee -a "$out/bench.log"
    find bench/results -maxdepth 1 -name '*.json' -newer "$out/env.txt" -exec cp {} "$out/" \;
}

# Case ids start with M: "[1-" is M = 1.
bench 110 kernels "peers or (weight_only and ([1- or [16-))"

# Several workers (pytest-xdist, where installed): compiling each kernel specialization
# is single-threaded CPU work, and the machine has 16 cores. -v: one line per test as it
# ends, so a run cut by its box still says which passed.
workers=()
if "$python" -c "import xdist" 2>/dev/null; then
    workers=(-n 14)
fi
boxed 140 "gpu tests" "$python" -m pytest -v --tb=short -m gpu "${workers[@]}" -p no:cacheprovider \
    tests/kernels tests/hdp tests/checkpoint 2>&1 | tee "$out/gpu-tests.log"
tests_status=${PIPESTATUS[0]}

bench 50 hdp "attention"

e2e_model=${E2E_MODEL:-1b}
boxed 60 "e2e: bitscale train --model $e2e_model --compile" "$python" -m bitscale train --nproc 1 \
    --model "$e2e_model" --steps 5 --compile --no-progress --metrics "$out/train-$e2e_model.json" \
    2>&1 | tee "$out/train-$e2e_model.log"
bench 60 e2e "plain_loop or qat_step_cost" --quick

# The first call of a new shape (W4A16 decode on code words, M = 1: 21 autotune candidates)
# in a fresh process, cold autotune cache then warm; the cold run's second N is tuning only.
rm -rf "$out/bitscale-cache"
for cache in cold warm; do
    BITSCALE_CACHE_DIR="$out/bitscale-cache" boxed 30 "first call, $cache autotune cache" \
        "$python" -c 'import json, sys, time, torch; from bitscale.kernels import quantize; from bitscale.kernels.reference import pack_weight; from bitscale.kernels.triton_a16 import bipolar_linear_a16; ws = {n: pack_weight(quantize(torch.randn(n, 5120, device="cuda"), 4), layout="code_words") for n in (3072, 2560)}; x = torch.randn(1, 5120, device="cuda", dtype=torch.bfloat16); torch.cuda.synchronize(); [(t := time.perf_counter(), bipolar_linear_a16(x, w), torch.cuda.synchronize(), print(json.dumps({"cache": sys.argv[1], "N": n, "K": 5120, "first_call_s": round(time.perf_counter() - t, 3)}))) for n, w in ws.items()]' \
        "$cache" 2>&1 | tee -a "$out/first-call.log"
done

# Then the rest of the kernel benchmarks, most asked-for first: W{4,8}A8 at 4096^2, the
# eager host overhead, the expansion crossover, weight-only at M = 256 and 4096, the
# bit-plane comparison, W{4,8}A8 at 8192 x 28672.
for chunk in "int8_activation and N4096" "eager_overhead" "expanded_weight" \
    "weight_only and ([256- or [4096-)" "bitplane" "int8_activation and N8192"; do
    bench 60 kernels "$chunk"
done

# The issue's kernel goals against every results file, this run's included (last, so the
# verdict ends the output a short lease sees).
"$python" -m bitscale bench goals 2>&1 | tee "$out/goals.md"

stamp "done; files in $out: $(ls "$out" | tr '\n' ' ')"
exit "$tests_status"
