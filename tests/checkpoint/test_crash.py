"""Kill -9 at random instants of a save: the newest committed step always loads, bitwise."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bitscale.checkpoint import Checkpointer, list_steps, verify
from bitscale.checkpoint.storage import TMP_PREFIX, read_latest_pointer

DRIVER = Path(__file__).with_name("kill_trials.py")
NUM_KILLS = 50
MAX_TRIALS = 80


def _load_driver():
    spec = importlib.util.spec_from_file_location("kill_trials", DRIVER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_same_state(loaded: dict, reference: dict) -> None:
    for key, value in reference["model"].state_dict().items():
        assert torch.equal(loaded["model"].state_dict()[key], value), key
    got, want = loaded["optim"].state_dict(), reference["optim"].state_dict()
    assert got["param_groups"] == want["param_groups"]
    assert got["state"].keys() == want["state"].keys()
    for index, param_state in want["state"].items():
        for key, value in param_state.items():
            assert torch.equal(got["state"][index][key], value), (index, key)
    assert loaded["meta"] == reference["meta"]


@pytest.mark.slow
def test_kill9_during_save_leaves_newest_committed_step_loadable(tmp_path: Path) -> None:
    seed = int(os.environ.get("BITSCALE_KILL_SEED", "20261126"))
    result = subprocess.run(
        [sys.executable, str(DRIVER), str(tmp_path), str(NUM_KILLS), str(MAX_TRIALS), str(seed)],
        capture_output=True,
        text=True,
        timeout=240,
        # Forked children must not touch a CUDA context (pinned memory) of their parent.
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    counts = lines[0]["counts"]
    trials = [line for line in lines if "root" in line]
    killed = [t for t in trials if t["exit"] == -9]
    assert len(killed) == NUM_KILLS, trials
    assert all(t["exit"] in (0, -9) for t in trials), trials
    # Every phase of a save was hit: data files mid-write, before and after fsync, the
    # manifest, the commit rename, LATEST, retention.
    killed_kinds = {t["mode"].split(" #")[0] for t in killed if " #" in t["mode"]}
    assert killed_kinds == set(counts), (killed_kinds, counts)

    driver = _load_driver()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the children trained single-threaded
    references: dict[int, dict] = {}
    try:
        for trial in trials:
            root = Path(trial["root"])
            durable_file = root.parent / f"{root.name}.durable"
            durable = (
                max((int(s) for s in durable_file.read_text().split()), default=0)
                if durable_file.exists()
                else 0
            )
            context = f"trial {trial} (durable step {durable})"
            model, optimizer = driver.build(seed=1)
            state = {"model": model, "optim": optimizer, "meta": None}
            with Checkpointer(root) as checkpointer:
                leftovers = [n for n in os.listdir(root) if n.startswith(TMP_PREFIX)]
                assert not leftovers, context
                committed = list_steps(root)
                for step in committed:  # no committed step is ever torn
                    verify(root, step, mode="hash")
                assert read_latest_pointer(root) in {None, *committed}, context
                if not committed:
                    assert durable == 0, context
                    continue
                assert committed[-1] >= durable, context
                loaded = checkpointer.load(state, rng=False)
            assert loaded == committed[-1], context
            if loaded not in references:
                references[loaded] = driver.state_at(loaded)
            _assert_same_state(state, references[loaded])
    finally:
        torch.set_num_threads(threads)
