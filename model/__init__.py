"""Llama-style transformer with product-key memory layers (Lin et al. 2025; Berges et al. 2024)."""
from __future__ import annotations

from typing import Any

import torch

from model.config import PRESETS, MemoryConfig, ModelConfig, make_config, update_dataclass
from model.memory import ProductKeyMemory, product_key_topk
from model.transformer import VALUES_KEY, ModelOutput, Transformer

__all__ = ["VALUES_KEY", "build_model", "make_config", "ModelConfig", "MemoryConfig", "ModelOutput", "Transformer",
           "ProductKeyMemory", "product_key_topk", "PRESETS", "update_dataclass"]


def build_model(preset: str | ModelConfig, *, device: torch.device | str | None = None, seed: int = 0,
                **overrides: Any) -> Transformer:
    """Build a model from a preset name (or a ModelConfig) with field overrides.

    device="meta" builds without allocating (for sharded materialisation); any other device builds
    there and initialises deterministically from `seed`.
    """
    config = preset if isinstance(preset, ModelConfig) else make_config(preset, **overrides)
    with torch.device(device if device is not None else "cpu"):
        model = Transformer(config)
    if str(device) != "meta":
        model.init_weights(seed)
    return model
