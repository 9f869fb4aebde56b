"""Train a small GPT on mixed long/short documents with hybrid data parallelism, lazy
universal checkpoints and optional bipolar-INT quantization-aware training.

Run it on N local processes with ``bitscale train --nproc N`` (it starts them through
torch's own elastic launcher), or under your own launcher::

    torchrun --nproc-per-node 4 -m bitscale.train --model tiny --steps 100

Each step: the global batch (documents of the standard library's own source, or --data)
-> a plan (``bitscale.hdp.plan_batch``, or the static DP x CP mesh with --schedule static)
-> this rank's work items -> one gradient sync -> optimizer step. With --ckpt-dir a lazy
checkpoint is taken every --ckpt-every steps; --resume continues from the newest committed
one, on any number of processes. Ctrl-C / SIGTERM stop after the current step, commit or
discard the pending checkpoint, and say which step is safe.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bitscale.throughput import model_flops
from bitscale.train_config import (
    CPU_CAPACITY,
    CUDA_CAPACITY,
    MICRO_BATCHES_PER_STEP,
    Precision,
    Schedule,
    TrainConfig,
    parse_quant,
)
from bitscale.train_metrics import (
    RunSummary,
    StepRecord,
    metrics_document,
    plot_runs,
    print_summary,
    summarize,
    write_json_atomic,
)

if TYPE_CHECKING:
    import torch

    from bitscale.model import GPT

__all__ = [
    "DEMO_ARGS",
    "Precision",
    "RunSummary",
    "Schedule",
    "StepRecord",
    "TrainConfig",
    "add_arguments",
    "launch",
    "main",
    "parse_quant",
    "train",
]

DEMO_ARGS: tuple[str, ...] = (
    "--nproc", "2",
    "--model", "tiny",
    "--steps", "30",
    "--schedule", "both",
    "--ckpt-dir", "runs/demo/ckpt",
    "--ckpt-every", "10",
    "--metrics", "runs/demo/metrics.json",
    "--plot", "runs/demo/train.png",
)  # fmt: skip
"""The README's main job (``make demo``): ``bitscale train`` followed by these arguments.
tests/e2e runs exactly this command with fewer steps, so it cannot rot."""


# --------------------------------------------------------------------------------------------
# processes and signals


class _StopRequest:
    """Ctrl-C / SIGTERM: the first one asks to stop after the current step (every rank agrees
    on the step through one tiny all-reduce), a second one stops at once."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.signal_name = signal.Signals(signum).name


