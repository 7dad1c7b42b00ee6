"""Items 4 and 5: the product-key lookup against brute force, and the memory layer against the FFN.

Item 4. For M queries of H heads at N = n² slots, three ways to get each query's top-k slots:
  ours       - model.product_key_topk: two n-key half scores, top-k of each, top-k of the k² sums;
  brute_flat - what a memory without product keys does: score all N full keys (k_dim each; the key
               of slot i*n+j is [sub_key1_i, sub_key2_j], materialised once outside the timing),
               then top-k of the N scores. This is the "scoring all N keys" cost, O(N·k_dim);
  brute_sum  - all N scores formed as s1_i + s2_j (the exact fp32 numbers product keys compare),
               then top-k of the N scores: O(N) per query, the cheapest exhaustive reference and the
               one that can match our indices bit for bit.
`pk_matches_bruteforce`: for every query and head, our k slots equal brute_sum's as sets; ties at the
k-th score (rare with float scores) would be reported as `mismatches_not_ties` only if the scores differ.
The flat brute force's agreement is reported as a fraction (its fp32 dot products round differently).

Also measured, with benchmark-local copies of the algorithm (`ALTERNATIVES`; not library code), each
checked to give outputs identical to the library's on random and on tie-heavy integer scores:
  stable_sort - the top-k by full-row stable sorts (the library's implementation before 854f71f);
  topk_repair - torch.topk, k-long sorts and a tie check at the cut (a proposed further speed-up).
Item 5 runs the memory layer with each of them too (swapping model.memory.product_key_topk, the
function ProductKeyMemory.lookup calls; `ratio_with` is None if that swap stops taking effect).

Item 5. ProductKeyMemory vs the SwiGLU FeedForward it replaces, at the same model dim, forward +
backward (all parameters trainable, values gradient sparse), interleaved.
"""
from __future__ import annotations

import math

import torch

import model.memory as memory_module
from benchmarks.common import interleaved, median, paired_ratio, ratio_clock, summary
from model import MemoryConfig, make_config
from model.memory import ProductKeyMemory, product_key_topk
from model.transformer import FeedForward


# --------------------------------------------------- alternative exact top-k (benchmark-local copies)
def _topk_stable_sort(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k, descending, equal scores -> lower position first, by a full stable sort of every row
    (what model/memory.py did before commit 854f71f)."""
    values, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], order[..., :k]


def _topk_repair(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as _topk_stable_sort without sorting whole rows: torch.topk, then order the k winners
    by (score desc, position asc) with two k-long sorts, and redo by stable sort only the rows where more
    than k entries reach the k-th score (a tie across the cut, where topk's choice is unspecified)."""
    values, pos = torch.topk(scores, k, dim=-1, sorted=True)
    pos, perm = torch.sort(pos, dim=-1)
    values = values.gather(-1, perm)
    values, perm = torch.sort(values, dim=-1, descending=True, stable=True)
    pos = pos.gather(-1, perm)
    cut = (scores >= values[..., -1:]).sum(-1) > k
    if bool(cut.any()):
        v, p = _topk_stable_sort(scores[cut], k)
        values[cut], pos[cut] = v, p
    return values, pos


def _product_key_topk_with(query: torch.Tensor, sub_keys: torch.Tensor, k: int, topk_fn):
    """The product-key algorithm of model.product_key_topk with a pluggable exact top-k."""
    n = sub_keys.shape[2]
    half = query.shape[-1] // 2
    s1 = torch.einsum("mhd,hnd->mhn", query[..., :half], sub_keys[:, 0])
    s2 = torch.einsum("mhd,hnd->mhn", query[..., half:], sub_keys[:, 1])
    _, i1 = topk_fn(s1, k)
    _, i2 = topk_fn(s2, k)
    i1, _ = torch.sort(i1, dim=-1)          # row-major candidate grid in increasing slot order
    i2, _ = torch.sort(i2, dim=-1)
    v1, v2 = s1.gather(-1, i1), s2.gather(-1, i2)
    cand = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2)
    slots = (i1.unsqueeze(-1) * n + i2.unsqueeze(-2)).flatten(-2)
    scores, pos = topk_fn(cand, k)
    return scores, slots.gather(-1, pos)


def product_key_topk_stable_sort(query, sub_keys, k):
    return _product_key_topk_with(query, sub_keys, k, _topk_stable_sort)


def product_key_topk_repair(query, sub_keys, k):
    return _product_key_topk_with(query, sub_keys, k, _topk_repair)


ALTERNATIVES = {"stable_sort": product_key_topk_stable_sort, "topk_repair": product_key_topk_repair}


