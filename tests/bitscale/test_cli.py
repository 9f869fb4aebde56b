from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bitscale.cli import main


def test_env_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    import torch

    assert info["torch"] == torch.__version__
    assert info["torch_build"] in {"CPU", f"CUDA {torch.version.cuda}"}
    assert info["gloo"] is True
    assert info["cuda_available"] == torch.cuda.is_available()
    assert info["deepspeed"] != ""
    assert info["kernel_mode"].startswith(("triton", "torch fallback"))


def test_env_table_from_python_dash_m() -> None:
    bitscale = [sys.executable, "-m", "bitscale"]
    result = subprocess.run([*bitscale, "env"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "kernel_mode" in result.stdout and "torch" in result.stdout


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_unknown_command_is_an_argparse_error() -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["nope"])
    assert excinfo.value.code == 2
