"""Each strategy's optimisation seam (backward -> grad_norm_sq -> step) in this process: a world of one rank
under a gloo process group (so FSDP2 really shards into DTensors and DeepSpeed really builds its ZeRO engine),
no torchrun. Against the same model as a plain module (the same per-parameter init) on the same batch, with
plain SGD so the expected update is exact: grad_norm_sq is the squared norm of the dense gradients,
step(clip_coef, lr) moves every dense weight by -lr * clip_coef * grad, clears the gradients, and leaves the
values table (the values lane's) alone."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest
import torch
import torch.distributed as dist

from model import VALUES_KEY
from tests.launch import REPO
from training.build import build_parallel_model
from training.config import resolve_config, with_deepspeed_default
from training.distributed import DistInfo
from training.step import lm_loss, make_plan, optimizer_factory, set_trainable

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
LR, COEF = 0.05, 0.5


def config(strategy: str):
    cfg = resolve_config("recipes/configs/tiny_pretrain.yaml", {
        "strategy": strategy, "output_dir": "/tmp/unused", "model.n_layers": 2, "model.memory_layers": [1],
        "model.dim": 64, "model.ffn_hidden": 128, "model.memory.num_slots": 1024, "model.memory.k_dim": 32,
        "model.memory.value_dim": 64, "model.memory.k": 8, "optim.momentum": 0.0, "optim.weight_decay": 0.0})
    return with_deepspeed_default(cfg, REPO / "recipes" / "configs" / "deepspeed")


@pytest.fixture(scope="module")
def plain():
    """The reference, built before any process group exists: see `reference`."""
    return reference()


@pytest.fixture(scope="module")
def world(plain, tmp_path_factory):
    """One one-rank gloo process group for the module (DeepSpeed caches its groups, so every strategy shares
    it), torn down afterwards with the environment as it was: later tests in this process see no group."""
    environ = dict(os.environ)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "DS_ACCELERATOR": "cpu"}.items():
            mp.setenv(key, value)
        if importlib.util.find_spec("deepspeed") is not None:
            # a CPU kernel for shared-memory all-reduce, compiled on first use; one rank needs none
            mp.setattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op", lambda: None)
        store = dist.FileStore(str(tmp_path_factory.mktemp("world") / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            yield DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
        finally:
            dist.destroy_process_group()
            ds_comm = sys.modules.get("deepspeed.comm.comm")
            if ds_comm is not None:
                ds_comm.cdb = None          # DeepSpeed keeps a handle on the (now destroyed) group
            os.environ.clear()
            os.environ.update(environ)


def build(cfg, dist_info):
    plan = make_plan(cfg)
    strategy, _ = build_parallel_model(cfg, dist_info, set_trainable=lambda model, lora: set_trainable(model, plan, lora))
    values = strategy.values
    dense = [p for p in strategy.module.parameters() if p.requires_grad and p is not values]
    strategy.setup_optimizer(dense, optimizer_factory(cfg, sgd=True))
    return strategy


def batch():
    tokens = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(3))
    return tokens[:, :-1], tokens[:, 1:]


def forward_backward(strategy) -> None:
    tokens, labels = batch()
    out = strategy.module(tokens, padding_mask=torch.ones_like(tokens, dtype=torch.bool))
    strategy.backward(lm_loss(out.logits, labels))


def full_weights(strategy) -> dict[str, torch.Tensor]:
    """Every dense weight by name, whole (FSDP2 DTensors and ZeRO-3 partitions gathered)."""
    from torch.distributed.tensor import DTensor
    if hasattr(strategy, "_named_tensors"):        # ZeRO: the module's own tensors, gathered under stage 3
        out = {}
        for name, p in strategy.model.named_parameters():
            with strategy._gathered([p]):
                out[name] = p.detach().clone()
        return out
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in strategy.module.named_parameters() if name != VALUES_KEY}


def reference():
    """The plain module (fsdp2 without a process group shards nothing): its dense gradients on the batch."""
    strategy = build(config("fsdp2"), CPU)
    forward_backward(strategy)
    before = full_weights(strategy)
    grads = {name: p.grad.detach().clone() for name, p in strategy.module.named_parameters()
             if name != VALUES_KEY and p.grad is not None}
    return before, grads


@pytest.mark.parametrize("name", ["fsdp2", "zero1", "zero3"])
def test_backward_norm_and_step_of_each_strategy(name, plain, world):
    if name.startswith("zero"):
        pytest.importorskip("deepspeed")
    start, grads = plain
    strategy = build(config(name), world)
    assert strategy.dist_info.distributed
    before = full_weights(strategy)
    assert set(before) == set(start) and all(torch.equal(before[k], start[k]) for k in start)   # same init
    values = strategy.values.detach().clone()
    forward_backward(strategy)
    want_sq = sum(float(g.double().pow(2).sum()) for g in grads.values())
    assert strategy.grad_norm_sq() == pytest.approx(want_sq, rel=1e-5)
    strategy.step(clip_coef=COEF, lr=LR)
    after = full_weights(strategy)
    assert strategy.grad_norm_sq() == 0.0                          # gradients cleared
    assert torch.equal(strategy.values, values)                    # the values lane's table: not the strategy's
    moved = 0
    for key, w in after.items():
        expected = start[key] - LR * COEF * grads[key] if key in grads else start[key]
        torch.testing.assert_close(w, expected, rtol=1e-4, atol=1e-6, msg=key)
        moved += int(not torch.equal(w, start[key]))
    assert moved > len(after) // 2
