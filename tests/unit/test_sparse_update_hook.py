"""The reference README loop on a small memory model: only the selected rows of the values table move."""

from __future__ import annotations

import gc
import math
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparse_update import SparseMemoryFinetuner, SparseMemoryFinetuningArgs


class ToyMemoryLM(nn.Module):
    """Embedding → key lookup (top-k per head) → embedding_bag over a values table → logits."""

    def __init__(self, *, vocab: int = 40, dim: int = 8, num_slots: int = 256, heads: int = 2, k: int = 4,
                 sparse: bool = True) -> None:
        super().__init__()
        self.heads, self.k, self.sparse = heads, k, sparse
        self.embed = nn.Embedding(vocab, dim)
        self.keys = nn.Parameter(torch.randn(heads, num_slots, dim))
        self.memory_values = nn.Parameter(torch.empty(num_slots, dim).normal_(std=0.5))
        self.out = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None):
        b, t = tokens.shape
        x = self.embed(tokens)
        scores, idx = torch.einsum("btd,hnd->bthn", x, self.keys).topk(self.k, dim=-1)
        y = F.embedding_bag(idx.reshape(-1, self.k), self.memory_values, mode="sum",
                            per_sample_weights=scores.softmax(-1).reshape(-1, self.k), sparse=self.sparse)
        logits = self.out(x + y.view(b, t, self.heads, -1).sum(2))
        indices = idx.reshape(b, t, -1).clone()
        if padding_mask is not None:
            indices[~padding_mask] = -1
        return logits, indices


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    # Every real position carries loss (target: the token itself), so every row a real position read
    # gets a nonzero gradient and "rows that changed" == "rows selected" exactly.
    target = tokens.masked_fill(~padding_mask, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)


def make_batch(gen: torch.Generator, *, batch: int = 4, seq: int = 8, vocab: int = 40):
    tokens = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[0, :3] = False  # left padding on one row
    return tokens, mask


def hand_top_t(indices: torch.Tensor, df: list[int], num_batches: int, top_t: int) -> list[int]:
    counts = Counter(i for i in indices.flatten().tolist() if i >= 0)
    total = sum(counts.values())
    score = {i: c / total * math.log((num_batches + 1) / (df[i] + 1)) for i, c in counts.items()}
    return sorted(sorted(score, key=lambda i: (-score[i], i))[:top_t])


