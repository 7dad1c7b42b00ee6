"""One seam for every parallelism strategy; the training loop never branches on which one runs.

A strategy shards the module; the memory values table is not part of it (training/build.py creates the table
and the model reads it by reference): it stays a replicated plain tensor trained by the values lane with the
sparse_update hook (training/values_lane.py).
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn


class Strategy(Protocol):
    module: nn.Module
    """What the loop calls for the forward pass."""
    values: nn.Parameter | None
    """The replicated memory values table, as build.py made it (outside the module; the strategy leaves it be)."""

    def materialize(self, init_fn: Any) -> None:
        """Allocate the meta-built model on this rank (shards only); `init_fn(name, full_tensor)` initialises
        each parameter deterministically (build.init_fn_of: the parameter's own generator)."""

    def setup_optimizer(self, params: list[nn.Parameter], factory: Any) -> None:
        """Create the optimizer of the sharded/engine-managed trainable parameters (may be empty)."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def grad_norm_sq(self) -> float:
        """Squared global norm of the managed parameters' gradients."""

    def step(self, *, clip_coef: float, lr: float) -> None:
        """Scale gradients by clip_coef (<= 1), set the lr, step the managed optimizer, zero grads."""

    def save(self, path: str) -> None:
        """Write what the strategy manages (model, its optimizer) under `path`; every rank calls it."""

    def load(self, path: str, *, model_only: bool, allow_missing: Any = lambda key: False) -> None:
        """Read `path`; model_only reads the model weights of any strategy's checkpoint (init_from)."""


def build_strategy(name: str, model: nn.Module, *, values: nn.Parameter | None, dist_info, config) -> Strategy:
    if name == "fsdp2":
        from training.parallel.fsdp2 import FSDP2Strategy
        return FSDP2Strategy(model, values=values, dist_info=dist_info)
    if name in ("zero1", "zero2", "zero3"):
        from training.parallel.zero import ZeroStrategy
        return ZeroStrategy(model, values=values, dist_info=dist_info, stage=int(name[-1]), config=config)
    raise ValueError(f"config key 'strategy': unknown strategy '{name}'")
