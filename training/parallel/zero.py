"""DeepSpeed ZeRO stage 1/2/3 behind the strategy seam; the values table stays outside the engine.

Why outside: ZeRO 1-3 wrap the optimizer, so torch optimizer hooks never see an engine parameter, and
sparse gradients fail at stages 1-3 (DESIGN.md section 4). The table is removed from the module's
registered parameters and kept as a plain attribute (`model.memory_values` still resolves, so forward
is unchanged); DeepSpeed never sees it, so it is neither partitioned nor reduced at any stage. The
trainer gives it its own optimizer with the sparse_update mask + row-sync hook, exactly as under FSDP2.

Life cycle (the order trainer.py calls the seam in):
  materialize     full, deterministic per-parameter init on every rank (same tensors as FSDP2)
  setup_optimizer builds the engine: `deepspeed.initialize(model, optimizer=<torch optimizer of the
                  trainable engine parameters>)`. ZeRO-3 partitions the parameters here. With nothing
                  trainable in the engine (sparse, tf_only, memory_all, background) ZeRO-3 runs without
                  an optimizer (it still gathers parameters in forward/backward); ZeRO-1/2 need an
                  optimizer, and with nothing to optimise they have nothing to partition, so the engine
                  is built at stage 0 (replicated weights, exactly what ZeRO-1/2 would hold).
  load            model weights from any checkpoint's DCP model entries (FSDP2's or ours); on resume of
                  an engine with an optimizer, DeepSpeed's own checkpoint (fp32 master partitions and
                  optimizer state).

Gradient clipping is the seam's, not DeepSpeed's: the trainer combines `grad_norm_sq()` (the engine's
reduced gradient partitions) with the values table's norm and passes one coefficient, which `step`
applies to the partitions before the ZeRO optimizer steps — the same rule as FSDP2. A DeepSpeed config
with `gradient_clipping` > 0 is rejected (it would clip the engine by its own norm only).

Checkpoint layout of `<ckpt>/sharded/`:
  .metadata, *.distcp   torch.distributed.checkpoint of the model weights ("model.<name>", full shapes,
                        row-sharded across ranks): the same keys FSDP2 writes, so `init_from` works from
                        and to either strategy
  deepspeed/engine/     engine.save_checkpoint (only when the engine has an optimizer)
DeepSpeed's files are torch.save pickles; they are read back with `weights_only=True` (the restricted
unpickler, with the few DeepSpeed classes they hold allow-listed), never with full unpickling.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

VALUES_KEY = "memory_values"
DS_SUBDIR = "deepspeed"
DS_TAG = "engine"
LOAD_BUDGET_BYTES = 1 << 30   # full tensors read per DCP round when loading model weights
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "deepspeed"


def load_deepspeed_config(path: str, stage: int) -> dict[str, Any]:
    """The DeepSpeed JSON for `stage` (default recipes/configs/deepspeed/zero{stage}.json), validated."""
    file = Path(path) if path else DEFAULT_CONFIG / f"zero{stage}.json"
    if not file.is_file():
        raise ValueError(f"config key 'deepspeed_config': {file} does not exist")
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"config key 'deepspeed_config': {file} is not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"config key 'deepspeed_config': {file} must hold a JSON object")
    zero = cfg.setdefault("zero_optimization", {})
    if int(zero.get("stage", stage)) != stage:
        raise ValueError(f"config key 'deepspeed_config': {file} sets zero_optimization.stage="
                         f"{zero['stage']} but --strategy=zero{stage}; use the matching file")
    zero["stage"] = stage
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise ValueError(f"config key 'deepspeed_config': {file} has a '{key}' section; the optimizer and "
                             "lr schedule come from the job config (optim.*), remove it")
    if float(cfg.get("gradient_clipping", 0.0)) > 0:
        raise ValueError(f"config key 'deepspeed_config': {file} sets gradient_clipping; clipping covers the "
                         "engine and the values table together, set --optim.grad_clip instead")
    if "sparse_gradients" in cfg:
        raise ValueError(f"config key 'deepspeed_config': {file} has 'sparse_gradients', which DeepSpeed "
                         "rejects; the values table's sparse gradients are handled outside the engine")
    # The loop feeds batches itself and steps once per batch: one micro-batch per step.
    if int(cfg.get("gradient_accumulation_steps", 1)) != 1:
        raise ValueError(f"config key 'deepspeed_config': {file} sets gradient_accumulation_steps; the loop "
                         "steps once per batch, remove it (use a larger data.batch_size)")
    cfg.pop("train_batch_size", None)
    cfg["train_micro_batch_size_per_gpu"] = 1
    cfg["gradient_accumulation_steps"] = 1
    cfg["gradient_clipping"] = 0.0
    cfg["zero_allow_untested_optimizer"] = True
    return cfg


def _safe_checkpoint_engine(base_cls):
    """DeepSpeed's torch checkpoint engine, reading with the restricted unpickler (weights_only=True)."""

    class SafeTorchCheckpointEngine(base_cls):
        def load(self, path: str, map_location=None):
            from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
            from deepspeed.runtime.zero.config import ZeroStageEnum
            from deepspeed.utils.tensor_fragment import fragment_address
            allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    return SafeTorchCheckpointEngine


