"""DeepSpeed ZeRO stage 1/2/3 behind the strategy seam; the values table stays outside the engine.

Why outside: ZeRO 1-3 wrap the optimizer, so torch optimizer hooks never see an engine parameter, and
sparse gradients fail at stages 1-3 (DESIGN.md section 4). DeepSpeed takes every registered parameter of the
module it is given (ZeRO-3 partitions them all; there is no way to leave one out), so the table is not one:
training/build.py creates it and the model reads it by reference (`Transformer.use_values`, a plain attribute
that `self.memory_values` in forward finds). DeepSpeed never sees it, so no stage partitions, reduces or
checkpoints it. The trainer gives it its own optimizer with the sparse_update mask + row-sync hook and saves
it, exactly as under FSDP2.

Life cycle (the order trainer.py calls the seam in):
  materialize     deterministic init from the same per-parameter generators as FSDP2, so both
                  strategies start from the same bits. ZeRO-3 under a process group: one parameter at a
                  time is allocated full-size, initialised and handed to DeepSpeed's ZeRO-3 partitioning
                  (`deepspeed.zero.Init(module=...)` for the first, then that parameter's
                  `convert_to_zero_parameters`, as `deepspeed.initialize` itself converts a module), so a
                  rank never holds the whole model, only its partitions and one full parameter. ZeRO-1/2
                  replicate the weights anyway and materialise them whole (as does ZeRO-3 without a
                  process group, for one-process evaluation)
  setup_optimizer `deepspeed.initialize(model, optimizer=<torch optimizer of the trainable engine
                  parameters>)`; ZeRO-3 partitions the parameters here. With nothing trainable in the
                  engine (sparse, tf_only, memory_all, background) ZeRO-3 runs without an optimizer (it
                  still gathers parameters for forward and backward); ZeRO-1/2 refuse to run without
                  one and would have nothing to partition (they partition optimizer state and
                  gradients only), so that engine is built at stage 0: replicated weights, as ZeRO-1/2
                  would hold them.
  load            model weights from any checkpoint's DCP entries (FSDP2's or ours); on resume of an
                  engine with an optimizer, then DeepSpeed's own checkpoint (fp32 master partitions
                  and optimizer state).

Gradient clipping is the seam's, not DeepSpeed's: the trainer combines `grad_norm_sq()` (this rank's
reduced gradient partitions, all-reduced) with the values table's norm and passes one coefficient, which
`step` multiplies into the partitions before the ZeRO optimizer steps: the same rule as FSDP2. A
DeepSpeed config with `gradient_clipping` > 0 is rejected (DeepSpeed would clip the engine by its own
norm, without the values table).

Checkpoint layout of `<ckpt>/sharded/`:
  .metadata, *.distcp   torch.distributed.checkpoint of the model ("model.<name>": parameters, tied
                        duplicates and persistent buffers, full shapes, dim 0 split across ranks):
                        the keys FSDP2 writes, so `init_from` works from and to either strategy
  deepspeed/engine/     engine.save_checkpoint, when the engine has an optimizer (exact resume)
DeepSpeed's files are torch.save pickles: they are read with `weights_only=True` (the restricted
unpickler; the three DeepSpeed classes they hold are allow-listed), never fully unpickled.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

DS_SUBDIR = "deepspeed"
DS_TAG = "engine"
LOAD_BUDGET_BYTES = 1 << 30   # full tensors held per DCP read round when loading model weights


def load_deepspeed_config(path: str, stage: int) -> dict[str, Any]:
    """The DeepSpeed JSON at `path` (recipes/train.py fills in recipes/configs/deepspeed/zero{stage}.json when
    the config names none), validated and completed with what the loop requires (one micro-batch per step,
    no DeepSpeed clipping)."""
    if not path:
        raise ValueError(f"config key 'deepspeed_config' is empty: --strategy=zero{stage} needs a DeepSpeed JSON, "
                         f"e.g. --deepspeed_config=recipes/configs/deepspeed/zero{stage}.json")
    file = Path(path)
    where = f"config key 'deepspeed_config': {path}"
    if not file.is_file():
        raise ValueError(f"{where} does not exist")
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{where} must hold a JSON object")
    zero = cfg.setdefault("zero_optimization", {})
    if int(zero.get("stage", stage)) != stage:
        raise ValueError(f"{where} sets zero_optimization.stage={zero['stage']} but --strategy=zero{stage}; "
                         "use the matching file")
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise ValueError(f"{where} has an '{key}' section; the optimizer and lr schedule come from the job "
                             "config (optim.*): remove it")
    if float(cfg.get("gradient_clipping", 0.0)) > 0:
        raise ValueError(f"{where} sets gradient_clipping; clipping covers the engine and the values table "
                         "together: set --optim.grad_clip instead")
    if "sparse_gradients" in cfg:
        raise ValueError(f"{where} has 'sparse_gradients', which DeepSpeed rejects; the values table's sparse "
                         "gradients are handled outside the engine: remove it")
    if int(cfg.get("gradient_accumulation_steps", 1)) != 1:
        raise ValueError(f"{where} sets gradient_accumulation_steps; the loop steps once per batch: remove it "
                         "(use a larger data.batch_size)")
    for key in ("fp16", "bf16", "torch_autocast"):
        if isinstance(cfg.get(key), dict) and cfg[key].get("enabled"):
            raise ValueError(f"{where} enables {key}; the strategies train in fp32 (the values table, the "
                             "seam's gradient clipping and the FSDP2 equivalence assume it): remove it")
    for key in ("offload_optimizer", "offload_param"):
        if isinstance(zero.get(key), dict) and zero[key].get("device", "none") != "none":
            raise ValueError(f"{where} sets zero_optimization.{key}; offloading moves the gradient partitions the "
                             "seam clips, and is not supported: remove it")
    if cfg.get("checkpoint", {}).get("load_universal"):
        raise ValueError(f"{where} sets checkpoint.load_universal, which unpickles files; remove it")
    zero["stage"] = stage
    cfg.pop("train_batch_size", None)
    cfg.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, gradient_clipping=0.0,
               zero_allow_untested_optimizer=True)
    return cfg


def _safe_torch_load(path: str, map_location=None) -> Any:
    """DeepSpeed's checkpoint files through the restricted unpickler (no arbitrary code)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


