"""The on-disk format: safetensors headers, skeletons, manifests, chunked reads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from bitscale.checkpoint.format import (
    FORMAT_VERSION,
    ChunkRecord,
    FileRecord,
    Manifest,
    ManifestError,
    RankRecord,
    TensorRecord,
    decode_skeleton,
    encode_skeleton,
    open_chunk,
    parse_step_dir_name,
    read_tensor,
    safetensors_header,
    step_dir_name,
    validate_manifest,
)
from safetensors.torch import load_file


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    prefix, spans = safetensors_header([(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()])
    with open(path, "wb") as handle:
        handle.write(prefix)
        for (begin, end), value in zip(spans, tensors.values(), strict=True):
            data = value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            assert len(data) == end - begin
            handle.write(data)


def test_streamed_header_gives_files_safetensors_reads(tmp_path: Path) -> None:
    tensors = {
        "f64": torch.randn(3, 2, dtype=torch.float64),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "f16": torch.randn(2, 2, 2).half(),
        "i64": torch.arange(-4, 4),
        "u8": torch.arange(7, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "f8": torch.randn(6).to(torch.float8_e4m3fn),
    }
    _write_safetensors(tmp_path / "x.safetensors", tensors)
    loaded = load_file(tmp_path / "x.safetensors")
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
        assert torch.equal(
            loaded[key].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)
        ), key


def test_header_rejects_unsupported_dtypes_and_duplicates() -> None:
    with pytest.raises(TypeError, match=r"cannot checkpoint a torch.complex128 tensor"):
        safetensors_header([("z", torch.complex128, (2,))])
    with pytest.raises(ValueError, match="duplicate safetensors key"):
        safetensors_header([("a", torch.float32, (1,)), ("a", torch.float32, (1,))])


def test_skeleton_round_trip_keeps_python_types() -> None:
    tensors: dict[str, torch.Tensor] = {}

    def on_tensor(path: tuple[str, ...], tensor: torch.Tensor) -> str:
        name = "/".join(path)
        tensors[name] = tensor
        return name

    value = {
        "t": torch.ones(2),
        "tuple": (1, (2.5, "x")),
        "ints": {0: "a", 1: torch.zeros(1)},
        "$odd": 1,
        "floats": [math.nan, math.inf, -math.inf, -0.0],
        "bytes": b"\x00\x01",
        "flags": [True, None],
    }
    skeleton = encode_skeleton(value, on_tensor, ("root",))
    text = json.dumps(skeleton, allow_nan=False)  # strict JSON
    restored = decode_skeleton(json.loads(text), tensors.__getitem__)
    assert restored["tuple"] == (1, (2.5, "x")) and isinstance(restored["tuple"][1], tuple)
    assert restored["ints"][0] == "a" and restored["ints"][1] is tensors["root/ints/1"]
    assert restored["$odd"] == 1 and restored["bytes"] == b"\x00\x01"
    nan, inf, ninf, nzero = restored["floats"]
    assert math.isnan(nan) and inf == math.inf and ninf == -math.inf
    assert math.copysign(1.0, nzero) == -1.0
    assert restored["t"] is tensors["root/t"] and restored["flags"] == [True, None]


def test_skeleton_rejects_foreign_objects_naming_the_path() -> None:
    with pytest.raises(TypeError, match=r"set at 'root/a/1'"):
        encode_skeleton({"a": [1, {2, 3}]}, lambda p, t: "", ("root",))


def test_step_dir_names() -> None:
    assert step_dir_name(42) == "step-00000042"
    assert parse_step_dir_name("step-00000042") == 42
    assert parse_step_dir_name("step-123456789") == 123456789
    for other in (".tmp-step-00000042-abc", "step-42", "LATEST", "step-0000004x"):
        assert parse_step_dir_name(other) is None
    with pytest.raises(ValueError, match="step must be >= 0"):
        step_dir_name(-1)


def _manifest(chunks: list[ChunkRecord], shape: tuple[int, ...] = (4, 6)) -> Manifest:
    return Manifest(
        step=1,
        world_size=2,
        files=(FileRecord(name="a", size=1, sha256="0"), FileRecord(name="b", size=1, sha256="0")),
        tensors={"w": TensorRecord(dtype="float32", shape=shape, chunks=tuple(chunks))},
        ranks=(RankRecord(rank=0, entries={}),),
    )


def test_manifest_validation_catches_bad_tilings() -> None:
    top = ChunkRecord(file="a", key="w", offsets=(0, 0), shape=(2, 6))
    bottom = ChunkRecord(file="b", key="w", offsets=(2, 0), shape=(2, 6))
    validate_manifest(_manifest([top, bottom]))
    with pytest.raises(ManifestError, match="cover 12 of 24"):
        validate_manifest(_manifest([top]))
    with pytest.raises(ManifestError, match="overlap"):
        # Rows [0, 2) and [1, 3): the right element count, but row 1 twice and row 3 never.
        shifted = ChunkRecord(file="b", key="w", offsets=(1, 0), shape=(2, 6))
        validate_manifest(_manifest([top, shifted]))
    with pytest.raises(ManifestError, match="leaves dim 1"):
        validate_manifest(_manifest([ChunkRecord(file="a", key="w", offsets=(0, 1), shape=(4, 6))]))
    with pytest.raises(ManifestError, match="chunk file 'c' is not listed"):
        validate_manifest(_manifest([ChunkRecord(file="c", key="w", offsets=(0, 0), shape=(4, 6))]))


def test_manifest_json_round_trip_and_version_check() -> None:
    manifest = _manifest(
        [
            ChunkRecord(file="a", key="w", offsets=(0, 0), shape=(2, 6)),
            ChunkRecord(file="b", key="w", offsets=(2, 0), shape=(2, 6)),
        ]
    )
    assert Manifest.from_bytes(manifest.to_bytes()) == manifest
    data = json.loads(manifest.to_bytes())
    data["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(ManifestError, match="format_version 2 is not supported"):
        Manifest.from_json(data)
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.from_bytes(b"{truncated")
    del data["files"]
    data["format_version"] = FORMAT_VERSION
    with pytest.raises(ManifestError, match="malformed manifest"):
        Manifest.from_json(data)


def test_read_tensor_assembles_regions_from_chunks_in_several_files(tmp_path: Path) -> None:
    full = torch.arange(7 * 5, dtype=torch.float64).reshape(7, 5)
    # Four chunks: rows [0,3) x cols [0,2) | [0,3) x [2,5) in file a; rows [3,7) split in b.
    pieces = {
        ("a", "p0"): ((0, 0), (3, 2)),
        ("a", "p1"): ((0, 2), (3, 3)),
        ("b", "p2"): ((3, 0), (4, 4)),
        ("b", "p3"): ((3, 4), (4, 1)),
    }
    per_file: dict[str, dict[str, torch.Tensor]] = {"a": {}, "b": {}}
    chunks = []
    for (file, key), (offsets, shape) in pieces.items():
        region = full[offsets[0] : offsets[0] + shape[0], offsets[1] : offsets[1] + shape[1]]
        per_file[file][key] = region.clone()
        chunks.append(ChunkRecord(file=file, key=key, offsets=offsets, shape=shape))
    for file, tensors in per_file.items():
        _write_safetensors(tmp_path / file, tensors)
    record = TensorRecord(dtype="float64", shape=(7, 5), chunks=tuple(chunks))
    validate_manifest(
        Manifest(
            step=0,
            world_size=1,
            files=(
                FileRecord(name="a", size=0, sha256=""),
                FileRecord(name="b", size=0, sha256=""),
            ),
            tensors={"w": record},
            ranks=(),
        )
    )
    assert torch.equal(read_tensor(tmp_path, record), full)
    for offsets, shape in [((2, 1), (3, 4)), ((0, 4), (7, 1)), ((6, 0), (1, 5)), ((1, 1), (0, 3))]:
        want = full[offsets[0] : offsets[0] + shape[0], offsets[1] : offsets[1] + shape[1]]
        assert torch.equal(read_tensor(tmp_path, record, offsets, shape), want), offsets
    out = torch.empty(2, 2, dtype=torch.float64)
    read_tensor(tmp_path, record, (2, 1), (2, 2), out=out)
    assert torch.equal(out, full[2:4, 1:3])
    assert torch.equal(open_chunk(tmp_path, chunks[2])[1:3, :], full[4:6, 0:4])
    with pytest.raises(ValueError, match="region rank 1"):
        read_tensor(tmp_path, record, (0,), (1,))
