"""FSDP2: `fully_shard` per block and at the root.

The values table is not a parameter of the module (training/build.py creates it and the model reads it by
reference, `Transformer.use_values`), so it is neither sharded nor gradient-reduced: it stays a replicated plain
tensor and the sparse_update hook syncs its selected rows (DESIGN.md section 4).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor, distribute_tensor


class FSDP2Strategy:
    def __init__(self, model: nn.Module, *, values: nn.Parameter | None, dist_info) -> None:
        assert values is None or all(p is not values for p in model.parameters()), \
            "the values table must be outside the module (Transformer.use_values, training/build.py)"
        self.dist_info = dist_info
        self.values = values
        self.optimizer: torch.optim.Optimizer | None = None
        if dist_info.distributed:
            from torch.distributed.fsdp import fully_shard
            for block in model.layers:
                fully_shard(block)
            fully_shard(model)
        self.module = model

    # ---- weights -------------------------------------------------------------------------------
    @torch.no_grad()
    def materialize(self, init_fn: Callable[[str, torch.Tensor], None]) -> None:
        """Allocate this rank's shards and fill them from full-size per-parameter tensors (`init_fn(name,
        full)`), so the initial model is the same for every world size (one parameter is full-size at a time)."""
        device = self.dist_info.device
        # Without fully_shard (one process), to_empty makes one new parameter per module, which unties shared
        # weights (tie_embeddings): note the aliases first and tie them again after (fully_shard keeps them tied)
        first: dict[int, str] = {}
        tied: list[tuple[str, str]] = []
        for name, param in self.module.named_parameters(remove_duplicate=False):
            canonical = first.setdefault(id(param), name)
            if canonical != name:
                tied.append((name, canonical))
        self.module.to_empty(device=device)
        for alias, canonical in tied:
            owner, _, attr = alias.rpartition(".")
            if self.module.get_parameter(alias) is not self.module.get_parameter(canonical):
                setattr(self.module.get_submodule(owner), attr, self.module.get_parameter(canonical))
        for name, param in self.module.named_parameters():
            full = torch.empty(param.shape, dtype=param.dtype, device=device)
            init_fn(name, full)
            if isinstance(param, DTensor):
                shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
                param.to_local().copy_(shard.to_local())
            else:
                param.copy_(full)
        for module in self.module.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.reset_running_stats()

    # ---- optimisation --------------------------------------------------------------------------
    def setup_optimizer(self, params: list[nn.Parameter], factory: Callable[[list], torch.optim.Optimizer]) -> None:
        self.params = [p for p in params if p is not self.values]
        self.optimizer = factory(self.params) if self.params else None

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def grad_norm_sq(self) -> float:
        total = torch.zeros((), dtype=torch.float64, device=self.dist_info.device)
        for p in getattr(self, "params", []):
            if p.grad is None:
                continue
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            total += g.double().pow(2).sum()
        if self.dist_info.distributed:
            dist.all_reduce(total)     # the shards partition each parameter: sum of squares adds up
        return float(total.item())

    def step(self, *, clip_coef: float, lr: float) -> None:
        if self.optimizer is None:
            return
        if clip_coef < 1.0:
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(clip_coef)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ---- checkpoints (DCP; the values table is saved by the caller) ----------------------------
    _OPTS = StateDictOptions(full_state_dict=False, cpu_offload=False)

    def _model_state(self) -> dict[str, Any]:
        return get_model_state_dict(self.module, options=self._OPTS)

    def save(self, path: str) -> None:
        state: dict[str, Any] = {"model": self._model_state()}
        if self.optimizer is not None:
            state["optim"] = get_optimizer_state_dict(self.module, self.optimizer, options=self._OPTS)
        dcp.save(state, checkpoint_id=path)

    def load(self, path: str, *, model_only: bool, allow_missing: Callable[[str], bool] = lambda k: False) -> None:
        from training import safe_dcp
        state: dict[str, Any] = {"model": self._model_state()}
        with_optim = not model_only and self.optimizer is not None
        if with_optim:
            state["optim"] = get_optimizer_state_dict(self.module, self.optimizer, options=self._OPTS)
        stored = safe_dcp.stored_keys(path)
        missing = [k for k in state["model"] if f"model.{k}" not in stored]
        if [k for k in missing if not allow_missing(k)]:
            raise ValueError(f"checkpoint {path} lacks model weights {missing[:3]}...; was it written for "
                             "another model config?")
        for k in missing:
            state["model"].pop(k)
        safe_dcp.check_shapes(path, {f"model.{k}": tuple(v.shape) for k, v in state["model"].items()
                                     if hasattr(v, "shape")})
        safe_dcp.load(state, path)
        set_model_state_dict(self.module, state["model"], options=StateDictOptions(strict=False))
        if with_optim:
            set_optimizer_state_dict(self.module, self.optimizer, state["optim"], options=self._OPTS)
