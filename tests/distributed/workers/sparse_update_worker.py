"""torchrun worker for tests/distributed/test_sparse_update_dist.py (2 ranks, gloo).

Every rank runs all checks on its own data and writes OUT_DIR/rank{r}.json; the test asserts on them.
Single-process references run inside the worker on the gathered (concatenated) global batch, through
the same API with a one-rank process group.

    torchrun --standalone --nproc_per_node=2 tests/distributed/workers/sparse_update_worker.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # repository root

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sparse_update import SparseMemoryFinetuner, SparseMemoryFinetuningArgs  # noqa: E402
from training.distributed import close  # noqa: E402

NUM_SLOTS, DIM, VOCAB, TOP_T, LR = 256, 8, 40, 6, 2.0


class ToyMemoryLM(nn.Module):
    """Embedding → key lookup (top-k per head) → embedding_bag over a values table → logits."""

    def __init__(self, *, sparse: bool, heads: int = 2, k: int = 4) -> None:
        super().__init__()
        self.heads, self.k, self.sparse = heads, k, sparse
        self.embed = nn.Embedding(VOCAB, DIM)
        self.keys = nn.Parameter(torch.randn(heads, NUM_SLOTS, DIM))
        self.memory_values = nn.Parameter(torch.empty(NUM_SLOTS, DIM).normal_(std=0.5))
        self.out = nn.Linear(DIM, VOCAB)
        for name, p in self.named_parameters():
            p.requires_grad_(name == "memory_values")

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor):
        b, t = tokens.shape
        x = self.embed(tokens)
        scores, idx = torch.einsum("btd,hnd->bthn", x, self.keys).topk(self.k, dim=-1)
        y = F.embedding_bag(idx.reshape(-1, self.k), self.memory_values, mode="sum",
                            per_sample_weights=scores.softmax(-1).reshape(-1, self.k), sparse=self.sparse)
        logits = self.out(x + y.view(b, t, self.heads, -1).sum(2))
        indices = idx.reshape(b, t, -1).clone()
        indices[~mask] = -1
        return logits, indices


def build(sparse: bool) -> ToyMemoryLM:
    torch.manual_seed(0)  # identical initial model on every rank
    return ToyMemoryLM(sparse=sparse)


def loss_fn(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    target = tokens.masked_fill(~mask, -100)  # every real position carries loss
    return F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1), ignore_index=-100)


def local_batch(step: int, rank: int, *, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Different data on every rank; the same padding pattern, so per-rank means average to the global mean."""
    gen = torch.Generator().manual_seed(1000 * (step + offset) + rank)
    tokens = torch.randint(0, VOCAB, (3, 8), generator=gen)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0, :2] = False
    return tokens, mask


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def identical_across_ranks(t: torch.Tensor) -> tuple[bool, float]:
    hi, lo = t.detach().clone(), t.detach().clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return bool(torch.equal(hi, lo)), float((hi - lo).abs().max())


