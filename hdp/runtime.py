"""The HDP step runner: executes one rank's share of a :class:`~bitscale.hdp.plan.Plan`.

A training loop calls it once per step::

    runner = HDPRunner(model)                      # once; model is replicated on every rank
    for batch in loader:                           # batch[i]: 1-D LongTensor, sequence i
        plan = plan_batch([len(s) for s in batch], world_size, capacity)
        result = runner.step(batch, plan)          # forward/backward of this rank's items,
        optimizer.step()                           # gradients synced and normalized
        optimizer.zero_grad()

Model contract (see `bitscale.hdp.dispatch`): ``model(input_ids, position_ids) -> logits``
with token-major 1-D inputs ``[T]`` and logits ``[T, V]``; its attention layers call
``bitscale.hdp.attention(q, k, v)``. ``loss_fn(logits, labels)`` (default: summed cross
entropy, labels -100 ignored) must return the *sum* over tokens.

What a step does on each rank:

1. For each micro-batch of ``plan.for_rank(rank)`` (items sharing ``WorkItem.micro_batch``),
   in the global order: gather this rank's tokens. Labels are shifted inside each sequence
   *before* sharding (the last token of a zigzag chunk predicts the first of the next), the
   last token of a sequence and every padding slot get label -100, position ids are the
   tokens' global positions within their sequence (padding slots get 0: they sit at the
   tail, so no real token ever attends to them). Forward under the right attention layout,
   backward of the summed loss. Ring partners run the same micro-batch at the same point
   of their own lists; nothing else synchronises ranks.
2. One small all-reduce of the loss sum, loss-token count and per-rank metrics, then one
   all-reduce (SUM) of all gradients (one flat buffer per dtype), divided by the global
   loss-token count. Averaging per-rank mean losses instead would weight tokens unequally
   whenever ranks hold different token counts (research notes 1.4).

All ring traffic is point-to-point on the world group; ``group`` (default: world) is the set
of HDP ranks, and plan rank r is ``group`` rank r.

FSDP2 (``fully_shard``) composes, with one rule: parameters stay unsharded for the whole
step. FSDP2 normally all-gathers before every forward and reduce-scatters after every
backward on all ranks of its mesh, but HDP ranks run different numbers of micro-batches, so
those collectives would not pair up. For a model with FSDP2 modules the runner therefore

1. turns off gradient sync, resharding after forward and after backward on every FSDP
   module, and unshards them all (one all-gather per module, the same on every rank);
2. runs the micro-batches, which issue no collectives, only ring P2P; unsharded gradients
   accumulate locally;
3. turns sync and resharding back on, sets the gradient divide factor to 1 (SUM), and runs
   one zero-loss forward/backward of a single token: its backward issues every module's
   reduce-scatter in the same order on every rank and reshards; the zero loss adds exactly
   0 to the gradients. Then the sharded gradients are divided by the global loss-token
   count.

So during a step every rank holds full parameters and full gradients (ZeRO-1 memory);
between steps parameters, gradients and optimizer states are sharded. The FSDP2 mesh must
be the HDP ``group``. ``reshard_after_forward`` is left False after a step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .comm import CommCategory, CommCounter
from .dispatch import PackedDocuments, RingShard, attention_layout
from .offload import ActivationOffload, OffloadStats
from .plan import Plan, WorkItem

__all__ = ["HDPRunner", "MicroBatch", "StepResult", "build_micro_batch"]

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (last token of a sequence, padding)."""


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token cross entropies, labels == -100 ignored; float32 or wider math."""
    compute = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(logits.to(compute), labels, ignore_index=IGNORE_INDEX, reduction="sum")


@dataclass(frozen=True)
class MicroBatch:
    """This rank's inputs for one forward/backward."""

    input_ids: torch.Tensor
    """[T] int64 token ids (padding slots: ``pad_id``)."""
    position_ids: torch.Tensor
    """[T] global positions within each sequence (padding slots: 0)."""
    labels: torch.Tensor
    """[T] next-token ids, -100 where no loss is taken."""
    layout: PackedDocuments | RingShard
    """What :func:`bitscale.hdp.attention` does for these tokens."""
    loss_tokens: int
    """Tokens with a label (the micro-batch's share of the global normaliser)."""
    real_tokens: int
    padding_tokens: int
    slots: int
    """Token slots this rank holds (T = real_tokens + padding_tokens)."""
    offload_ratio: float
    """The largest ``offload_ratio`` among the items."""
    item_ids: tuple[int, ...]


