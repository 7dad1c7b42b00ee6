"""Llama-style decoder (RMSNorm, RoPE, SwiGLU, SDPA) with product-key memory layers.

The model is plain nn.Modules: it knows nothing of FSDP, DeepSpeed or TF-IDF. It holds the one values
table (`memory_values`) and passes it to every memory layer at call time: its own registered parameter when
built alone, or a table it reads by reference (`use_values`) when a trainer owns the table.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig
from model.memory import ProductKeyMemory


VALUES_KEY = "memory_values"
"""The name of the one values table every memory layer reads (Transformer.memory_values)."""


@dataclass
class ModelOutput:
    logits: Tensor | None
    """(B, T, vocab) next-token logits; None from forward(reads_only=True)."""
    memory_indices: list[Tensor]
    """One LongTensor (B, T, heads*k) per memory layer; -1 at padded positions."""
    balance_loss: Tensor | None = None
    """With forward(balance_loss=True): the memory layers' mean sub-key load-balancing loss (1 = uniform)."""


def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, H, T, D); rotates interleaved pairs."""
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return rotated.to(x.dtype)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads: one fused projection whose output rows are the
    queries (n_heads x head_dim), then the keys and the values (n_kv_heads x head_dim each); each key/value
    head serves n_heads / n_kv_heads consecutive query heads."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.kv_heads
        self.head_dim = config.head_dim
        self.wqkv = nn.Linear(config.dim, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim,
                              bias=config.attn_qkv_bias)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None) -> Tensor:
        batch, seq, dim = x.shape
        qkv = self.wqkv(x)
        if self.n_kv_heads == self.n_heads:
            q, k, v = qkv.view(batch, seq, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = qkv.split([self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim,
                                 self.n_kv_heads * self.head_dim], dim=-1)
            q = q.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
            # each key/value head serves n_heads / n_kv_heads consecutive query heads
            k, v = (t.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
                    .repeat_interleave(self.n_heads // self.n_kv_heads, dim=1) for t in (k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.wo(y.transpose(1, 2).reshape(batch, seq, dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Attention, then the FFN; a memory block replaces the FFN by the memory (memory_mode "replace") or
    adds the memory's output beside it (memory_mode "parallel": h + ffn(norm(h)) + memory(norm(h)))."""

    def __init__(self, config: ModelConfig, *, use_memory: bool) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.memory = ProductKeyMemory(config.dim, config.memory) if use_memory else None
        keep_ffn = not use_memory or config.memory_mode == "parallel"
        self.feed_forward = FeedForward(config.dim, config.ffn_hidden) if keep_ffn else None

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None,
                values: Tensor | None, padding_mask: Tensor | None,
                balance: list[Tensor] | None = None) -> tuple[Tensor, Tensor | None]:
        h = h + self.attention(self.attention_norm(h), cos, sin, attn_mask)
        if self.memory is None:
            return h + self.feed_forward(self.ffn_norm(h)), None
        x = self.ffn_norm(h)
        out, indices = self.memory(x, values, padding_mask, balance)
        if self.feed_forward is not None:
            # (h + ffn) first: with a zero memory output the block is bit-identical to the dense one
            return h + self.feed_forward(x) + out, indices
        return h + out, indices


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        memory_layers = set(config.memory_layers)
        self.layers = nn.ModuleList(Block(config, use_memory=i in memory_layers) for i in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if memory_layers:
            m = config.memory
            self.memory_values = nn.Parameter(torch.empty(m.num_slots, m.value_dim))
        else:
            self.memory_values = None

    def forward(self, tokens: Tensor, padding_mask: Tensor | None = None, balance_loss: bool = False,
                reads_only: bool = False) -> ModelOutput:
        """`reads_only`: stop after the last memory block and return only its reads (memory_indices; logits None):
        all that background statistics and memory diagnostics use, bit for bit the same, without the blocks
        above the memory and the output layer (about half a forward for a mid-depth memory). Called through the
        module on every rank alike, as any forward."""
        batch, seq = tokens.shape
        if seq > self.config.max_seq_len:
            raise ValueError(f"sequence length {seq} exceeds model.max_seq_len={self.config.max_seq_len}")
        cos, sin = rope_tables(seq, self.config.head_dim, self.config.rope_theta, tokens.device)
        attn_mask = None
        if padding_mask is not None:
            padding_mask = padding_mask.bool()
            causal = torch.ones(seq, seq, dtype=torch.bool, device=tokens.device).tril()
            # Padded keys are invisible; every query sees itself so fully padded rows stay finite.
            attn_mask = (causal & padding_mask[:, None, None, :]) | torch.eye(seq, dtype=torch.bool,
                                                                              device=tokens.device)
        h = self.tok_embeddings(tokens)
        indices: list[Tensor] = []
        balance: list[Tensor] | None = [] if balance_loss else None
        last = max((i for i, layer in enumerate(self.layers) if layer.memory is not None), default=-1)
        for i, layer in enumerate(self.layers):
            if reads_only and i > last:
                break
            # Only memory blocks get the table: FSDP2 hooks every block's tensor inputs, and an unused
            # table input comes back from its backward hook as a dense N x d zero gradient per block.
            values = self.memory_values if layer.memory is not None else None
            h, idx = layer(h, cos, sin, attn_mask, values, padding_mask, balance)
            if idx is not None:
                indices.append(idx)
        aux = torch.stack(balance).mean() if balance else None
        if reads_only:
            return ModelOutput(logits=None, memory_indices=indices, balance_loss=aux)
        return ModelOutput(logits=self.output(self.norm(h)).float(), memory_indices=indices, balance_loss=aux)

    def use_values(self, table: Tensor | None) -> None:
        """Read `table` as the values table from now on, held by reference: a plain attribute, no longer a
        registered parameter. Module-wide machinery then never touches it: parameters(), state_dict(),
        to()/to_empty(), FSDP2 and DeepSpeed (ZeRO-3 partitions every registered parameter of the module it is
        given, with no way to leave one out). Its owner trains, syncs and saves it (training/build.py: the
        values lane's table, the same tensor the strategy and the finetuner get)."""
        delattr(self, VALUES_KEY)                      # the registered parameter (or an earlier table)
        object.__setattr__(self, VALUES_KEY, table)    # nn.Module.__setattr__ would register a Parameter again

    # ---- initialisation -------------------------------------------------------------------------
    def init_tensor_(self, name: str, tensor: Tensor, generator: torch.Generator) -> None:
        """Fill `tensor` (full shape of parameter `name`) with its initial value. The single source of
        init rules; strategies that shard parameters call it on full tensors and keep their shard."""
        if name.endswith("norm.weight") or name.endswith("query_norm.weight"):
            tensor.fill_(1.0)
        elif name.endswith(".bias"):
            tensor.zero_()
        elif name == "memory_values":
            m = self.config.memory
            std = m.value_init_std if m.value_init_std is not None else m.value_dim ** -0.5
            tensor.normal_(0.0, std, generator=generator)
        elif name.endswith("sub_keys"):
            tensor.normal_(0.0, (self.config.memory.k_dim // 2) ** -0.5, generator=generator)
        else:
            tensor.normal_(0.0, self.config.init_std, generator=generator)

    @staticmethod
    def param_generator(seed: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
        """A per-parameter generator: init does not depend on parameter order or sharding."""
        gen = torch.Generator(device=device)
        gen.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        return gen

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Initialise every parameter and buffer in place (after `to_empty` for meta-built models)."""
        for name, param in self.named_parameters():
            gen = self.param_generator(seed, name, param.device)
            self.init_tensor_(name, param.data, gen)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.reset_running_stats()

    def num_params(self) -> dict[str, int]:
        """Parameter counts: memory values, other memory-layer params, and the dense rest."""
        values = self.memory_values.numel() if self.memory_values is not None else 0
        memory_other = sum(p.numel() for layer in self.layers if layer.memory is not None
                           for p in layer.memory.parameters())
        total = sum(p.numel() for p in self.parameters())
        return {"total": total, "memory_values": values, "memory_other": memory_other,
                "dense": total - values - memory_other}
