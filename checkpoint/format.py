"""The on-disk checkpoint format (version 1): safetensors data files plus a JSON manifest.

Everything here is pure (bytes and dicts in, bytes and dicts out) except the
small readers at the bottom, which open files read-only. Writing, fsync and the
atomic commit live in :mod:`bitscale.checkpoint.storage`.

Layout of a checkpoint root::

    <root>/LATEST                        "step-00000042\\n", swapped atomically after each commit
    <root>/step-00000042/                appears only by atomic rename of a .tmp-* directory
        manifest.json                    the commit record (schema below)
        rank00000-00.safetensors         data files: one or more per writing rank
        rank00001-00.safetensors
    <root>/.tmp-step-00000043-<token>/   an unfinished save: ignored by readers, removed on open

A directory named ``step-<8 digits>`` is committed if and only if it holds
``manifest.json``: the manifest is written, fsynced and renamed into place
inside the temporary directory, and the directory itself is renamed last.

Data files are plain safetensors: an 8-byte little-endian header length, a JSON
header ``{key: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``,
then the raw little-endian tensor bytes. ``safetensors.safe_open`` opens every
one of them; :func:`open_chunk` returns a lazy slice so a reader can load any
byte range of a chunk without reading the rest of the file.

``manifest.json`` (``format_version`` 1)::

    {
      "format_version": 1,
      "step": 42,
      "created_at": "2026-11-26T10:00:00Z",
      "writer": {"bitscale": "0.1.0", "torch": "2.13.0"},
      "world_size": 2,                       # ranks that wrote this step
      "files": [                             # every data file of the step
        {"name": "rank00000-00.safetensors", "size": 1234, "sha256": "<64 hex>"}
      ],
      "tensors": {                           # every logical tensor, by name
        "model/layer.weight": {
          "dtype": "float32",                # torch dtype name without "torch."
          "shape": [8, 4],                   # global: logical, unsharded, unpadded
          "chunks": [                        # hyper-rectangles that tile `shape` exactly
            {"file": "rank00000-00.safetensors", "key": "model/layer.weight",
             "offsets": [0, 0], "shape": [4, 4]},
            {"file": "rank00001-00.safetensors", "key": "model/layer.weight",
             "offsets": [4, 0], "shape": [4, 4]}
          ],
          "layout": null                     # optional JSON describing how it was sharded
        }
      },
      "ranks": [                             # what each writing rank saved besides tensor bytes
        {"rank": 0,
         "entries": {"model": {"kind": "module", "value": <skeleton>}, ...},
         "rng": {"python": ..., "numpy": ..., "torch": "<base64>", "cuda": [...]} | null}
      ]
    }

A single-process save has one chunk per tensor, covering it whole. The chunks of
a tensor never overlap and their volumes sum to the tensor's element count
(:func:`validate_manifest` checks this).

An entry's ``value`` is a *skeleton*: the entry's ``state_dict()`` (or the
plain object) as JSON, where each tensor is replaced by ``{"$tensor": name}``
naming a key of ``tensors``. Other tagged forms keep Python types exact:
``{"$tuple": [...]}``, ``{"$dict": [[key, value], ...]}`` for dicts whose keys
are not all strings (or start with ``$``), ``{"$float": "nan" | "inf" | "-inf"}``
and ``{"$bytes": "<base64>"}``; ``{"$object": ...}`` (a pickled foreign object) and
``{"$odict": [[key, value], ...]}`` appear only in files of the DeepSpeed
engine, never in a manifest. Entry kinds are :class:`EntryKind`. An
optimizer's skeleton is keyed by parameter *name*, not by id:
``{"state": {param_name: {...}}, "param_groups": [{..., "params": [param_name, ...]}]}``,
where a parameter's name is the tensor name of that parameter in the
checkpoint (``"model/layer.weight"``), or ``"#<group>.<index>"`` for a
parameter that belongs to no module of the saved state.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FORMAT_VERSION",
    "LATEST_NAME",
    "MANIFEST_NAME",
    "ChunkRecord",
    "EntryKind",
    "FileRecord",
    "Manifest",
    "ManifestError",
    "RankRecord",
    "TensorRecord",
    "data_file_name",
    "decode_skeleton",
    "dtype_from_name",
    "dtype_name",
    "encode_skeleton",
    "open_chunk",
    "parse_step_dir_name",
    "read_chunk_region",
    "read_manifest",
    "read_tensor",
    "safetensors_header",
    "skeleton_tensor_names",
    "step_dir_name",
    "validate_manifest",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
LATEST_NAME = "LATEST"

_STEP_DIR = re.compile(r"^step-(\d{8,})$")

# safetensors dtype codes; the manifest uses torch's names ("float32").
_SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64",
}


class EntryKind(StrEnum):
    """How an entry of the saved state is restored."""

    MODULE = "module"
    """An ``nn.Module``: its ``state_dict()``."""
    OPTIMIZER = "optimizer"
    """A ``torch.optim.Optimizer``: state keyed by parameter name."""
    STATEFUL = "stateful"
    """Anything else with ``state_dict()``/``load_state_dict()`` (LR scheduler, data loader)."""
    TENSOR = "tensor"
    """A bare tensor, restored in place."""
    OBJECT = "object"
    """A plain JSON-able value, returned by ``load`` in the state mapping."""


class ManifestError(ValueError):
    """A manifest that cannot be read: malformed, or written by an unknown format version."""


def step_dir_name(step: int) -> str:
    """``42 -> "step-00000042"``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step-{step:08d}"


