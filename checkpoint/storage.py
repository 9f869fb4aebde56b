"""Files and directories of a checkpoint root: atomic commit, LATEST, retention, verification.

Crash safety rests on three POSIX guarantees: ``fsync`` makes a file's bytes
durable, ``rename`` within one filesystem is atomic, and ``fsync`` of a
directory makes the renames inside it durable. A step is saved as::

    1. write data files into .tmp-step-<n>-<token>/, fsync each
    2. write manifest.json (via a temporary name, fsync, rename), fsync the directory
    3. rename .tmp-step-<n>-<token>/ -> step-<n>/, fsync the root      <- the commit point
    4. write LATEST via .tmp-LATEST-<token>, fsync, rename over LATEST, fsync the root
    5. retention: rename old steps to .tmp-*, fsync the root, then delete them

A kill at any instant leaves every committed ``step-*`` directory whole. Names
starting with ``.tmp-`` are never read and :func:`clean_leftovers` removes them.
``LATEST`` is a convenience pointer for tools; readers trust the ``step-*``
directories, so a kill between steps 3 and 4 still loads the new step.

The :class:`Storage` protocol is the seam tests use to inject failures (disk
full, a kill in the middle of a write); :class:`LocalStorage` is the real one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from bitscale.checkpoint.format import (
    LATEST_NAME,
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    parse_step_dir_name,
    read_manifest,
    step_dir_name,
    validate_manifest,
)

__all__ = [
    "TMP_PREFIX",
    "CheckpointCorruptError",
    "FileWriter",
    "LocalStorage",
    "Storage",
    "VerifyMode",
    "apply_retention",
    "clean_leftovers",
    "commit_step",
    "find_problems",
    "latest_step",
    "list_steps",
    "read_latest_pointer",
    "read_step_manifest",
    "temp_dir_name",
    "verify",
]

TMP_PREFIX = ".tmp-"

# Hash files in 8 MiB reads: large enough that hashlib releases the GIL and the
# per-call overhead vanishes, small enough to keep memory flat.
_HASH_READ_BYTES = 8 << 20


class VerifyMode(StrEnum):
    """How much of a step is checked before it is loaded."""

    NONE = "none"
    """Trust the manifest."""
    SIZE = "size"
    """Every data file exists with the recorded size (cheap: one stat per file)."""
    HASH = "hash"
    """Sizes, and every file's SHA-256 (reads every byte)."""


class CheckpointCorruptError(RuntimeError):
    """A committed step failed verification; the message lists each problem."""

    def __init__(self, step_dir: str | Path, problems: list[str]) -> None:
        listed = "\n  ".join(problems)
        super().__init__(f"checkpoint {step_dir} is damaged:\n  {listed}")
        self.step_dir = str(step_dir)
        self.problems = problems

    def __reduce__(self) -> tuple[Any, ...]:
        return (CheckpointCorruptError, (self.step_dir, self.problems))


@runtime_checkable
class FileWriter(Protocol):
    """A file being written sequentially."""

    def write(self, data: memoryview) -> None: ...

    def close(self) -> None:
        """Flush and fsync, then close."""

    def abort(self) -> None:
        """Close without fsync after a failure; never raises."""


@runtime_checkable
class Storage(Protocol):
    """The file operations a save performs, in one place so tests can fake them."""

    def open_writer(self, path: Path) -> FileWriter: ...

    def makedirs(self, path: Path) -> None: ...

    def write_atomic(self, path: Path, data: bytes, token: str) -> None:
        """Replace ``path`` with ``data`` atomically and durably."""

    def rename(self, src: Path, dst: Path) -> None:
        """Atomic rename; then fsync the parent directory of ``dst``."""

    def remove_tree(self, path: Path) -> None: ...