def _init_process_group() -> bool:
    """Join the torchrun / --nproc process group (gloo on CPU, NCCL on GPU), or make a group
    of one when started alone; False when the caller had already initialized one."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if "WORLD_SIZE" not in os.environ:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return True
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
        # Processes share the cores; more intra-op threads than cores only oversubscribe.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    dist.init_process_group(backend)
    return True


def _device() -> torch.device:
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# one training run in this process


def cost_model_for(model_config: Any, precision: Precision) -> Any:
    """The planner's cost model for our GPT on this machine.

    Compute is in FLOPs over an assumed 2e10 FLOP/s (a few CPU cores; only ratios matter for
    balancing): linear work 6 FLOPs per parameter per token, causal attention 3.5 x 2 x dim
    FLOPs per token pair per layer (backward ~2.5x forward), and an assumed 3 ms of fixed
    Python overhead per forward/backward call. Ring bytes are exact for the dtypes the ring
    carries (K/V in bf16 under --precision bf16, else the parameters' dtype; dK/dV in float32
    or wider), so measured ring traffic must equal the plan's.
    """
    from bitscale.hdp.cost import CostModel

    flops = 2e10
    c = model_config
    linear_params = (
        c.num_layers
        * (
            c.dim * (c.dim + 2 * c.num_kv_heads * c.head_dim)
            + c.dim * c.dim
            + 3 * c.dim * c.ffn_dim
        )
        + c.dim * c.vocab_size
    )
    return CostModel(
        alpha=3.5 * 2 * c.num_layers * c.dim / flops,
        beta=6 * linear_params / flops,
        gamma=3e-3,
        num_layers=c.num_layers,
        kv_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        element_size={Precision.BF16: 2, Precision.FLOAT32: 4, Precision.FLOAT64: 8}[precision],
        # One host: every rank is on the same node and the ring crosses shared memory.
        node_size=1 << 20,
    )


def build_model(config: TrainConfig, device: torch.device) -> GPT:
    """The model every rank starts from: same seed, same weights, optional QAT layers."""
    import torch

    from bitscale.model import GPT, QuantScope, preset, quant_filter

    torch.manual_seed(config.seed)
    model = GPT(preset(config.model))
    # bf16 keeps float32 parameters (the masters); autocast lowers the compute.
    if config.precision is Precision.FLOAT64:
        model = model.double()
    if config.quant is not None:
        from bitscale.kernels import quantize_model

        w_bits, a_bits = parse_quant(config.quant)
        model = quantize_model(
            model, w_bits=w_bits, a_bits=a_bits, filter=quant_filter(QuantScope(config.quant_scope))
        )
    model = model.to(device)
    model.set_activation_checkpointing(config.activation_checkpointing)
    if config.compile:
        model.compile_blocks()
    return model


def check_fits(config: TrainConfig, available_bytes: int, where: str) -> None:
    """Refuse a resolved config whose estimated memory (`bitscale.throughput`) exceeds
    ``available_bytes`` of one process, naming the way out."""
    from bitscale.model import preset
    from bitscale.throughput import estimate_memory

    c = preset(config.model)
    assert config.capacity is not None, "check_fits takes a resolved config"
    params = (
        c.vocab_size * c.dim * 2
        + c.num_layers * (2 * c.dim * c.dim + 2 * c.dim * c.num_kv_heads * c.head_dim)
        + c.num_layers * 3 * c.dim * c.ffn_dim
    )
    wide = 8 if config.precision is Precision.FLOAT64 else 4
    estimate = estimate_memory(
        params=params,
        dim=c.dim,
        kv_dim=c.num_kv_heads * c.head_dim,
        ffn_dim=c.ffn_dim,
        num_layers=c.num_layers,
        capacity=config.capacity,
        param_bytes=wide,
        compute_bytes=2 if config.precision is Precision.BF16 else wide,
        checkpointing=config.activation_checkpointing,
    )
    if estimate.total > available_bytes:
        gib = 1 << 30
        hint = "" if config.activation_checkpointing else ", add --activation-checkpointing"
        raise ValueError(
            f"--model {config.model} does not fit: about {estimate.total / gib:.1f} GiB per "
            f"process ({estimate.states / gib:.1f} GiB of weights, gradients and AdamW state, "
            f"{estimate.activations / gib:.1f} GiB of activations at --capacity "
            f"{config.capacity}) but {where} has {available_bytes / gib:.1f} GiB; choose a "
            f"smaller --model, lower --capacity{hint}, or use more memory per process"
        )


def _memory_per_process(nproc: int) -> tuple[int, str]:
    """Bytes one process may use here: a CUDA device's memory (one device per process when
    there are enough), or the host's memory shared by ``nproc`` processes."""
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        total = torch.cuda.get_device_properties(0).total_memory
        sharing = max(1, math.ceil(nproc / count))
        return total // sharing, f"{torch.cuda.get_device_name(0)} (per process)"
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // nproc, f"this host's memory shared by {nproc} process(es)"


def _peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 datasheet peak, or None (CPU, unlisted GPU)."""
    if device.type != "cuda":
        return None
    import torch

    from bitscale.bench import known_gpu_peaks

    peaks = known_gpu_peaks(torch.cuda.get_device_name(device))
    return None if peaks is None else peaks.bf16_flops


def _graphs_compiled() -> int:
    """Graphs torch.compile has built in this process so far."""
    import sys

    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# Settings that decide which model is trained on which data: a resumed run must match them.
# The optimizer's hyperparameters are here too: loading restores the saved lr, weight
# decay and the scheduler's base lr, so a changed flag would be silently ignored.
_IDENTITY_FIELDS = (
    "model",
    "tokens_per_step",
    "docs_per_step",
    "max_len",
    "seed",
    "data",
    "precision",
    "quant",
    "quant_scope",
    "lr",
    "weight_decay",
    "warmup_steps",
)


def _check_fresh_ckpt_dir(ckpt_dir: str, resume: bool) -> None:
    """A new run must not write into another run's checkpoints: after a crash, --resume
    would pick whichever step is newest, possibly the other run's."""
    from bitscale.checkpoint import latest_step

    if not resume and latest_step(ckpt_dir) is not None:
        raise ValueError(
            f"--ckpt-dir {ckpt_dir} already holds committed checkpoints (newest: step "
            f"{latest_step(ckpt_dir)}); pass --resume to continue that run, or choose "
            "another --ckpt-dir (or delete that one) to start a new run"
        )