def parse_step_dir_name(name: str) -> int | None:
    """``"step-00000042" -> 42``; ``None`` for any other name (temporary, foreign)."""
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def data_file_name(rank: int, index: int) -> str:
    """Name of data file ``index`` written by ``rank``."""
    return f"rank{rank:05d}-{index:02d}.safetensors"


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32 -> "float32"``; raises ``TypeError`` for dtypes safetensors cannot store."""
    if dtype not in _SAFETENSORS_DTYPES:
        supported = ", ".join(sorted(dtype_name(d) for d in _SAFETENSORS_DTYPES))
        raise TypeError(f"cannot checkpoint a {dtype} tensor; supported dtypes: {supported}")
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """``"float32" -> torch.float32``."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or dtype not in _SAFETENSORS_DTYPES:
        raise ManifestError(f"unknown tensor dtype {name!r} in manifest")
    return dtype


@dataclass(frozen=True, kw_only=True)
class ChunkRecord:
    """One stored hyper-rectangle of a logical tensor."""

    file: str
    """Data file name, relative to the step directory."""
    key: str
    """Tensor key inside that safetensors file."""
    offsets: tuple[int, ...]
    """Start of the chunk in each dimension of the logical tensor."""
    shape: tuple[int, ...]
    """Extent of the chunk in each dimension; the stored tensor has this shape."""

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "key": self.key,
            "offsets": list(self.offsets),
            "shape": list(self.shape),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ChunkRecord:
        return cls(
            file=str(data["file"]),
            key=str(data["key"]),
            offsets=tuple(int(x) for x in data["offsets"]),
            shape=tuple(int(x) for x in data["shape"]),
        )


