"""The memory values table's own optimisation lane, beside the strategy's dense parameters.

The table is replicated and never handed to FSDP2 or DeepSpeed: it has its own optimizer (plain SGD for the
value-row methods, AdamW when pretraining or finetuning everything), its own lr (optim.lr x
optim.values_lr_mult), its share of the global gradient-clip norm and its own checkpoint state. Masking to the
selected rows and averaging those rows over ranks happen in the SparseMemoryFinetuner's optimizer pre-hook
(the mechanism of the paper and the reference); when a clip norm is needed first, `grad_sq_norm` has the
finetuner do that same sync early, and the hook then finds it done.
"""
from __future__ import annotations

import torch
from torch import nn

from sparse_update import SparseMemoryFinetuner


class ValuesLane:
    def __init__(self, values: nn.Parameter, optimizer: torch.optim.Optimizer, finetuner: SparseMemoryFinetuner,
                 *, lr_mult: float, max_row_norm: float = 0.0) -> None:
        self.values, self.optimizer, self.finetuner, self.lr_mult = values, optimizer, finetuner, lr_mult
        self.max_row_norm = float(max_row_norm)
        finetuner.attach(optimizer)     # mask + row sync run as the optimizer's step pre-hook

    def grad_sq_norm(self) -> float:
        """The squared norm of what the step will apply (selected rows, averaged over ranks): the same on
        every rank. Collective when distributed: every rank calls it."""
        return self.finetuner.grad_sq_norm()

    def step(self, *, lr: float, clip_coef: float = 1.0) -> int:
        """Scale by the global clip coefficient, set the lane's lr, step (the pre-hook masks and syncs), clear;
        then bound the moved rows' norms (max_row_norm > 0). Returns how many rows the bound scaled back."""
        if clip_coef < 1.0 and self.values.grad is not None:
            self.values.grad.mul_(clip_coef)      # already synced: grad_sq_norm ran to compute the coefficient
        for group in self.optimizer.param_groups:
            group["lr"] = lr * self.lr_mult
        rows, before = self._rows_and_norms() if self.max_row_norm > 0 else (None, None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self._bound_rows(rows, before) if rows is not None else 0

    @torch.no_grad()
    def _rows_and_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows this step may move and their L2 norms before the step, in float32: with plain SGD the
        finetuner's selection (nothing else moves); with AdamW every row (its moments move unread rows too)."""
        sgd = isinstance(self.optimizer, torch.optim.SGD)
        selected = self.finetuner.trainable_indices if sgd and self.finetuner.args.enabled else None
        rows = selected if selected is not None else torch.arange(self.values.shape[0], device=self.values.device)
        return rows, self.values.detach()[rows].float().norm(dim=1)

    @torch.no_grad()
    def _bound_rows(self, rows: torch.Tensor, before: torch.Tensor) -> int:
        """Scale each moved row whose norm grew past max(max_row_norm, its norm before) back to that bound."""
        table = self.values.detach()
        after = table[rows].float().norm(dim=1)
        bound = before.clamp(min=self.max_row_norm)
        over = after > bound
        if not bool(over.any()):
            return 0
        scale = torch.where(over, bound / after, torch.ones_like(after))
        table[rows] = (table[rows].float() * scale[:, None]).to(table.dtype)
        return int(over.sum())
