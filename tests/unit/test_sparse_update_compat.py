"""The reference implementation's API names (sparse_update/compat.py) on the repository's own model:
the reference README's loop, written with those names, moves only the top-t value rows (issue 21, item 7)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model import build_model
from sparse_update import (BackgroundCorpusIndexTracker, SparseMemoryFinetuner, SparseMemoryFinetuningArgs,
                           SparseMemoryGradientMask, TFIDFRanker)

N, VOCAB, TOP_T = 16 ** 2, 64, 8


def tiny_model():
    model = build_model("tiny", seed=0, vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, ffn_hidden=64,
                        max_seq_len=16, memory_layers=(1,),
                        memory=dict(num_slots=N, heads=2, k=4, k_dim=16, value_dim=32))
    for name, p in model.named_parameters():
        p.requires_grad_(name == "memory_values")     # the paper trains the value rows only
    return model


def loader(seed: int, n: int):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (4, 12), generator=gen) for _ in range(n)]


def forward_and_get_indices(model, batch):
    out = model(batch)
    return out, out.memory_indices


def loss_of(out, batch):
    return F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), batch[:, 1:].reshape(-1))


def changed_rows(before, after) -> set[int]:
    return set((before != after).any(dim=1).nonzero().flatten().tolist())


def test_reference_readme_loop_through_the_reference_names(tmp_path):
    model = tiny_model()
    args = SparseMemoryFinetuningArgs(enabled=True, top_t=TOP_T, use_idf=True, num_background_batches=5)
    finetuner = SparseMemoryFinetuner(args, model.memory_values)
    # collect_background_indices reads args.num_background_batches batches, the same as the README's loop
    finetuner.collect_background_indices(loader(0, 9), model)
    assert finetuner.background_tracker.num_batches == 5 and not finetuner.background_tracker.is_collecting
    collected = finetuner.background_tracker.document_frequency.clone()
    # --- the reference README, as written ----------------------------------------------------------
    finetuner.background_tracker.start_collection()
    for batch in loader(0, 5):
        _, indices = forward_and_get_indices(model, batch)
        finetuner.background_tracker.add_batch_indices(indices)
    finetuner.save_background_indices(tmp_path / "bg_indices.pt")
    finetuner.load_background_indices(tmp_path / "bg_indices.pt")
    assert torch.equal(finetuner.background_tracker.document_frequency, collected)
    optimizer = torch.optim.SGD([model.memory_values], lr=2.0)
    ranker = TFIDFRanker(finetuner.background_tracker)
    for batch in loader(1, 3):
        out, indices = forward_and_get_indices(model, batch)
        finetuner.update_trainable_indices(indices)   # selects top-t by TF-IDF
        before = model.memory_values.detach().clone()
        loss_of(out, batch).backward()                # only top-t get gradients
        optimizer.step()
        optimizer.zero_grad()
        # -------------------------------------------------------------------------------------------
        top_t = set(ranker.rank_indices(indices, TOP_T).tolist())
        assert set(finetuner.trainable_indices.tolist()) == top_t and len(top_t) == TOP_T
        moved = changed_rows(before, model.memory_values.detach())
        assert moved and moved <= top_t
    assert finetuner.get_stats() == {"num_trainable_indices": TOP_T, "total_memory_indices": N,
                                     "trainable_pct": 100.0 * TOP_T / N, "num_background_batches": 5}
    finetuner.cleanup()   # hooks gone: the next step moves every row the batch read
    batch = loader(2, 1)[0]
    out, indices = forward_and_get_indices(model, batch)
    before = model.memory_values.detach().clone()
    loss_of(out, batch).backward()
    optimizer.step()
    assert len(changed_rows(before, model.memory_values.detach())) > TOP_T


def test_reference_components_tracker_ranker_and_gradient_mask(tmp_path):
    """The reference's three pieces composed by hand, as its sparse_finetuner.py does."""
    model = tiny_model()
    tracker = BackgroundCorpusIndexTracker(num_batches=3, num_slots=N)
    tracker.start_collection()
    df = torch.zeros(N, dtype=torch.int64)
    for batch in loader(0, 5):                        # stops by itself after num_batches=3
        with torch.no_grad():
            indices = model(batch).memory_indices
        counted = tracker.add_batch_indices(indices)
        if tracker.current_batch_id <= 3 and counted is not None:
            df[torch.cat([i.flatten() for i in indices]).unique()] += 1
    assert tracker.current_batch_id == 3 and not tracker.is_collecting
    assert [tracker.get_document_frequency(i) for i in range(N)] == df.tolist()
    tracker.save(tmp_path / "bg.safetensors")
    loaded = BackgroundCorpusIndexTracker(num_slots=N)
    loaded.load(tmp_path / "bg.safetensors")
    assert torch.equal(loaded.document_frequency, df) and loaded.num_batches == 3

    ranker = TFIDFRanker(loaded, use_idf=True)
    assert ranker.num_background_batches == 3
    mask = SparseMemoryGradientMask(model.memory_values)
    mask.register_hook()
    optimizer = torch.optim.SGD([model.memory_values], lr=2.0)
    batch = loader(1, 1)[0]
    out = model(batch)
    top = ranker.rank_indices(out.memory_indices, TOP_T)
    idf = torch.log(torch.tensor(4.0) / (df[top].double() + 1))
    counts = torch.cat([i.flatten() for i in out.memory_indices]).bincount(minlength=N)[top]
    scores = counts.double() * idf
    assert torch.all(scores[:-1] >= scores[1:])     # highest score first
    mask.set_trainable_indices(top)
    before = model.memory_values.detach().clone()
    loss_of(out, batch).backward()
    optimizer.step()
    optimizer.zero_grad()
    moved = changed_rows(before, model.memory_values.detach())
    assert moved and moved <= set(top.tolist())
    mask.remove_hook()
    assert mask.hook_handle is None
    out = model(batch)
    before = model.memory_values.detach().clone()
    loss_of(out, batch).backward()
    optimizer.step()
    assert len(changed_rows(before, model.memory_values.detach())) > TOP_T


def test_num_background_batches_is_validated_and_old_checkpoints_do_not_warn():
    import warnings

    import pytest
    with pytest.raises(ValueError, match="num_background_batches"):
        SparseMemoryFinetuningArgs(num_background_batches=0)
    model = tiny_model()
    finetuner = SparseMemoryFinetuner(SparseMemoryFinetuningArgs(enabled=True, use_idf=False), model.memory_values)
    state = finetuner.state_dict()
    del state["args"]["num_background_batches"]      # a checkpoint written before the option existed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        finetuner.load_state_dict(state)
