"""The pure parts of ``bitscale train`` (data, flags, metrics) and one in-process run."""

from __future__ import annotations

import itertools
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


def test_stdlib_corpus_is_long_tailed_top_level_definitions() -> None:
    corpus = load_corpus()
    assert corpus.source is DataSource.STDLIB
    assert len(corpus) > 1000
    assert all(path.suffix == ".py" for path in corpus.paths)
    assert not any("site-packages" in path.parts for path in corpus.paths)
    # Long-tailed: the longest document is many times the median one.
    assert corpus.lengths.max() > 100 * np.median(corpus.lengths)
    # Each file is cut into its preamble and top-level definitions, covering it exactly
    # (documents under 2 bytes aside).
    path = corpus.paths[int(np.argmax(corpus.lengths > 2000))]
    pieces = [
        (int(offset), int(length))
        for p, offset, length in zip(corpus.paths, corpus.offsets, corpus.lengths, strict=True)
        if p == path
    ]
    text = path.read_bytes()
    assert sum(length for _, length in pieces) >= len(text) - 2 * len(pieces)
    for offset, _length in pieces[1:]:
        assert text[offset:].startswith((b"def ", b"class ", b"async def ")), text[offset:40]
    doc = int(np.argmax(corpus.offsets > 0))
    offset = int(corpus.offsets[doc])
    assert (
        bytes(corpus.tokens(doc, 1, 30).astype(np.uint8))
        == corpus.paths[doc].read_bytes()[offset + 1 : offset + 30]
    )


def test_token_budget_batches_continue_the_document_stream() -> None:
    lengths = np.array([5, 3000, 17, 900, 2, 64, 4096, 300, 11, 7])
    sampler = BatchSampler(num_docs=len(lengths), tokens_per_step=1000, max_len=800, seed=3)
    batches = [sampler.windows(step, lengths) for step in range(6)]
    fresh = BatchSampler(num_docs=len(lengths), tokens_per_step=1000, max_len=800, seed=3)
    assert fresh.windows(5, lengths) == batches[5]  # a resumed run needs no earlier calls
    stream = [doc for windows in batches for doc, _, _ in windows]
    # Consecutive steps take consecutive documents of one permutation per epoch.
    assert sorted(stream[:10]) == list(range(10))
    for windows in batches:
        sizes = [stop - start for _, start, stop in windows]
        assert max(sizes) <= 800  # long documents give a window of max_len
        assert sum(sizes) <= 1000 or len(sizes) == 1
    # Whole documents while they fit: the next step's first one would have overflowed.
    for windows, following in itertools.pairwise(batches):
        first = following[0]
        assert sum(b - a for _, a, b in windows) + first[2] - first[1] > 1000
    with pytest.raises(ValueError, match="exactly one of tokens_per_step and docs_per_step"):
        BatchSampler(num_docs=3, max_len=8)


def test_defaults_fill_the_device_and_keep_long_documents() -> None:
    cpu = TrainConfig().resolved(2, cuda=False)
    assert (cpu.capacity, cpu.max_len, cpu.tokens_per_step) == (2048, 4096, 8192)
    assert cpu.precision == "float32" and cpu.docs_per_step is None
    gpu = TrainConfig().resolved(4, cuda=True)
    assert (gpu.capacity, gpu.max_len, gpu.tokens_per_step) == (32768, 4 * 32768, 8 * 32768)
    assert gpu.precision == "bf16"
    one = TrainConfig(capacity=1001).resolved(1, cuda=False)
    assert one.max_len == 1001
    assert TrainConfig(capacity=1001).resolved(3, cuda=False).max_len == 3000
    # Explicit flags win and keep the old rule for capacity.
    old = TrainConfig(docs_per_step=8, max_len=128, precision="float64").resolved(2, cuda=True)
    assert (old.capacity, old.tokens_per_step, old.precision) == (64, None, "float64")
    with pytest.raises(ValueError, match="give one of them"):
        TrainConfig(docs_per_step=8, tokens_per_step=100)
    with pytest.raises(ValueError, match="--compile does not go with --precision float64"):
        TrainConfig(compile=True, precision="float64")
    with pytest.raises(ValueError, match="--precision 'fp8' is not one of bf16, float32"):
        TrainConfig(precision="fp8")


