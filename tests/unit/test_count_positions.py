"""--sparse.count_positions=loss: only the memory reads at positions that carry loss enter the slot counts.
The Stepper's selection must equal the finetuner's selection on the same reads with every other position
marked "not read" (-1) by hand, and differ from counting every position (else the option would do nothing).
The global (all-ranks) combination of those counts is the finetuner's, tested on 2 ranks against one process
in tests/distributed/test_sparse_update_dist.py."""
from __future__ import annotations

import pytest
import torch

from data_pipeline import Batch
from model import build_model
from sparse_update import SparseMemoryFinetuner
from training.config import resolve_config
from training.step import IGNORE_INDEX, Stepper, make_plan, optimizer_factory, set_trainable
from training.values_lane import ValuesLane

from test_stepper import LocalStrategy


def build(count_positions: str):
    cfg = resolve_config("recipes/configs/tiny_fact_learning.yaml", {
        "init_from": "x", "method": "sparse", "sparse.ranking": "tf", "optim.lr": 10.0, "sparse.top_t": 8,
        "optim.loss_on": "answer", "sparse.count_positions": count_positions,
        "model.n_layers": 2, "model.memory_layers": [1], "model.memory.num_slots": 32 ** 2})
    torch.manual_seed(0)
    model = build_model("tiny", n_layers=2, memory_layers=(1,), memory={"num_slots": 32 ** 2})
    plan = make_plan(cfg)
    set_trainable(model, plan, set())
    values = model.memory_values
    finetuner = SparseMemoryFinetuner(plan.sparse_args, values)
    lane = ValuesLane(values, optimizer_factory(cfg, sgd=True, values=True)([values]), finetuner,
                      lr_mult=cfg.optim.values_lr_mult)
    stepper = Stepper(config=cfg, strategy=LocalStrategy(model, []), finetuner=finetuner, values_lane=lane,
                      device=torch.device("cpu"), total_steps=4)
    return cfg, model, finetuner, stepper


def fact_batch() -> Batch:
    """4 rows of 12 tokens; the last 2 tokens of each row are the answer (the only loss positions)."""
    tokens = torch.randint(5, 8000, (4, 12), generator=torch.Generator().manual_seed(3))
    answer = torch.zeros_like(tokens, dtype=torch.bool)
    answer[:, -3:-1] = True
    return Batch(tokens=tokens, padding_mask=torch.ones_like(tokens, dtype=torch.bool), labels=tokens.roll(-1, 1),
                 answer_mask=answer)


@pytest.mark.parametrize("count_positions", ["loss", "all"])
def test_the_selection_counts_only_the_reads_it_should(count_positions):
    cfg, model, finetuner, stepper = build(count_positions)
    batch = fact_batch()
    with torch.no_grad():
        reads = model(batch.tokens, padding_mask=batch.padding_mask).memory_indices
    loss_positions = batch.labels.masked_fill(~batch.answer_mask, IGNORE_INDEX) != IGNORE_INDEX
    assert 0 < int(loss_positions.sum()) < loss_positions.numel()
    by_hand = SparseMemoryFinetuner(make_plan(cfg).sparse_args, torch.nn.Parameter(model.memory_values.detach().clone()))
    masked = [r.masked_fill(~loss_positions[..., None], -1) for r in reads] if count_positions == "loss" else reads
    by_hand.update_trainable_indices(masked)

    stepper.step(batch, 0)
    assert torch.equal(finetuner.trainable_indices, by_hand.trainable_indices)
    if count_positions == "loss":   # every selected row was read at a loss position
        at_loss = set(torch.cat([r[loss_positions].flatten() for r in reads]).tolist())
        assert set(finetuner.trainable_indices.tolist()) <= at_loss


def test_counting_loss_positions_changes_the_selection():
    selections = {}
    for mode in ("loss", "all"):
        _, _, finetuner, stepper = build(mode)
        stepper.step(fact_batch(), 0)
        selections[mode] = finetuner.trainable_indices.clone()
    assert not torch.equal(selections["loss"], selections["all"])
