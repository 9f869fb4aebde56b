"""What ``bitscale train`` records: one record per optimizer step, a run's summary (tokens/s,
model FLOPs, MFU, balance, checkpoint stalls), the --metrics JSON, the --plot figure and the
summary table (pure, apart from writing the files)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from bitscale._io import atomic_output, save_figure

if TYPE_CHECKING:
    from bitscale.train import TrainConfig

__all__ = [
    "METRICS_VERSION",
    "RunSummary",
    "StepRecord",
    "metrics_document",
    "plot_runs",
    "print_summary",
    "summarize",
    "write_json_atomic",
]


@dataclass(frozen=True, kw_only=True)
class StepRecord:
    """What one optimizer step did, as written to --metrics."""

    step: int
    """1-based: the number of optimizer steps taken after this one."""
    loss: float
    """Mean cross-entropy over the global batch's loss tokens (nats per byte)."""
    tokens: int
    loss_tokens: int
    time_s: float
    tokens_per_s: float
    busy_s: list[float]
    """Per rank: seconds spent running its own work items (forward + backward)."""
    balance: float
    """max(busy_s) / mean(busy_s)."""
    planned_balance: float
    """The planner's estimate of the same ratio (waits for ring partners included)."""
    ring_bytes: int
    """K/V and dK/dV bytes sent around attention rings, counted as sent, summed over ranks."""
    planned_ring_bytes: int
    """The planner's count of the same bytes."""
    ckpt_stall_s: float
    """Seconds rank 0's training was blocked by checkpointing during this step."""
    model_flops: int
    """Training FLOPs the model needs for this batch (`bitscale.throughput.model_flops`)."""
    graphs_compiled: int
    """Graphs torch.compile built on rank 0 during this step (0 after the first step when
    the dynamic token count works; always 0 without --compile)."""


@dataclass(frozen=True, kw_only=True)
class RunSummary:
    schedule: str
    world_size: int
    precision: str
    first_step: int
    last_step: int
    final_loss: float | None
    tokens_per_s: float
    model_flops_per_token: float
    model_flops_per_s: float
    mfu: float | None
    """model_flops_per_s over world_size devices' dense bf16 peak; None without a known peak
    (CPU, an unlisted GPU)."""
    peak_flops: float | None
    """One device's dense bf16 peak used for mfu."""
    mean_balance: float
    ring_bytes: int
    saves: int
    mean_stall_per_save_s: float
    wall_s: float
    safe_step: int | None
    """Newest committed checkpoint step when the run ended (None without --ckpt-dir)."""
    interrupted: bool


def summarize(
    records: Sequence[StepRecord],
    *,
    schedule: str,
    world_size: int,
    precision: str,
    first_step: int,
    saves: int,
    wall_s: float,
    safe_step: int | None,
    interrupted: bool,
    peak_flops: float | None = None,
) -> RunSummary:
    """Totals of a run's steps. Throughput is tokens over step time summed, so start-up and
    the final checkpoint flush do not count, and leaves out the first step when there are
    more (it pays one-time costs: allocator warm-up, first ring connections, compilation).
    MFU is the same steps' model FLOPs per second over ``world_size`` x ``peak_flops``."""
    from bitscale.throughput import mfu

    timed = records[1:] if len(records) > 1 else records
    step_time = sum(r.time_s for r in timed)
    stall = sum(r.ckpt_stall_s for r in records)
    tokens = sum(r.tokens for r in timed)
    flops = sum(r.model_flops for r in timed)
    return RunSummary(
        schedule=schedule,
        world_size=world_size,
        precision=precision,
        first_step=first_step,
        last_step=records[-1].step if records else first_step,
        final_loss=records[-1].loss if records else None,
        tokens_per_s=tokens / step_time if step_time > 0 else 0.0,
        model_flops_per_token=flops / tokens if tokens else 0.0,
        model_flops_per_s=flops / step_time if step_time > 0 else 0.0,
        mfu=mfu(flops, step_time, peak_flops, world_size),
        peak_flops=peak_flops,
        mean_balance=sum(r.balance for r in records) / len(records) if records else 1.0,
        ring_bytes=sum(r.ring_bytes for r in records),
        saves=saves,
        mean_stall_per_save_s=stall / saves if saves else 0.0,
        wall_s=wall_s,
        safe_step=safe_step,
        interrupted=interrupted,
    )