def test_model_flops_and_mfu() -> None:
    from bitscale.throughput import mfu, model_flops

    # 6 N per token plus 6 L D S (S + 1) per document.
    flops = model_flops([3, 1], matmul_params=10, num_layers=2, attention_dim=4)
    assert flops == 6 * 10 * 4 + 6 * 2 * 4 * (3 * 4 + 1 * 2)
    assert mfu(1e12, 2.0, 1e12, 2) == pytest.approx(0.25)
    assert mfu(1e12, 2.0, None, 2) is None
    model = build_model(TrainConfig(model="small"), torch.device("cpu"))
    c = model.config
    per_layer = 2 * c.dim * c.dim + 2 * c.dim * c.num_kv_heads * c.head_dim + 3 * c.dim * c.ffn_dim
    assert model.matmul_parameters() == c.num_layers * per_layer + c.dim * c.vocab_size


def test_presets_up_to_1b_fit_their_description() -> None:
    from bitscale.model import GPT, PRESETS

    with torch.device("meta"):
        sizes = {name: GPT(config).num_parameters() for name, config in PRESETS.items()}
    assert 0.95e9 < sizes["1b"] < 1.05e9
    assert PRESETS["1b"].num_kv_heads < PRESETS["1b"].num_heads  # grouped-query attention
    assert 2.5e8 < sizes["large"] < 3e8
    assert sizes == dict(sorted(sizes.items(), key=lambda item: item[1]))


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
            model_flops=1000,
            graphs_compiled=0,
        )

    records = [record(1, 5.0, 0.0), record(2, 1.0, 0.2), record(3, 1.0, 0.0)]
    summary = summarize(
        records,
        schedule="hdp",
        world_size=2,
        precision="bf16",
        first_step=0,
        saves=1,
        wall_s=9.0,
        safe_step=2,
        interrupted=False,
        peak_flops=100.0,
    )
    assert summary.tokens_per_s == 100.0
    assert summary.model_flops_per_token == 10.0 and summary.model_flops_per_s == 1000.0
    assert summary.mfu == pytest.approx(1000.0 / (2 * 100.0))
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
    assert document["version"] == 2 and document["config"]["quant"] == "w4a8"
    assert document["runs"]["hdp"]["summary"]["mfu"] is None  # no bf16 peak for a CPU
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
    assert main(["train", "--nproc", "2", "--ckpt-dir", str(tmp_path / "ckpt")]) == 2


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--precision", "fp8"], "--precision 'fp8' is not one of bf16, float32, float64"),
        (["--compile", "--precision", "float64"], "--compile does not go with --precision"),
        # 1b needs ~19 GiB of states per process: no host shares that 64 ways.
        (["--model", "1b", "--nproc", "64"], "--model 1b does not fit: about"),
        (["--docs-per-step", "4", "--tokens-per-step", "64"], "give one of them"),
        (["--model", "huge"], "unknown model preset 'huge'"),
    ],
)
def test_bad_flags_are_one_line_not_a_traceback(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from bitscale.cli import main

    assert main(["train", *flags]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith("bitscale train: error: ") and message in err, err


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


def _train_one_thread(config: TrainConfig) -> list[float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in test_single_process_quantized_run_in_process
    try:
        runs = train(config)
    finally:
        torch.set_num_threads(threads)
    return [record.loss for record in runs["hdp"][1]]


# bf16 autocast against float32 on the same batches and initial weights. Measured on this
# 2-core CPU: the per-step loss gap grows as the runs drift apart, at most 0.014 nats over
# these 8 steps (small preset, loss 5.55 -> 3.31), 1.2e-4 for the tiny preset over 12
# steps. 0.05 nats is about 2% of the descent and 3.5x the measured gap.
BF16_LOSS_MARGIN = 0.05


def test_bf16_trains_like_float32() -> None:
    common = {"model": "small", "steps": 8, "docs_per_step": 4, "max_len": 128}
    float32 = _train_one_thread(TrainConfig(**common, precision="float32", progress=False))
    bf16 = _train_one_thread(TrainConfig(**common, precision="bf16", progress=False))
    gaps = [abs(a - b) for a, b in zip(float32, bf16, strict=True)]
    assert max(gaps) <= BF16_LOSS_MARGIN, gaps
    assert bf16 != float32  # autocast really ran in bf16
    assert bf16[-1] < bf16[0] - 1.0 and float32[-1] < float32[0] - 1.0, (bf16, float32)


def test_bf16_resume_is_bitwise(tmp_path: Path) -> None:
    """float32 masters and AdamW state are what a bf16 run saves: resuming continues it
    exactly (same losses to the last bit, same final checkpoint)."""
    from bitscale.checkpoint import Checkpointer

    common = {"model": "tiny", "docs_per_step": 4, "max_len": 64, "precision": "bf16"}
    common |= {"ckpt_every": 2, "progress": False}
    straight = _train_one_thread(TrainConfig(**common, steps=4, ckpt_dir=str(tmp_path / "a")))
    _train_one_thread(TrainConfig(**common, steps=2, ckpt_dir=str(tmp_path / "b")))
    resumed = _train_one_thread(
        TrainConfig(**common, steps=4, ckpt_dir=str(tmp_path / "b"), resume=True)
    )
    assert resumed == straight[2:]
    states = []
    for name in ("a", "b"):
        model = build_model(TrainConfig(model="tiny", seed=1), torch.device("cpu"))
        with Checkpointer(tmp_path / name) as checkpointer:
            checkpointer.load({"model": model}, rng=False)
        states.append(model.state_dict())
    assert all(p.dtype == torch.float32 for p in states[0].values())
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


def test_activation_checkpointing_changes_no_bit() -> None:
    """Recomputing the halves around attention in backward gives the same gradients."""
    common = {"model": "tiny", "steps": 3, "docs_per_step": 4, "max_len": 64, "progress": False}
    plain = _train_one_thread(TrainConfig(**common))
    recomputed = _train_one_thread(TrainConfig(**common, activation_checkpointing=True))
    assert recomputed == plain
    model = build_model(TrainConfig(activation_checkpointing=True), torch.device("cpu"))
    tokens = torch.arange(16) % 256
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.shape) or t, lambda t: t
    ):
        model(tokens, torch.arange(16)).sum()
    # Recomputed halves save only their inputs: no [T, ffn_dim] MLP activation is kept.
    assert all(model.config.ffn_dim not in shape for shape in saved), saved


def test_qat_quantizes_each_weight_once_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The weight quantizer's clip search runs twice (coarse, fine) per quantized layer and
    step, however many micro-batches the step has: not per micro-batch, not per row."""
    from bitscale.kernels import format as quant_format
    from bitscale.kernels import linear as quant_linear

    searches: list[int] = []
    quantized: list[int] = []  # every fake-quantization: weights and activations
    search, fake_quantize = quant_format._search_clip, quant_linear.fake_quantize

    def counted_search(*args, **kwargs):
        searches.append(1)
        return search(*args, **kwargs)

    def counted_fake_quantize(*args, **kwargs):
        quantized.append(1)
        return fake_quantize(*args, **kwargs)

    monkeypatch.setattr(quant_format, "_search_clip", counted_search)
    monkeypatch.setattr(quant_linear, "fake_quantize", counted_fake_quantize)
    config = TrainConfig(
        steps=2, docs_per_step=6, max_len=48, capacity=48, quant="w4a8", progress=False
    )
    layers = sum(
        isinstance(m, BipolarLinear) for m in build_model(config, torch.device("cpu")).modules()
    )
    searches.clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(config)
    finally:
        torch.set_num_threads(threads)
    assert len(searches) == 2 * 2 * layers
    # Per step: each weight once, each layer's activations once per micro-batch (>= 2 here).
    activations = len(quantized) - 2 * layers
    assert activations >= 2 * 2 * layers
