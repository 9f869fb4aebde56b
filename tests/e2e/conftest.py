"""Helpers for the end-to-end tests of ``bitscale train``: run the real command line in
subprocesses, read what it wrote."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

# Settings that keep a step to ~0.1 s on 2 CPU cores: the tiny model, 8 documents of at
# most 128 bytes per step.
SMALL = ("--model", "tiny", "--docs-per-step", "8", "--max-len", "128", "--no-progress")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # Several ranks share 2 cores: one intra-op thread each.
    env["OMP_NUM_THREADS"] = "1"
    env.pop("WORLD_SIZE", None)
    return env


@pytest.fixture
def small_args() -> tuple[str, ...]:
    return SMALL


@pytest.fixture
def run_train() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_train(args, cwd=..., timeout=...)``: ``bitscale train ARGS`` to completion."""

    def run(
        args: Sequence[str], *, cwd: Path, timeout: float = 150
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bitscale.cli", "train", *args],
            cwd=cwd,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture
def start_train() -> Callable[..., subprocess.Popen[str]]:
    """``start_train(args, cwd=...)``: ``bitscale train ARGS`` in the background, in a
    session of its own (so a signal reaches only it)."""

    def start(args: Sequence[str], *, cwd: Path) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "bitscale.cli", "train", *args],
            cwd=cwd,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    return start


@pytest.fixture
def start_ranks() -> Callable[..., list[subprocess.Popen[str]]]:
    """``start_ranks(world_size, args, cwd=...)``: the ranks of a job started the way
    torchrun starts them (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the environment),
    each a direct child of the test so it can be killed with SIGKILL by pid."""

    def start(world_size: int, args: Sequence[str], *, cwd: Path) -> list[subprocess.Popen[str]]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        processes = []
        for rank in range(world_size):
            env = _env()
            env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world_size),
                LOCAL_WORLD_SIZE=str(world_size),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "bitscale.train", *args],
                    cwd=cwd,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        return processes

    return start


@pytest.fixture
def read_metrics() -> Callable[[Path], dict[str, Any]]:
    def read(path: Path) -> dict[str, Any]:
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    return read
