"""Stepper and the values lane, one process, no torchrun: the step is forward -> select -> backward -> clip ->
step, the values gradient is masked and synced once per step (by the optimizer pre-hook, or early by the clip
norm), and only the selected rows move."""
from __future__ import annotations

import math

import pytest
import torch

from data_pipeline import Batch
from model import build_model
from sparse_update import SparseMemoryFinetuner
from training.config import resolve_config
from training.step import Stepper, make_plan, optimizer_factory, set_trainable
from training.values_lane import ValuesLane


class LocalStrategy:
    """The strategy seam's step interface over a plain module (what FSDP2/ZeRO provide under torchrun)."""

    def __init__(self, module, params):
        self.module, self.params = module, params
        self.optimizer = torch.optim.SGD(params, lr=0.0) if params else None

    def backward(self, loss):
        loss.backward()

    def grad_norm_sq(self):
        return sum(float(p.grad.pow(2).sum()) for p in self.params if p.grad is not None)

    def step(self, *, clip_coef, lr):
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def setup(method="tf_only", clip=0.0, t=6, lr=50.0, cap=0.0, overrides=None):
    cfg = resolve_config("recipes/configs/tiny_fact_learning.yaml", {
        "init_from": "x", "method": method, "optim.lr": lr, "sparse.top_t": t, "optim.grad_clip": clip,
        "optim.values_max_row_norm": cap,
        "optim.loss_on": "all", "model.n_layers": 2, "model.memory_layers": [1], "model.memory.num_slots": 32 ** 2,
        **(overrides or {})})
    torch.manual_seed(0)
    model = build_model("tiny", n_layers=2, memory_layers=(1,), memory={"num_slots": 32 ** 2})
    plan = make_plan(cfg)
    set_trainable(model, plan, set())
    values = model.memory_values
    finetuner = SparseMemoryFinetuner(plan.sparse_args, values)
    lane = ValuesLane(values, optimizer_factory(cfg, sgd=plan.values_sgd, values=True)([values]), finetuner,
                      lr_mult=cfg.optim.values_lr_mult, max_row_norm=cfg.optim.values_max_row_norm)
    dense = [p for p in model.parameters() if p.requires_grad and p is not values]
    stepper = Stepper(config=cfg, strategy=LocalStrategy(model, dense), finetuner=finetuner, values_lane=lane,
                      device=torch.device("cpu"), total_steps=10)
    tokens = torch.randint(0, 8000, (3, 10), generator=torch.Generator().manual_seed(1))
    batch = Batch(tokens=tokens, padding_mask=torch.ones_like(tokens, dtype=torch.bool), labels=tokens.roll(-1, 1))
    return cfg, model, finetuner, stepper, batch


def count_syncs(finetuner, monkeypatch):
    calls = []
    original = finetuner.sync_gradients
    monkeypatch.setattr(finetuner, "sync_gradients", lambda: (calls.append(1), original())[1])
    return calls


def test_only_the_selected_rows_move_and_the_dense_weights_stay(monkeypatch):
    cfg, model, finetuner, stepper, batch = setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    syncs = count_syncs(finetuner, monkeypatch)
    metrics = stepper.step(batch, 0)
    assert len(syncs) == 1                                 # once per step: the optimizer pre-hook's (no clip)
    changed = (model.memory_values != before["memory_values"]).any(1).nonzero().flatten()
    selected = set(finetuner.trainable_indices.tolist())
    assert len(selected) == 6 and 0 < changed.numel() <= 6 and set(changed.tolist()) <= selected
    for key, value in before.items():
        if key != "memory_values":
            assert torch.equal(value, model.state_dict()[key]), key
    assert metrics["sparse_update/selected"] == 6 and math.isfinite(metrics["train/loss"])


def test_grad_norm_is_the_norm_of_the_masked_gradient_and_the_clip_scales_the_update():
    # reference: the same step by hand, masked to the selection, no clip
    _, model, finetuner, _, batch = setup()
    out = model(batch.tokens, padding_mask=batch.padding_mask)
    finetuner.update_trainable_indices(out.memory_indices)
    finetuner.remove()                                     # its backward hook would mask: keep the full gradient
    torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), batch.labels.flatten()).backward()
    g = model.memory_values.grad.coalesce().to_dense()
    rows = finetuner.trainable_indices
    masked_norm = float(g[rows].norm())
    assert masked_norm < float(g.norm())                   # the mask matters for this batch

    _, m1, _, s1, _ = setup()
    start = m1.memory_values.detach().clone()
    free = s1.step(batch, 0)
    assert free["train/grad_norm"] == pytest.approx(masked_norm, rel=1e-5)
    clip = masked_norm / 4
    _, m2, _, s2, _ = setup(clip=clip)
    clipped = s2.step(batch, 0)
    assert clipped["train/grad_norm"] == pytest.approx(masked_norm, rel=1e-5)   # the norm before clipping
    coef = clip / (masked_norm + 1e-6)                     # the Stepper's coefficient (its epsilon included)
    torch.testing.assert_close(m2.memory_values - start, (m1.memory_values - start) * coef,
                               rtol=1e-4, atol=1e-7)


def test_without_a_clip_norm_the_optimizer_pre_hook_alone_masks(monkeypatch):
    """The lane's step alone (no grad_sq_norm first): the pre-hook syncs exactly once, rows outside stay."""
    _, model, finetuner, stepper, batch = setup()
    lane = stepper.values_lane
    start = model.memory_values.detach().clone()
    out = model(batch.tokens, padding_mask=batch.padding_mask)
    finetuner.update_trainable_indices(out.memory_indices)
    torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), batch.labels.flatten()).backward()
    syncs = count_syncs(finetuner, monkeypatch)
    lane.step(lr=50.0)
    assert len(syncs) == 1 and model.memory_values.grad is None
    changed = set((model.memory_values != start).any(1).nonzero().flatten().tolist())
    assert changed and changed <= set(finetuner.trainable_indices.tolist())


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_the_rows_sync_early_only_when_a_clip_needs_the_norm(clip, monkeypatch):
    """Without a clip the values norm is not asked for before the step: the optimizer pre-hook alone masks and
    syncs, and the logged grad_norm is read after it (the same number). With a clip the coefficient needs the
    norm first: the sync runs early, once, and the pre-hook finds it done."""
    _, _, finetuner, stepper, batch = setup(clip=clip)
    early, syncs = [], count_syncs(finetuner, monkeypatch)
    original = finetuner.grad_sq_norm
    monkeypatch.setattr(finetuner, "grad_sq_norm", lambda: (early.append(len(syncs)), original())[1])
    metrics = stepper.step(batch, 0)
    assert len(syncs) == 1
    assert early == ([0] if clip > 0 else [])              # asked before any sync, only for a clip
    lane = stepper.values_lane
    if clip > 0:
        assert lane.applied_sq_norm is None                # the early norm was used, nothing measured twice
    else:                                                  # the metric is the norm read after the hook's sync
        assert float(lane.applied_sq_norm) == pytest.approx(metrics["train/grad_norm"] ** 2, rel=1e-9)


@pytest.mark.parametrize("stage,method,expect", [
    ("pretrain", "sparse", (True, False, True, False, "all_accessed", True)),
    ("background", "sparse", (False, False, False, False, None, False)),
    ("finetune", "sparse", (False, False, True, True, "top_t", False)),
    ("finetune", "tf_only", (False, False, True, True, "top_t", False)),
    ("finetune", "memory_all", (False, False, True, True, "all_accessed", False)),
    ("finetune", "full", (True, False, True, False, "all_accessed", True)),
    ("finetune", "lora", (False, True, False, False, None, False)),
])
def test_the_method_table(stage, method, expect):
    overrides = {"stage": stage, "method": method, "init_from": "x", "sparse.top_t": 7, "max_steps": 5}
    if method in ("full", "lora") or stage == "pretrain":
        overrides["optim.lr"] = 1e-4
    cfg = resolve_config("recipes/configs/tiny_fact_learning.yaml", overrides)
    plan = make_plan(cfg)
    a = plan.sparse_args
    got = (plan.train_dense, plan.train_lora, plan.train_values, plan.values_sgd, a.mode if a.enabled else None,
           a.dense_output)
    assert got == expect
    if got[4] == "top_t":
        assert a.top_t == 7 and a.ranking == ("tf" if method == "tf_only" else "tfidf")


