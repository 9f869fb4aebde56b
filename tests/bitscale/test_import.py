"""The package imports light and from the installed location, never a shadowing folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run_python(code: str, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("cwd", [REPO, Path("/")], ids=["repo-root", "elsewhere"])
def test_import_is_light(cwd: Path) -> None:
    out = _run_python(
        "import sys, json\n"
        "import bitscale\n"
        "light = 'torch' not in sys.modules\n"
        "import bitscale.kernels, bitscale.hdp, bitscale.checkpoint\n"
        "bitscale.hdp.HDPRunner, bitscale.hdp.attention, bitscale.kernels.BipolarLinear\n"
        "import bitscale.hdp.simulate, bitscale.checkpoint.cli, bitscale.train\n"
        "import torch\n"
        "print(json.dumps({'light': light, 'triton': 'triton' in sys.modules,\n"
        "  'cuda': torch.cuda.is_initialized(),\n"
        "  'kernels': bitscale.kernels.__file__, 'top_level_kernels': 'kernels' in sys.modules}))",
        cwd,
    )
    report = json.loads(out)
    assert report["light"], "import bitscale must not import torch"
    assert not report["triton"], "importing bitscale subsystems must not import triton"
    assert not report["cuda"], "importing bitscale must not initialize CUDA"
    assert not report["top_level_kernels"]
    assert Path(report["kernels"]).parent.name in {"kernels"}, report["kernels"]


def test_pytest_imports_the_installed_package() -> None:
    import bitscale.kernels

    # Editable installs map bitscale.kernels to <repo>/kernels; regular ones to site-packages.
    location = Path(bitscale.kernels.__file__).resolve()
    assert location in {REPO / "kernels" / "__init__.py"} or "site-packages" in location.parts


def test_lazy_subsystem_attribute() -> None:
    import bitscale

    assert bitscale.hdp.__name__ == "bitscale.hdp"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        bitscale.nope  # noqa: B018
