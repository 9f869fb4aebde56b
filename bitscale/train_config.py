"""``bitscale train``'s settings: the schedules, the precisions, the device defaults of the
token budget, and ``TrainConfig`` (every flag, validated; ``resolved`` fills in what depends
on the device and the process count). Pure: no torch import."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields, replace
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "CPU_CAPACITY",
    "CUDA_CAPACITY",
    "MICRO_BATCHES_PER_STEP",
    "Precision",
    "Schedule",
    "TrainConfig",
    "parse_quant",
]


class Schedule(StrEnum):
    HDP = "hdp"
    """bitscale.hdp.plan_batch: each document on the fewest ranks it needs, balanced."""
    STATIC = "static"
    """bitscale.hdp.plan_static_mesh: a fixed DP x CP mesh sized for the longest document."""
    BOTH = "both"
    """Train twice from the same initial state, HDP then static, and compare them."""


class Precision(StrEnum):
    BF16 = "bf16"
    """bf16 compute under torch.autocast, float32 master weights, gradients and AdamW state
    (the checkpoints hold the float32 masters); the LM head and the loss stay float32. The
    default on CUDA."""
    FLOAT32 = "float32"
    """The default on CPU: bf16 autocast bought no consistent speed there (2 processes on a
    2-core AMX machine, 6 steps: tiny 0.89x, small 1.14x float32's tokens/s) and costs
    exactness."""
    FLOAT64 = "float64"
    """For exactness checks: any two schedules or process counts then agree to round-off
    (tests/e2e holds their losses to 1e-10 relative)."""


CUDA_CAPACITY = 32768
"""Default token slots per rank on CUDA: enough work per micro-batch to fill a GPU's matrix
units; the 1b preset's activations at this capacity are ~50 GB in bf16 (``--capacity`` or
``--activation-checkpointing`` for smaller GPUs)."""
CPU_CAPACITY = 2048
"""Default token slots per rank on CPU (one step of the tiny model stays near a second)."""
MICRO_BATCHES_PER_STEP = 2
"""Default token budget of a step: this many full micro-batches per rank."""


_QUANT_SPEC = re.compile(r"^w([1-8])(?:a([1-8]|16))?$")


def parse_quant(spec: str) -> tuple[int, int]:
    """``"w4a8"`` -> ``(4, 8)``; ``"w2"`` means 16-bit activations (weight-only)."""
    match = _QUANT_SPEC.match(spec.strip().lower())
    if match is None:
        raise ValueError(
            f"--quant {spec!r} is not a bipolar-INT spec; write wN or wNaM with weight bits N "
            "in 1..8 and activation bits M in 1..8 or 16, e.g. w4a8 or w2"
        )
    return int(match.group(1)), int(match.group(2) or 16)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything one training run depends on; the CLI flags map one to one."""

    model: str = "tiny"
    """Preset of bitscale.model.PRESETS."""
    steps: int = 30
    """Optimizer steps to reach (a resumed run counts from step 0 too)."""
    tokens_per_step: int | None = None
    """Token budget of one global batch (whole documents while they fit); default
    MICRO_BATCHES_PER_STEP * nproc * capacity. Exclusive with docs_per_step."""
    docs_per_step: int | None = None
    """Documents in one global batch instead of a token budget."""
    max_len: int | None = None
    """Longest sequence in tokens; longer documents contribute a seeded window. Default:
    the longest the processes can hold (nproc * capacity), so documents are not cut to one
    rank's capacity: the long ones are what HDP spreads over ranks."""
    capacity: int | None = None
    """Token slots one rank holds in one micro-batch. Default: CUDA_CAPACITY on CUDA,
    CPU_CAPACITY otherwise; with --max-len given, ceil(max_len / min(nproc, 2)), so
    documents longer than half of max_len are spread over several ranks."""
    lr: float = 3e-3
    warmup_steps: int = 5
    weight_decay: float = 0.01
    seed: int = 0
    data: str | None = None
    """None: the standard library's .py files; a folder of text files; a length file."""
    schedule: Schedule = Schedule.HDP
    precision: Precision | None = None
    """None: bf16 on CUDA, float32 elsewhere."""
    compile: bool = False
    """torch.compile the blocks (the token count is a dynamic dimension: one graph)."""
    activation_checkpointing: bool = False
    """Recompute each block's projections and MLP in backward (attention is kept)."""
    quant: str | None = None
    """Bipolar-INT QAT for the block projections, e.g. "w4a8"; None trains in float."""
    quant_scope: str = "all"
    """Which projections --quant swaps: "mlp", "attn" or "all"."""
    ckpt_dir: str | None = None
    ckpt_every: int = 10
    keep: int = 3
    resume: bool = False
    metrics: str | None = None
    plot: str | None = None
    progress: bool = True
    version: int = 1

    def __post_init__(self) -> None:
        for name in ("steps", "docs_per_step", "ckpt_every", "keep"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.max_len is not None and self.max_len < 2:
            raise ValueError(f"--max-len must be >= 2 (an input and a target), got {self.max_len}")
        if self.tokens_per_step is not None and self.docs_per_step is not None:
            raise ValueError(
                "--tokens-per-step and --docs-per-step both size the batch; give one of them"
            )
        if self.tokens_per_step is not None and self.tokens_per_step < 2:
            raise ValueError(f"--tokens-per-step must be >= 2, got {self.tokens_per_step}")
        if self.capacity is not None and self.capacity < 2:
            raise ValueError(f"--capacity must be >= 2 token slots, got {self.capacity}")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.quant is not None:
            parse_quant(self.quant)
        if self.quant_scope not in ("mlp", "attn", "all"):
            raise ValueError(f"--quant-scope must be mlp, attn or all, got {self.quant_scope!r}")
        if self.resume and self.ckpt_dir is None:
            raise ValueError("--resume needs --ckpt-dir (the folder holding the checkpoints)")
        object.__setattr__(self, "schedule", Schedule(self.schedule))
        if self.precision is not None:
            try:
                object.__setattr__(self, "precision", Precision(self.precision))
            except ValueError:
                choices = ", ".join(p.value for p in Precision)
                raise ValueError(
                    f"--precision {self.precision!r} is not one of {choices}"
                ) from None
        if self.compile and self.precision is Precision.FLOAT64:
            raise ValueError(
                "--compile does not go with --precision float64: float64 runs are exactness "
                "checks, and compiled kernels fuse and reorder the float math; drop --compile "
                "or use bf16/float32"
            )

    def capacity_for(self, world_size: int, *, cuda: bool = False) -> int:
        if self.capacity is not None:
            capacity = self.capacity
        elif self.max_len is not None:
            capacity = math.ceil(self.max_len / min(world_size, 2))
            capacity += capacity % 2  # zigzag shards hold whole chunk pairs
        else:
            return CUDA_CAPACITY if cuda else CPU_CAPACITY
        max_len = self.max_len if self.max_len is not None else _longest_held(world_size, capacity)
        # A sequence that fits one rank stays whole; past that, L tokens on d ranks take
        # 2 * ceil(L / (2d)) slots per rank (zigzag shards hold whole chunk pairs).
        ring_slots = 2 * math.ceil(max_len / (2 * world_size))
        needed = max_len if world_size == 1 else min(max_len, ring_slots)
        if needed > capacity:
            raise ValueError(
                f"--max-len {max_len} does not fit on {world_size} process(es) of "
                f"--capacity {capacity} token slots; raise --capacity to at least {needed}, "
                "lower --max-len, or use more processes"
            )
        return capacity

    def resolved(self, world_size: int, *, cuda: bool) -> TrainConfig:
        """This config with the device- and process-count-dependent defaults filled in:
        precision, capacity, max_len and the token budget. A run and its checkpoints use
        the resolved values, so resuming on another process count with the defaults asks
        for the original --max-len / --tokens-per-step (the data would change)."""
        capacity = self.capacity_for(world_size, cuda=cuda)
        max_len = self.max_len if self.max_len is not None else _longest_held(world_size, capacity)
        tokens_per_step = self.tokens_per_step
        if tokens_per_step is None and self.docs_per_step is None:
            tokens_per_step = MICRO_BATCHES_PER_STEP * world_size * capacity
        precision = self.precision
        if precision is None:
            precision = Precision.BF16 if cuda else Precision.FLOAT32
        return replace(
            self,
            capacity=capacity,
            max_len=max_len,
            tokens_per_step=tokens_per_step,
            precision=precision,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        import torch

        return torch.bfloat16 if self.precision is Precision.BF16 else None

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        values = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}")
        return cls(**values)


def _longest_held(world_size: int, capacity: int) -> int:
    """The longest sequence ``world_size`` ranks of ``capacity`` slots hold (zigzag shards
    hold whole chunk pairs, so an odd capacity loses a slot on a ring)."""
    return capacity if world_size == 1 else world_size * (capacity - capacity % 2)
