"""Build the model on meta, add LoRA if the method needs it, set what trains, shard it through the
strategy seam and materialise it deterministically: shared by the trainer and recipes/evaluate.py."""
from __future__ import annotations

from typing import Callable

import torch

from model import build_model
from training.lora import apply_lora, init_lora_tensor_
from training.parallel import build_strategy


def build_parallel_model(config, dist_info, *, set_trainable: Callable[[torch.nn.Module, set[str]], None]):
    """Returns (strategy, lora parameter names). `set_trainable(model, lora_names)` sets requires_grad
    before sharding (FSDP2 keeps the flags)."""
    model = build_model(config.model_config(), device="meta")
    lora_names = set(apply_lora(model, rank=config.lora.rank, alpha=config.lora.alpha)) \
        if config.stage == "finetune" and config.method == "lora" else set()
    set_trainable(model, lora_names)
    strategy = build_strategy(config.strategy, model, values=model.memory_values, dist_info=dist_info,
                              config=config)

    def init_fn(name: str, tensor: torch.Tensor, gen: torch.Generator) -> None:
        if not init_lora_tensor_(name, tensor, gen):
            model.init_tensor_(name, tensor, gen)
    strategy.materialize(init_fn, config.seed)
    return strategy, lora_names