def _run_identity(config: TrainConfig) -> dict[str, Any]:
    return {name: json.loads(json.dumps(getattr(config, name))) for name in _IDENTITY_FIELDS}


def _check_same_run(saved: dict[str, Any], current: dict[str, Any], ckpt_dir: str) -> None:
    # `name in saved`: checkpoints of earlier versions lack the optimizer's fields.
    changed = [
        f"--{name.replace('_', '-')} {saved[name]!r} -> {current[name]!r}"
        for name in _IDENTITY_FIELDS
        if name in saved and saved[name] != current[name]
    ]
    if changed:
        raise ValueError(
            f"--resume: the checkpoint in {ckpt_dir} was trained with different settings "
            f"({'; '.join(changed)}); resume with the original flags (the defaults of "
            "--tokens-per-step and --max-len grow with the process count: pass the saved "
            "values) or use a new --ckpt-dir"
        )


def _lr_lambda(warmup_steps: int) -> Any:
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / (warmup_steps + 1))

    return factor


class _Timer:
    """Optimizer pre-step hooks registered around the checkpointer's own: the time between
    them is exactly how long the checkpointer blocked the step."""

    def __init__(self) -> None:
        self.stall_s = 0.0
        self._start = 0.0

    def before(self, *_: Any) -> None:
        self._start = time.perf_counter()

    def after(self, *_: Any) -> None:
        self.stall_s += time.perf_counter() - self._start

    def take(self) -> float:
        stall, self.stall_s = self.stall_s, 0.0
        return stall


class _LazyBatch(Sequence["torch.Tensor"]):
    """The global batch as the runner sees it: a document's bytes are read only when this
    rank's items touch it, so no rank reads the whole batch."""

    def __init__(self, corpus: Any, windows: list[tuple[int, int, int]]) -> None:
        self._corpus = corpus
        self._windows = windows

    def __len__(self) -> int:
        return len(self._windows)

    def __getitem__(self, index: Any) -> Any:
        import torch

        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return torch.from_numpy(self._corpus.tokens(*self._windows[index]))


def _plan(schedule: Schedule, lengths: list[int], world: int, capacity: int, cost: Any) -> Any:
    from bitscale.hdp.plan import plan_batch, plan_static_mesh

    if schedule is Schedule.STATIC:
        return plan_static_mesh(lengths, world, capacity, cost=cost)
    return plan_batch(lengths, world, capacity, cost=cost)


