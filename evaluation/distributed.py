"""Sharding and reduction shared by every metric: one result, whatever the number of ranks.

How a metric runs on W ranks:

* The (max_items-truncated) item list is cut into consecutive *batches* of ``batch_size`` items, the
  same batches on every world size. Batch ``b`` is evaluated by rank ``b % W`` (the shard is
  ``batches[rank::W]``: item-level ``items[rank::W]`` sharding at batch granularity). Sharding whole
  batches rather than single items is what makes the results *bit-identical* across world sizes: the
  composition and padded length of each forward batch never change, so neither does any float.
* Each rank writes its items' values (e.g. ``(nll_sum, num_tokens)``) into a zero-filled
  ``[num_items, num_fields]`` float64 table and the table is ``all_reduce(SUM)``-ed. Every row has
  exactly one non-zero contributor, so the reduction is exact (``x + 0 == x``); the final aggregates
  are then ``math.fsum`` over rows (exactly rounded, so independent of order). A plain all-reduce of
  per-rank ``(sum, count)`` pairs would round differently for different world sizes.
* Every rank runs the same number of forward passes (rounds ``ceil(num_batches / W)``; a rank without
  a batch in the last round runs a 1-token dummy forward, and generation runs in lock-step, see
  :func:`any_across`). Sharded models (FSDP2, ZeRO-3) gather parameters inside ``forward`` and would
  hang if one rank skipped a forward.

``process_group=None`` means the default group when ``torch.distributed`` is initialised (then every
rank of that group must call the metric with the same records), and a plain single-process run when it
is not.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Shard", "resolve_shard", "batch_rounds", "reduce_item_table", "any_across", "eval_mode",
           "infer_device", "model_max_seq_len", "forward_logits", "fsum_column", "take_items"]


@dataclass(frozen=True)
class Shard:
    """This process's place in the evaluation: rank, world size, and the group to reduce over."""

    rank: int
    world_size: int
    group: Any = None          # the process group; only meaningful when `distributed`
    distributed: bool = False  # False: single process, no collectives at all


def resolve_shard(process_group: Any = None) -> Shard:
    """The shard for `process_group` (None: default group if initialised, else single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise ValueError("process_group was given but torch.distributed is not initialised; "
                             "call torch.distributed.init_process_group first or pass process_group=None")
        return Shard(rank=0, world_size=1)
    return Shard(rank=dist.get_rank(process_group), world_size=dist.get_world_size(process_group),
                 group=process_group, distributed=True)


def take_items(records: Sequence[Any], max_items: int | None) -> list[Any]:
    """The first `max_items` records (all when None); raises ValueError when nothing is left."""
    if max_items is not None and max_items < 0:
        raise ValueError(f"max_items must be >= 0 or None, got {max_items}")
    items = list(records) if max_items is None else list(records)[:max_items]
    if not items:
        raise ValueError("no records to evaluate (empty evaluation set or max_items=0)")
    return items


def batch_rounds(num_items: int, batch_size: int, shard: Shard) -> list[range | None]:
    """This rank's batch (a range of global item indices) in each round, None for a dummy round.

    Every rank gets the same number of rounds, so every rank runs the same number of forwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    num_batches = math.ceil(num_items / batch_size)
    num_rounds = math.ceil(num_batches / shard.world_size)
    rounds: list[range | None] = []
    for k in range(num_rounds):
        b = k * shard.world_size + shard.rank
        rounds.append(range(b * batch_size, min((b + 1) * batch_size, num_items)) if b < num_batches else None)
    return rounds


def _reduce_device(shard: Shard) -> torch.device:
    # NCCL only reduces CUDA tensors; gloo (and everything else here) reduces CPU tensors.
    if shard.distributed and dist.get_backend(shard.group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_item_table(table: torch.Tensor, shard: Shard) -> torch.Tensor:
    """All-reduce (SUM) a ``[num_items, num_fields]`` float64 table in which each rank filled only
    its own rows; returns the full table on CPU (identical on every rank)."""
    assert table.dtype == torch.float64 and table.dim() == 2
    if not shard.distributed:
        return table
    work = table.to(_reduce_device(shard))
    dist.all_reduce(work, op=dist.ReduceOp.SUM, group=shard.group)
    return work.cpu()


def any_across(flag: bool, shard: Shard) -> bool:
    """True when `flag` is True on any rank (a collective: every rank must call it)."""
    if not shard.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_reduce_device(shard))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=shard.group)
    return bool(t.item() > 0)


def fsum_column(table: torch.Tensor, col: int) -> float:
    """Exactly rounded sum of one column (independent of summation order)."""
    return math.fsum(table[:, col].tolist())


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` under ``torch.no_grad()``; restores every submodule's own training flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, was_training in flags:
            m.training = was_training


def infer_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """`device` if given, else the device of the model's first non-meta parameter (CPU if none)."""
    if device is not None:
        return torch.device(device)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def model_max_seq_len(model: nn.Module) -> int | None:
    """``model.config.max_seq_len`` when the model has one (positions beyond it are not trained)."""
    config = getattr(model, "config", None)
    value = getattr(config, "max_seq_len", None)
    return int(value) if value else None


def forward_logits(model: nn.Module, tokens: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, T, V]`` of ``model(tokens, padding_mask=...)``, upcast to fp32 when lower."""
    out = model(tokens, padding_mask=padding_mask)
    logits = out.logits if hasattr(out, "logits") else out
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return logits


def dummy_forward(model: nn.Module, *, pad_like_id: int, device: torch.device) -> None:
    """A 1-token forward so this rank joins the collectives a sharded model runs inside forward."""
    tokens = torch.full((1, 1), pad_like_id, dtype=torch.long, device=device)
    forward_logits(model, tokens, torch.ones_like(tokens, dtype=torch.bool))
