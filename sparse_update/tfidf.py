"""Slot counting, the TF-IDF score of DESIGN.md §2, and a deterministic top-t selection.

Pure tensor functions (no collectives): the finetuner all-reduces the counts in between.

Counts are int32. They are exact (unlike float32, exact only up to 2**24 ≈ 16.7M) while all-reducing the
same 4 bytes per slot as float32 and half of int64 (DESIGN.md §4: 1M fp32 counts 5–7 ms on gloo, int64
12 ms), and index_add_ writes them directly (no int64 bincount result to convert).
One slot would need more than 2**31 lookups in one global batch to overflow, i.e. > 2 billion
(token, head, layer) lookups of the same row.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

COUNT_DTYPE = torch.int32
SCORE_DTYPE = torch.float64  # scores are cheap (N floats); float64 avoids spurious ties between slots

Indices = Union[Tensor, Sequence[Tensor]]


def count_slot_accesses(indices: Indices, num_slots: int, *, device: torch.device | None = None) -> Tensor:
    """How often each slot was looked up: int32 tensor of length `num_slots`.

    `indices` is a LongTensor of any shape or a list of them (one per memory layer); entries < 0 (padding)
    are ignored. Raises ValueError on an index >= num_slots.
    """
    tensors = [indices] if isinstance(indices, Tensor) else list(indices)
    if not tensors:
        raise ValueError("no memory indices given: pass a LongTensor or a non-empty list of them")
    counts: Tensor | None = None
    for t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f"memory indices must be tensors, got {type(t).__name__}")
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise TypeError(f"memory indices must be an integer tensor, got dtype {t.dtype}")
        if counts is None:
            counts = torch.zeros(num_slots, dtype=COUNT_DTYPE, device=device or t.device)
        flat = t.detach().reshape(-1).to(device=counts.device, dtype=torch.long)
        if flat.numel() == 0:
            continue
        lo, hi = (int(v) for v in torch.aminmax(flat))  # one pass, one host sync
        if hi >= num_slots:
            raise ValueError(f"memory index {hi} is out of range for a values table of {num_slots} rows")
        if lo < 0:
            flat = flat[flat >= 0]
        # index_add_ of ones: counts straight into int32 (bincount makes int64 and was ~2x slower here).
        counts.index_add_(0, flat, torch.ones(1, dtype=COUNT_DTYPE, device=counts.device).expand(flat.numel()))
    assert counts is not None
    return counts


def inverse_document_frequency(document_frequency: Tensor, num_batches: int) -> Tensor:
    """ln((|B|+1)/(df(i)+1)) for every slot (float64)."""
    df = document_frequency.to(SCORE_DTYPE)
    return torch.log((float(num_batches) + 1.0) / (df + 1.0))


def score_slots(counts: Tensor, idf: Tensor | None) -> Tensor:
    """c/Σc · idf elementwise (float64), or the counts themselves when idf is None (TF-only).

    Works on any subset of slots as long as `counts` holds every nonzero count (Σc must be the total).
    """
    c = counts.to(SCORE_DTYPE)
    if idf is None:
        return c
    total = c.sum().clamp_min(1.0)  # an all-padding batch has Σc = 0: every score is then 0
    return c / total * idf.to(device=c.device, dtype=SCORE_DTYPE)


def tfidf_scores(
    counts: Tensor,
    document_frequency: Tensor | None,
    num_batches: int,
    *,
    use_idf: bool,
) -> Tensor:
    """Score of every slot (float64): c(i)/Σc · ln((|B|+1)/(df(i)+1)), or c(i) when use_idf is False."""
    if not use_idf:
        return score_slots(counts, None)
    if document_frequency is None:
        raise ValueError("use_idf=True needs document frequencies")
    return score_slots(counts, inverse_document_frequency(document_frequency.to(counts.device), num_batches))


def top_k_positions(values: Tensor, k: int) -> Tensor:
    """Ascending positions of the k largest entries of a 1-D tensor; on equal values the lower position wins.

    torch.topk alone does not order ties, and every rank must pick exactly the same rows.
    """
    n = values.numel()
    k = min(int(k), n)
    if k == n:
        return torch.arange(n, device=values.device)
    threshold = torch.topk(values, k, sorted=False).values.min()
    above = (values > threshold).nonzero().flatten()
    # nonzero() returns ascending positions: the lowest tied positions fill the remaining places.
    tied = (values == threshold).nonzero().flatten()[: k - above.numel()]
    return torch.cat([above, tied]).sort().values


def select_all_accessed(counts: Tensor) -> Tensor:
    """Sorted LongTensor of every slot with counts > 0 (the union over the global batch)."""
    return counts.nonzero().flatten()


def select_top_t(scores: Tensor, counts: Tensor, top_t: int) -> Tensor:
    """Sorted LongTensor of the `top_t` accessed slots (counts > 0) with the highest scores.

    Fewer than `top_t` accessed slots: all of them. Equal scores: the lower slot index wins.
    """
    accessed = select_all_accessed(counts)  # ascending, so position order == slot order for ties
    return accessed[top_k_positions(scores.index_select(0, accessed), top_t)]


def quantiles(values: Tensor, qs: Sequence[float]) -> list[float]:
    """Linear-interpolated quantiles of a 1-D tensor (torch.quantile caps its input at 2**24 elements)."""
    if values.numel() == 0:
        return [0.0 for _ in qs]
    v = values.detach().to(SCORE_DTYPE).sort().values
    n = v.numel()
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = int(pos)
        hi = min(lo + 1, n - 1)
        frac = pos - lo
        out.append((v[lo] * (1.0 - frac) + v[hi] * frac).item())
    return out


def rank_lexicographic(primary: Tensor, secondary: Tensor, k: int) -> Tensor:
    """Ascending positions of the k entries that are largest by `primary`, then by `secondary`; equal on both:
    the lower position wins (exact: two stable sorts, no float combination of the keys)."""
    n = primary.numel()
    k = min(int(k), n)
    order = torch.sort(secondary, descending=True, stable=True).indices
    order = order[torch.sort(primary.index_select(0, order), descending=True, stable=True).indices]
    return order[:k].sort().values


def sequence_votes(indices: Indices, num_slots: int, idf: Tensor, share: int, *,
                   device: torch.device | None = None) -> Tensor:
    """int32 [N]: for every sequence (row of the leading dimension) of this rank's batch, a vote for each of
    the `share` slots with the highest TF-IDF *within that sequence*, c_s(i)/Σc_s · idf(i) (ties: lower slot
    first). A sequence that read nothing votes for nothing. Pure: the caller all-reduces the votes."""
    tensors = [indices] if isinstance(indices, Tensor) else list(indices)
    rows = int(tensors[0].shape[0]) if tensors and tensors[0].dim() > 0 else 0
    votes = torch.zeros(num_slots, dtype=COUNT_DTYPE, device=device or tensors[0].device)
    for r in range(rows):
        flat = torch.cat([t[r].reshape(-1) for t in tensors]).to(device=votes.device, dtype=torch.long)
        flat = flat[flat >= 0]
        if flat.numel() == 0:
            continue
        slots, counts = torch.unique(flat, return_counts=True)      # ascending slots
        scores = score_slots(counts, idf.to(votes.device).index_select(0, slots))
        votes[slots[top_k_positions(scores, share)]] += 1
    return votes


def sequences_read(indices: Indices) -> int:
    """How many rows of this rank's batch read at least one slot (padding = -1)."""
    tensors = [indices] if isinstance(indices, Tensor) else list(indices)
    if not tensors or tensors[0].dim() == 0:
        return 0
    real = torch.stack([(t.reshape(t.shape[0], -1) >= 0).any(1) for t in tensors]).any(0)
    return int(real.sum())


KL_EPS = 1e-8   # inside the log, as in the KL ranking's reference code (arXiv 2604.05248's authors)


def background_access_probability(access_counts: Tensor) -> Tensor:
    """q(i) = (C_bg(i) + 1) / Σ_j (C_bg(j) + 1) over all N slots (float64): the add-one smoothed share of the
    background lookups that went to slot i."""
    c = access_counts.to(SCORE_DTYPE) + 1.0
    return c / c.sum()


def kl_scores(counts: Tensor, background_probability: Tensor) -> Tensor:
    """Each slot's term of KL(p ‖ q), p(i) · ln((p(i) + ε) / (q(i) + ε)) with p(i) = c(i)/Σc the batch's
    access distribution and q the background's (background_access_probability), ε = 1e-8 (float64).

    Like score_slots, works on any subset of slots as long as `counts` holds every nonzero count; a slot
    the batch did not read scores 0 and is never selected (select only among counts > 0)."""
    c = counts.to(SCORE_DTYPE)
    p = c / c.sum().clamp_min(1.0)
    q = background_probability.to(device=c.device, dtype=SCORE_DTYPE)
    return p * torch.log((p + KL_EPS) / (q + KL_EPS))
