"""torch.distributed.checkpoint folders in and out, against the real DCP on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from bitscale.checkpoint.engine import Checkpointer
from bitscale.checkpoint.interop_dcp import export_dcp, import_dcp
from bitscale.checkpoint.layout import save_sharded
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


def trained(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01 * (seed + 1), weight_decay=0.1)
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def assert_same(a: tuple[nn.Module, torch.optim.Optimizer], b: tuple) -> None:
    (model_a, opt_a), (model_b, opt_b) = a, b
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q), name
        assert opt_a.state[p].keys() == opt_b.state[q].keys()
        for key, value in opt_a.state[p].items():
            assert torch.equal(value, opt_b.state[q][key]), (name, key)
    for group_a, group_b in zip(opt_a.param_groups, opt_b.param_groups, strict=True):
        assert {k: v for k, v in group_a.items() if k != "params"} == {
            k: v for k, v in group_b.items() if k != "params"
        }


def test_import_a_dcp_checkpoint_and_resume(tmp_path: Path) -> None:
    source = trained(0)
    model_sd, optim_sd = get_state_dict(*source)
    dcp.save(
        {"model": model_sd, "optim": optim_sd, "extra": {"epoch": 3, "name": "run"}},
        checkpoint_id=str(tmp_path / "dcp"),
    )
    calls = []
    import_dcp(tmp_path / "dcp", tmp_path / "ckpt", 12, progress=lambda d, t: calls.append(d))
    assert calls[-1] == len(calls)

    target = trained(1)
    state = {"model": target[0], "optim": target[1], "extra": None}
    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        assert checkpointer.load(state, rng=False) == 12
    assert_same(source, target)
    assert state["extra"] == {"epoch": 3, "name": "run"}
    before = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    for step in (12, 11):
        with pytest.raises(
            ValueError, match=rf"cannot write step {step} .*already holds committed steps \[12\]"
        ):
            import_dcp(tmp_path / "dcp", tmp_path / "ckpt", step)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == before


def test_export_to_dcp_loads_with_set_state_dict(tmp_path: Path) -> None:
    source = trained(0)
    save_sharded(tmp_path / "ckpt", 4, {"model": source[0], "optim": source[1]})
    assert export_dcp(tmp_path / "ckpt", tmp_path / "dcp") == 4

    target = trained(1)
    model_sd, optim_sd = get_state_dict(*target)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(tmp_path / "dcp"))
    set_state_dict(
        target[0], target[1], model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    assert_same(source, target)
    with pytest.raises(ValueError, match="not empty"):
        export_dcp(tmp_path / "ckpt", tmp_path / "dcp")


def test_failed_export_leaves_nothing_and_can_be_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = trained(0)
    save_sharded(tmp_path / "ckpt", 4, {"model": source[0], "optim": source[1]})
    written: list[str] = []

    def fail_before_metadata(self: dcp.FileSystemWriter, *args: object, **kwargs: object) -> None:
        written.extend(p.name for p in Path(self.path).iterdir())
        raise OSError("disk full while writing .metadata")

    with monkeypatch.context() as patch:
        patch.setattr(dcp.FileSystemWriter, "finish", fail_before_metadata)
        with pytest.raises(CheckpointException, match="disk full"):
            export_dcp(tmp_path / "ckpt", tmp_path / "dcp")
    assert any(name.endswith(".distcp") for name in written), "the failure came after data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

    with pytest.raises(ValueError, match=r"no entry 'nope'.*\['model', 'optim'\]"):
        export_dcp(tmp_path / "ckpt", tmp_path / "dcp", model_entry="nope")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

    assert export_dcp(tmp_path / "ckpt", tmp_path / "dcp") == 4
    assert (tmp_path / "dcp" / ".metadata").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "dcp"]


def test_foreign_folder_is_rejected_and_nothing_written(tmp_path: Path) -> None:
    (tmp_path / "notdcp").mkdir()
    (tmp_path / "notdcp" / "weights.bin").write_bytes(b"x" * 10)
    with pytest.raises(ValueError, match=r"not a torch\.distributed\.checkpoint folder"):
        import_dcp(tmp_path / "notdcp", tmp_path / "ckpt", 1)
    (tmp_path / "notdcp" / ".metadata").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot be read"):
        import_dcp(tmp_path / "notdcp", tmp_path / "ckpt", 1)
    assert not (tmp_path / "ckpt").exists() or list((tmp_path / "ckpt").iterdir()) == []
