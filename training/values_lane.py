"""The memory values table's own optimisation lane, beside the strategy's dense parameters.

The table is replicated and never handed to FSDP2 or DeepSpeed: it has its own optimizer (plain SGD for the
value-row methods, AdamW when pretraining or finetuning everything), its own lr (optim.lr x
optim.values_lr_mult), its share of the global gradient-clip norm and its own checkpoint state. Masking to the
selected rows and averaging those rows over ranks happen in the SparseMemoryFinetuner's optimizer pre-hook
(the mechanism of the paper and the reference). Only when a clip coefficient is needed before the step does
`grad_sq_norm` have the finetuner do that same sync early (the hook then finds it done); otherwise
`step(measure_norm=True)` reads the applied gradient's norm from a second pre-hook, right after the sync, as a
device tensor (no early sync, no host sync).
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
        # registered after the finetuner's, so it runs after the mask + sync (pre-hooks run in order)
        optimizer.register_step_pre_hook(self._read_applied_norm)
        self._measure = False
        self.applied_sq_norm: torch.Tensor | None = None

    def grad_sq_norm(self) -> float:
        """The squared norm of what the step will apply (selected rows, averaged over ranks): the same on
        every rank. Syncs the rows now (early) and waits for the host: call it only when the value is needed
        before the step (a clip coefficient). Collective when distributed: every rank calls it."""
        return self.finetuner.grad_sq_norm()

    def step(self, *, lr: float, clip_coef: float = 1.0, measure_norm: bool = False) -> int:
        """Scale by the global clip coefficient, set the lane's lr, step (the pre-hook masks and syncs), clear;
        then bound the moved rows' norms (max_row_norm > 0). Returns how many rows the bound scaled back.
        `measure_norm`: leave the squared norm of the gradient the step applied in `applied_sq_norm` (a 0-dim
        float64 device tensor, read after the pre-hook's sync; None when not measured)."""
        if clip_coef < 1.0 and self.values.grad is not None:
            self.values.grad.mul_(clip_coef)      # already synced: grad_sq_norm ran to compute the coefficient
        for group in self.optimizer.param_groups:
            group["lr"] = lr * self.lr_mult
        bounded = self.max_row_norm > 0
        rows = self._movable_rows() if bounded else None
        before = self._norms(rows) if bounded else None
        self._measure, self.applied_sq_norm = measure_norm, None
        try:
            self.optimizer.step()
        finally:
            self._measure = False
        self.optimizer.zero_grad(set_to_none=True)
        return self._bound_rows(rows, before) if bounded else 0

    def _read_applied_norm(self, optimizer, args, kwargs) -> None:
        if self._measure:
            self.applied_sq_norm = self.finetuner.masked_grad_sq_norm()

    def _movable_rows(self) -> torch.Tensor | None:
        """The rows this step may move: with plain SGD the finetuner's selection (nothing else moves); None =
        every row (AdamW: its moments move unread rows too)."""
        if isinstance(self.optimizer, torch.optim.SGD) and self.finetuner.args.enabled:
            return self.finetuner.trainable_indices
        return None

    @torch.no_grad()
    def _norms(self, rows: torch.Tensor | None) -> torch.Tensor:
        table = self.values.detach()
        return (table if rows is None else table[rows]).float().norm(dim=1)

    @torch.no_grad()
    def _bound_rows(self, rows: torch.Tensor | None, before: torch.Tensor) -> int:
        """Scale each moved row whose norm grew past max(max_row_norm, its norm before) back to that bound;
        only those rows are written."""
        after = self._norms(rows)
        bound = before.clamp(min=self.max_row_norm)
        over = (after > bound).nonzero().flatten()
        if over.numel() == 0:
            return 0
        table = self.values.detach()
        idx = over if rows is None else rows[over]
        table[idx] = (table[idx].float() * (bound[over] / after[over])[:, None]).to(table.dtype)
        return int(over.numel())
