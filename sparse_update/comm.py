"""The few collectives sparse_update needs, as no-ops when running as a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

def resolve_group(process_group: "dist.ProcessGroup | None") -> "dist.ProcessGroup | None":
    """The group to reduce over: the given one, else the default group when initialised, else None."""
    if process_group is not None:
        return process_group
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def world_size(group: "dist.ProcessGroup | None") -> int:
    """Number of ranks in `group` (1 when not distributed)."""
    return 1 if group is None else dist.get_world_size(group)


def rank(group: "dist.ProcessGroup | None") -> int:
    """This process's rank in `group` (0 when not distributed)."""
    return 0 if group is None else dist.get_rank(group)


def all_reduce_sum_(tensor: Tensor, group: "dist.ProcessGroup | None") -> Tensor:
    """In-place SUM over the group; returns the tensor."""
    if world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def barrier(group: "dist.ProcessGroup | None") -> None:
    """Wait for every rank of the group (no-op when not distributed)."""
    if world_size(group) > 1:
        dist.barrier(group=group)


def all_reduce_max_(tensor: Tensor, group: "dist.ProcessGroup | None") -> Tensor:
    """In-place MAX over the group; returns the tensor."""
    if world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


def all_gather(tensor: Tensor, group: "dist.ProcessGroup | None") -> list[Tensor]:
    """Every rank's `tensor` (same shape on all ranks), in rank order."""
    if world_size(group) == 1:
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts
