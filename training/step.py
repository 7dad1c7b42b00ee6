"""Which parameters train, with which optimizer and which sparse_update mode — and the step itself.

Data path of one step (Stepper.step): batch -> forward (logits + memory indices) -> select (counts
all-reduced -> TF-IDF -> top-t) -> backward -> clip -> step (dense lane: the strategy; values lane: the
optimizer pre-hook masks and row-syncs, then SGD/AdamW).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline import IGNORE_INDEX
from sparse_update import SparseMemoryFinetuner, SparseMemoryFinetuningArgs
from training import distributed as D
from training.callbacks import Callback, as_callbacks
from training.values_lane import ValuesLane


@dataclass(frozen=True)
class Plan:
    """What a (stage, method) trains."""
    train_dense: bool        # every non-values parameter
    train_lora: bool         # only LoRA parameters among the non-values ones
    train_values: bool
    values_sgd: bool         # values by plain SGD (sparse grads) vs AdamW (dense grads)
    sparse_args: SparseMemoryFinetuningArgs
    memory_only: bool = False  # of the dense parameters only the memory layers' (optim.trainable=memory)


# Each method as data: (train_dense, train_lora, train_values, values_sgd, finetuner mode or None).
# Pretraining trains like `full`; the background stage trains nothing.
METHOD_TABLE: dict[str, tuple[bool, bool, bool, bool, str | None]] = {
    "sparse":     (False, False, True, True, "top_t"),          # the top t rows by --sparse.ranking, SGD
    "tf_only":    (False, False, True, True, "top_t"),          # the same with ranking tf (alias)
    "memory_all": (False, False, True, True, "all_accessed"),   # every row the batch read, SGD
    "full":       (True, False, True, False, "all_accessed"),   # everything, AdamW (dense values gradient)
    "lora":       (False, True, False, False, None),            # LoRA adapters only
    "background": (False, False, False, False, None),           # records statistics, trains nothing
}


def make_plan(config) -> Plan:
    key = {"pretrain": "full", "background": "background"}.get(config.stage, config.method)
    train_dense, train_lora, train_values, values_sgd, mode = METHOD_TABLE[key]
    values_sgd = values_sgd or (train_values and config.optim.optimizer == "sgd")   # lora: the table is frozen
    if mode is None:
        args = SparseMemoryFinetuningArgs(enabled=False)
    elif mode == "all_accessed":
        # every accessed row trains; the union of accessed rows is synced (AdamW gets a dense gradient)
        args = SparseMemoryFinetuningArgs(enabled=True, mode="all_accessed", dense_output=not values_sgd,
                                          count_exchange=config.sparse.count_exchange)
    else:
        args = SparseMemoryFinetuningArgs(
            enabled=True, top_t=config.sparse.top_t, count_exchange=config.sparse.count_exchange,
            ranking="tf" if key == "tf_only" else config.sparse.ranking)
    return Plan(train_dense, train_lora, train_values, values_sgd, args,
                memory_only=config.stage == "pretrain" and config.optim.trainable == "memory")


def set_trainable(model: nn.Module, plan: Plan, lora_names: set[str]) -> None:
    """Set requires_grad per plan (before sharding: FSDP2 keeps the flags)."""
    values = getattr(model, "memory_values", None)
    for name, p in model.named_parameters():
        if p is values:
            p.requires_grad_(plan.train_values)
        else:
            dense = plan.train_dense and (not plan.memory_only or ".memory." in name)
            p.requires_grad_(dense or (plan.train_lora and name in lora_names))


def optimizer_factory(config, *, sgd: bool, values: bool = False):
    """The optimizer of the dense parameters, or (``values``) of the memory values table: its lr is
    ``optim.lr * optim.values_lr_mult`` and its weight decay ``optim.values_weight_decay`` when set."""
    o = config.optim
    lr = o.lr * (o.values_lr_mult if values else 1.0)
    if sgd:
        return lambda params: torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
    wd = o.weight_decay
    if values and o.values_weight_decay is not None:
        wd = o.values_weight_decay
    # fused: one pass per tensor instead of ~10 (8x faster on the 16.7M-element tiny values table on CPU)
    return lambda params: torch.optim.AdamW(params, lr=lr, betas=tuple(o.betas), weight_decay=wd,
                                            fused=_fused_ok(params))


def _fused_ok(params) -> bool:
    """The fused AdamW kernel exists for floating-point tensors on CPU and CUDA."""
    return all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)


def lr_at(config, step: int, total: int) -> float:
    o = config.optim
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "cosine" and total > o.warmup_steps:
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    return o.lr


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over real tokens. "mean" averages this rank's tokens; "sum" adds them up
    (times world size, since gradients are averaged over ranks), so the SGD lr of the value rows does not
    shrink with the number of tokens per step."""
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)
    if reduction == "sum" and torch.distributed.is_initialized():
        loss = loss * torch.distributed.get_world_size()
    return loss