METRICS_VERSION = 2
"""2: StepRecord.model_flops and graphs_compiled; RunSummary.precision, model FLOPs and
MFU; config fields tokens_per_step, compile, activation_checkpointing."""


def metrics_document(
    config: TrainConfig, runs: dict[str, tuple[RunSummary, Sequence[StepRecord]]]
) -> dict[str, Any]:
    """The --metrics JSON: config, and per schedule the summary and every step."""
    return {
        "version": METRICS_VERSION,
        "config": json.loads(config.to_json()),
        "runs": {
            name: {"summary": asdict(summary), "steps": [asdict(r) for r in records]}
            for name, (summary, records) in runs.items()
        },
    }


def write_json_atomic(path: str | os.PathLike[str], document: dict[str, Any]) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    with atomic_output(path, "w") as f:
        json.dump(document, f, indent=1)


def plot_runs(document: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Loss per step and per-rank busy time per step, one line per schedule (HDP vs static
    when both ran), written as an image (the suffix picks the format)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = document["runs"]
    fig, (ax_loss, ax_busy) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for name, run in runs.items():
        steps = [r["step"] for r in run["steps"]]
        line = ax_loss.plot(steps, [r["loss"] for r in run["steps"]], label=name)[0]
        world = len(run["steps"][0]["busy_s"]) if run["steps"] else 0
        for rank in range(world):
            ax_busy.plot(
                steps,
                [1e3 * r["busy_s"][rank] for r in run["steps"]],
                color=line.get_color(),
                alpha=0.35 + 0.65 * (rank + 1) / world,
                linestyle="-" if rank % 2 == 0 else "--",
                label=f"{name} rank {rank}",
            )
    ax_loss.set(xlabel="step", ylabel="loss (nats/byte)", title="training loss")
    ax_busy.set(xlabel="step", ylabel="busy time (ms)", title="per-rank busy time")
    ax_loss.legend()
    ax_busy.legend(fontsize="small", ncol=2)
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def print_summary(summaries: Sequence[RunSummary]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="bitscale train")
    table.add_column("")
    for summary in summaries:
        table.add_column(f"{summary.schedule} ({summary.world_size} proc)", justify="right")
    rows: list[tuple[str, Any]] = [
        ("steps", lambda s: f"{s.first_step + 1}..{s.last_step}"),
        ("precision", lambda s: s.precision),
        ("final loss", lambda s: "-" if s.final_loss is None else f"{s.final_loss:.4f}"),
        ("tokens/s", lambda s: f"{s.tokens_per_s:,.0f}"),
        ("model GFLOP/token", lambda s: f"{s.model_flops_per_token / 1e9:.3f}"),
        ("model TFLOP/s", lambda s: f"{s.model_flops_per_s / 1e12:.3f}"),
        ("MFU (bf16 peak)", lambda s: "n/a" if s.mfu is None else f"{100 * s.mfu:.1f}%"),
        ("balance max/mean", lambda s: f"{s.mean_balance:.3f}"),
        ("ring MB", lambda s: f"{s.ring_bytes / 1e6:.2f}"),
        ("checkpoints", lambda s: str(s.saves)),
        ("stall per save ms", lambda s: f"{1e3 * s.mean_stall_per_save_s:.1f}"),
        ("wall s", lambda s: f"{s.wall_s:.1f}"),
        ("safe step", lambda s: "-" if s.safe_step is None else str(s.safe_step)),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(s) for s in summaries))
    Console(stderr=False).print(table)
