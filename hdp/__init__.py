"""bitscale.hdp: hybrid data parallelism with dynamic context parallelism (ByteScale).

Plan a global batch so each sequence gets the fewest ranks it needs (``plan_batch``; the
static DP x CP baseline is ``plan_static_mesh``), then run each step with ``HDPRunner``: a
model whose attention calls ``attention(q, k, v)`` runs packed short documents on one rank
and zigzag ring attention for long ones, with one gradient all-reduce per step normalised by
the global loss-token count.

Names load lazily, so the planner (pure Python) imports without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .dispatch import attention
    from .plan import CostModel, Plan, StaticAssignment, WorkItem, plan_batch, plan_static_mesh
    from .runtime import HDPRunner, StepResult

_WHERE = {
    "CostModel": "plan",
    "Plan": "plan",
    "WorkItem": "plan",
    "StaticAssignment": "plan",
    "plan_batch": "plan",
    "plan_static_mesh": "plan",
    "HDPRunner": "runtime",
    "StepResult": "runtime",
    "attention": "dispatch",
}

__all__ = [
    "CostModel",
    "HDPRunner",
    "Plan",
    "StaticAssignment",
    "StepResult",
    "WorkItem",
    "attention",
    "plan_batch",
    "plan_static_mesh",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
