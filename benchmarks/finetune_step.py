"""A re-implemented finetune step (item smf_overhead; grad_worker.py uses its set-up): forward, TF-IDF selection, backward, row mask/sync, SGD.

It follows training/step.py (Stepper.step) for the values-only methods: the finetuner selects rows
from the forward's memory indices, backward runs the finetuner's masking tensor hook, then
the optimizer step, whose pre-hook masks and all-reduces the t selected rows (when distributed) before plain SGD.

`Setup` holds two views of the one values table: `values` carries the finetuner's hooks, `plain`
is a second nn.Parameter over the same storage with no hooks, so the "no selection" step trains the
very same table in the same process without the finetuner seeing it.

Item smf_overhead times this re-implementation; smf_overhead_ratio_stepper (stepper_bench.py) and the 2-rank
figures (dist_worker.py) time the trainer's own Stepper.step and run `smf_step` beside it only as a cross-check.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import build_bench_model, synthetic_background, token_batches, values_only
from sparse_update import SparseMemoryFinetuner, SparseMemoryFinetuningArgs

LR = 1e-3


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


@dataclass
class Setup:
    model: nn.Module
    values: nn.Parameter
    plain: nn.Parameter
    finetuner: SparseMemoryFinetuner
    opt: torch.optim.Optimizer
    opt_plain: torch.optim.Optimizer
    batches: list
    select_s: list = field(default_factory=list)
    sync_s: list = field(default_factory=list)
    selection_stats: dict = field(default_factory=dict)


def make_setup(model_overrides: dict, *, top_t: int, batch: int, seq: int, num_batches: int,
               seed: int = 0, attach: bool = True) -> Setup:
    model = build_bench_model(model_overrides, seed=seed)
    values_only(model)
    values = model.memory_values
    plain = nn.Parameter(values.data)       # same storage, no hooks
    finetuner = SparseMemoryFinetuner(SparseMemoryFinetuningArgs(enabled=True, top_t=top_t), values)
    synthetic_background(finetuner)
    opt = torch.optim.SGD([values], lr=LR)
    if attach:
        finetuner.attach(opt)
    opt_plain = torch.optim.SGD([plain], lr=LR)
    batches = token_batches(num_batches, batch, seq, model.config.vocab_size, seed=seed + 1)
    return Setup(model, values, plain, finetuner, opt, opt_plain, batches)


def smf_step(s: Setup, tokens: torch.Tensor, *, phase=None) -> float:
    """One sparse-memory-finetuning step (selection + masked backward + row sync + SGD); returns the loss.
    `phase(name)` is called around the collectives-bearing parts (for byte accounting)."""
    s.model.memory_values = s.values
    out = s.model(tokens)
    t0 = time.perf_counter()
    if phase:
        phase("selection")
    s.selection_stats = s.finetuner.update_trainable_indices(out.memory_indices)
    if phase:
        phase(None)
    s.select_s.append(time.perf_counter() - t0)
    loss = lm_loss(out.logits, tokens)
    loss.backward()
    t0 = time.perf_counter()
    if phase:
        phase("values_sync")
    s.opt.step()                 # the finetuner's pre-hook masks and row-syncs, then SGD
    if phase:
        phase(None)
    s.sync_s.append(time.perf_counter() - t0)
    s.opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def plain_step(s: Setup, tokens: torch.Tensor) -> float:
    """The same step training the same table with no selection, mask or sync (every accessed row moves)."""
    s.model.memory_values = s.plain
    out = s.model(tokens)
    loss = lm_loss(out.logits, tokens)
    loss.backward()
    s.opt_plain.step()
    s.opt_plain.zero_grad(set_to_none=True)
    s.model.memory_values = s.values
    return float(loss.detach())


def cycler(batches: list):
    """A callable returning the next batch each call (variants of one rep see the same batch when
    each variant has its own cycler over the same list)."""
    state = {"i": 0}

    def nxt():
        b = batches[state["i"] % len(batches)]
        state["i"] += 1
        return b
    return nxt
