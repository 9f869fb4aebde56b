"""Fakes shared by the checkpoint tests: storages that block or run out of space."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
from bitscale.checkpoint.storage import FileWriter, LocalStorage


class GatedStorage(LocalStorage):
    """Data files open only once ``gate`` is set: copies pile up in the host pool."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def open_writer(self, path: Path) -> FileWriter:
        self.gate.wait()
        return super().open_writer(path)


class FullDiskStorage(LocalStorage):
    """Raises ENOSPC once more than ``budget`` data bytes were written (None: no limit)."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = budget
        self.written = 0

    def open_writer(self, path: Path) -> FileWriter:
        inner = super().open_writer(path)
        storage = self

        class Writer:
            def write(self, data: memoryview) -> None:
                n = memoryview(data).nbytes
                if storage.budget is not None and storage.written + n > storage.budget:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
                storage.written += n
                inner.write(data)

            def close(self) -> None:
                inner.close()

            def abort(self) -> None:
                inner.abort()

        return Writer()


@pytest.fixture
def gated_storage() -> GatedStorage:
    storage = GatedStorage()
    yield storage
    storage.gate.set()


@pytest.fixture
def full_disk_storage() -> FullDiskStorage:
    return FullDiskStorage()