class _RootOutputFilter(logging.Filter):
    """Drop ZeRO-3's warning that it cannot see the tensors inside the root module's ModelOutput.

    Those hooks would gather the root module's *own* parameters for backward; the Transformer root owns
    none (its submodules do, and the values table is outside the engine), so nothing is missed. The
    equivalence tests (the same losses as FSDP2 under ZeRO-3) check it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "ModelOutput" not in record.getMessage()


def _quiet_deepspeed() -> None:
    from deepspeed.utils import logger as ds_logger
    ds_logger.setLevel(logging.WARNING)     # the console line per step is ours; DeepSpeed's INFO is noise
    if not any(isinstance(f, _RootOutputFilter) for f in ds_logger.filters):
        ds_logger.addFilter(_RootOutputFilter())
    # DeepSpeed 0.19 calls c10d functions that torch 2.13 deprecates, warning on every call.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+`? is deprecated", category=FutureWarning)


class _EngineModule(nn.Module):
    """What the loop calls once the engine exists: the engine's forward, and the model's `config`
    (the engine's own `config` attribute is DeepSpeed's JSON, which evaluation would misread)."""

    def __init__(self, engine: nn.Module, model_config: Any) -> None:
        super().__init__()
        self.engine = engine
        self.config = model_config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)


class ZeroStrategy:
    def __init__(self, model: nn.Module, *, values: nn.Parameter | None, dist_info, stage: int, config) -> None:
        if stage not in (1, 2, 3):
            raise ValueError(f"config key 'strategy': ZeRO stage must be 1, 2 or 3, got {stage}")
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if dist_info.device.type == "cuda" else "cpu")
        self.dist_info = dist_info
        self.stage = stage
        self.ds_config = load_deepspeed_config(getattr(config, "deepspeed_config", "") or "", stage)
        self.model = model
        self.module: nn.Module = model      # _EngineModule once setup_optimizer has built the engine
        self.engine = None
        self.optimizer: torch.optim.Optimizer | None = None   # the torch optimizer the engine wraps
        self.params: list[nn.Parameter] = []
        self._mesh = None
        assert values is None or all(p is not values for p in model.parameters()), \
            "the values table must be outside the module (Transformer.use_values, training/build.py)"
        self.values = values

    # ---- weights -------------------------------------------------------------------------------
    @torch.no_grad()
    def materialize(self, init_fn: Callable[[str, torch.Tensor], None]) -> None:
        """Allocate and initialise the module (`init_fn(name, full)` per parameter); the values table is
        build.py's, already made."""
        device = self.dist_info.device
        if self.stage == 3 and self.dist_info.distributed:
            self._materialize_partitioned(init_fn)
            return
        # to_empty makes one new parameter per module, which unties shared weights (tie_embeddings):
        # note the aliases first and tie them again after
        first: dict[int, str] = {}
        tied: list[tuple[str, str]] = []
        for name, param in self.model.named_parameters(remove_duplicate=False):
            canonical = first.setdefault(id(param), name)
            if canonical != name:
                tied.append((name, canonical))
        self.model.to_empty(device=device)
        for alias, canonical in tied:
            owner, _, attr = alias.rpartition(".")
            setattr(self.model.get_submodule(owner), attr, self.model.get_parameter(canonical))
        for name, param in self.model.named_parameters():
            init_fn(name, param.data)
        for module in self.model.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.reset_running_stats()

    @torch.no_grad()
    def _materialize_partitioned(self, init_fn: Callable[[str, torch.Tensor], None]) -> None:
        """ZeRO-3: each meta parameter becomes a ZeRO-3 parameter holding only this rank's partition.
        A full-size tensor exists for one parameter at a time (initialised from its generator on every
        rank; DeepSpeed broadcasts rank 0's copy, the same bits, before partitioning). Tied parameters
        (every name of one Parameter) get the one new parameter."""
        import deepspeed
        _quiet_deepspeed()
        device = self.dist_info.device
        owners: dict[int, tuple[str, nn.Parameter, list[tuple[nn.Module, str]]]] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            owner, _, attr = name.rpartition(".")
            owners.setdefault(id(param), (name, param, []))[2].append((self.model.get_submodule(owner), attr))
        for module in self.model.modules():      # buffers are small: whole on every rank, as before
            for name, buf in list(module._buffers.items()):
                if buf is not None and buf.is_meta:
                    module._buffers[name] = torch.empty(buf.shape, dtype=buf.dtype, device=device)
            if isinstance(module, nn.BatchNorm1d):
                module.reset_running_stats()
        first: nn.Parameter | None = None
        for canonical, old, places in owners.values():
            full = torch.empty(old.shape, dtype=old.dtype, device=device)
            init_fn(canonical, full)
            param = nn.Parameter(full, requires_grad=old.requires_grad)
            del full
            for module, attr in places:
                module._parameters[attr] = param
            if first is None:
                holder = nn.Module()
                holder.register_parameter("param", param)
                deepspeed.zero.Init(module=holder, config_dict_or_path=copy.deepcopy(self.ds_config),
                                    dtype=param.dtype)
                first = param
            else:
                first.convert_to_zero_parameters(param_list=[param])
        assert all(hasattr(p, "ds_id") for p in self.model.parameters()), "a parameter escaped ZeRO-3 partitioning"

    # ---- the engine ----------------------------------------------------------------------------
    def setup_optimizer(self, params: list[nn.Parameter], factory: Callable[[list], torch.optim.Optimizer]) -> None:
        if not self.dist_info.distributed:   # (loading weights for evaluation works without one)
            raise ValueError(f"config key 'strategy': zero{self.stage} needs a process group; launch with "
                             "torchrun (--nproc_per_node=1 for one process) or use --strategy=fsdp2")
        import deepspeed
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
        _quiet_deepspeed()
        self.params = [p for p in params if p is not self.values]
        self.optimizer = factory(self.params) if self.params else None
        cfg = copy.deepcopy(self.ds_config)
        if self.optimizer is None and self.stage < 3:
            cfg["zero_optimization"]["stage"] = 0    # see the module doc
        engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=self.optimizer, config=cfg,
                                               dist_init_required=False)
        if self.optimizer is not None:
            if not isinstance(engine.checkpoint_engine, TorchCheckpointEngine):
                raise ValueError("config key 'deepspeed_config': only DeepSpeed's default (torch) checkpoint "
                                 "engine is supported; remove the checkpoint engine settings")
            engine.checkpoint_engine.load = _safe_torch_load
        assert all(p is not self.values for p in engine.module.parameters()), "values table inside the engine"
        assert not hasattr(self.values, "ds_id"), "ZeRO-3 took the values table"
        self.engine = engine
        self.module = _EngineModule(engine, getattr(self.model, "config", None))

    @property
    def _zero_optimizer(self):
        """DeepSpeed's ZeRO optimizer; None when the engine has nothing to train."""
        return self.engine.optimizer if self.engine is not None and self.optimizer is not None else None

    # ---- optimisation --------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        if self._zero_optimizer is not None:
            self.engine.backward(loss)      # averages the gradients into this rank's partitions
        else:
            loss.backward()                 # only the values table has gradients; ZeRO-3's hooks still gather

    def _grad_partitions(self) -> list[torch.Tensor]:
        """This rank's averaged gradient partitions between backward and step. Stages 1-3 keep them in
        `averaged_gradients` ({group: [one tensor per parameter slice]}); together the ranks' slices
        tile every trainable parameter exactly once."""
        opt = self._zero_optimizer
        if opt is None:
            return []
        return [g for group in opt.averaged_gradients.values() if group is not None for g in group if g is not None]

    def grad_norm_sq(self) -> float:
        if self._zero_optimizer is None:
            return 0.0
        total = torch.zeros((), dtype=torch.float64, device=self.dist_info.device)
        for g in self._grad_partitions():
            total += g.detach().double().pow(2).sum()
        dist.all_reduce(total)
        return float(total.item())

    def step(self, *, clip_coef: float, lr: float) -> None:
        if self._zero_optimizer is None:
            return
        if clip_coef < 1.0:
            for g in self._grad_partitions():
                g.mul_(clip_coef)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()              # steps the partitions, all-gathers the weights, zeroes the grads

    # ---- checkpoints ---------------------------------------------------------------------------
    def _named_tensors(self, *, with_duplicates: bool) -> list[tuple[str, torch.Tensor]]:
        """Parameters (tied ones under every name when `with_duplicates`) and persistent buffers: the
        keys of model.state_dict(), which are the keys FSDP2 checkpoints."""
        out: list[tuple[str, torch.Tensor]] = list(self.model.named_parameters(remove_duplicate=not with_duplicates))
        for prefix, module in self.model.named_modules():
            for name, buf in module.named_buffers(recurse=False):
                if buf is not None and name not in module._non_persistent_buffers_set:
                    out.append((f"{prefix}.{name}" if prefix else name, buf))
        return out

    def _gathered(self, tensors: list[torch.Tensor], *, modifier_rank: int | None = None):
        """ZeRO-3: the full parameters inside the block (and, with modifier_rank, that rank's writes
        re-partitioned on exit); otherwise the tensors are full already."""
        params = [t for t in tensors if hasattr(t, "ds_id")]
        if not params:
            return contextlib.nullcontext()
        import deepspeed
        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)

    @torch.no_grad()
    def _model_state(self) -> dict[str, torch.Tensor]:
        """DTensors split on dim 0 across ranks (FSDP2's layout): each rank writes 1/world of every
        weight and, under ZeRO-3, holds one gathered parameter at a time. 0-d tensors are replicated."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard
        if self._mesh is None:
            self._mesh = init_device_mesh(self.dist_info.device.type, (self.dist_info.world_size,))
        rank, world = self.dist_info.rank, self.dist_info.world_size
        state: dict[str, torch.Tensor] = {}
        for name, tensor in self._named_tensors(with_duplicates=True):
            with self._gathered([tensor]):
                full = tensor.detach()
                if full.dim() == 0:
                    state[name] = full.clone()
                    continue
                size = math.ceil(full.shape[0] / world)
                local = full[rank * size:(rank + 1) * size].clone()
            state[name] = DTensor.from_local(local, self._mesh, [Shard(0)], run_check=False,
                                             shape=full.shape, stride=full.stride())
        return state

    def save(self, path: str) -> None:
        dcp.save({"model": self._model_state()}, checkpoint_id=path)
        if self._zero_optimizer is not None:
            self.engine.save_checkpoint(str(Path(path) / DS_SUBDIR), tag=DS_TAG, client_state={},
                                        save_latest=False)

    def load(self, path: str, *, model_only: bool, allow_missing: Callable[[str], bool] = lambda k: False) -> None:
        # The DCP weights first, always: they hold every weight, frozen ones included, whatever the
        # engine checkpoint covers; then the engine's own state (fp32 masters, optimizer) on resume.
        self._load_model_weights(path, allow_missing)
        if model_only or self._zero_optimizer is None:
            return
        ds_dir = Path(path) / DS_SUBDIR
        if not (ds_dir / DS_TAG).is_dir():
            raise ValueError(f"checkpoint {path} has no DeepSpeed engine state ({ds_dir / DS_TAG}); resume a run "
                             "with the strategy and method that wrote it")
        load_path, _ = self.engine.load_checkpoint(str(ds_dir), tag=DS_TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        if load_path is None:
            raise ValueError(f"checkpoint {ds_dir / DS_TAG}: DeepSpeed could not read it; delete this checkpoint "
                             "to resume from an earlier one")

    @torch.no_grad()
    def _load_model_weights(self, path: str, allow_missing: Callable[[str], bool]) -> None:
        """Full tensors of "model.<name>" (DCP, FSDP2's or our layout) into the model, at most
        LOAD_BUDGET_BYTES per read round; then the ZeRO optimizer's fp32 master partitions follow."""
        from training import safe_dcp    # the metadata is a pickle: never through the stock reader
        stored = safe_dcp.stored_shapes(path)
        named = self._named_tensors(with_duplicates=False)
        missing = [n for n, _ in named if f"model.{n}" not in stored]
        if [n for n in missing if not allow_missing(n)]:
            raise ValueError(f"checkpoint {path} lacks model weights {missing[:3]}...; was it written for "
                             "another model config?")
        todo = [(n, t, tuple(getattr(t, "ds_shape", t.shape))) for n, t in named if n not in missing]
        safe_dcp.check_shapes(path, {f"model.{n}": shape for n, _, shape in todo})
        rounds: list[list] = [[]]
        used = 0
        for item in todo:
            size = math.prod(item[2]) * item[1].element_size()
            if rounds[-1] and used + size > LOAD_BUDGET_BYTES:
                rounds.append([])
                used = 0
            rounds[-1].append(item)
            used += size
        for group in rounds:
            full = {n: torch.empty(shape, dtype=t.dtype) for n, t, shape in group}
            safe_dcp.load({"model": full}, path)
            tensors = [t for _, t, _ in group]
            # Every rank read the same full tensors. ZeRO-3: rank 0 writes them into the gathered
            # parameters and GatheredParameters re-partitions them on exit; otherwise every rank copies.
            with self._gathered(tensors, modifier_rank=0):
                for n, t, _ in group:
                    if not hasattr(t, "ds_id") or self.dist_info.rank == 0:
                        t.data.copy_(full[n].to(t.device))
        opt = self._zero_optimizer
        if opt is not None and hasattr(opt, "refresh_fp32_params"):
            opt.refresh_fp32_params()
