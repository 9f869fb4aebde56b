#!/usr/bin/env bash
# Creates the development venv from nothing: torch first (a CPU build unless the
# machine already has a CUDA torch), then bitscale editable with its deepspeed and
# dev extras, constrained to that torch so nothing pulls a multi-GB CUDA build.
set -euo pipefail

venv=${1:-.venv}
python=${PYTHON:-python3}
constraints="$venv/torch-constraint.txt"

system_torch_cuda=$("$python" - <<'PY' 2>/dev/null || true
import torch
print(torch.__version__ if torch.version.cuda else "")
PY
)

if [ -n "$system_torch_cuda" ]; then
    echo "setup: keeping the machine's CUDA torch $system_torch_cuda"
    "$python" -m venv --system-site-packages "$venv"
    torch_version=$system_torch_cuda
else
    "$python" -m venv "$venv"
    # 2.13.0 resolves to the CPU wheel on the project's machines; elsewhere point
    # BITSCALE_TORCH_INDEX at a CPU wheel index (see README).
    "$venv/bin/python" -m pip install -q ${BITSCALE_TORCH_INDEX:+--index-url "$BITSCALE_TORCH_INDEX"} \
        "torch==${BITSCALE_TORCH_VERSION:-2.13.0}"
    torch_version=$("$venv/bin/python" -c 'import torch; print(torch.__version__)')
fi
echo "torch==$torch_version" > "$constraints"

"$venv/bin/python" -m pip install -q -c "$constraints" --upgrade pip setuptools wheel
# deepspeed's setup.py imports torch, so it must build against the venv's torch.
"$venv/bin/python" -m pip install -q -c "$constraints" --no-build-isolation -e ".[deepspeed,dev]"

"$venv/bin/python" - <<'PY'
import importlib.metadata as md
bad = sorted(d.metadata["Name"] for d in md.distributions() if d.metadata["Name"].lower().startswith("nvidia-"))
import torch
if not torch.cuda.is_available() and bad:
    raise SystemExit(f"setup: CUDA packages were installed on a machine without CUDA: {bad}")
print(f"setup: torch {torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU'} build)")
PY
