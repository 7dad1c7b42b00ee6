"""--sparse.count_positions=loss: only the memory reads at positions that carry loss enter the slot counts.
The Stepper's selection must equal the finetuner's selection on the same reads with every other position
marked "not read" (-1) by hand, and differ from counting every position (else the option would do nothing).
The global (all-ranks) combination of those counts is the finetuner's, tested on 2 ranks against one process
in tests/distributed/test_sparse_update_dist.py."""
from __future__ import annotations

import pytest
import torch

from data_pipeline import Batch
from sparse_update import SparseMemoryFinetuner
from training.step import IGNORE_INDEX, make_plan

from test_stepper import setup


def build(count_positions: str):
    cfg, model, finetuner, stepper, _ = setup(method="sparse", t=8, lr=10.0, overrides={
        "sparse.ranking": "tf", "optim.loss_on": "answer", "sparse.count_positions": count_positions})
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