@pytest.mark.parametrize("cap_scale", [1.0, 1.5])
def test_max_row_norm_projects_grown_rows_back_onto_the_bound_along_the_same_step(cap_scale):
    """optim.values_max_row_norm: the same step as without the bound, then every moved row whose norm grew
    past max(cap, its norm before) is scaled back to exactly that bound; rows within it and unselected rows
    are left as the plain step leaves them."""
    lr = 2000.0                                         # large enough that some selected rows grow past the cap
    _, free_model, free_ft, free_stepper, batch = setup(lr=lr)
    before = free_model.memory_values.detach().clone()
    free_stepper.step(batch, 0)
    free = free_model.memory_values.detach()
    rows = free_ft.trainable_indices
    pre, post = before[rows].norm(dim=1), free[rows].norm(dim=1)
    cap = float(before.norm(dim=1).median()) * cap_scale
    bound = pre.clamp(min=cap)
    over = post > bound
    assert int(over.sum()) > 0                       # else this test could not see the bound act

    _, model, ft, stepper, batch = setup(lr=lr, cap=cap)
    metrics = stepper.step(batch, 0)
    got = model.memory_values.detach()
    assert torch.equal(ft.trainable_indices, rows)       # same selection: the bound acts after the step
    assert metrics["memory/rows_norm_bounded"] == int(over.sum())
    expected = free.clone()
    expected[rows[over]] = free[rows[over]] * (bound[over] / post[over])[:, None]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got[rows].norm(dim=1) <= bound * (1 + 1e-5)).all()
    others = torch.ones(got.shape[0], dtype=torch.bool)
    others[rows] = False
    assert torch.equal(got[others], before[others])


def test_max_row_norm_off_reports_nothing_and_changes_nothing():
    _, model_a, _, stepper_a, batch = setup(lr=2000.0)
    metrics = stepper_a.step(batch, 0)
    assert "memory/rows_norm_bounded" not in metrics
    _, model_b, _, stepper_b, batch = setup(lr=2000.0, cap=1e9)   # a bound no row reaches: the plain step
    assert stepper_b.step(batch, 0)["memory/rows_norm_bounded"] == 0
    assert torch.equal(model_a.memory_values, model_b.memory_values)


@pytest.mark.parametrize("method, dense", [("full", True), ("memory_all", False), ("tf_only", False)])
def test_values_trained_by_adamw_get_a_dense_gradient_straight_from_the_memory_layer(method, dense):
    """AdamW needs a dense values gradient: the Stepper has the memory layers produce it (no sparse COO of every
    lookup densified afterwards); plain-SGD methods keep the sparse one. Only the accessed rows are nonzero."""
    _, model, finetuner, stepper, batch = setup(method=method, lr=1e-3)
    layers = [m for m in model.modules() if hasattr(m, "sparse_grad")]
    assert layers and all(m.sparse_grad is (not dense) for m in layers)
    seen = []
    model.memory_values.register_hook(lambda g: seen.append(g.is_sparse))
    stepper.step(batch, 0)
    assert seen == [not dense]


def test_full_finetuning_with_optimizer_sgd_is_plain_sgd_on_every_parameter():
    """--optim.optimizer=sgd (the paper's optimizer control for the baselines): full finetuning's values table and
    dense weights take plain SGD steps, so every read row moves by exactly -lr x its gradient."""
    lr = 0.5
    cfg, model, _, stepper, batch = setup(method="full", lr=lr, overrides={"optim.optimizer": "sgd"})
    plan = make_plan(cfg)
    assert plan.train_dense and plan.values_sgd
    dense = [p for p in model.parameters() if p.requires_grad and p is not model.memory_values]
    assert type(optimizer_factory(cfg, sgd=cfg.optim.optimizer == "sgd")(dense)) is torch.optim.SGD
    grads = []
    model.memory_values.register_hook(lambda g: grads.append(g.coalesce().to_dense() if g.is_sparse else g.clone()))
    before = model.memory_values.detach().clone()
    stepper.step(batch, 0)
    (grad,) = grads
    moved = (model.memory_values.detach() - before).abs().sum(1) > 0
    assert moved.any() and torch.equal(moved, grad.abs().sum(1) > 0)
    torch.testing.assert_close(model.memory_values.detach() - before, -lr * grad, rtol=1e-5, atol=1e-7)


def test_lora_with_optimizer_sgd_leaves_the_frozen_values_table_out_of_the_sgd_lane():
    cfg = resolve_config("recipes/configs/tiny_fact_learning.yaml",
                         {"init_from": "x", "method": "lora", "optim.lr": 0.1, "optim.optimizer": "sgd"})
    plan = make_plan(cfg)
    assert plan.train_lora and not plan.train_values and not plan.values_sgd


@pytest.mark.parametrize("overrides, key", [({"optim.optimizer": "adam"}, "optim.optimizer"),
                                            ({"optim.optimizer": "sgd", "optim.weight_decay": 0.1},
                                             "optim.weight_decay")])
def test_optimizer_option_is_validated(overrides, key):
    with pytest.raises(ValueError, match=f"config key '{key}'"):
        setup(method="full", lr=0.1, overrides=overrides)
