"""Product-key memory layer that reports which slots it read.

Each head's query is split in two halves, each scored against its own table of sqrt(N) sub-keys. The
top-k of each half, then the top-k over the k*k candidate sums, is exactly the top-k over all N
products (a_i + b_j) without materialising them: O(sqrt(N) * k_dim + k^2) per head and token.

Ties are broken deterministically towards the lower slot index (slot = i * sqrt(N) + j), in both
stages, so the result equals a stable brute-force ranking of all N scores.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import MemoryConfig


def _rms(x: Tensor, eps: float = 1e-6) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _top_set(scores: Tensor, k: int) -> Tensor:
    """Positions of the k largest entries along the last dim, in increasing position order; among
    entries equal to the k-th largest the lower positions win. topk finds the threshold, masks pick the
    set exactly (a full stable sort gives the same result but is ~6x slower on CPU)."""
    threshold = scores.topk(k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    above = scores > threshold
    ties = scores == threshold
    need = k - above.sum(dim=-1, keepdim=True)
    take = above | (ties & (ties.cumsum(dim=-1) <= need))
    return take.nonzero()[:, -1].view(*scores.shape[:-1], k)


def product_key_topk(query: Tensor, sub_keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k slots of the product-key score.

    query: (M, H, k_dim); sub_keys: (H, 2, n, k_dim / 2). Returns scores (M, H, k) in descending order
    (ties: lower slot first) and slot indices (M, H, k) in [0, n*n).
    """
    return topk_of_halves(*sub_key_scores(query, sub_keys), k)[:2]


def sub_key_scores(query: Tensor, sub_keys: Tensor) -> tuple[Tensor, Tensor]:
    """Each query half against its sub-key table: (M, H, n) twice."""
    half = query.shape[-1] // 2
    s1 = torch.einsum("mhd,hnd->mhn", query[..., :half], sub_keys[:, 0])
    s2 = torch.einsum("mhd,hnd->mhn", query[..., half:], sub_keys[:, 1])
    return s1, s2


def topk_of_halves(s1: Tensor, s2: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The exact top-k over the n*n sums s1_i + s2_j: scores (M, H, k) descending, slots (M, H, k), and
    each half's top-k sub-keys (M, H, k)."""
    n = s1.shape[-1]
    # Each half's winners come in index order, so the row-major k*k candidate grid is in increasing
    # slot order and the same rule (lower position wins ties) means lower slot wins.
    i1 = _top_set(s1, k)
    i2 = _top_set(s2, k)
    v1 = s1.gather(-1, i1)
    v2 = s2.gather(-1, i2)
    cand = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2)            # (M, H, k*k)
    cand_slots = (i1.unsqueeze(-1) * n + i2.unsqueeze(-2)).flatten(-2)   # (M, H, k*k)
    pos = _top_set(cand, k)                                              # slot order
    scores = cand.gather(-1, pos)
    scores, order = torch.sort(scores, dim=-1, descending=True, stable=True)   # only k entries
    return scores, cand_slots.gather(-1, pos.gather(-1, order)), i1, i2


def sub_key_balance_loss(s1: Tensor, s2: Tensor, i1: Tensor, i2: Tensor) -> Tensor:
    """Load-balancing auxiliary loss on sub-key usage, as MoE routers use (Switch Transformer): per head
    and sub-key table, n * sum_i f_i * P_i, with f_i the share of the tokens' top-k sub-keys that are i
    (counted, no gradient) and P_i the mean softmax probability of sub-key i over the tokens. It is 1.0
    when usage is uniform and grows to n as the tokens pile onto one sub-key; mean over heads and tables."""
    terms = []
    for s, i in ((s1, i1), (s2, i2)):
        n = s.shape[-1]
        f = torch.zeros(s.shape[1], n, dtype=s.dtype, device=s.device)
        f.scatter_add_(1, i.transpose(0, 1).reshape(s.shape[1], -1), torch.ones_like(i, dtype=s.dtype)
                       .transpose(0, 1).reshape(s.shape[1], -1))
        f = f / f.sum(-1, keepdim=True).clamp_min(1)
        p = torch.softmax(s.float(), dim=-1).mean(0)                        # (H, n)
        terms.append(n * (f.detach() * p).sum(-1))
    return torch.stack(terms).mean()


