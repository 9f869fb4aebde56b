"""Atomic file output shared by the CLI tools (metrics, reports, plots)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_output(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success fsync and rename it over ``path``,
    on any error remove it. A reader (or a crash) never sees a half-written file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_figure(fig, path: str | os.PathLike[str], **kwargs) -> None:
    """``fig.savefig`` through :func:`atomic_output`; the format comes from the suffix."""
    file_format = Path(path).suffix.lstrip(".").lower() or "png"
    with atomic_output(path) as f:
        fig.savefig(f, format=file_format, **kwargs)
