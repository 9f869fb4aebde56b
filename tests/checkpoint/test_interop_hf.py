"""Streaming Hugging Face export: layout, bf16 cast, tied weights, bounded memory."""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import pytest
import torch
from bitscale.checkpoint.interop_hf import HF_INDEX_NAME, export_hf
from bitscale.checkpoint.layout import save_sharded
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from bitscale.testing import run_on_ranks


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("steps", torch.arange(3))


def load_hf(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / HF_INDEX_NAME).read_text())
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / file), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
        tensors.update(load_file(folder / file))
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    assert set(index["weight_map"]) == set(tensors)
    return tensors


def test_export_layout_cast_and_tied_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Tiny()
    save_sharded(tmp_path / "ckpt", 2, {"model": model, "meta": {"lr": 0.1}})
    progress = []
    export_hf(
        tmp_path / "ckpt",
        tmp_path / "hf",
        max_shard_bytes=100,
        progress=lambda done, total: progress.append((done, total)),
    )
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert HF_INDEX_NAME in files
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    exported = load_hf(tmp_path / "hf")
    expected = {k: v for k, v in model.state_dict().items() if k != "head.weight"}
    assert exported.keys() == expected.keys(), "the tied head is stored once, as embed.weight"
    for key, value in expected.items():
        assert torch.equal(exported[key], value), key
    assert progress[-1] == (len(expected), len(expected))

    export_hf(tmp_path / "ckpt", tmp_path / "hf16", dtype=torch.bfloat16)
    exported = load_hf(tmp_path / "hf16")
    assert exported["proj.weight"].dtype == torch.bfloat16
    assert torch.equal(exported["proj.weight"], model.proj.weight.detach().to(torch.bfloat16))
    assert exported["steps"].dtype == torch.int64, "integer tensors keep their dtype"


def test_bad_requests_write_nothing(tmp_path: Path) -> None:
    save_sharded(tmp_path / "ckpt", 1, {"model": Tiny(), "w": torch.ones(2)})
    with pytest.raises(ValueError, match=r"no module entry 'w'.*\['model'\]"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf", entry="w")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        export_hf(tmp_path / "ckpt", tmp_path / "full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "full"]
    with pytest.raises(ValueError, match="no committed bitscale checkpoint"):
        export_hf(tmp_path / "full", tmp_path / "hf")
    for bad_dtype in (torch.int8, torch.bool, "bf16", "torch.bfloat16"):
        with pytest.raises(ValueError, match=r"dtype must be None or a floating torch\.dtype"):
            export_hf(tmp_path / "ckpt", tmp_path / "hf", dtype=bad_dtype)  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "full"]


TENSOR_BYTES, BUFFER_BYTES = 4 << 20, 1 << 20


def measure_export_memory(rank: int, world_size: int, root: str) -> int:
    """Peak resident memory an export adds, in a fresh process (see test_universal's
    measure_load_memory: glibc's mmap threshold fixed, so RSS measures live memory)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 << 10)
    module = nn.Module()
    for i in range(6):
        module.register_buffer(f"layer{i}", torch.full((TENSOR_BYTES // 4,), float(i)))
    save_sharded(Path(root) / "ckpt", 1, {"model": module})
    del module
    libc.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    status = Path("/proc/self/status").read_text()
    before = int(status.split("VmRSS:")[1].split()[0]) * 1024
    export_hf(
        Path(root) / "ckpt", Path(root) / "hf", dtype=torch.bfloat16, buffer_bytes=BUFFER_BYTES
    )
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024 - before


@pytest.mark.dist
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux procfs")
def test_export_streams_one_tensor_at_a_time(tmp_path: Path) -> None:
    (peak,) = run_on_ranks(measure_export_memory, 1, str(tmp_path))
    # One float32 tensor, its bf16 cast and the read buffer; the model is 24 MiB.
    assert peak <= 2 * TENSOR_BYTES + BUFFER_BYTES, peak
    print(f"peak extra export memory: {peak / 2**20:.2f} MiB (largest tensor 4 MiB, model 24 MiB)")