class Stepper:
    """Runs one optimisation step; the loop calls `step(batch, step_index)` and logs what it returns.

    forward (logits + memory indices) -> select (counts all-reduced, ranked, top-t) -> backward -> clip
    (one global norm over the dense parameters and the values lane) -> step (strategy, then the values lane,
    whose optimizer pre-hook masks and row-syncs the values gradient). Only a clip (optim.grad_clip > 0)
    needs the values norm before the step, and only then are the rows synced early; without one the logged
    train/grad_norm takes the values part from the lane after its pre-hook's sync."""

    def __init__(self, *, config, strategy, finetuner: SparseMemoryFinetuner | None, values_lane: ValuesLane | None,
                 device: torch.device, total_steps: int, callbacks: Iterable[Callback] | None = None) -> None:
        self.config, self.strategy, self.finetuner, self.values_lane = config, strategy, finetuner, values_lane
        self.device, self.total_steps = device, total_steps
        self.callbacks = as_callbacks(callbacks)     # on_loss(step, loss) -> the loss trained on
        if finetuner is not None and finetuner.args.enabled and finetuner.args.dense_output:
            dense_values_gradient(strategy.module)


    def step(self, batch, step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        tokens = batch.tokens.to(self.device)
        mask = batch.padding_mask.to(self.device)
        labels = batch.labels.to(self.device)
        answer = batch.answer_mask.to(self.device) if batch.answer_mask is not None else None
        train_labels = self._loss_labels(labels, answer)
        num_tokens = int(mask.sum())
        num_loss_tokens = int((train_labels != IGNORE_INDEX).sum())
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        # ---- forward
        balance_weight = self.config.optim.memory_balance_loss
        if balance_weight > 0:
            out = self.strategy.module(tokens, padding_mask=mask, balance_loss=True)
        else:
            out = self.strategy.module(tokens, padding_mask=mask)
        # ---- select
        stats = self._select(out.memory_indices, train_labels)
        # ---- loss + backward
        loss = lm_loss(out.logits, train_labels, reduction=self.config.optim.loss_reduction)
        if num_loss_tokens == 0:   # this rank's rows hold no answer: contribute a zero loss, keep collectives
            loss = out.logits.sum() * 0.0
        split = _answer_split(out.logits, labels, answer) if answer is not None else {}
        objective = loss
        if balance_weight > 0:
            split["train/balance_loss"] = float(out.balance_loss)
            objective = loss + balance_weight * out.balance_loss
        objective = self.callbacks.on_loss(step + 1, objective)
        # a non-finite loss on any rank stops every rank together, before any update
        if D.all_reduce_max(0.0 if torch.isfinite(objective).item() else 1.0) > 0:
            return {"train/loss": float("nan")}
        self.strategy.backward(objective)
        # ---- clip: one norm over both lanes (the values lane's is the same on every rank once synced)
        lr = lr_at(self.config, step, self.total_steps)
        lane, clip = self.values_lane, self.config.optim.grad_clip
        dense_sq = self.strategy.grad_norm_sq()
        coef, values_sq = 1.0, None
        if clip > 0 and lane is not None:     # the coefficient needs the values norm now: the rows sync early
            values_sq = lane.grad_sq_norm()
        if clip > 0:
            coef = min(1.0, clip / (math.sqrt(dense_sq + (values_sq or 0.0)) + 1e-6))
        # ---- step (without a clip the values lane's pre-hook syncs and the norm is read after it)
        self.strategy.step(clip_coef=coef, lr=lr)
        capped = 0
        if lane is not None:
            capped = lane.step(lr=lr, clip_coef=coef, measure_norm=values_sq is None)
            if values_sq is None:
                values_sq = float(lane.applied_sq_norm)    # after the update is queued: no stall before it
        grad_norm = math.sqrt(dense_sq + (values_sq or 0.0))
        elapsed = time.perf_counter() - t0
        per_token = loss.item() / (max(num_loss_tokens, 1) * world if self.config.optim.loss_reduction == "sum" else 1)
        metrics = {"train/loss": per_token, "train/lr": lr, "train/grad_norm": grad_norm,
                   "train/step_time_s": elapsed, "train/tokens_per_s": num_tokens * world / max(elapsed, 1e-9)}
        metrics.update({f"sparse_update/{k}": v for k, v in stats.items() if isinstance(v, (int, float))})
        metrics.update(split)
        if self.config.optim.values_max_row_norm > 0:
            metrics["memory/rows_norm_bounded"] = capped
        return metrics

    def _select(self, indices: list[torch.Tensor], train_labels: torch.Tensor) -> dict[str, Any]:
        """The finetuner's selection from this batch's memory reads (all ranks' counts combined)."""
        if self.finetuner is None or not self.finetuner.args.enabled:
            return {}
        if self.config.sparse.count_positions == "loss":
            # only reads at positions that carry loss count (the -1 of padding means "not read")
            keep = (train_labels != IGNORE_INDEX)[..., None]
            indices = [i.masked_fill(~keep, -1) for i in indices]
        return self.finetuner.update_trainable_indices(indices)

    def _loss_labels(self, labels: torch.Tensor, answer: torch.Tensor | None) -> torch.Tensor:
        if self.config.optim.loss_on != "answer" or self.config.stage != "finetune":
            return labels
        if answer is None:
            raise ValueError("config key 'optim.loss_on': answer needs batches with an answer span (fact learning)")
        return labels.masked_fill(~answer, IGNORE_INDEX)


@torch.no_grad()
def _answer_split(logits: torch.Tensor, labels: torch.Tensor, answer: torch.Tensor) -> dict[str, float]:
    """Mean next-token loss on the fact's own rows over the answer's tokens and over the other tokens,
    over the global batch (whatever optim.loss_on trains on): shows whether a step teaches the answer."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                         reduction="none").view_as(labels)
    real = labels != IGNORE_INDEX
    ans, other = real & answer, real & ~answer
    sums = torch.tensor([float(ce[ans].sum()), float(ans.sum()), float(ce[other].sum()), float(other.sum())],
                        dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    out = {}
    if sums[1] > 0:
        out["train/loss_answer"] = float(sums[0] / sums[1])
    if sums[3] > 0:
        out["train/loss_other"] = float(sums[2] / sums[3])
    return out


def dense_values_gradient(model: nn.Module) -> None:
    """Have every memory layer produce a dense values gradient (embedding_bag(sparse=False)) when the
    optimizer needs one anyway (AdamW: pretraining, method full). A sparse gradient holds one
    value_dim-wide row per lookup (tokens x heads x k rows: 4x the tiny table at 32 x 64 tokens) and the
    finetuner's hook then densified it; the dense backward sums the lookups straight into the N x d gradient,
    so the step skips that intermediate and the conversion. The same gradient up to float summation order."""
    from model.memory import ProductKeyMemory
    for layer in model.modules():
        if isinstance(layer, ProductKeyMemory):
            layer.sparse_grad = False
