"""The pure parts of ``bitscale train`` (data, flags, metrics) and one in-process run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from bitscale.kernels import BipolarLinear

from bitscale.data import BatchSampler, Corpus, DataSource, load_corpus
from bitscale.train import (
    DEMO_ARGS,
    TrainConfig,
    _check_same_run,
    _run_identity,
    build_model,
    parse_quant,
    summarize,
    train,
)


def test_stdlib_corpus_is_long_tailed_bytes() -> None:
    corpus = load_corpus()
    assert corpus.source is DataSource.STDLIB
    assert len(corpus) > 100
    assert all(path.suffix == ".py" for path in corpus.paths)
    assert not any("site-packages" in path.parts for path in corpus.paths)
    # Long-tailed: the longest file is many times the median one.
    assert corpus.lengths.max() > 20 * np.median(corpus.lengths)
    doc = int(np.argmax(corpus.lengths > 100))
    assert (
        bytes(corpus.tokens(doc, 10, 50).astype(np.uint8)) == corpus.paths[doc].read_bytes()[10:50]
    )


def test_sampler_is_a_pure_function_of_seed_and_step() -> None:
    lengths = np.array([5, 3000, 17, 900, 2, 64, 4096, 300, 11, 7])
    sampler = BatchSampler(num_docs=len(lengths), docs_per_step=4, max_len=256, seed=3)
    first = [sampler.windows(step, lengths) for step in range(5)]
    again = [sampler.windows(step, lengths) for step in reversed(range(5))][::-1]
    assert first == again
    # Every document exactly once per epoch (20 draws over 10 documents = 2 epochs).
    drawn = [doc for windows in first for doc, _, _ in windows]
    assert sorted(drawn[:10]) == sorted(drawn[10:]) == list(range(10))
    for windows in first:
        for doc, start, stop in windows:
            assert 0 <= start < stop <= lengths[doc]
            assert stop - start == min(lengths[doc], 256)
    other_seed = BatchSampler(num_docs=len(lengths), docs_per_step=4, max_len=256, seed=4)
    assert [other_seed.windows(s, lengths) for s in range(5)] != first


def test_length_file_makes_learnable_synthetic_documents(tmp_path: Path) -> None:
    path = tmp_path / "lengths.txt"
    path.write_text("12\n\n300\n7\n")
    corpus = load_corpus(path, seed=1)
    assert corpus.source is DataSource.LENGTHS
    assert corpus.lengths.tolist() == [12, 300, 7]
    tokens = corpus.tokens(1, 0, 300)
    # An arithmetic progression modulo 256: the next byte follows from the previous one.
    steps = np.diff(tokens) % 256
    assert len(set(steps.tolist())) == 1
    assert np.array_equal(corpus.tokens(1, 100, 120), tokens[100:120])
    assert np.array_equal(load_corpus(path, seed=1).tokens(1, 0, 300), tokens)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("12\nabc\n", r"lengths\.txt:2: 'abc' is not"),
        ("5\n0\n", r"lengths\.txt:2: length 0 is not positive"),
    ],
)
def test_bad_length_file_names_the_line(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "lengths.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_corpus(path)


def test_folder_corpus_and_missing_data(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_bytes(b"hello world")
    (tmp_path / "docs" / "b.md").write_bytes(b"x")  # too short to train on
    corpus = load_corpus(tmp_path / "docs")
    assert corpus.source is DataSource.FOLDER and corpus.lengths.tolist() == [11]
    with pytest.raises(ValueError, match="no such file or folder"):
        load_corpus(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no file"):
        load_corpus(tmp_path / "empty")


def test_corpus_paths_must_match_its_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"generates its documents: pass paths=None \(got 1 "):
        Corpus(DataSource.LENGTHS, [5], paths=[tmp_path / "a.txt"])
    with pytest.raises(ValueError, match=r"one path per length \(got no paths for 2 lengths"):
        Corpus(DataSource.FOLDER, [5, 6])
    with pytest.raises(ValueError, match=r"one path per length \(got 1 paths for 2 lengths"):
        Corpus(DataSource.STDLIB, [5, 6], paths=[tmp_path / "a.txt"])


def test_quant_spec_and_config_validation() -> None:
    assert parse_quant("w4a8") == (4, 8)
    assert parse_quant("W2") == (2, 16)
    assert parse_quant("w1a16") == (1, 16)
    for bad in ("w9", "w4a9", "int4", "w0a8"):
        with pytest.raises(ValueError, match="wNaM"):
            parse_quant(bad)
    with pytest.raises(ValueError, match="--resume needs --ckpt-dir"):
        TrainConfig(resume=True)
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match=r"raise --capacity to at least 256"):
        TrainConfig(max_len=1024, capacity=128).capacity_for(4)
    assert TrainConfig(max_len=512).capacity_for(1) == 512
    assert TrainConfig(max_len=511).capacity_for(4) == 256
    # One process holds a sequence whole: an odd capacity of max_len is enough.
    assert TrainConfig(max_len=511, capacity=511).capacity_for(1) == 511
    with pytest.raises(ValueError, match=r"raise --capacity to at least 511"):
        TrainConfig(max_len=511, capacity=510).capacity_for(1)
    config = TrainConfig(quant="w4a8", schedule="static", capacity=64)
    assert TrainConfig.from_json(config.to_json()) == config


def test_resume_refuses_changed_optimizer_flags() -> None:
    """Loading restores the saved lr, weight decay and the scheduler's base lr: a changed
    flag on --resume would be ignored, so it is refused, naming the flag."""
    saved = _run_identity(TrainConfig())
    _check_same_run(saved, _run_identity(TrainConfig()), "ckpt")
    for flag, config in (
        ("--lr", TrainConfig(lr=1e-2)),
        ("--weight-decay", TrainConfig(weight_decay=0.5)),
        ("--warmup-steps", TrainConfig(warmup_steps=1)),
    ):
        with pytest.raises(ValueError, match=flag):
            _check_same_run(saved, _run_identity(config), "ckpt")
    older = {k: v for k, v in saved.items() if k not in ("lr", "weight_decay", "warmup_steps")}
    _check_same_run(older, _run_identity(TrainConfig(lr=1e-2)), "ckpt")


def test_demo_args_parse() -> None:
    from bitscale.cli import build_parser

    args = build_parser().parse_args(["train", *DEMO_ARGS])
    assert args.nproc == 2 and args.steps > 0


def test_quantized_model_swaps_block_projections_only() -> None:
    model = build_model(TrainConfig(quant="w4a8", quant_scope="mlp"), torch.device("cpu"))
    quantized = {name for name, m in model.named_modules() if isinstance(m, BipolarLinear)}
    assert quantized == {
        f"blocks.{i}.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")
    }
    assert type(model.lm_head) is torch.nn.Linear


def test_summary_leaves_out_the_first_step_from_throughput() -> None:
    from bitscale.train import StepRecord

    def record(step: int, time_s: float, stall: float) -> StepRecord:
        return StepRecord(
            step=step,
            loss=1.0 / step,
            tokens=100,
            loss_tokens=90,
            time_s=time_s,
            tokens_per_s=100 / time_s,
            busy_s=[0.1, 0.3],
            balance=1.5,
            planned_balance=1.1,
            ring_bytes=10,
            planned_ring_bytes=10,
            ckpt_stall_s=stall,
        )

    records = [record(1, 5.0, 0.0), record(2, 1.0, 0.2), record(3, 1.0, 0.0)]
    summary = summarize(
        records,
        schedule="hdp",
        world_size=2,
        first_step=0,
        saves=1,
        wall_s=9.0,
        safe_step=2,
        interrupted=False,
    )
    assert summary.tokens_per_s == 100.0
    assert summary.ring_bytes == 30 and summary.final_loss == pytest.approx(1 / 3)
    assert summary.mean_stall_per_save_s == pytest.approx(0.2)


def test_single_process_quantized_run_in_process(tmp_path: Path) -> None:
    """A group of one, QAT layers, checkpoint, metrics and plot, without a subprocess."""
    config = TrainConfig(
        steps=4,
        docs_per_step=4,
        max_len=64,
        quant="w4a8",
        ckpt_dir=str(tmp_path / "ckpt"),
        ckpt_every=2,
        metrics=str(tmp_path / "m.json"),
        plot=str(tmp_path / "p.png"),
        progress=False,
    )
    threads = torch.get_num_threads()
    # Other test processes share the 2 cores: one intra-op thread avoids OpenMP barriers
    # that wait on a descheduled sibling thread (10x slower wall time under load).
    torch.set_num_threads(1)
    try:
        runs = train(config)
    finally:
        torch.set_num_threads(threads)
    summary, records = runs["hdp"]
    assert [r.step for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r.loss) for r in records)
    assert summary.saves == 2 and summary.safe_step == 4
    document = json.loads((tmp_path / "m.json").read_text())
    assert document["version"] == 1 and document["config"]["quant"] == "w4a8"
    assert [r["step"] for r in document["runs"]["hdp"]["steps"]] == [1, 2, 3, 4]
    assert (tmp_path / "p.png").stat().st_size > 0


def test_makefile_demo_runs_exactly_the_demo_args() -> None:
    """`make demo` is the README's main job; DEMO_ARGS (what the e2e test runs) must be it."""
    import shlex

    makefile = Path(__file__).resolve().parents[2] / "Makefile"
    recipe = makefile.read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    commands = [line for line in recipe.splitlines() if "bitscale train" in line]
    assert len(commands) == 1, f"the demo recipe should run `bitscale train` once:\n{recipe}"
    words = shlex.split(commands[0])
    assert tuple(words[words.index("train") + 1 :]) == DEMO_ARGS, (
        "Makefile's demo command and bitscale.train.DEMO_ARGS differ; change them together"
    )


def test_new_run_refuses_a_folder_with_another_runs_checkpoints(tmp_path: Path) -> None:
    from bitscale.checkpoint import Checkpointer

    from bitscale.cli import main

    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        checkpointer.save(3, {"x": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"already holds committed checkpoints \(newest: step 3\)"):
        main(["train", "--nproc", "2", "--ckpt-dir", str(tmp_path / "ckpt")])


def test_example_script_trains_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """examples/train_hdp.py as torchrun would start one rank of it, in this process."""
    import runpy
    import socket
    import sys

    script = Path(__file__).resolve().parents[2] / "examples" / "train_hdp.py"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for name, value in {**env, "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for steps in (4, 6):
            argv = [str(script), "--steps", str(steps), "--docs", "4", "--max-len", "64"]
            argv += ["--capacity", "64", "--ckpt-dir", str(tmp_path / "ckpt"), "--ckpt-every", "2"]
            monkeypatch.setattr(sys, "argv", argv)
            runpy.run_path(str(script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == [f"step {i}" for i in range(1, 7)]
