"""Row operations on the values gradient: keep only the trainable rows, gather them, write them back.

`rows` is always a sorted, unique LongTensor on the gradient's device. Sparse gradients are COO tensors
with one sparse dimension (what `F.embedding_bag(sparse=True)` produces, uncoalesced: one entry per
lookup); dense gradients are [N, ...]. Sparse gradients are filtered *before* coalescing, so the cost is
one pass over the lookups plus a coalesce of only the kept entries.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _row_entries(grad: Tensor) -> tuple[Tensor, Tensor]:
    """(row id per entry, values [nnz, *row_shape]) of a sparse COO gradient, duplicates allowed."""
    if grad.sparse_dim() != 1:  # a fully sparse COO (not what embedding_bag makes): regroup by row
        grad = grad.coalesce().to_dense().to_sparse(sparse_dim=1)
    return grad._indices()[0], grad._values()


def _lookup(rows: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
    """Positions of `query` entries in sorted `rows`, and whether each entry is present."""
    if rows.numel() == 0:
        return torch.zeros_like(query), torch.zeros_like(query, dtype=torch.bool)
    pos = torch.searchsorted(rows, query)
    safe = pos.clamp(max=rows.numel() - 1)
    return safe, rows[safe] == query


def mask_rows(grad: Tensor, rows: Tensor, *, dense_output: bool) -> Tensor:
    """A copy of `grad` with every row outside `rows` dropped (sparse) or zeroed (dense).

    A sparse input gives a coalesced sparse output unless dense_output is True.
    """
    if grad.is_sparse:
        row_ids, values = _row_entries(grad)
        _, hit = _lookup(rows, row_ids)
        kept_ids, kept_vals = row_ids[hit], values[hit]
        if dense_output:
            out = torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device)
            out.index_add_(0, kept_ids, kept_vals)
            return out
        return torch.sparse_coo_tensor(
            kept_ids.unsqueeze(0), kept_vals, grad.shape, check_invariants=False
        ).coalesce()
    out = torch.zeros_like(grad)
    if rows.numel():
        out.index_copy_(0, rows, grad.index_select(0, rows))
    return out


def gather_rows_(out: Tensor, grad: Tensor, rows: Tensor) -> Tensor:
    """Fill `out` [len(rows), *row_shape] with grad[rows] (rows absent from a sparse grad are zero)."""
    if grad.is_sparse:
        row_ids, values = _row_entries(grad)
        pos, hit = _lookup(rows, row_ids)
        out.zero_()
        out.index_add_(0, pos[hit], values[hit].to(out.dtype))  # sums duplicate entries of a row
    elif rows.numel():
        out.copy_(grad.index_select(0, rows))
    return out


def rows_to_grad(values: Tensor, rows: Tensor, *, shape: torch.Size, sparse: bool) -> Tensor:
    """A gradient of `shape` whose only nonzero rows are `rows`, holding `values` [len(rows), *row_shape]."""
    if sparse:
        return torch.sparse_coo_tensor(
            rows.unsqueeze(0), values, shape, is_coalesced=True, check_invariants=False
        )
    out = torch.zeros(shape, dtype=values.dtype, device=values.device)
    out.index_copy_(0, rows, values)
    return out