def _identical_on(fn, query, sub_keys, k) -> bool:
    a_s, a_i = product_key_topk(query, sub_keys, k)
    b_s, b_i = fn(query, sub_keys, k)
    return bool(torch.equal(a_s, b_s) and torch.equal(a_i, b_i))


def _tie_heavy_inputs(heads: int, n: int, k_dim: int, m: int = 32, seed: int = 0):
    """Integer-valued queries and keys: many exactly equal scores, also across the top-k cut."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (m, heads, k_dim), generator=gen).float()
    keys = torch.randint(-1, 2, (heads, 2, n, k_dim // 2), generator=gen).float()
    return q, keys


# ------------------------------------------------------------------------------------------- item 4
def _brute_sum(query, sub_keys, k, chunk):
    half = query.shape[-1] // 2
    out_s, out_i = [], []
    for q in query.split(chunk):
        s1 = torch.einsum("mhd,hnd->mhn", q[..., :half], sub_keys[:, 0])
        s2 = torch.einsum("mhd,hnd->mhn", q[..., half:], sub_keys[:, 1])
        full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)        # (m, H, n*n), slot = i*n + j
        s, i = torch.topk(full, k, dim=-1)
        out_s.append(s)
        out_i.append(i)
    return torch.cat(out_s), torch.cat(out_i)


def _flat_keys(sub_keys):
    h, _, n, half = sub_keys.shape
    k1 = sub_keys[:, 0].unsqueeze(2).expand(h, n, n, half)
    k2 = sub_keys[:, 1].unsqueeze(1).expand(h, n, n, half)
    return torch.cat([k1, k2], dim=-1).reshape(h, n * n, 2 * half).contiguous()   # (H, N, k_dim)


def _brute_flat(query, keys, k, chunk):
    out = []
    for q in query.split(chunk):
        scores = torch.einsum("mhd,hnd->mhn", q, keys)
        out.append(torch.topk(scores, k, dim=-1).indices)
    return torch.cat(out)


def _agreement(ours_s, ours_i, ref_s, ref_i) -> dict:
    a, _ = ours_i.sort(-1)
    b, _ = ref_i.sort(-1)
    same = (a == b).all(-1)
    bad = int((~same).sum())
    not_ties = 0
    if bad:   # a differing set is a tie at the cut only if the k-th scores are equal
        kth_ours, kth_ref = ours_s[..., -1][~same], ref_s.min(-1).values[~same]
        not_ties = int((kth_ours != kth_ref).sum())
    return {"rows": same.numel(), "rows_identical": int(same.sum()), "mismatches_not_ties": not_ties}


def run_pk(profile, *, num_slots: int, heads: int, k: int, k_dim: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    n = math.isqrt(num_slots)
    sub_keys = torch.empty(heads, 2, n, k_dim // 2).normal_(0, (k_dim // 2) ** -0.5, generator=gen)
    query = torch.randn(profile.pk_tokens, heads, k_dim, generator=gen)
    few = query[:profile.pk_brute_tokens].contiguous()       # the brute forces cost O(N) per query
    chunk = max(1, (1 << 26) // (heads * num_slots))          # <= 256 MB of fp32 scores at a time
    keys = _flat_keys(sub_keys)
    # exactness (these calls also warm every variant up)
    ours_s, ours_i = product_key_topk(query, sub_keys, k)
    ref_s, ref_i = _brute_sum(few, sub_keys, k, chunk)
    agree = _agreement(ours_s[:few.shape[0]], ours_i[:few.shape[0]], ref_s, ref_i)
    flat_i = _brute_flat(few, keys, k, chunk)
    flat_overlap = float((ours_i[:few.shape[0]].unsqueeze(-1) == flat_i.unsqueeze(-2)).any(-1).float().mean())
    tie_q, tie_keys = _tie_heavy_inputs(heads, n, k_dim)
    identical = {name: _identical_on(fn, query, sub_keys, k) and _identical_on(fn, tie_q, tie_keys, k)
                 for name, fn in ALTERNATIVES.items()}
    product_key_topk(few, sub_keys, k)

    # ours vs brute forces on the same few queries (equal work); ours vs the alternatives on all queries
    cpu: dict = {}
    wall = interleaved({
        "ours": lambda: product_key_topk(query, sub_keys, k),
        **{name: (lambda fn=fn: fn(query, sub_keys, k)) for name, fn in ALTERNATIVES.items()},
        "ours_few": lambda: product_key_topk(few, sub_keys, k),
        "brute_sum_few": lambda: _brute_sum(few, sub_keys, k, chunk),
        "brute_flat_few": lambda: _brute_flat(few, keys, k, chunk),
    }, reps=profile.pk_reps, warmup=0, cpu=cpu)
    clock = ratio_clock()
    times = cpu if clock == "cpu" else wall
    return {
        "clock": clock,
        "speedup_flat": paired_ratio(times["brute_flat_few"], times["ours_few"]),
        "speedup_sum": paired_ratio(times["brute_sum_few"], times["ours_few"]),
        "matches": agree["mismatches_not_ties"] == 0,
        "agreement_vs_brute_sum": agree,
        "flat_overlap_fraction": flat_overlap,
        "alternatives": {name: {"identical_to_ours": identical[name],
                                "ours_speedup_over_it": paired_ratio(times[name], times["ours"])}
                         for name in ALTERNATIVES},
        "inputs": {"N": num_slots, "heads": heads, "k": k, "k_dim": k_dim, "queries": profile.pk_tokens,
                   "queries_brute": few.shape[0], "reps": profile.pk_reps,
                   "threads": torch.get_num_threads(), "dtype": "float32"},
        "time_s": {name: summary(v) for name, v in wall.items()},
        "cpu_s": {name: summary(v) for name, v in cpu.items()},
        "per_query_us": {"ours": median(times["ours"]) / query.shape[0] * 1e6,
                         **{name: median(times[name]) / query.shape[0] * 1e6 for name in ALTERNATIVES},
                         "brute_sum": median(times["brute_sum_few"]) / few.shape[0] * 1e6,
                         "brute_flat": median(times["brute_flat_few"]) / few.shape[0] * 1e6},
    }


# ------------------------------------------------------------------------------------------- item 5
def run_ffn(profile, *, model_overrides: dict, seed: int = 0) -> dict:
    cfg = make_config("tiny", **model_overrides)
    torch.manual_seed(seed)
    mem = ProductKeyMemory(cfg.dim, cfg.memory)
    for p in mem.parameters():
        torch.nn.init.normal_(p, std=0.02)
    torch.nn.init.normal_(mem.sub_keys, std=(cfg.memory.k_dim // 2) ** -0.5)
    values = torch.nn.Parameter(torch.empty(cfg.memory.num_slots, cfg.memory.value_dim).normal_(
        std=cfg.memory.value_dim ** -0.5))
    ffn = FeedForward(cfg.dim, cfg.ffn_hidden)
    seq = min(64, profile.ffn_tokens)
    x = torch.randn(max(1, profile.ffn_tokens // seq), seq, cfg.dim)
    g = torch.randn_like(x)

    def fwd_bwd(layer_call, params):
        def call():
            xi = x.detach().requires_grad_(True)
            (layer_call(xi) * g).sum().backward()
            for p in params:
                p.grad = None
        return call

    mem_params = list(mem.parameters()) + [values]
    mem_call = fwd_bwd(lambda xi: mem(xi, values)[0], mem_params)
    ffn_call = fwd_bwd(ffn, list(ffn.parameters()))

    calls = {"n": 0}

    def with_topk(fn):
        def counted(*a):
            calls["n"] += 1
            return fn(*a)

        def call():
            original = memory_module.product_key_topk
            memory_module.product_key_topk = counted   # what ProductKeyMemory.lookup calls
            try:
                mem_call()
            finally:
                memory_module.product_key_topk = original
        return call

    cpu: dict = {}
    wall = interleaved({"memory": mem_call, "ffn": ffn_call,
                        **{f"memory_{name}": with_topk(fn) for name, fn in ALTERNATIVES.items()}},
                       reps=profile.reps, warmup=profile.warmup, cpu=cpu)
    clock = ratio_clock()
    times = cpu if clock == "cpu" else wall
    swapped = calls["n"] > 0          # False if ProductKeyMemory stopped calling model.memory.product_key_topk
    m = cfg.memory
    result = {
        "clock": clock,
        "ratio": paired_ratio(times["memory"], times["ffn"]),
        "ratio_wall": paired_ratio(wall["memory"], wall["ffn"]),
        "ratio_with": {name: paired_ratio(times[f"memory_{name}"], times["ffn"]) if swapped else None
                       for name in ALTERNATIVES},
        "inputs": {"dim": cfg.dim, "ffn_hidden": cfg.ffn_hidden, "N": m.num_slots, "heads": m.heads, "k": m.k,
                   "k_dim": m.k_dim, "value_dim": m.value_dim, "tokens": x.shape[0] * x.shape[1],
                   "reps": profile.reps, "threads": torch.get_num_threads(),
                   "params_ffn": sum(p.numel() for p in ffn.parameters()),
                   "params_memory_excl_values": sum(p.numel() for p in mem.parameters())},
        "time_s": {name: summary(v) for name, v in wall.items()},
        "cpu_s": {name: summary(v) for name, v in cpu.items()},
    }
    return result


def memory_config(model_overrides: dict) -> MemoryConfig:
    return make_config("tiny", **model_overrides).memory