def _check_sequence(batch: Sequence[torch.Tensor], seq_id: int, length: int) -> torch.Tensor:
    tokens = batch[seq_id]
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"batch[{seq_id}] must be a 1-D tensor of token ids, got {type(tokens)}")
    if tokens.dim() != 1 or tokens.dtype.is_floating_point or tokens.dtype.is_complex:
        raise ValueError(
            f"batch[{seq_id}] must be a 1-D integer tensor of token ids, got shape "
            f"{tuple(tokens.shape)} and dtype {tokens.dtype}; pass one tensor per sequence"
        )
    if tokens.shape[0] != length:
        raise ValueError(
            f"batch[{seq_id}] has {tokens.shape[0]} tokens but the plan was made for {length}; "
            "plan the batch from its own lengths"
        )
    return tokens


def _shifted_labels(tokens: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Labels of positions start..end-1 of a sequence: the next token, -100 for the last."""
    length = tokens.shape[0]
    labels = torch.full((end - start,), IGNORE_INDEX, dtype=torch.long, device=tokens.device)
    stop = min(end, length - 1)
    if stop > start:
        labels[: stop - start] = tokens[start + 1 : stop + 1]
    return labels


def build_micro_batch(
    items: Sequence[WorkItem],
    plan_rank: int,
    batch: Sequence[torch.Tensor],
    lengths: Sequence[int],
    *,
    global_ranks: Sequence[int] | None = None,
    pad_id: int = 0,
    counter: CommCounter | None = None,
) -> MicroBatch:
    """Inputs of ``plan_rank`` for the micro-batch made of ``items`` (pure; no communication).

    ``global_ranks[r]`` is the world rank of plan rank r (identity when None).
    """
    first = items[0]
    position = first.ranks.index(plan_rank)
    ids, positions, labels = [], [], []
    real = loss = 0
    if first.cp_size == 1:
        if len(items) != 1:
            raise ValueError(f"single-rank micro-batch {first.micro_batch} has several items")
        doc_lengths = []
        for seq_id, start, end in first.shards[0]:
            tokens = _check_sequence(batch, seq_id, lengths[seq_id])
            if (start, end) != (0, lengths[seq_id]):
                raise ValueError(
                    f"item {first.item_id}: single-rank items hold whole sequences, got range "
                    f"({seq_id}, {start}, {end}) of a {lengths[seq_id]}-token sequence"
                )
            ids.append(tokens)
            positions.append(torch.arange(end, device=tokens.device))
            labels.append(_shifted_labels(tokens, 0, end))
            doc_lengths.append(end)
            real += end
            loss += end - 1
        bounds = [0]
        for n in doc_lengths:
            bounds.append(bounds[-1] + n)
        layout: PackedDocuments | RingShard = PackedDocuments(tuple(bounds))
        padding = 0
    else:
        d = first.cp_size
        chunk_sizes = []
        for item in items:
            if item.ranks != first.ranks or item.chunk_size < 1:
                raise ValueError(
                    f"items {[i.item_id for i in items]} of one ring micro-batch must share "
                    "ranks and have chunk_size >= 1"
                )
            c = item.chunk_size
            shard = item.shards[position]
            seq_id = shard[0][0]
            length = lengths[seq_id]
            expected = tuple(
                (seq_id, min(k * c, length), min((k + 1) * c, length))
                for k in (position, 2 * d - 1 - position)
            )
            if tuple(shard) != expected:
                raise ValueError(
                    f"item {item.item_id}: rank position {position} must hold zigzag chunks "
                    f"{position} and {2 * d - 1 - position} of chunk_size {c}, i.e. "
                    f"{expected}; got {tuple(shard)}"
                )
            tokens = _check_sequence(batch, seq_id, length)
            for _, start, end in expected:
                pad = c - (end - start)
                ids.append(tokens[start:end])
                ids.append(torch.full((pad,), pad_id, dtype=tokens.dtype, device=tokens.device))
                positions.append(torch.arange(start, end, device=tokens.device))
                positions.append(torch.zeros(pad, dtype=torch.long, device=tokens.device))
                labels.append(_shifted_labels(tokens, start, end))
                labels.append(
                    torch.full((pad,), IGNORE_INDEX, dtype=torch.long, device=tokens.device)
                )
                real += end - start
                loss += max(0, min(end, length - 1) - start)
            chunk_sizes.append(c)
        ring = (
            tuple(first.ranks)
            if global_ranks is None
            else tuple(global_ranks[r] for r in first.ranks)
        )
        layout = RingShard(
            ranks=ring,
            position=position,
            item_id=first.item_id,
            chunk_sizes=tuple(chunk_sizes),
            counter=counter,
        )
        padding = 2 * sum(chunk_sizes) - real
    input_ids = torch.cat(ids).long()
    return MicroBatch(
        input_ids=input_ids,
        position_ids=torch.cat(positions),
        labels=torch.cat(labels),
        layout=layout,
        loss_tokens=loss,
        real_tokens=real,
        padding_tokens=padding,
        slots=input_ids.shape[0],
        offload_ratio=max(item.offload_ratio for item in items),
        item_ids=tuple(item.item_id for item in items),
    )


def _fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP2 modules of ``model`` in module order (empty for a replicated model)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _full_bytes(params: Iterable[torch.nn.Parameter]) -> int:
    """Bytes of the full (unsharded) parameters."""
    return sum(p.numel() * p.element_size() for p in params if p.requires_grad)


def micro_batches_of(items: Sequence[WorkItem]) -> list[list[WorkItem]]:
    """Consecutive items sharing ``micro_batch`` form one forward/backward."""
    groups: list[list[WorkItem]] = []
    for item in items:
        if groups and groups[-1][0].micro_batch == item.micro_batch:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


@dataclass(frozen=True)
class StepResult:
    """What one :meth:`HDPRunner.step` did (global values are equal on every rank)."""

    loss: float
    """Global mean token loss: loss_sum / loss_tokens (0.0 when there are no loss tokens)."""
    loss_sum: float
    loss_tokens: int
    """Global loss-token count (the gradient normaliser)."""
    local_loss_tokens: int
    local_tokens: int
    """Real tokens this rank ran."""
    local_padding_tokens: int
    micro_batches: int
    """Forward/backward calls this rank ran."""
    busy_time: tuple[float, ...]
    """Per rank: seconds inside its forward/backward calls (ring waits included, gradient
    sync excluded)."""
    ring_kv_bytes: tuple[int, ...]
    """Per rank: K/V bytes sent on rings."""
    ring_dkv_bytes: tuple[int, ...]
    """Per rank: dK/dV bytes sent on rings."""
    comm_bytes: dict[str, int] = field(default_factory=dict)
    """This rank's payload bytes by category (`bitscale.hdp.comm.CommCategory`)."""
    offload: dict[str, int] = field(default_factory=dict)
    """This rank's `OffloadStats` for the step."""


class HDPRunner:
    """Runs this rank's share of each step's plan on a replicated model (module docstring).

    Args:
        model: ``model(input_ids [T], position_ids [T]) -> logits [T, V]`` whose attention
            calls ``bitscale.hdp.attention``; every HDP rank holds an identical replica.
        group: the HDP ranks (default: the world group); plan rank r is group rank r.
        loss_fn: ``loss_fn(logits, labels) -> summed loss``; labels -100 carry no loss.
        pad_id: token id placed in padding slots of zigzag shards.
        offload_ratio: fraction of saved activations moved to host for micro-batches of at
            least ``offload_min_slots`` token slots; None (default) follows each item's
            ``offload_ratio`` from the plan.
        autocast: ``torch.bfloat16`` or ``torch.float16`` runs each forward under
            ``torch.autocast`` in that dtype: parameters and their gradients stay in their
            own (float32 master) dtype, matmuls and attention inputs are low precision, and
            attention keeps its softmax statistics, ring merges and dK/dV accumulators in
            float32 and returns gradients in its input dtype. None (default) computes in the
            parameters' dtype.

    Construct it on every rank of the world (with NCCL it runs one warm-up collective).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        group: dist.ProcessGroup | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = summed_cross_entropy,
        pad_id: int = 0,
        offload_ratio: float | None = None,
        offload_min_slots: int = 0,
        autocast: torch.dtype | None = None,
    ) -> None:
        if autocast not in (None, torch.bfloat16, torch.float16):
            raise ValueError(
                f"autocast must be torch.bfloat16, torch.float16 or None, got {autocast}"
            )
        if not dist.is_initialized():
            raise ValueError("HDPRunner needs torch.distributed initialized (torchrun)")
        if offload_ratio is not None and not 0.0 <= offload_ratio <= 1.0:
            raise ValueError(f"offload_ratio must be in [0, 1] or None, got {offload_ratio}")
        self.model = model
        self.autocast = autocast
        self.group = group if group is not None else dist.group.WORLD
        self.loss_fn = loss_fn
        self.pad_id = pad_id
        self.offload_ratio = offload_ratio
        self.offload_min_slots = offload_min_slots
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self._global_ranks = tuple(
            dist.get_global_rank(self.group, r) for r in range(self.world_size)
        )
        self._fsdp_modules = _fsdp_modules(model)
        params = [p for p in model.parameters()]
        if not params:
            raise ValueError("model has no parameters")
        self.device = params[0].device
        if dist.get_backend(self.group) == "nccl":
            # NCCL allows P2P among a subset of a group only after a collective on all of it.
            dist.all_reduce(torch.zeros(1, device=self.device), group=dist.group.WORLD)

    def step(self, batch: Sequence[torch.Tensor], plan: Plan) -> StepResult:
        """Forward/backward of this rank's items, then gradient sync (grads are replaced).

        ``batch[seq_id]`` is sequence ``seq_id`` of the plan as a 1-D tensor of token ids;
        only the sequences this rank's items touch are read, so ``batch`` may be a lazy
        sequence.
        """
        if plan.world_size != self.world_size:
            raise ValueError(
                f"plan is for {plan.world_size} ranks but the HDP group has {self.world_size}; "
                "plan with world_size = the group size"
            )
        if len(batch) != len(plan.lengths):
            raise ValueError(
                f"batch has {len(batch)} sequences but the plan was made for {len(plan.lengths)}"
            )
        self.model.zero_grad(set_to_none=True)
        counter = CommCounter()
        if self._fsdp_modules:
            self._fsdp_unshard(counter)
        offload_stats = OffloadStats()
        offloader = ActivationOffload(keep=self.model.parameters(), stats=offload_stats)
        loss_sum = 0.0
        local_loss = local_tokens = local_padding = 0
        busy = 0.0
        groups = micro_batches_of(plan.for_rank(self.rank))
        for items in groups:
            mb = build_micro_batch(
                items,
                self.rank,
                batch,
                plan.lengths,
                global_ranks=self._global_ranks,
                pad_id=self.pad_id,
                counter=counter,
            )
            ratio = mb.offload_ratio if self.offload_ratio is None else self.offload_ratio
            if mb.slots < self.offload_min_slots:
                ratio = 0.0
            started = time.perf_counter()
            with (
                attention_layout(mb.layout),
                offloader.offloading(ratio),
                torch.autocast(
                    self.device.type, dtype=self.autocast, enabled=self.autocast is not None
                ),
            ):
                logits = self.model(mb.input_ids.to(self.device), mb.position_ids.to(self.device))
                loss = self.loss_fn(logits, mb.labels.to(self.device))
            loss.backward()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            busy += time.perf_counter() - started
            loss_sum += float(loss.detach())
            local_loss += mb.loss_tokens
            local_tokens += mb.real_tokens
            local_padding += mb.padding_tokens

        n = self.world_size
        metrics = torch.zeros(2 + 3 * n, dtype=torch.float64, device=self.device)
        metrics[0] = loss_sum
        metrics[1] = local_loss
        metrics[2 + self.rank] = busy
        metrics[2 + n + self.rank] = counter.bytes[CommCategory.RING_KV]
        metrics[2 + 2 * n + self.rank] = counter.bytes[CommCategory.RING_DKV]
        counter.add(CommCategory.METRICS, metrics.numel() * metrics.element_size())
        dist.all_reduce(metrics, group=self.group)
        values = metrics.cpu().tolist()
        loss_tokens = round(values[1])
        if self._fsdp_modules:
            self._fsdp_reduce_scatter(loss_tokens, counter)
        else:
            self._sync_gradients(loss_tokens, counter)
        return StepResult(
            loss=values[0] / loss_tokens if loss_tokens else 0.0,
            loss_sum=values[0],
            loss_tokens=loss_tokens,
            local_loss_tokens=local_loss,
            local_tokens=local_tokens,
            local_padding_tokens=local_padding,
            micro_batches=len(groups),
            busy_time=tuple(values[2 : 2 + n]),
            ring_kv_bytes=tuple(round(v) for v in values[2 + n : 2 + 2 * n]),
            ring_dkv_bytes=tuple(round(v) for v in values[2 + 2 * n : 2 + 3 * n]),
            comm_bytes=counter.as_dict(),
            offload=offload_stats.as_dict(),
        )

    def _fsdp_unshard(self, counter: CommCounter) -> None:
        for module in self._fsdp_modules:
            module.set_requires_gradient_sync(False, recurse=False)
            module.set_reshard_after_forward(False, recurse=False)
            module.set_reshard_after_backward(False, recurse=False)
        for module in self._fsdp_modules:
            module.unshard()
        counter.add(CommCategory.PARAM_GATHER, _full_bytes(self.model.parameters()))

    def _fsdp_reduce_scatter(self, loss_tokens: int, counter: CommCounter) -> None:
        for module in self._fsdp_modules:
            module.set_requires_gradient_sync(True, recurse=False)
            module.set_reshard_after_backward(True, recurse=False)
            module.set_gradient_divide_factor(1.0)
        token = torch.full((1,), self.pad_id, dtype=torch.long, device=self.device)
        position = torch.zeros(1, dtype=torch.long, device=self.device)
        with attention_layout(None):
            (self.model(token, position).sum() * 0).backward()
        counter.add(CommCategory.GRAD_SYNC, _full_bytes(self.model.parameters()))
        if loss_tokens:
            for param in self.model.parameters():
                if param.grad is not None:
                    param.grad.div_(loss_tokens)

    def _sync_gradients(self, loss_tokens: int, counter: CommCounter) -> None:
        """One all-reduce per (dtype, device) of all gradients, then / loss_tokens."""
        buckets: dict[tuple[torch.dtype, torch.device], list[torch.nn.Parameter]] = {}
        for param in self.model.parameters():
            if param.requires_grad:
                buckets.setdefault((param.dtype, param.device), []).append(param)
        for params in buckets.values():
            flat = torch.cat(
                [
                    p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(p).reshape(-1)
                    for p in params
                ]
            )
            counter.add(CommCategory.GRAD_SYNC, flat.numel() * flat.element_size())
            dist.all_reduce(flat, group=self.group)
            if loss_tokens:
                flat /= loss_tokens
            offset = 0
            for p in params:
                p.grad = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
