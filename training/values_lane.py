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
                 *, lr_mult: float) -> None:
        self.values, self.optimizer, self.finetuner, self.lr_mult = values, optimizer, finetuner, lr_mult
        finetuner.attach(optimizer)     # mask + row sync run as the optimizer's step pre-hook

    def grad_sq_norm(self) -> float:
        """The squared norm of what the step will apply (selected rows, averaged over ranks): the same on
        every rank. Collective when distributed: every rank calls it."""
        return self.finetuner.grad_sq_norm()

    def step(self, *, lr: float, clip_coef: float = 1.0) -> None:
        """Scale by the global clip coefficient, set the lane's lr, step (the pre-hook masks and syncs), clear."""
        if clip_coef < 1.0 and self.values.grad is not None:
            self.values.grad.mul_(clip_coef)      # already synced: grad_sq_norm ran to compute the coefficient
        for group in self.optimizer.param_groups:
            group["lr"] = lr * self.lr_mult
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
