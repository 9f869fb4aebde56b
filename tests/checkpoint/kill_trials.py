"""Driver for the kill -9 trials of test_crash.py (run as a script, not collected).

It imports torch once, then forks one child per trial. A child trains a tiny
model and saves every step into its own root; it dies by SIGKILL either at a
random file operation of the save pipeline (chosen by index, so every phase is
hit: mid data file, before the manifest, before the rename, before LATEST,
during retention) or at a random instant chosen by the driver. After each
``wait()`` the child appends the durable step to ``durable.txt``.

Usage: kill_trials.py BASE_DIR NUM_KILLS MAX_TRIALS SEED -> one JSON line per trial, until
NUM_KILLS children died by SIGKILL (a random instant may fall after a child finished).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from bitscale.checkpoint import Checkpointer
from bitscale.checkpoint.storage import LocalStorage
from torch import nn

NUM_STEPS = 4


def build(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 3))
    return model, torch.optim.Adam(model.parameters(), lr=0.05)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(8, 24, generator=generator)
    loss = model(x).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def state_at(step: int) -> dict[str, object]:
    """The reference state after ``step`` training steps (what save(step) captured)."""
    model, optimizer = build()
    for s in range(1, step + 1):
        train_step(model, optimizer, s)
    return {"model": model, "optim": optimizer, "meta": {"step": step}}


class KillingStorage(LocalStorage):
    """Counts file operations by kind; SIGKILLs its own process at the ``kill_nth``
    operation of kind ``kill_kind``.

    Kinds name the target and the operation: ``data-open``, ``data-write`` (the victim
    write puts half its bytes down first, leaving a torn file), ``data-fsync``, the same
    for ``manifest`` and ``latest`` (written through temporary names), and the renames
    ``manifest-rename``, ``commit-rename`` (the step directory), ``latest-rename``,
    ``retention-rename`` and ``retention-remove``.
    """

    def __init__(self, kill_kind: str | None = None, kill_nth: int = 0) -> None:
        self.kill_kind, self.kill_nth = kill_kind, kill_nth
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def _tick(self, kind: str) -> bool:
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            return kind == self.kill_kind and self.counts[kind] == self.kill_nth

    @staticmethod
    def _die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def open_writer(self, path: Path):  # type: ignore[override]
        if "manifest" in path.name:
            target = "manifest"
        elif "LATEST" in path.name:
            target = "latest"
        else:
            target = "data"
        if self._tick(f"{target}-open"):
            self._die()
        inner = super().open_writer(path)
        storage = self

        class Writer:
            def write(self, data: memoryview) -> None:
                if storage._tick(f"{target}-write"):
                    inner.write(memoryview(data).cast("B")[: len(data) // 2])
                    storage._die()
                inner.write(data)

            def close(self) -> None:
                if storage._tick(f"{target}-fsync"):
                    storage._die()
                inner.close()

            def abort(self) -> None:
                inner.abort()

        return Writer()

    def rename(self, src: Path, dst: Path) -> None:
        if dst.name == "manifest.json":
            kind = "manifest-rename"
        elif dst.name == "LATEST":
            kind = "latest-rename"
        elif dst.name.startswith(".tmp-"):
            kind = "retention-rename"
        else:
            kind = "commit-rename"
        if self._tick(kind):
            self._die()
        super().rename(src, dst)

    def remove_tree(self, path: Path) -> None:
        if self._tick("retention-remove"):
            self._die()
        super().remove_tree(path)


def run_child(root: Path, kill_kind: str | None = None, kill_nth: int = 0) -> dict[str, int]:
    torch.set_num_threads(1)
    storage = KillingStorage(kill_kind, kill_nth)
    model, optimizer = build()
    durable = os.open(root.parent / f"{root.name}.durable", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    # A 1 KiB pool splits each weight into several pieces: many writes per file.
    with Checkpointer(root, keep=2, host_buffer_bytes=1024, storage=storage) as checkpointer:
        checkpointer.attach(optimizer)
        for step in range(1, NUM_STEPS + 1):
            train_step(model, optimizer, step)
            checkpointer.save(step, {"model": model, "optim": optimizer, "meta": {"step": step}})
            if step % 2 == 0:
                checkpointer.wait()
                os.write(durable, f"{step}\n".encode())
    return storage.counts


def fork_child(root: Path, kill_kind: str | None = None, kill_nth: int = 0) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            run_child(root, kill_kind, kill_nth)
        except BaseException:
            code = 3
        os._exit(code)
    return pid


def main() -> None:
    base, num_kills, max_trials = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(int(sys.argv[4]))
    # A first run in this process pays the lazy imports of the first optimizer
    # step (about 4 s) once; its threads are joined by close(), so the forks
    # below start from a single-threaded process. A second, forked run measures
    # how many file operations and how long a full run takes.
    run_child(base / "warmup")
    start = time.perf_counter()
    counts = count_ops(base / "dry")
    duration = time.perf_counter() - start
    kinds = sorted(counts)
    print(json.dumps({"dry_run_s": duration, "counts": counts}), flush=True)
    kills = 0
    for trial in range(max_trials):
        if kills == num_kills:
            break
        root = base / f"trial{trial:03d}"
        if trial % 2 == 0:
            # Cycle through the kinds so every phase of a save is hit; the occurrence
            # within the run (which save, which piece) is random.
            kind = kinds[(trial // 2) % len(kinds)]
            nth = rng.randint(1, counts[kind])
            pid = fork_child(root, kind, nth)
            mode = f"{kind} #{nth}/{counts[kind]}"
        else:
            pid = fork_child(root)
            delay = rng.uniform(0.0, duration)
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            mode = f"after {delay * 1e3:.1f} ms"
        _, status = os.waitpid(pid, 0)
        exit_code = os.waitstatus_to_exitcode(status)
        kills += exit_code == -signal.SIGKILL
        print(json.dumps({"root": str(root), "mode": mode, "exit": exit_code}), flush=True)


def count_ops(root: Path) -> dict[str, int]:
    """Run one full save sequence in a child; return how many operations of each kind it made."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        os.write(write_fd, json.dumps(run_child(root)).encode())
        os._exit(0)
    os.close(write_fd)
    data = b""
    while chunk := os.read(read_fd, 4096):
        data += chunk
    os.waitpid(pid, 0)
    return json.loads(data)


if __name__ == "__main__":
    main()