class ProductKeyMemory(nn.Module):
    """Memory+ FFN replacement. The values table is passed in at call time (one table, shared by all
    memory layers, owned by the model), so this module holds only keys and projections."""

    def __init__(self, dim: int, config: MemoryConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.sparse_grad = c.sparse_grad
        """Layout of the values gradient (embedding_bag(sparse=...)); config.sparse_grad unless the trainer
        sets it (a values table trained by AdamW needs a dense gradient: training/step.py)."""
        self.query = nn.Linear(dim, c.heads * c.k_dim, bias=True)
        self.query_norm = nn.BatchNorm1d(c.heads * c.k_dim) if c.query_batchnorm else None
        self.sub_keys = nn.Parameter(torch.empty(c.heads, 2, c.num_sub_keys, c.k_dim // 2))
        self.gate = nn.Linear(dim, c.value_dim, bias=False) if c.swilu else None
        self.out = nn.Linear(c.value_dim, dim, bias=False)

    def lookup(self, x: Tensor, *, balance: bool = False) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
        """x: (M, dim) -> (weights (M, H, k) fp32 softmax, slots (M, H, k)); with `balance`, also the
        sub-key load-balancing loss of these tokens (sub_key_balance_loss)."""
        c = self.config
        q = self.query(x)
        if self.query_norm is not None:
            q = self.query_norm(q)
        q = q.view(-1, c.heads, c.k_dim)
        keys = self.sub_keys
        if c.qk_norm:
            half = c.k_dim // 2
            q = torch.cat([_rms(q[..., :half]), _rms(q[..., half:])], dim=-1)
            keys = _rms(keys)
        dtype = torch.promote_types(q.dtype, torch.float32)   # score and softmax in >= fp32
        if not balance:
            scores, slots = product_key_topk(q.to(dtype), keys.to(dtype), c.k)
            return torch.softmax(scores, dim=-1), slots
        s1, s2 = sub_key_scores(q.to(dtype), keys.to(dtype))
        scores, slots, i1, i2 = topk_of_halves(s1, s2, c.k)
        return torch.softmax(scores, dim=-1), slots, sub_key_balance_loss(s1, s2, i1, i2)

    def forward(self, x: Tensor, values: Tensor, padding_mask: Tensor | None = None,
                balance: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """x: (B, T, dim). Returns the layer output (B, T, dim) and the slots read, (B, T, heads*k),
        with -1 at padded positions (which read nothing and contribute no gradient). A `balance` list
        gets this layer's sub-key load-balancing loss over the real tokens appended."""
        c = self.config
        batch, seq, dim = x.shape
        flat = x.reshape(-1, dim)
        if padding_mask is not None:
            real = padding_mask.reshape(-1)
            flat = flat[real]
        if balance is None:
            weights, slots = self.lookup(flat)
        else:
            weights, slots, aux = self.lookup(flat, balance=True)
            balance.append(aux)
        read = F.embedding_bag(slots.reshape(flat.shape[0], -1), values,
                               per_sample_weights=weights.reshape(flat.shape[0], -1).to(values.dtype),
                               mode="sum", sparse=self.sparse_grad)        # sum over heads and k
        read = read.to(x.dtype)
        if self.gate is not None:
            read = read * F.silu(self.gate(flat))
        out_real = self.out(read)
        if padding_mask is None:
            return out_real.view(batch, seq, dim), slots.view(batch, seq, -1)
        out = out_real.new_zeros(batch * seq, dim)
        out[real] = out_real
        indices = slots.new_full((batch * seq, c.heads * c.k), -1)
        indices[real] = slots.reshape(flat.shape[0], -1)
        return out.view(batch, seq, dim), indices.view(batch, seq, -1)