def _agree_to_stop(stop: _StopRequest, world: int, device: torch.device) -> bool:
    """True on every rank when any rank was asked to stop."""
    if world == 1:
        return stop.signal_name is not None
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1.0 if stop.signal_name is not None else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def _train_schedule(
    config: TrainConfig,
    schedule: Schedule,
    ckpt_dir: str | None,
    *,
    rank: int,
    world: int,
    stop: _StopRequest,
    log: Any,
) -> tuple[RunSummary, list[StepRecord]]:
    import torch

    from bitscale.data import BatchSampler, load_corpus
    from bitscale.hdp import HDPRunner
    from bitscale.kernels import reuse_quantized_weights

    run_start = time.perf_counter()
    device = _device()
    corpus = load_corpus(config.data, seed=config.seed)
    assert config.max_len is not None and config.capacity is not None, "resolved config"
    assert isinstance(config.precision, Precision), "resolved config"
    sampler = BatchSampler(
        num_docs=len(corpus),
        tokens_per_step=config.tokens_per_step,
        docs_per_step=config.docs_per_step,
        max_len=config.max_len,
        seed=config.seed,
    )
    capacity = config.capacity_for(world)
    model = build_model(config, device)
    c = model.config
    flops_of = functools.partial(
        model_flops,
        matmul_params=model.matmul_parameters(),
        num_layers=c.num_layers,
        attention_dim=c.num_heads * c.head_dim,
    )
    peak_flops = _peak_flops(device)
    cost = cost_model_for(c, config.precision)
    # Fused AdamW: one kernel for all parameters on CUDA; foreach (a few multi-tensor ops)
    # elsewhere. Either keeps float32 (or float64) state next to the float32 masters.
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.lr,
        betas=(0.9, 0.95),
        weight_decay=config.weight_decay,
        fused=fused or None,
        foreach=None if fused else True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.warmup_steps))
    runner = HDPRunner(model, autocast=config.autocast_dtype)
    quant = f", bipolar QAT {config.quant} ({config.quant_scope})" if config.quant else ""
    extras = "".join(
        text
        for on, text in (
            (config.compile, ", compiled blocks"),
            (config.activation_checkpointing, ", activation checkpointing"),
        )
        if on
    )
    batch = (
        f"{config.tokens_per_step:,} tokens per step"
        if config.tokens_per_step is not None
        else f"{config.docs_per_step} documents per step"
    )
    log(
        f"[{schedule}] {config.model}: {model.num_parameters():,} parameters, "
        f"{config.precision}{quant}{extras}; {len(corpus):,} documents from {corpus.name}, "
        f"{batch}, up to {config.max_len:,} tokens each; {world} process(es), capacity "
        f"{capacity:,} tokens per rank"
    )
    timer = _Timer()
    optimizer.register_step_pre_hook(timer.before)
    checkpointer = None
    start_step = 0
    state: dict[str, Any] = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "trainer": _run_identity(config),
    }
    if ckpt_dir is not None:
        from bitscale.checkpoint import Checkpointer, latest_step

        _check_fresh_ckpt_dir(ckpt_dir, config.resume)
        checkpointer = Checkpointer(ckpt_dir, keep=config.keep)
        if config.resume and latest_step(ckpt_dir) is not None:
            # Training draws no random numbers after initialization (batches are a function
            # of seed and step, no dropout), so RNG states need no restoring, and a run
            # resumed on a different process count has no per-rank RNG state to take.
            start_step = checkpointer.load(state, rng=False)
            _check_same_run(state["trainer"], _run_identity(config), ckpt_dir)
            log(f"[{schedule}] resumed from step {start_step} in {ckpt_dir} on {world} process(es)")
        elif config.resume:
            log(f"[{schedule}] --resume: no committed checkpoint in {ckpt_dir}; starting at step 0")
        checkpointer.attach(optimizer)
    optimizer.register_step_pre_hook(timer.after)

    records: list[StepRecord] = []
    saves = 0
    interrupted = False
    progress = None
    if rank == 0 and config.progress:
        from tqdm import tqdm

        progress = tqdm(
            total=config.steps,
            initial=start_step,
            desc=f"train {schedule}",
            unit="step",
            dynamic_ncols=True,
        )
    try:
        for step in range(start_step, config.steps):
            windows = sampler.windows(step, corpus.lengths)
            lengths = [stop_ - start for _, start, stop_ in windows]
            plan = _plan(schedule, lengths, world, capacity, cost)
            graphs_before = _graphs_compiled()
            step_start = time.perf_counter()
            # QAT: each weight is quantized once per step, not once per micro-batch.
            with reuse_quantized_weights():
                outcome = runner.step(_LazyBatch(corpus, windows), plan)
            optimizer.step()
            scheduler.step()
            stall_s = timer.take()
            if checkpointer is not None and (step + 1) % config.ckpt_every == 0:
                save_start = time.perf_counter()
                checkpointer.save(step + 1, state)
                stall_s += time.perf_counter() - save_start
                saves += 1
            step_s = time.perf_counter() - step_start
            busy = list(outcome.busy_time)
            mean_busy = sum(busy) / len(busy)
            records.append(
                StepRecord(
                    step=step + 1,
                    loss=outcome.loss,
                    tokens=sum(lengths),
                    loss_tokens=outcome.loss_tokens,
                    time_s=step_s,
                    tokens_per_s=sum(lengths) / step_s,
                    busy_s=busy,
                    balance=max(busy) / mean_busy if mean_busy > 0 else 1.0,
                    planned_balance=plan.stats.balance,
                    ring_bytes=sum(outcome.ring_kv_bytes) + sum(outcome.ring_dkv_bytes),
                    planned_ring_bytes=plan.stats.ring_bytes,
                    ckpt_stall_s=stall_s,
                    model_flops=flops_of(lengths),
                    graphs_compiled=_graphs_compiled() - graphs_before,
                )
            )
            if progress is not None:
                last = records[-1]
                progress.set_postfix(
                    loss=f"{last.loss:.3f}",
                    tok_s=f"{last.tokens_per_s:,.0f}",
                    balance=f"{last.balance:.2f}",
                    stall_ms=f"{1e3 * stall_s:.1f}",
                    refresh=False,
                )
                progress.update(1)
            if _agree_to_stop(stop, world, device):
                interrupted = True
                break
    finally:
        if progress is not None:
            progress.close()
    safe_step = None
    if checkpointer is not None:
        from bitscale.checkpoint import latest_step

        checkpointer.wait()
        checkpointer.close()
        safe_step = latest_step(ckpt_dir)
    summary = summarize(
        records,
        schedule=str(schedule),
        world_size=world,
        precision=str(config.precision),
        peak_flops=peak_flops,
        first_step=start_step,
        saves=saves,
        wall_s=time.perf_counter() - run_start,
        safe_step=safe_step,
        interrupted=interrupted,
    )
    return summary, records


