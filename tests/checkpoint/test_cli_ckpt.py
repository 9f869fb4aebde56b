"""``bitscale ckpt``: listing, inspection, verification, export, and clear errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from bitscale.checkpoint import cli
from bitscale.checkpoint.layout import save_sharded
from torch import nn


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="bitscale ckpt")
    cli.add_arguments(parser)
    return cli.main(parser.parse_args(argv))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    for step in (10, 20):
        save_sharded(tmp_path / "ckpt", step, {"model": model, "optim": optimizer})
    return tmp_path / "ckpt"


def test_registered_in_the_bitscale_cli() -> None:
    from bitscale.cli import _COMMANDS

    assert _COMMANDS["ckpt"][0] == "bitscale.checkpoint.cli"


def test_ls_inspect_verify(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("ls", str(root)) == 0
    out = capsys.readouterr().out
    assert "10" in out and "20 (LATEST)" in out
    assert run("inspect", str(root), "--tensors") == 0
    out = capsys.readouterr().out
    assert (
        "step 20" in out and "model/0.weight" in out and "optim/state/model/1.bias/exp_avg" in out
    )
    assert run("verify", str(root), "--step", "10") == 0
    assert "step 10: ok (hash)" in capsys.readouterr().out


def test_damage_is_reported(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (data_file,) = (root / "step-00000020").glob("*.safetensors")
    raw = bytearray(data_file.read_bytes())
    raw[-1] ^= 0xFF
    data_file.write_bytes(bytes(raw))
    assert run("verify", str(root)) == 1
    assert "SHA-256 differs" in capsys.readouterr().err
    assert run("verify", str(root), "--mode", "size") == 0

    (root / "step-00000010" / "manifest.json").write_text("{not json")
    assert run("inspect", str(root), "--step", "10") == 1
    assert "manifest is not valid JSON" in capsys.readouterr().err
    assert run("inspect", str(root), "--step", "11") == 1
    assert "step 11 is not committed" in capsys.readouterr().err


def test_foreign_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("ls", str(tmp_path / "missing")) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "pytorch_model.bin").write_bytes(b"x")
    assert run("inspect", str(tmp_path / "foreign")) == 1
    assert "not a bitscale checkpoint root" in capsys.readouterr().err
    assert run("from-dcp", str(tmp_path / "out"), str(tmp_path / "foreign"), "--step", "1") == 1
    assert "not a torch.distributed.checkpoint folder" in capsys.readouterr().err
    assert run("from-deepspeed", str(tmp_path / "out"), str(tmp_path / "foreign")) == 1
    assert "not a DeepSpeed checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_hf_with_cast(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hf"
    assert run("export-hf", str(root), str(out), "--dtype", "bf16", "--max-shard-size", "40B") == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert len(set(index["weight_map"].values())) > 1
    assert run("export-hf", str(root), str(out)) == 1
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run("export-hf", str(root), str(out), "--max-shard-size", "lots")
