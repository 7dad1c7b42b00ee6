"""Per-rank memory plan of a finetune (or pretrain) step, computed from the real model built on the meta device
(nothing is allocated):

    python -m benchmarks.memory_plan --preset paper-1.3b --world_size 8 --strategy fsdp2|zero1|zero2|zero3
        [--dtype bf16|fp32] [--seq_len 64] [--batch 64] [--method sparse|memory_all|full] [--top_t 500]
        [--out plan.json]

Per rank, in bytes:
- dense parameters: everything except the values table, sharded as the strategy shards them.
  - FSDP2 shards every parameter on dim 0 (⌈rows / world⌉ rows per rank).
  - ZeRO-3 partitions the flat parameters evenly.
  - ZeRO-1/2 keep a full copy on every rank.
- FSDP2 all-gather: the root group (embeddings, final norm, output) plus the largest block, unsharded in
  the training dtype while it computes (no prefetch counted).
- dense gradients and AdamW state: only when the dense parameters train (`full`, pretraining).
  - The gradients are sharded by FSDP2, ZeRO-2 and ZeRO-3.
  - The optimizer state (two fp32 moments, plus an fp32 master copy when the dtype is bf16) is sharded by
    every strategy.
- the values table: replicated, exactly N × value_dim × bytes.
- the values gradient. Value-row methods: the COO gradient of `embedding_bag(sparse=True)` holds one row per
  lookup (tokens × heads × k per memory layer) until the finetuner masks it to the t selected rows. `full`
  (AdamW): a dense N × d gradient and two fp32 moments.
- activations, an estimate: Korthikanti et al. 2022 without recomputation, s·b·h·(34 + 5·a·s/h) bytes per
  layer at 16 bits (×2 in fp32). Plus the fp32 logits and their gradient, and each memory layer's indices
  and weights. The estimate ignores allocator fragmentation, communication buffers and the CUDA context.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from data_pipeline.atomic import atomic_write
from model import build_model

STRATEGIES = ("fsdp2", "zero1", "zero2", "zero3")
METHODS = ("sparse", "memory_all", "full")
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
GiB = 1 << 30


def plan(preset: str, *, world_size: int, strategy: str, dtype: str = "bf16", seq_len: int = 64, batch: int = 64,
         method: str = "sparse", top_t: int = 500) -> dict:
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    if world_size < 1 or seq_len < 1 or batch < 1 or top_t < 1:
        raise ValueError("--world_size, --seq_len, --batch and --top_t must be >= 1")
    model = build_model(preset, device="meta")
    c = model.config
    b = DTYPE_BYTES[dtype]
    values = model.memory_values
    dense = [(n, p) for n, p in model.named_parameters() if p is not values]
    dense_numel = sum(p.numel() for _, p in dense)

    # ---- dense parameters per rank
    if strategy == "fsdp2":
        per_rank = sum(math.ceil(p.shape[0] / world_size) * (p.numel() // max(p.shape[0], 1)) for _, p in dense)
    elif strategy == "zero3":
        per_rank = math.ceil(dense_numel / world_size)
    else:
        per_rank = dense_numel
    out: dict = {"dense_params": per_rank * b}
    if strategy == "fsdp2":
        root = sum(p.numel() for n, p in dense if not n.startswith("layers."))
        largest = max(sum(p.numel() for p in layer.parameters() if p is not values) for layer in model.layers)
        out["fsdp2_all_gather"] = (root + largest) * b

    # ---- dense gradients and optimizer state (only when they train)
    trains_dense = method == "full"
    grads_sharded = strategy in ("fsdp2", "zero2", "zero3")
    shard = math.ceil(dense_numel / world_size)
    out["dense_grads"] = ((shard if grads_sharded else dense_numel) * b) if trains_dense else 0
    out["dense_optimizer"] = (shard * (8 + (4 if dtype == "bf16" else 0))) if trains_dense else 0

    # ---- the replicated values table and its gradient
    n_slots, d = (values.shape if values is not None else (0, 0))
    out["values_table"] = n_slots * d * b
    tokens = math.ceil(batch / world_size) * seq_len            # this rank's share of the global batch
    lookups = tokens * c.memory.heads * c.memory.k * len(c.memory_layers)
    if method == "full":
        out["values_grad"] = n_slots * d * b
        out["values_optimizer"] = n_slots * d * (8 + (4 if dtype == "bf16" else 0))
        out["values_grad_before_mask"] = out["values_grad"]
    else:
        rows = min(top_t, n_slots) if method == "sparse" else min(lookups, n_slots)
        out["values_grad_before_mask"] = lookups * (d * b + 8)       # COO: a row and an int64 index per lookup
        out["values_grad"] = rows * (d * b + 8)
        out["values_optimizer"] = 0                                  # plain SGD: no state

    # ---- activations (estimate)
    h, a, s, bb = c.dim, c.n_heads, seq_len, math.ceil(batch / world_size)
    per_layer = s * bb * h * (34 + 5 * a * s / h) * (b / 2)
    logits = 2 * s * bb * c.vocab_size * 4                           # fp32 logits and their gradient
    memory_reads = len(c.memory_layers) * tokens * c.memory.heads * c.memory.k * (8 + 4)
    out["activations_estimate"] = int(c.n_layers * per_layer + logits + memory_reads)

    peak_grad = max(out["values_grad_before_mask"], out["values_grad"])
    total = (out["dense_params"] + out.get("fsdp2_all_gather", 0) + out["dense_grads"] + out["dense_optimizer"]
             + out["values_table"] + peak_grad + out["values_optimizer"] + out["activations_estimate"])
    return {"preset": preset, "world_size": world_size, "strategy": strategy, "dtype": dtype, "method": method,
            "seq_len": seq_len, "batch_global": batch, "top_t": top_t,
            "params": {"dense": dense_numel, "memory_values": n_slots * d},
            "per_rank_bytes": out, "per_rank_total_bytes": int(total)}


def table(result: dict) -> str:
    lines = [f"{result['preset']}  {result['strategy']}  {result['method']}  {result['dtype']}  world {result['world_size']}"
             f"  batch {result['batch_global']} x seq {result['seq_len']}  t {result['top_t']}",
             f"{'per rank':34s} {'GiB':>10s}"]
    for key, value in result["per_rank_bytes"].items():
        lines.append(f"{key:34s} {value / GiB:10.3f}")
    lines.append(f"{'total (values grad at its peak)':34s} {result['per_rank_total_bytes'] / GiB:10.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="paper-1.3b")
    ap.add_argument("--world_size", type=int, default=8)
    ap.add_argument("--strategy", default="fsdp2")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--seq_len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--method", default="sparse")
    ap.add_argument("--top_t", type=int, default=500)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    try:
        result = plan(args.preset, world_size=args.world_size, strategy=args.strategy, dtype=args.dtype,
                      seq_len=args.seq_len, batch=args.batch, method=args.method, top_t=args.top_t)
    except ValueError as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(table(result))
    if args.out:
        atomic_write(Path(args.out), json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
