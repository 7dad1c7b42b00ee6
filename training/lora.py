"""LoRA on the attention and FFN matrices (Hu et al. 2021), written for FSDP2.

Why not peft: peft wraps modules and renames state-dict keys (`base_layer.weight`) and needs
`transformers`; here LoRALinear *is* an nn.Linear (same `weight` key), so base checkpoints load into a
LoRA model unchanged, and FSDP2 shards lora_A/lora_B like any other parameter.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LORA_TARGETS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


class LoRALinear(nn.Linear):
    """y = x W^T + (alpha / r) * x A^T B^T, with W frozen; B starts at zero so the model is unchanged."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float,
                 device: torch.device | None = None, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device)
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, device=device))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale


def apply_lora(model: nn.Module, *, rank: int, alpha: float) -> list[str]:
    """Replace the target Linears in place (works on meta); returns the names of the new parameters."""
    names = []
    for name, module in list(model.named_modules()):
        if not any(name.endswith(t) for t in LORA_TARGETS) or not isinstance(module, nn.Linear):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lora = LoRALinear(module.in_features, module.out_features, rank=rank, alpha=alpha,
                          device=module.weight.device, bias=module.bias is not None)
        lora.weight = module.weight
        if module.bias is not None:      # e.g. model.attn_qkv_bias (Qwen2): same `bias` key, frozen like the weight
            lora.bias = module.bias
        setattr(parent, child, lora)
        names += [f"{name}.lora_A", f"{name}.lora_B"]
    return names


def init_lora_tensor_(name: str, tensor: Tensor, generator: torch.Generator) -> bool:
    """Init rule for LoRA parameters; returns False for other names."""
    if name.endswith("lora_A"):
        bound = 1.0 / math.sqrt(tensor.shape[1])
        tensor.uniform_(-bound, bound, generator=generator)
        return True
    if name.endswith("lora_B"):
        tensor.zero_()
        return True
    return False
