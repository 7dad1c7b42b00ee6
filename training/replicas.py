"""Replica consistency of the values table: every rank must hold the same bits."""
from __future__ import annotations

import torch
import torch.distributed as dist


def row_checksums(values: torch.Tensor) -> torch.Tensor:
    """Per-row int64 sums of the raw bits: any changed bit changes its row's sum (N numbers, not N*d)."""
    bits = values.detach().contiguous().view(torch.int32 if values.element_size() == 4 else torch.int16)
    return bits.to(torch.int64).sum(dim=1)


def diverged_rows(values: torch.Tensor) -> int:
    """Rows whose bits differ between ranks (all-reduce MAX and MIN of the row checksums); 0 if one rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return 0
    sums = row_checksums(values)
    hi, lo = sums.clone(), sums.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return int((hi != lo).sum())


class ReplicaDivergence(RuntimeError):
    pass


def check_replicas(values: torch.Tensor | None, *, step: int) -> None:
    if values is None:
        return
    bad = diverged_rows(values)
    if bad:
        raise ReplicaDivergence(f"the replicated memory values table differs between ranks in {bad} rows at step "
                                f"{step}; stopping (the last checkpoint is consistent). This means a gradient "
                                "reached the table outside the sparse_update row sync")