def changed(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    return (before != after).any(dim=1).nonzero().flatten().tolist()


def same_on_all_ranks(obj) -> bool:
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return all(o == objs[0] for o in objs)


def check_background(res: dict, solo: dist.ProcessGroup, out_dir: Path) -> SparseMemoryFinetuner:
    rank = dist.get_rank()
    model = build(True)
    args = SparseMemoryFinetuningArgs(enabled=True, top_t=TOP_T, use_idf=True)
    ft = SparseMemoryFinetuner(args, model.memory_values)
    ref = SparseMemoryFinetuner(args, build(True).memory_values, process_group=solo)
    local_only = SparseMemoryFinetuner(args, build(True).memory_values, process_group=solo)
    for tracker in (ft.background_tracker, ref.background_tracker, local_only.background_tracker):
        tracker.start_collection()
    counts_equal = True
    for b in range(6):
        tokens, mask = local_batch(b, rank, offset=100)
        with torch.no_grad():
            _, idx = model(tokens, mask)
        counts = ft.background_tracker.add_batch_indices(idx)
        ref_counts = ref.background_tracker.add_batch_indices(gather_cat(idx))  # one process, global batch
        local_only.background_tracker.add_batch_indices(idx)
        counts_equal &= bool(torch.equal(counts, ref_counts))
    res["bg_counts_equal_single_process"] = counts_equal
    res["bg_df_equal_single_process"] = bool(
        torch.equal(ft.background_tracker.document_frequency, ref.background_tracker.document_frequency)
    )
    res["bg_access_equal_single_process"] = bool(
        torch.equal(ft.background_tracker.access_counts, ref.background_tracker.access_counts))
    res["bg_num_batches"] = ft.background_tracker.num_batches
    res["bg_local_df_differs"] = not torch.equal(
        ft.background_tracker.document_frequency, local_only.background_tracker.document_frequency
    )
    path = out_dir / "bg_indices.pt"
    ft.save_background_indices(path)  # collective: rank 0 writes, everyone waits
    loaded = SparseMemoryFinetuner(args, build(True).memory_values)
    loaded.load_background_indices(path)
    res["bg_file_roundtrip"] = bool(
        torch.equal(loaded.background_tracker.document_frequency, ft.background_tracker.document_frequency)
    ) and loaded.background_tracker.num_batches == 6 and torch.equal(
        loaded.background_tracker.access_counts, ft.background_tracker.access_counts)
    return ft


def train(res: dict, name: str, *, solo: dist.ProcessGroup, background: SparseMemoryFinetuner, sparse: bool,
          attach: bool, mode: str = "top_t", dense_output: bool = False, steps: int = 3,
          ranking: str = "tfidf", count_exchange: str = "auto") -> None:
    rank = dist.get_rank()
    args = SparseMemoryFinetuningArgs(enabled=True, top_t=TOP_T, ranking=ranking, mode=mode, dense_output=dense_output,
                                      count_exchange=count_exchange)
    model, ref_model = build(sparse), build(sparse)
    ft = SparseMemoryFinetuner(args, model.memory_values)
    ref = SparseMemoryFinetuner(args, ref_model.memory_values, process_group=solo)
    bg = background.background_tracker
    for f in (ft, ref):
        f.background_tracker.set_statistics(bg.document_frequency.clone(), bg.num_batches, bg.access_counts.clone())
    opt = torch.optim.SGD([model.memory_values], lr=LR)
    ref_opt = torch.optim.SGD([ref_model.memory_values], lr=LR)
    if attach:
        ft.attach(opt)
    ref.attach(ref_opt)
    same_selection, changed_is_selection, stats_agree, selections = True, True, True, []
    for step in range(steps):
        tokens, mask = local_batch(step, rank)
        logits, idx = model(tokens, mask)
        stats = ft.update_trainable_indices(idx)
        stats_agree &= same_on_all_ranks(stats)
        # One process on the concatenated global batch (indices depend only on frozen embed/keys).
        g_tokens, g_mask = gather_cat(tokens), gather_cat(mask)
        ref_logits, ref_idx = ref_model(g_tokens, g_mask)
        ref_stats = ref.update_trainable_indices(ref_idx)
        same_selection &= bool(torch.equal(ft.trainable_indices, ref.trainable_indices))
        same_selection &= stats == ref_stats
        if mode == "all_accessed":
            union = sorted(set(gather_cat(idx).flatten().tolist()) - {-1})
            same_selection &= ft.trainable_indices.tolist() == union
        selections.append(ft.trainable_indices.tolist())
        before = model.memory_values.detach().clone()
        loss_fn(logits, tokens, mask).backward()
        opt.step()
        opt.zero_grad()
        loss_fn(ref_logits, g_tokens, g_mask).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        changed_is_selection &= changed(before, model.memory_values.detach()) == ft.trainable_indices.tolist()
    identical, max_diff = identical_across_ranks(model.memory_values)
    res[f"{name}/same_selection_as_single_process"] = same_selection
    res[f"{name}/stats_same_on_all_ranks"] = stats_agree
    res[f"{name}/changed_rows_are_selected_rows"] = changed_is_selection
    res[f"{name}/identical_across_ranks"] = identical
    res[f"{name}/max_diff_across_ranks"] = max_diff
    diff = (model.memory_values - ref_model.memory_values).detach().abs().max()
    res[f"{name}/max_diff_vs_single_process"] = float(diff)
    res[f"{name}/selected_per_step"] = [len(s) for s in selections]
    res[f"{name}/selections"] = selections
    res[f"{name}/count_bytes_last_step"] = ft.count_bytes_last_step
    res[f"{name}/read_slots_last_step"] = len(set(idx.flatten().tolist()) - {-1})
    res[f"{name}/synced_bytes_last_step"] = ft.synced_bytes_last_step
    res[f"{name}/synced_rows_last_step"] = ft.synced_rows_last_step
    res[f"{name}/changed_total"] = changed(build(sparse).memory_values.detach(), model.memory_values.detach())


def check_missing_grad(res: dict, background: SparseMemoryFinetuner) -> None:
    """Rank 1 has no values gradient this step (e.g. it skipped the memory): no hang, same table."""
    rank = dist.get_rank()
    model = build(True)
    ft = SparseMemoryFinetuner(SparseMemoryFinetuningArgs(enabled=True, top_t=TOP_T), model.memory_values)
    ft.background_tracker.set_statistics(
        background.background_tracker.document_frequency.clone(), background.background_tracker.num_batches
    )
    opt = torch.optim.SGD([model.memory_values], lr=LR)
    ft.attach(opt)
    tokens, mask = local_batch(0, rank)
    logits, idx = model(tokens, mask)
    ft.update_trainable_indices(idx)
    if rank == 0:
        loss_fn(logits, tokens, mask).backward()
    before = model.memory_values.detach().clone()
    opt.step()
    res["missing_grad/identical_across_ranks"] = identical_across_ranks(model.memory_values)[0]
    res["missing_grad/changed_rows_within_selection"] = set(changed(before, model.memory_values.detach())) <= set(
        ft.trainable_indices.tolist()
    )
    res["missing_grad/something_changed"] = bool(changed(before, model.memory_values.detach()))
    opt.zero_grad()
    ft.update_trainable_indices(idx)
    before = model.memory_values.detach().clone()
    opt.step()  # no rank has a gradient: nothing moves, grad stays None
    res["missing_grad/none_anywhere_no_change"] = (
        torch.equal(before, model.memory_values.detach()) and model.memory_values.grad is None
    )


def main() -> None:
    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    solo_groups = [dist.new_group([r]) for r in range(dist.get_world_size())]  # created collectively
    solo = solo_groups[rank]
    res: dict = {"world_size": dist.get_world_size()}
    background = check_background(res, solo, out_dir)
    train(res, "sparse", solo=solo, background=background, sparse=True, attach=True)
    train(res, "control_no_attach", solo=solo, background=background, sparse=True, attach=False)
    train(res, "dense", solo=solo, background=background, sparse=False, attach=True, dense_output=True)
    train(res, "all_accessed", solo=solo, background=background, sparse=True, attach=True, mode="all_accessed")
    for ranking in ("tf", "kl", "seq_tfidf"):
        train(res, ranking, solo=solo, background=background, sparse=True, attach=True, ranking=ranking)
    for exchange in ("dense", "sparse"):
        train(res, f"exchange_{exchange}", solo=solo, background=background, sparse=True, attach=True,
              count_exchange=exchange)
    check_missing_grad(res, background)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(res, indent=1, sort_keys=True))
    close(together=True)   # gc, barrier, destroy: see training.distributed.close


if __name__ == "__main__":
    main()