class ZeroStrategy:
    def __init__(self, model: nn.Module, *, values: nn.Parameter | None, dist_info, stage: int, config) -> None:
        if stage not in (1, 2, 3):
            raise ValueError(f"config key 'strategy': ZeRO stage must be 1, 2 or 3, got {stage}")
        if not dist_info.distributed:
            raise ValueError(f"config key 'strategy': zero{stage} needs a process group; launch with torchrun "
                             "(--nproc_per_node=1 for one process) or use --strategy=fsdp2")
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if dist_info.device.type == "cuda" else "cpu")
        self.dist_info = dist_info
        self.stage = stage
        self.ds_config = load_deepspeed_config(getattr(config, "deepspeed_config", "") or "", stage)
        self.model = model
        self.module: nn.Module = model          # the engine once setup_optimizer has built it
        self.engine = None
        self.optimizer: torch.optim.Optimizer | None = None   # the torch optimizer the engine wraps
        self.params: list[nn.Parameter] = []
        self._mesh = None
        # Take the values table out of the module before DeepSpeed sees it: a plain attribute is still
        # found by `self.memory_values` in forward, but is not in parameters() / state_dict().
        self.values = values
        self._values_requires_grad = bool(values.requires_grad) if values is not None else False
        if values is not None:
            registered = model._parameters.get(VALUES_KEY)
            assert registered is values, "values must be the model's registered memory_values parameter"
            del model._parameters[VALUES_KEY]
            model.__dict__[VALUES_KEY] = values

    # ---- weights -------------------------------------------------------------------------------
    @torch.no_grad()
    def materialize(self, init_fn: Callable[[str, torch.Tensor, torch.Generator], None], seed: int) -> None:
        """Full-size deterministic init on every rank, from the same per-parameter generators as FSDP2
        (ZeRO-3 partitions the tensors when the engine is built)."""
        from model import Transformer
        device = self.dist_info.device
        self.model.to_empty(device=device)
        for name, param in self.model.named_parameters():
            init_fn(name, param.data, Transformer.param_generator(seed, name, device))
        for module in self.model.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.reset_running_stats()
        if self.values is not None:
            old = self.values
            values = nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device=device),
                                  requires_grad=self._values_requires_grad)
            init_fn(VALUES_KEY, values.data, Transformer.param_generator(seed, VALUES_KEY, device))
            self.model.__dict__[VALUES_KEY] = values
            self.values = values

    # ---- the engine ----------------------------------------------------------------------------
    def setup_optimizer(self, params: list[nn.Parameter], factory: Callable[[list], torch.optim.Optimizer]) -> None:
        import deepspeed
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(logging.WARNING)     # one console line per step is ours; DeepSpeed's INFO is noise
        self.params = [p for p in params if p is not self.values]
        self.optimizer = factory(self.params) if self.params else None
        cfg = copy.deepcopy(self.ds_config)
        if self.optimizer is None and self.stage < 3:
            cfg["zero_optimization"]["stage"] = 0    # ZeRO-1/2 require an optimizer; see the module doc
        engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=self.optimizer, config=cfg,
                                               dist_init_required=False)
        if getattr(engine, "checkpoint_engine", None) is not None:
            engine.checkpoint_engine.__class__ = _safe_checkpoint_engine(type(engine.checkpoint_engine))
        assert VALUES_KEY not in dict(engine.module.named_parameters()), "values table leaked into the engine"
        assert self.values is None or not hasattr(self.values, "ds_id"), "ZeRO-3 partitioned the values table"
        self.engine = engine
        self.module = engine

    @property
    def _zero_optimizer(self):
        """DeepSpeed's ZeRO optimizer (None without trainable engine parameters)."""
        return self.engine.optimizer if self.engine is not None and self.optimizer is not None else None

    # ---- optimisation --------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        if self._zero_optimizer is not None:
            self.engine.backward(loss)      # reduce-scatters the gradients into this rank's partitions
        else:
            loss.backward()                 # only the values table has gradients; ZeRO-3 hooks still gather

    def _grad_partitions(self) -> list[torch.Tensor]:
        """This rank's reduced (averaged) gradient partitions, after backward and before step.
        Stages 1-3 keep them in `averaged_gradients`: {group: [tensor per parameter slice]}."""
        opt = self._zero_optimizer
        if opt is None:
            return []
        out = []
        for group in getattr(opt, "averaged_gradients", {}).values():
            if group is not None:
                out.extend(g for g in group if g is not None)
        return out

    def grad_norm_sq(self) -> float:
        total = torch.zeros((), dtype=torch.float64)
        for g in self._grad_partitions():
            total += g.detach().double().pow(2).sum().cpu()
        if self.dist_info.distributed and self._zero_optimizer is not None:
            total = total.to(self.dist_info.device)
            dist.all_reduce(total)     # the partitions tile each parameter once: squares add up
        return float(total.item())

    def step(self, *, clip_coef: float, lr: float) -> None:
        if self._zero_optimizer is None:
            return
        if clip_coef < 1.0:
            for g in self._grad_partitions():
                g.mul_(clip_coef)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()              # steps the partitions, gathers the weights, zeroes the grads

    # ---- checkpoints ---------------------------------------------------------------------------
    def _named_params(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.model.named_parameters())

    def _device_mesh(self):
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh
            self._mesh = init_device_mesh(self.dist_info.device.type, (self.dist_info.world_size,))
        return self._mesh

    def _gathered(self, params: list[nn.Parameter], *, modifier_rank: int | None = None):
        import contextlib
        if self.engine is None or self.stage < 3:
            return contextlib.nullcontext()
        import deepspeed
        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)

    @torch.no_grad()
    def _model_state(self) -> dict[str, torch.Tensor]:
        """The weights as FSDP2 writes them: full shapes, dim 0 sharded across ranks (DTensor), so each
        rank holds 1/world of the model plus one gathered parameter at a time (ZeRO-3)."""
        if not self.dist_info.distributed:
            return {name: p.detach() for name, p in self._named_params()}
        from torch.distributed.tensor import DTensor, Shard
        mesh = self._device_mesh()
        rank, world = self.dist_info.rank, self.dist_info.world_size
        state = {}
        for name, p in self._named_params():
            with self._gathered([p]):
                full = p.detach()
                rows = full.shape[0] if full.dim() else 1
                size = math.ceil(rows / world)
                local = full.reshape(rows, -1)[rank * size:min((rank + 1) * size, rows)]
                local = local.reshape((local.shape[0],) + tuple(full.shape[1:])).clone()
                state[name] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False,
                                                 shape=full.shape, stride=full.stride())
        return state

    def save(self, path: str) -> None:
        dcp.save({"model": self._model_state()}, checkpoint_id=path)
        if self._zero_optimizer is not None:
            self.engine.save_checkpoint(str(Path(path) / DS_SUBDIR), tag=DS_TAG, client_state={},
                                        save_latest=False)

    def load(self, path: str, *, model_only: bool, allow_missing: Callable[[str], bool] = lambda k: False) -> None:
        ds_dir = Path(path) / DS_SUBDIR
        if not model_only and self._zero_optimizer is not None:
            if not (ds_dir / DS_TAG).is_dir():
                raise ValueError(f"checkpoint {path} has no DeepSpeed engine state ({ds_dir / DS_TAG}); it was not "
                                 "written by this strategy and method — resume with the run's own strategy")
            load_path, _ = self.engine.load_checkpoint(str(ds_dir), tag=DS_TAG, load_optimizer_states=True,
                                                       load_lr_scheduler_states=False)
            if load_path is None:
                raise ValueError(f"checkpoint {ds_dir / DS_TAG}: DeepSpeed could not load it; delete this "
                                 "checkpoint to resume from an earlier one")
            return
        self._load_model_weights(path, allow_missing)

    @torch.no_grad()
    def _load_model_weights(self, path: str, allow_missing: Callable[[str], bool]) -> None:
        """Read "model.<name>" full tensors (DCP, any strategy's layout) into the engine's parameters,
        a bounded number of bytes per round, then refresh the ZeRO optimizer's fp32 master partitions."""
        from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
        stored = FileSystemReader(path).read_metadata().state_dict_metadata
        named = [(n, p) for n, p in self._named_params()]
        missing = [n for n, _ in named if f"model.{n}" not in stored]
        if [n for n in missing if not allow_missing(n)]:
            raise ValueError(f"checkpoint {path} lacks model weights {missing[:3]}...; was it written for "
                             "another model config?")
        todo = [(n, p) for n, p in named if n not in missing]
        for n, p in todo:
            shape = tuple(stored[f"model.{n}"].size)
            if shape != tuple(getattr(p, "ds_shape", p.shape)):
                raise ValueError(f"checkpoint {path}: weight {n} has shape {shape}, the model has "
                                 f"{tuple(getattr(p, 'ds_shape', p.shape))}; use a checkpoint of the same model config")
        rounds: list[list[tuple[str, nn.Parameter]]] = [[]]
        used = 0
        for n, p in todo:
            size = math.prod(getattr(p, "ds_shape", p.shape)) * p.element_size()
            if rounds[-1] and used + size > LOAD_BUDGET_BYTES:
                rounds.append([])
                used = 0
            rounds[-1].append((n, p))
            used += size
        for group in rounds:
            full = {n: torch.empty(tuple(getattr(p, "ds_shape", p.shape)), dtype=p.dtype, device="cpu")
                    for n, p in group}
            dcp.load({"model": full}, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))
            params = [p for _, p in group]
            # ZeRO-3: every rank read the same tensors; rank 0 writes them, GatheredParameters repartitions.
            with self._gathered(params, modifier_rank=0):
                if self.stage < 3 or self.engine is None or self.dist_info.rank == 0:
                    for n, p in group:
                        p.data.copy_(full[n].to(p.device))
        opt = self._zero_optimizer
        if opt is not None and hasattr(opt, "refresh_fp32_params"):
            opt.refresh_fp32_params()