# --------------------------------------------------------------------------------------------
# entry points


def train(config: TrainConfig) -> dict[str, tuple[RunSummary, list[StepRecord]]]:
    """Run ``config`` in this process: alone, or as one rank of a torchrun / --nproc job.

    Rank 0 writes --metrics and --plot and prints the summary table. Returns every
    schedule's summary and step records (the same on every rank except ``busy_s`` timing).
    """
    import torch.distributed as dist

    owns_group = _init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    config = config.resolved(world, cuda=_device().type == "cuda")

    def log(message: str) -> None:
        if rank == 0:
            print(message, flush=True)

    stop = _StopRequest()
    stop.install()
    runs: dict[str, tuple[RunSummary, list[StepRecord]]] = {}
    current_ckpt_dir: str | None = None
    try:
        for schedule in _schedules(config):
            current_ckpt_dir = _ckpt_dir_for(config, schedule)
            runs[str(schedule)] = _train_schedule(
                config,
                schedule,
                current_ckpt_dir,
                rank=rank,
                world=world,
                stop=stop,
                log=log,
            )
            if runs[str(schedule)][0].interrupted:
                break
    except KeyboardInterrupt:
        log(_stop_message(stop.signal_name or "SIGINT", None, _safe_step(current_ckpt_dir), True))
        raise
    finally:
        stop.uninstall()
        if owns_group:
            _leave_process_group()
    if rank == 0:
        _report(config, runs)
        last = list(runs.values())[-1][0]
        if last.interrupted:
            log(_stop_message(stop.signal_name or "SIGINT", last.last_step, last.safe_step, False))
    return runs


def _leave_process_group() -> None:
    """Destroy the process group once every rank is done with it. Without the barrier a
    rank that finished first tore its gloo connections down under a peer still using them,
    and the peer aborted in C++ ("terminate called without an active exception", exit -6):
    1 run in 12-16 of a 2-process job on 2 cores. An exception on the way out (a failed
    rank) skips the barrier, which could wait forever."""
    import sys

    import torch.distributed as dist

    if sys.exc_info()[0] is None:
        dist.barrier()
    dist.destroy_process_group()


def _ckpt_dir_for(config: TrainConfig, schedule: Schedule) -> str | None:
    """With --schedule both, each schedule keeps its checkpoints in a subfolder."""
    if config.ckpt_dir is None or config.schedule is not Schedule.BOTH:
        return config.ckpt_dir
    return os.path.join(config.ckpt_dir, str(schedule))


def _schedules(config: TrainConfig) -> list[Schedule]:
    if config.schedule is Schedule.BOTH:
        return [Schedule.HDP, Schedule.STATIC]
    return [config.schedule]


def _ckpt_dirs(config: TrainConfig) -> list[str]:
    return [d for s in _schedules(config) if (d := _ckpt_dir_for(config, s)) is not None]


