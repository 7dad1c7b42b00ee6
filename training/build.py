"""Build the model on meta, add LoRA if the method needs it, set what trains, create the values table, shard the
rest through the strategy seam and materialise it deterministically: shared by the trainer and recipes/evaluate.py."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from model import VALUES_KEY, Transformer, build_model
from training.lora import apply_lora, init_lora_tensor_
from training.parallel import build_strategy


def init_fn_of(model: Transformer, seed: int) -> Callable[[str, torch.Tensor], None]:
    """`init_fn(name, tensor)`: the initial value of parameter `name` written into `tensor` (its full shape),
    from the parameter's own generator, so the bits depend neither on the strategy nor on the world size."""
    @torch.no_grad()
    def init_fn(name: str, tensor: torch.Tensor) -> None:
        gen = Transformer.param_generator(seed, name, tensor.device)
        if not init_lora_tensor_(name, tensor, gen):
            model.init_tensor_(name, tensor, gen)
    return init_fn


def values_table(model: Transformer, device: torch.device | str, seed: int) -> nn.Parameter | None:
    """The memory values table, created once: full size on `device` on every rank, initialised from its own
    generator (the same bits everywhere: replicated), trainable as `set_trainable` flagged it. The model reads it
    by reference (`Transformer.use_values`: no longer a registered parameter, so no strategy shards, reduces or
    checkpoints it, and DeepSpeed never sees it); the strategy and the finetuner get this same tensor."""
    meta = model.memory_values
    if meta is None:
        return None
    table = nn.Parameter(torch.empty(meta.shape, dtype=meta.dtype, device=device), requires_grad=meta.requires_grad)
    init_fn_of(model, seed)(VALUES_KEY, table.data)
    model.use_values(table)
    return table


def build_parallel_model(config, dist_info, *, set_trainable: Callable[[torch.nn.Module, set[str]], None]):
    """Returns (strategy, lora parameter names); `strategy.values` is the values table. `set_trainable(model,
    lora_names)` sets requires_grad before sharding (FSDP2 keeps the flags)."""
    model = build_model(config.model_config(), device="meta")
    lora_names = set(apply_lora(model, rank=config.lora.rank, alpha=config.lora.alpha)) \
        if config.stage == "finetune" and config.method == "lora" else set()
    set_trainable(model, lora_names)
    values = values_table(model, dist_info.device, config.seed)
    strategy = build_strategy(config.strategy, model, values=values, dist_info=dist_info, config=config)
    strategy.materialize(init_fn_of(model, config.seed))
    return strategy, lora_names