class _LocalFileWriter:
    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def write(self, data: memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = os.write(self._fd, view)
            if written == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[written:]

    def close(self) -> None:
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def fsync_dir(path: Path) -> None:
    """Make renames and creations inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage:
    """:class:`Storage` on a POSIX filesystem."""

    def open_writer(self, path: Path) -> FileWriter:
        return _LocalFileWriter(path)

    def makedirs(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)

    def write_atomic(self, path: Path, data: bytes, token: str) -> None:
        tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{token}")
        writer = self.open_writer(tmp)
        try:
            writer.write(memoryview(data))
        except BaseException:
            writer.abort()
            raise
        writer.close()
        self.rename(tmp, path)

    def rename(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)
        fsync_dir(dst.parent)

    def remove_tree(self, path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def temp_dir_name(step: int, token: str) -> str:
    """Name of the directory a save of ``step`` writes into before its commit."""
    return f"{TMP_PREFIX}{step_dir_name(step)}-{token}"


def new_token() -> str:
    """A short random token that keeps concurrent temporary names apart."""
    return uuid.uuid4().hex[:12]


def _committed(root: Path) -> Iterator[tuple[int, Path]]:
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return
    for name in names:
        step = parse_step_dir_name(name)
        if step is not None and (root / name / MANIFEST_NAME).is_file():
            yield step, root / name


def list_steps(root: str | os.PathLike[str]) -> list[int]:
    """Committed steps under ``root``, oldest first (not verified; see :func:`verify`)."""
    return sorted(step for step, _ in _committed(Path(root)))


def latest_step(root: str | os.PathLike[str]) -> int | None:
    """The newest committed step under ``root``, or ``None`` when there is none."""
    steps = list_steps(root)
    return steps[-1] if steps else None


def read_step_manifest(
    root: str | os.PathLike[str], step: int | None = None
) -> tuple[int, Path, Manifest]:
    """Step ``step`` (default: the newest committed one) under ``root``: its number, its
    folder and its manifest. Raises ``ValueError`` when ``root`` has no committed step."""
    root = Path(root)
    step = latest_step(root) if step is None else step
    if step is None:
        raise ValueError(f"no committed bitscale checkpoint under {root}")
    if step not in list_steps(root):
        raise ValueError(
            f"{root} has no committed step {step}; its committed steps are {list_steps(root)}"
        )
    step_dir = root / step_dir_name(step)
    return step, step_dir, read_manifest(step_dir)


def read_latest_pointer(root: str | os.PathLike[str]) -> int | None:
    """The step named by ``<root>/LATEST`` (``None`` when absent or unreadable)."""
    try:
        text = (Path(root) / LATEST_NAME).read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return parse_step_dir_name(text)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        while block := handle.read(_HASH_READ_BYTES):
            digest.update(block)
    return digest.hexdigest()


def find_problems(step_dir: str | os.PathLike[str], mode: VerifyMode | str) -> list[str]:
    """Everything wrong with one step directory under ``mode``; empty when it is whole."""
    mode = VerifyMode(mode)
    step_dir = Path(step_dir)
    try:
        manifest = Manifest.from_bytes((step_dir / MANIFEST_NAME).read_bytes())
        validate_manifest(manifest)
    except FileNotFoundError:
        return [f"{MANIFEST_NAME} is missing"]
    except ManifestError as error:
        return [f"{MANIFEST_NAME}: {error}"]
    if mode is VerifyMode.NONE:
        return []
    problems = []
    for record in manifest.files:
        path = step_dir / record.name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{record.name}: missing")
            continue
        if size != record.size:
            problems.append(f"{record.name}: {size} bytes, manifest says {record.size}")
        elif mode is VerifyMode.HASH and _sha256_file(path) != record.sha256:
            problems.append(f"{record.name}: SHA-256 differs from the manifest")
    return problems


def verify(
    root: str | os.PathLike[str],
    step: int | None = None,
    *,
    mode: VerifyMode | str = VerifyMode.HASH,
) -> int:
    """Check one committed step (default: the newest) and return its number.

    Raises :class:`CheckpointCorruptError` listing every problem found, or
    ``FileNotFoundError`` when there is no such committed step.
    """
    root = Path(root)
    if step is None:
        step = latest_step(root)
        if step is None:
            raise FileNotFoundError(f"no committed checkpoint under {root}")
    step_dir = root / step_dir_name(step)
    if not (step_dir / MANIFEST_NAME).is_file():
        raise FileNotFoundError(
            f"step {step} is not committed under {root}; committed steps: {list_steps(root)}"
        )
    problems = find_problems(step_dir, mode)
    if problems:
        raise CheckpointCorruptError(step_dir, problems)
    return step


def clean_leftovers(root: str | os.PathLike[str], storage: Storage | None = None) -> list[str]:
    """Remove what interrupted saves and deletions left behind; returns the names removed.

    Only call this while no save into ``root`` is in flight.
    """
    storage = storage or LocalStorage()
    root = Path(root)
    removed = []
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return removed
    for name in names:
        if name.startswith(TMP_PREFIX):
            storage.remove_tree(root / name)
            removed.append(name)
    return removed


def commit_step(root: Path, tmp_dir: Path, step: int, token: str, storage: Storage) -> None:
    """Publish a fully written and fsynced ``tmp_dir`` as ``step`` and point LATEST at the newest.

    A committed directory already holding ``step`` (a damaged step being
    rewritten after a fallback) is moved aside first and deleted afterwards.
    """
    final = root / step_dir_name(step)
    replaced = None
    if final.exists():
        replaced = root / f"{TMP_PREFIX}replaced-{final.name}-{token}"
        storage.rename(final, replaced)
    storage.rename(tmp_dir, final)
    newest = max(step, latest_step(root) or step)
    storage.write_atomic(root / LATEST_NAME, (step_dir_name(newest) + "\n").encode(), token)
    if replaced is not None:
        storage.remove_tree(replaced)


def apply_retention(root: Path, keep: int, token: str, storage: Storage) -> list[int]:
    """Delete all but the newest ``keep`` committed steps; returns the steps removed.

    Each old step is first renamed to a ``.tmp-`` name (atomic, so a crash never
    leaves a half-deleted ``step-*``), then deleted.
    """
    steps = list_steps(root)
    doomed = steps[:-keep] if keep > 0 else []
    for step in doomed:
        name = step_dir_name(step)
        storage.rename(root / name, root / f"{TMP_PREFIX}deleting-{name}-{token}")
    for step in doomed:
        storage.remove_tree(root / f"{TMP_PREFIX}deleting-{step_dir_name(step)}-{token}")
    return doomed