def _safe_step(ckpt_dir: str | None) -> int | None:
    if ckpt_dir is None:
        return None
    from bitscale.checkpoint import latest_step

    return latest_step(ckpt_dir)


def _stop_message(signal_name: str, step: int | None, safe_step: int | None, forced: bool) -> str:
    where = "mid-step" if forced else f"after step {step}"
    if safe_step is None:
        saved = "no checkpoint is committed (no --ckpt-dir, or none taken yet)"
    else:
        saved = f"step {safe_step} is committed and safe: rerun with --resume"
    if forced:
        # The checkpointer finishes a save in flight at interpreter exit; a kill before that
        # leaves only a temporary folder, which the next run removes.
        saved += "; a save still in flight commits on exit or is discarded, never half-written"
    else:
        if safe_step is not None:
            saved = f"the pending checkpoint was committed; {saved}"
    return f"stopped by {signal_name} {where}: {saved}"


def _report(config: TrainConfig, runs: dict[str, tuple[RunSummary, list[StepRecord]]]) -> None:
    document = metrics_document(config, runs)
    if config.metrics is not None:
        write_json_atomic(config.metrics, document)
        print(f"metrics: {config.metrics}")
    if config.plot is not None:
        plot_runs(document, config.plot)
        print(f"plot: {config.plot}")
    print_summary([summary for summary, _ in runs.values()])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="start this many local processes through torch's elastic launcher "
        "(leave out under torchrun)",
    )
    parser.add_argument(
        "--model",
        default=d.model,
        help="model preset: tiny (0.14M parameters), small (3M), medium (35M), large (270M) or "
        "1b (1.0B) (default: %(default)s)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=d.steps,
        help="optimizer steps to reach; a resumed run counts from step 0 (default: %(default)s)",
    )
    parser.add_argument(
        "--tokens-per-step",
        type=int,
        default=None,
        help="token budget of one global batch, filled with whole documents "
        f"(default: {MICRO_BATCHES_PER_STEP} x nproc x capacity)",
    )
    parser.add_argument(
        "--docs-per-step",
        type=int,
        default=None,
        help="documents in one global batch, instead of a token budget",
    )
    parser.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="longest sequence in tokens; longer documents give a random window "
        "(default: nproc x capacity, the longest the processes hold)",
    )
    parser.add_argument(
        "--capacity",
        type=int,
        default=None,
        help=f"token slots per rank per micro-batch (default: {CUDA_CAPACITY} on CUDA, "
        f"{CPU_CAPACITY} on CPU; max-len / min(nproc, 2) when --max-len is given)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=d.lr,
        help="AdamW learning rate after the warm-up (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=d.warmup_steps,
        help="learning-rate warm-up steps (default: %(default)s)",
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=d.weight_decay,
        help="AdamW weight decay (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=d.seed, help="random seed (default: %(default)s)"
    )
    parser.add_argument(
        "--data",
        default=None,
        help="folder of text files, or a file with one document length per line "
        "(default: the Python standard library's .py files)",
    )
    parser.add_argument(
        "--schedule",
        choices=[s.value for s in Schedule],
        default=d.schedule.value,
        help="hdp plans each step with HDP, static with the DP x CP mesh, both runs one after "
        "the other from the same initial weights (default: %(default)s)",
    )
    parser.add_argument(
        "--precision",
        default=None,
        metavar="{" + ",".join(p.value for p in Precision) + "}",
        help="bf16 (bf16 compute, float32 master weights and AdamW state), float32, or float64 "
        "for exactness checks (default: bf16 on CUDA, float32 on CPU)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the transformer blocks (one graph for every token count)",
    )
    parser.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute each block's projections and MLP in backward to save memory",
    )
    parser.add_argument(
        "--quant",
        default=None,
        help="bipolar-INT QAT of the block projections, e.g. w4a8 or w2 (default: float)",
    )
    parser.add_argument(
        "--quant-scope",
        choices=["mlp", "attn", "all"],
        default=d.quant_scope,
        help="which projections --quant swaps (default: %(default)s)",
    )
    parser.add_argument(
        "--ckpt-dir",
        default=None,
        help="take lazy checkpoints into this folder; with --schedule both, one subfolder per "
        "schedule (default: no checkpoints)",
    )
    parser.add_argument(
        "--ckpt-every",
        type=int,
        default=d.ckpt_every,
        help="steps between checkpoints (default: %(default)s)",
    )
    parser.add_argument(
        "--keep", type=int, default=d.keep, help="committed checkpoints kept (default: %(default)s)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest committed checkpoint"
    )
    parser.add_argument("--metrics", default=None, help="write per-step metrics to this JSON")
    parser.add_argument("--plot", default=None, help="write a loss / busy-time plot (png, svg)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        model=args.model,
        steps=args.steps,
        tokens_per_step=args.tokens_per_step,
        docs_per_step=args.docs_per_step,
        max_len=args.max_len,
        capacity=args.capacity,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        seed=args.seed,
        data=args.data,
        schedule=Schedule(args.schedule),
        precision=args.precision,
        compile=args.compile,
        activation_checkpointing=args.activation_checkpointing,
        quant=args.quant,
        quant_scope=args.quant_scope,
        ckpt_dir=args.ckpt_dir,
        ckpt_every=args.ckpt_every,
        keep=args.keep,
        resume=args.resume,
        metrics=args.metrics,
        plot=args.plot,
        progress=not args.no_progress,
    )