@dataclass(frozen=True, kw_only=True)
class TensorRecord:
    """A logical tensor: dtype, global shape and the chunks that tile it."""

    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[ChunkRecord, ...]
    layout: Any = None
    """Optional JSON describing how the tensor was sharded when saved (free-form)."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    def to_json(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "chunks": [chunk.to_json() for chunk in self.chunks],
            "layout": self.layout,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorRecord:
        return cls(
            dtype=str(data["dtype"]),
            shape=tuple(int(x) for x in data["shape"]),
            chunks=tuple(ChunkRecord.from_json(c) for c in data["chunks"]),
            layout=data.get("layout"),
        )


@dataclass(frozen=True, kw_only=True)
class FileRecord:
    """A data file of the step, with what it must contain."""

    name: str
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FileRecord:
        return cls(name=str(data["name"]), size=int(data["size"]), sha256=str(data["sha256"]))


@dataclass(frozen=True, kw_only=True)
class RankRecord:
    """What one writing rank saved besides tensor bytes: entry skeletons and RNG states."""

    rank: int
    entries: dict[str, dict[str, Any]]
    """Entry name -> ``{"kind": EntryKind value, "value": skeleton}``."""
    rng: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "entries": self.entries, "rng": self.rng}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RankRecord:
        return cls(rank=int(data["rank"]), entries=dict(data["entries"]), rng=data.get("rng"))


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """The commit record of one step (see the module docstring for the JSON)."""

    step: int
    world_size: int
    files: tuple[FileRecord, ...]
    tensors: dict[str, TensorRecord]
    ranks: tuple[RankRecord, ...]
    created_at: str = ""
    writer: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def file(self, name: str) -> FileRecord:
        for record in self.files:
            if record.name == name:
                return record
        raise ManifestError(f"manifest of step {self.step} lists no data file {name!r}")

    def rank_record(self, rank: int) -> RankRecord | None:
        for record in self.ranks:
            if record.rank == rank:
                return record
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "step": self.step,
            "created_at": self.created_at,
            "writer": self.writer,
            "world_size": self.world_size,
            "files": [f.to_json() for f in self.files],
            "tensors": {name: t.to_json() for name, t in self.tensors.items()},
            "ranks": [r.to_json() for r in self.ranks],
        }

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"checkpoint format_version {version!r} is not supported by this bitscale "
                f"(it reads version {FORMAT_VERSION}); upgrade bitscale to load it"
            )
        try:
            return cls(
                format_version=FORMAT_VERSION,
                step=int(data["step"]),
                created_at=str(data.get("created_at", "")),
                writer=dict(data.get("writer", {})),
                world_size=int(data["world_size"]),
                files=tuple(FileRecord.from_json(f) for f in data["files"]),
                tensors={str(n): TensorRecord.from_json(t) for n, t in data["tensors"].items()},
                ranks=tuple(RankRecord.from_json(r) for r in data["ranks"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ManifestError(f"malformed manifest: {error!r}") from error

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest:
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ManifestError(f"manifest is not valid JSON: {error}") from error
        if not isinstance(data, dict):
            raise ManifestError("manifest is not a JSON object")
        return cls.from_json(data)


def _volume(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _overlaps(a: ChunkRecord, b: ChunkRecord) -> bool:
    return all(
        ao < bo + bs and bo < ao + as_
        for ao, as_, bo, bs in zip(a.offsets, a.shape, b.offsets, b.shape, strict=True)
    )


def validate_manifest(manifest: Manifest) -> None:
    """Check internal consistency: chunks inside their tensor, tiling it exactly, files listed.

    Raises :class:`ManifestError` naming the first problem.
    """
    file_names = {f.name for f in manifest.files}
    for name, tensor in manifest.tensors.items():
        dtype_from_name(tensor.dtype)
        ndim = len(tensor.shape)
        for chunk in tensor.chunks:
            if chunk.file not in file_names:
                raise ManifestError(f"tensor {name!r}: chunk file {chunk.file!r} is not listed")
            if len(chunk.offsets) != ndim or len(chunk.shape) != ndim:
                raise ManifestError(
                    f"tensor {name!r}: chunk rank {len(chunk.shape)} != tensor rank {ndim}"
                )
            for dim, (off, ext, full) in enumerate(
                zip(chunk.offsets, chunk.shape, tensor.shape, strict=True)
            ):
                if off < 0 or ext < 0 or off + ext > full:
                    raise ManifestError(
                        f"tensor {name!r}: chunk [{off}, {off + ext}) leaves dim {dim} "
                        f"of size {full}"
                    )
        covered = sum(_volume(c.shape) for c in tensor.chunks)
        if covered != _volume(tensor.shape):
            raise ManifestError(
                f"tensor {name!r}: chunks cover {covered} of {_volume(tensor.shape)} elements"
            )
        for i, a in enumerate(tensor.chunks):
            for b in tensor.chunks[i + 1 :]:
                if _volume(a.shape) and _volume(b.shape) and _overlaps(a, b):
                    raise ManifestError(f"tensor {name!r}: chunks {a} and {b} overlap")


def safetensors_header(
    entries: Sequence[tuple[str, torch.dtype, Sequence[int]]],
    metadata: Mapping[str, str] | None = None,
) -> tuple[bytes, list[tuple[int, int]]]:
    """The leading bytes of a safetensors file holding ``entries`` in this order.

    Returns ``(prefix, spans)``: ``prefix`` is the 8-byte length plus the JSON
    header (padded with spaces to a multiple of 8 bytes, as safetensors does),
    and ``spans[i]`` is the ``[begin, end)`` byte range of entry ``i`` counted
    from the end of ``prefix``. Knowing every offset before any data exists lets
    writers stream tensors into the file as their copies finish.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    spans: list[tuple[int, int]] = []
    offset = 0
    for key, dtype, shape in entries:
        if key in header:
            raise ValueError(f"duplicate safetensors key {key!r}")
        nbytes = _volume(shape) * dtype.itemsize
        dtype_name(dtype)
        header[key] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        spans.append((offset, offset + nbytes))
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, spans