def changed_rows(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    return (before != after).any(dim=1).nonzero().flatten().tolist()


def build(sparse: bool) -> ToyMemoryLM:
    torch.manual_seed(0)
    model = ToyMemoryLM(sparse=sparse)
    for name, p in model.named_parameters():
        p.requires_grad_(name == "memory_values")  # every other parameter is frozen, the keys too
    return model


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse_grad", "dense_grad"])
def test_reference_readme_loop(tmp_path: Path, sparse: bool) -> None:
    model = build(sparse)
    gen = torch.Generator().manual_seed(1)
    top_t = 6
    # --- the README, as written -------------------------------------------------------------
    args = SparseMemoryFinetuningArgs(enabled=True, top_t=top_t, use_idf=True)
    finetuner = SparseMemoryFinetuner(args, model.memory_values)
    finetuner.background_tracker.start_collection()
    background_df = [0] * 256
    for _ in range(6):
        tokens, mask = make_batch(gen)
        with torch.no_grad():
            _, indices = model(tokens, mask)
        finetuner.background_tracker.add_batch_indices(indices)
        for i in set(indices[indices >= 0].tolist()):
            background_df[i] += 1
    finetuner.save_background_indices(tmp_path / "bg_indices.pt")
    finetuner.load_background_indices(tmp_path / "bg_indices.pt")
    optimizer = torch.optim.SGD([model.memory_values], lr=2.0)
    for _ in range(3):
        tokens, mask = make_batch(gen)
        logits, indices = model(tokens, mask)
        finetuner.update_trainable_indices(indices)
        loss = lm_loss(logits, tokens, mask)
        before = model.memory_values.detach().clone()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        # ------------------------------------------------------------------------------------------
        expected = hand_top_t(indices, background_df, 6, top_t)
        assert finetuner.trainable_indices.tolist() == expected
        assert changed_rows(before, model.memory_values.detach()) == expected
    assert finetuner.background_tracker.document_frequency.tolist() == background_df


def test_control_without_finetuner_changes_more_rows() -> None:
    model = build(True)
    tokens, mask = make_batch(torch.Generator().manual_seed(1))
    logits, indices = model(tokens, mask)
    before = model.memory_values.detach().clone()
    lm_loss(logits, tokens, mask).backward()
    torch.optim.SGD([model.memory_values], lr=2.0).step()
    accessed = sorted(set(indices[indices >= 0].tolist()))
    assert changed_rows(before, model.memory_values.detach()) == accessed
    assert len(accessed) > 20


def run_steps(model: ToyMemoryLM, finetuner: SparseMemoryFinetuner, optimizer: torch.optim.Optimizer, *,
              steps: int = 2, attach: bool = True, seed: int = 1) -> list[list[int]]:
    if attach:
        finetuner.attach(optimizer)
    gen = torch.Generator().manual_seed(seed)
    changes = []
    for _ in range(steps):
        tokens, mask = make_batch(gen)
        logits, indices = model(tokens, mask)
        finetuner.update_trainable_indices(indices)
        before = model.memory_values.detach().clone()
        lm_loss(logits, tokens, mask).backward()
        optimizer.step()
        optimizer.zero_grad()
        assert changed_rows(before, model.memory_values.detach()) == finetuner.trainable_indices.tolist()
        changes.append(finetuner.trainable_indices.tolist())
    return changes


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse_grad", "dense_grad"])
def test_attach_single_process_tf_only(sparse: bool) -> None:
    model = build(sparse)
    ft = SparseMemoryFinetuner(SparseMemoryFinetuningArgs(enabled=True, top_t=5, use_idf=False), model.memory_values)
    opt = torch.optim.SGD([model.memory_values], lr=1.0)
    run_steps(model, ft, opt)
    assert ft.synced_bytes_last_step == 0  # nothing to all-reduce in one process
    assert ft.attach(opt) is ft.attach(opt)  # attaching twice returns the same handle


def test_mask_only_at_step_for_gradient_accumulation() -> None:
    """mask_in_backward=False: select after backward (all micro-batches), the pre-hook masks at step."""
    model = build(True)
    args = SparseMemoryFinetuningArgs(enabled=True, top_t=4, use_idf=False, mask_in_backward=False)
    ft = SparseMemoryFinetuner(args, model.memory_values)
    opt = torch.optim.SGD([model.memory_values], lr=1.0)
    ft.attach(opt)
    gen = torch.Generator().manual_seed(3)
    all_indices = []
    for _ in range(2):  # two micro-batches
        tokens, mask = make_batch(gen)
        logits, indices = model(tokens, mask)
        lm_loss(logits, tokens, mask).backward()
        all_indices.append(indices)
    assert model.memory_values.grad._nnz() > 4  # unmasked until the step
    ft.update_trainable_indices(all_indices)
    counts = Counter(i for t in all_indices for i in t.flatten().tolist() if i >= 0)
    expected = sorted(sorted(counts, key=lambda i: (-counts[i], i))[:4])
    before = model.memory_values.detach().clone()
    opt.step()
    assert changed_rows(before, model.memory_values.detach()) == expected


def test_dense_output_with_adamw() -> None:
    model = build(True)  # sparse gradient from embedding_bag, AdamW needs it dense
    args = SparseMemoryFinetuningArgs(enabled=True, top_t=5, use_idf=False, dense_output=True)
    ft = SparseMemoryFinetuner(args, model.memory_values)
    opt = torch.optim.AdamW([model.memory_values], lr=0.1, weight_decay=0.0)
    tokens, mask = make_batch(torch.Generator().manual_seed(1))
    logits, indices = model(tokens, mask)
    ft.update_trainable_indices(indices)
    lm_loss(logits, tokens, mask).backward()
    assert not model.memory_values.grad.is_sparse  # densified even without attach()
    ft.attach(opt)
    before = model.memory_values.detach().clone()
    opt.step()  # first AdamW step, no weight decay: zero-gradient rows stay put
    assert changed_rows(before, model.memory_values.detach()) == ft.trainable_indices.tolist()


def test_gradient_accumulation_and_explicit_sync() -> None:
    model = build(True)
    ft = SparseMemoryFinetuner(SparseMemoryFinetuningArgs(enabled=True, top_t=3, use_idf=False), model.memory_values)
    opt = torch.optim.SGD([model.memory_values], lr=1.0)
    ft.attach(opt)
    tokens, mask = make_batch(torch.Generator().manual_seed(5))
    logits, indices = model(tokens, mask)
    ft.update_trainable_indices(indices)
    loss = lm_loss(logits, tokens, mask)
    loss.backward(retain_graph=True)
    loss.backward()  # second accumulation, also masked
    ft.sync_gradients()
    grad = model.memory_values.grad
    assert grad.is_sparse and grad._indices()[0].tolist() == ft.trainable_indices.tolist()
    before = model.memory_values.detach().clone()
    opt.step()
    assert changed_rows(before, model.memory_values.detach()) == ft.trainable_indices.tolist()


def test_no_gradient_this_step_is_fine() -> None:
    model = build(True)
    ft = SparseMemoryFinetuner(SparseMemoryFinetuningArgs(enabled=True, top_t=3, use_idf=False), model.memory_values)
    opt = torch.optim.SGD([model.memory_values], lr=1.0)
    ft.attach(opt)
    ft.update_trainable_indices(torch.tensor([1, 2, 3]))
    before = model.memory_values.detach().clone()
    opt.step()  # values.grad is None
    assert torch.equal(before, model.memory_values.detach())


def test_backward_before_selection_is_an_actionable_error() -> None:
    model = build(True)
    SparseMemoryFinetuner(SparseMemoryFinetuningArgs(enabled=True, top_t=3), model.memory_values)
    tokens, mask = make_batch(torch.Generator().manual_seed(1))
    logits, _ = model(tokens, mask)
    with pytest.raises(RuntimeError, match="update_trainable_indices"):
        lm_loss(logits, tokens, mask).backward()


def test_remove_detach_and_disabled() -> None:
    model = build(True)
    ft = SparseMemoryFinetuner(SparseMemoryFinetuningArgs(enabled=True, top_t=3, use_idf=False), model.memory_values)
    opt = torch.optim.SGD([model.memory_values], lr=1.0)
    handle = ft.attach(opt)
    assert len(opt._optimizer_step_pre_hooks) == 1
    ft.detach(opt)
    assert len(opt._optimizer_step_pre_hooks) == 0
    handle.remove()  # harmless twice
    ft.remove()
    tokens, mask = make_batch(torch.Generator().manual_seed(1))
    logits, indices = model(tokens, mask)
    lm_loss(logits, tokens, mask).backward()  # no hook left: no selection needed, nothing masked
    accessed = sorted(set(indices[indices >= 0].tolist()))
    assert set(accessed) <= set(model.memory_values.grad.coalesce().indices()[0].tolist())  # padded reads too

    disabled = SparseMemoryFinetuner(SparseMemoryFinetuningArgs(enabled=False), model.memory_values)
    assert disabled.update_trainable_indices(indices) == {}
    disabled.attach(opt).remove()
    assert len(opt._optimizer_step_pre_hooks) == 0


def test_dropped_finetuner_leaves_an_inert_hook() -> None:
    model = build(True)
    ft = SparseMemoryFinetuner(SparseMemoryFinetuningArgs(enabled=True, top_t=3), model.memory_values)
    del ft
    gc.collect()
    tokens, mask = make_batch(torch.Generator().manual_seed(1))
    logits, _ = model(tokens, mask)
    lm_loss(logits, tokens, mask).backward()  # would raise "no trainable rows" if the hook were alive
    assert model.memory_values.grad is not None


def test_constructor_and_attach_errors() -> None:
    model = build(True)
    args = SparseMemoryFinetuningArgs(enabled=True, top_t=3, use_idf=False)
    with pytest.raises(ValueError, match="meta"):
        SparseMemoryFinetuner(args, nn.Parameter(torch.empty(8, 2, device="meta")))
    with pytest.raises(ValueError, match="requires_grad|require grad"):
        SparseMemoryFinetuner(args, nn.Parameter(torch.zeros(8, 2), requires_grad=False))
    ft = SparseMemoryFinetuner(args, model.memory_values)
    with pytest.raises(ValueError, match="does not hold the values parameter"):
        ft.attach(torch.optim.SGD([model.out.weight], lr=1.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ft.attach(torch.optim.SGD([model.memory_values], lr=1.0, momentum=0.9))
    assert any("momentum" in str(w.message) for w in caught)


def test_no_state_on_the_parameter() -> None:
    model = build(True)
    values = model.memory_values
    attrs_before = set(vars(values))
    ft = SparseMemoryFinetuner(SparseMemoryFinetuningArgs(enabled=True, top_t=3, use_idf=False), values)
    ft.attach(torch.optim.SGD([values], lr=1.0))
    assert set(vars(values)) == attrs_before


def _masked_reference(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(grad)
    out[rows] = grad[rows]
    return out


def test_dense_gradient_is_masked_in_place_without_a_second_buffer() -> None:
    """memory.sparse_grad=False: the N x d gradient autograd hands over becomes .grad and is masked there, in
    place (no second N x d tensor); the values are those of masking a copy."""
    model = build(False)
    values = model.memory_values
    seen: dict[str, int] = {}

    def record(grad: torch.Tensor) -> None:          # runs before the finetuner's hook (registered first)
        seen["ptr"] = grad.data_ptr()                 # no reference kept: autograd may hand the tensor over
        seen["unmasked"] = grad.clone()

    values.register_hook(record)
    ft = SparseMemoryFinetuner(SparseMemoryFinetuningArgs(enabled=True, top_t=5, use_idf=False), values)
    tokens, mask = make_batch(torch.Generator().manual_seed(1))
    logits, indices = model(tokens, mask)
    ft.update_trainable_indices(indices)
    lm_loss(logits, tokens, mask).backward()
    grad = values.grad
    assert grad.data_ptr() == seen["ptr"]      # the very buffer backward produced: nothing reallocated
    rows = ft.trainable_indices
    assert torch.equal(grad, _masked_reference(seen["unmasked"], rows))
    assert (grad.abs().sum(1) > 0).nonzero().flatten().tolist() == rows.tolist()

    # a second backward accumulates onto .grad: that contribution is masked on its own, as before
    logits, indices = model(tokens, mask)
    lm_loss(logits, tokens, mask).backward()
    assert torch.equal(values.grad, _masked_reference(2 * seen["unmasked"], rows))

    # torch.autograd.grad never reaches .grad: the tensor hook still masks what it returns
    values.grad = None
    logits, _ = model(tokens, mask)
    (g,) = torch.autograd.grad(lm_loss(logits, tokens, mask), values)
    assert torch.equal(g, _masked_reference(seen["unmasked"], rows))
    assert values.grad is None


def test_dense_in_place_mask_matches_the_copying_mask() -> None:
    """The old path (mask_rows builds a masked copy in the tensor hook) and the in-place one give the same
    table after a few SGD steps, bit for bit."""
    from sparse_update.hook import mask_rows

    def run(in_place: bool) -> torch.Tensor:
        model = build(False)
        ft = SparseMemoryFinetuner(SparseMemoryFinetuningArgs(enabled=True, top_t=5, use_idf=False),
                                   model.memory_values)
        if not in_place:
            ft._accumulates = lambda: False           # force the copying branch
        opt = torch.optim.SGD([model.memory_values], lr=1.0)
        run_steps(model, ft, opt, steps=3, seed=4)
        return model.memory_values.detach().clone()

    assert torch.equal(run(True), run(False))
    g = torch.randn(16, 3)
    rows = torch.tensor([1, 5, 9])
    assert torch.equal(mask_rows(g, rows, dense_output=False), _masked_reference(g, rows))


@pytest.mark.parametrize("kept", [3, 200], ids=["few_rows_copied", "many_rows_complement_zeroed"])
def test_in_place_mask_either_way_equals_the_masked_copy(kept: int) -> None:
    model = build(False)
    ft = SparseMemoryFinetuner(SparseMemoryFinetuningArgs(enabled=True, top_t=5, use_idf=False), model.memory_values)
    g = torch.randn(256, 8)
    rows = torch.randperm(256, generator=torch.Generator().manual_seed(0))[:kept].sort().values
    expected = _masked_reference(g, rows)
    out = ft._masked_in_place(g, rows)
    assert out is g and torch.equal(g, expected)
    assert torch.equal(torch.signbit(g), torch.signbit(expected))   # +0.0 where masked, like zeros_like