def launch(config: TrainConfig, nproc: int) -> int:
    """Run ``config`` on ``nproc`` local processes started by torch's elastic launcher (what
    ``torchrun --standalone`` uses); returns the exit status."""
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    launch_config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        run_id=str(uuid.uuid4()),
        max_restarts=0,
        monitor_interval=0.1,
    )
    worker = (sys.executable, "-m", "bitscale.train", "--worker-config", config.to_json())
    try:
        elastic_launch(launch_config, worker[0])(*worker[1:])
    except SignalException as error:
        print(f"bitscale train: stopped by {error.sigval.name}", file=sys.stderr)
        return 130
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        if failure.exitcode == 130:
            print(f"bitscale train: rank {rank} was stopped by a signal", file=sys.stderr)
            return 130
        print(
            f"bitscale train: rank {rank} failed with exit code {failure.exitcode} "
            "(its traceback is above)",
            file=sys.stderr,
        )
        return 1
    return 0


def main(args: argparse.Namespace) -> int:
    """``bitscale train``: a bad flag or setting is one line on stderr (exit status 2),
    not a traceback; errors once training runs keep theirs."""
    worker_config = getattr(args, "worker_config", None)
    if worker_config:
        config = TrainConfig.from_json(worker_config)
    else:
        try:
            config = _checked_config(args)
        except ValueError as error:
            print(f"bitscale train: error: {error}", file=sys.stderr)
            return 2
        if args.nproc is not None:
            return launch(config, args.nproc)
    runs = train(config)
    return 130 if any(summary.interrupted for summary, _ in runs.values()) else 0


def _checked_config(args: argparse.Namespace) -> TrainConfig:
    """The flags' config, once every check that needs no process group has passed."""
    config = config_from_args(args)
    nproc = args.nproc if args.nproc is not None else int(os.environ.get("WORLD_SIZE", "1"))
    from bitscale.data import load_corpus
    from bitscale.model import preset

    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    preset(config.model)
    load_corpus(config.data, seed=config.seed)
    if args.nproc is not None and "WORLD_SIZE" in os.environ:
        raise ValueError(
            "--nproc starts processes itself; under torchrun leave it out "
            "(torchrun's --nproc-per-node sets the process count)"
        )
    import torch

    resolved = config.resolved(nproc, cuda=torch.cuda.is_available())
    check_fits(resolved, *_memory_per_process(nproc))
    for ckpt_dir in _ckpt_dirs(config):
        _check_fresh_ckpt_dir(ckpt_dir, config.resume)
    return config


def _module_main(argv: Sequence[str] | None = None) -> int:
    """``python -m bitscale.train``: the same flags as ``bitscale train`` (for torchrun), plus
    the launcher's hidden --worker-config."""
    parser = argparse.ArgumentParser(prog="python -m bitscale.train", description=__doc__)
    add_arguments(parser)
    parser.add_argument("--worker-config", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        return main(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(_module_main())