# ----------------------------------------------------------------------------- skeletons

_EXACT = frozenset({type(None), bool, int, float, str, bytes, tuple, list})

TensorRef = Callable[[tuple[str, ...], torch.Tensor], str]
ObjectRef = Callable[[tuple[str, ...], Any], Any]


def _path_text(path: tuple[str, ...]) -> str:
    return "/".join(path) or "<root>"


def encode_skeleton(
    value: Any,
    on_tensor: TensorRef,
    path: tuple[str, ...] = (),
    on_object: ObjectRef | None = None,
) -> Any:
    """``value`` as JSON, each tensor replaced by ``{"$tensor": on_tensor(path, tensor)}``.

    Without ``on_object``, raises ``TypeError`` naming the path of a value that is
    neither a tensor nor JSON-able (a custom object should be given
    ``state_dict``/``load_state_dict``), and subclasses of tuple (``torch.Size``,
    named tuples) become tuples. With ``on_object``, any value whose type is not
    exactly a JSON type, a tuple or a mapping becomes ``{"$object": on_object(path,
    value)}`` and an ``OrderedDict`` becomes ``{"$odict": [[key, value], ...]}``;
    the DeepSpeed engine uses this to return exactly the objects it was given.
    """
    if isinstance(value, torch.Tensor):
        return {"$tensor": on_tensor(path, value)}
    if on_object is not None and not isinstance(value, Mapping) and type(value) not in _EXACT:
        return {"$object": on_object(path, value)}
    recurse = functools.partial(encode_skeleton, on_tensor=on_tensor, on_object=on_object)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, tuple):
        return {"$tuple": [recurse(v, path=(*path, str(i))) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [recurse(v, path=(*path, str(i))) for i, v in enumerate(value)]
    if isinstance(value, OrderedDict) and on_object is not None:
        return {
            "$odict": [
                [recurse(k, path=(*path, "$key")), recurse(v, path=(*path, str(k)))]
                for k, v in value.items()
            ]
        }
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: recurse(v, path=(*path, k)) for k, v in value.items()}
        return {
            "$dict": [
                [recurse(k, path=(*path, "$key")), recurse(v, path=(*path, str(k)))]
                for k, v in value.items()
            ]
        }
    raise TypeError(
        f"cannot checkpoint {type(value).__qualname__} at {_path_text(path)!r}: values must be "
        "tensors, JSON-able (None, bool, int, float, str, bytes, list, tuple, dict), or objects "
        "with state_dict()/load_state_dict()"
    )


def decode_skeleton(
    skeleton: Any,
    tensor: Callable[[str], Any],
    obj: Callable[[Any], Any] | None = None,
) -> Any:
    """Inverse of :func:`encode_skeleton`; ``tensor(name)`` supplies each tensor and
    ``obj(payload)`` each ``$object`` (an error when ``obj`` is not given)."""
    if isinstance(skeleton, list):
        return [decode_skeleton(v, tensor, obj) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if len(skeleton) == 1:
        ((tag, inner),) = skeleton.items()
        if tag == "$tensor":
            return tensor(inner)
        if tag == "$tuple":
            return tuple(decode_skeleton(v, tensor, obj) for v in inner)
        if tag == "$dict":
            return {
                decode_skeleton(k, tensor, obj): decode_skeleton(v, tensor, obj) for k, v in inner
            }
        if tag == "$odict":
            return OrderedDict(
                (decode_skeleton(k, tensor, obj), decode_skeleton(v, tensor, obj)) for k, v in inner
            )
        if tag == "$float":
            return float(inner)
        if tag == "$bytes":
            return base64.b64decode(inner)
        if tag == "$object":
            if obj is None:
                raise ManifestError("skeleton holds a foreign $object and no decoder was given")
            return obj(inner)
    return {k: decode_skeleton(v, tensor, obj) for k, v in skeleton.items()}


def skeleton_tensor_names(skeleton: Any) -> Iterator[str]:
    """Every tensor name a skeleton refers to."""
    if isinstance(skeleton, list):
        for v in skeleton:
            yield from skeleton_tensor_names(v)
    elif isinstance(skeleton, dict):
        if len(skeleton) == 1 and "$tensor" in skeleton:
            yield skeleton["$tensor"]
            return
        for v in skeleton.values():
            yield from skeleton_tensor_names(v)


# ----------------------------------------------------------------------------- readers


def read_manifest(step_dir: str | Path) -> Manifest:
    """Parse ``<step_dir>/manifest.json`` (no size or hash checks: see ``storage.verify``)."""
    path = Path(step_dir) / MANIFEST_NAME
    return Manifest.from_bytes(path.read_bytes())


def open_chunk(step_dir: str | Path, chunk: ChunkRecord) -> Any:
    """A lazy view of one stored chunk: a ``safetensors`` slice object.

    Index it with one Python slice per dimension to read only those bytes, e.g.
    ``open_chunk(d, c)[0:2, :]``; ``[:]`` (or ``[...]``) reads the whole chunk.
    The file stays memory-mapped while the slice object is alive.
    """
    from safetensors import safe_open

    handle = safe_open(str(Path(step_dir) / chunk.file), framework="pt")
    return handle.get_slice(chunk.key)


def read_chunk_region(
    step_dir: str | Path,
    chunk: ChunkRecord,
    offsets: Sequence[int],
    shape: Sequence[int],
) -> torch.Tensor:
    """Read the part of ``chunk`` inside the logical region ``offsets``/``shape``.

    Returns a tensor of the intersection's shape (possibly empty).
    """
    starts = [max(o, co) - co for o, co in zip(offsets, chunk.offsets, strict=True)]
    stops = [
        min(o + s, co + cs) - co
        for o, s, co, cs in zip(offsets, shape, chunk.offsets, chunk.shape, strict=True)
    ]
    if not chunk.shape:
        from safetensors import safe_open

        with safe_open(str(Path(step_dir) / chunk.file), framework="pt") as handle:
            return handle.get_tensor(chunk.key)
    view = open_chunk(step_dir, chunk)
    return view[tuple(slice(a, max(a, b)) for a, b in zip(starts, stops, strict=True))]


def read_tensor(
    step_dir: str | Path,
    record: TensorRecord,
    offsets: Sequence[int] | None = None,
    shape: Sequence[int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Assemble the region ``offsets``/``shape`` (default: the whole tensor) from its chunks.

    Reads only the overlapping byte ranges of overlapping chunks. With ``out``
    (a tensor of the region's shape and the record's dtype) the data lands there.
    """
    offsets = tuple(offsets) if offsets is not None else (0,) * len(record.shape)
    shape = tuple(shape) if shape is not None else record.shape
    if len(offsets) != len(record.shape) or len(shape) != len(record.shape):
        raise ValueError(
            f"region rank {len(shape)} does not match the tensor's rank {len(record.shape)}"
        )
    if out is None:
        out = torch.empty(shape, dtype=record.torch_dtype)
    elif tuple(out.shape) != shape or out.dtype != record.torch_dtype:
        raise ValueError(
            f"out has shape {tuple(out.shape)} and dtype {out.dtype}; the region needs "
            f"{shape} and {record.torch_dtype}"
        )
    for chunk in record.chunks:
        lo = [max(o, co) for o, co in zip(offsets, chunk.offsets, strict=True)]
        hi = [
            min(o + s, co + cs)
            for o, s, co, cs in zip(offsets, shape, chunk.offsets, chunk.shape, strict=True)
        ]
        if any(a >= b for a, b in zip(lo, hi, strict=True)) and shape:
            continue
        piece = read_chunk_region(step_dir, chunk, offsets, shape)
        target = out[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offsets, strict=True))]
        target.copy_(piece)
    return out
