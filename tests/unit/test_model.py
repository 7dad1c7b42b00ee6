"""Model tests: exact product-key lookup, sparse value gradients, padding, overfitting, meta build."""
import pytest
import torch
import torch.nn.functional as F

from model import MemoryConfig, build_model, make_config, product_key_topk
from model.memory import ProductKeyMemory


def brute_force_topk(query, sub_keys, k):
    """Materialise all N = n*n scores and rank them; ties go to the lower slot index."""
    heads, _, n, half = sub_keys.shape
    s1 = torch.einsum("mhd,hnd->mhn", query[..., :half], sub_keys[:, 0])
    s2 = torch.einsum("mhd,hnd->mhn", query[..., half:], sub_keys[:, 1])
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)          # slot = i * n + j
    values, order = torch.sort(full, dim=-1, descending=True, stable=True)
    return values[..., :k], order[..., :k]


@pytest.mark.parametrize("seed,n,k,heads,k_dim,m", [(0, 16, 4, 2, 8, 50), (1, 32, 8, 4, 16, 40),
                                                    (2, 8, 8, 1, 4, 30), (3, 64, 32, 4, 32, 20)])
def test_product_key_equals_brute_force(seed, n, k, heads, k_dim, m):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(m, heads, k_dim, generator=gen, dtype=torch.float64)
    keys = torch.randn(heads, 2, n, k_dim // 2, generator=gen, dtype=torch.float64)
    scores, slots = product_key_topk(query, keys, k)
    ref_scores, ref_slots = brute_force_topk(query, keys, k)
    assert torch.equal(slots, ref_slots)
    torch.testing.assert_close(scores, ref_scores)


def test_product_key_ties_are_deterministic_lowest_slot_first():
    # Integer-valued scores on a tiny grid produce many exact ties, including at the top-k boundary.
    gen = torch.Generator().manual_seed(7)
    for _ in range(20):
        query = torch.randint(-2, 3, (25, 2, 4), generator=gen).double()
        keys = torch.randint(-1, 2, (2, 2, 8, 2), generator=gen).double()
        scores, slots = product_key_topk(query, keys, 5)
        ref_scores, ref_slots = brute_force_topk(query, keys, 5)
        assert torch.equal(slots, ref_slots)
        assert torch.equal(scores, ref_scores)


def test_memory_layer_scores_match_brute_force_through_the_module():
    torch.manual_seed(0)
    cfg = MemoryConfig(num_slots=16 ** 2, heads=2, k=4, k_dim=8, value_dim=6)
    layer = ProductKeyMemory(12, cfg).double()
    torch.nn.init.normal_(layer.sub_keys)
    x = torch.randn(30, 12, dtype=torch.float64)
    weights, slots = layer.lookup(x)
    q = layer.query(x).view(-1, 2, 8)
    ref_scores, ref_slots = brute_force_topk(q, layer.sub_keys, 4)
    assert torch.equal(slots, ref_slots)
    torch.testing.assert_close(weights, torch.softmax(ref_scores, -1))


def test_values_gradient_is_sparse_and_only_on_read_rows_padding_contributes_nothing():
    torch.manual_seed(0)
    model = build_model("tiny", n_layers=2, memory_layers=(1,), memory={"num_slots": 32 ** 2})
    tokens = torch.randint(0, 8000, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[0, :5] = False       # left padding
    mask[2, 9:] = False       # right padding
    out = model(tokens, padding_mask=mask)
    (idx,) = out.memory_indices
    assert idx.shape == (3, 12, 4 * 32)
    assert (idx[~mask] == -1).all() and (idx[mask] >= 0).all()
    out.logits[mask].sum().backward()
    grad = model.memory_values.grad
    assert grad.is_sparse
    grad = grad.coalesce()
    rows = grad.indices()[0].unique()
    nonzero_rows = rows[grad.values().abs().sum(-1)[torch.searchsorted(grad.indices()[0], rows)] >= 0]
    read = idx[mask].unique()
    assert set(rows.tolist()) <= set(read.tolist())
    assert set(nonzero_rows.tolist()) <= set(read.tolist())
    # Indices read only at padded positions would have to come from the padded tokens: recompute
    # without the padded tokens and check the gradient rows are exactly those read by real tokens.
    dense = grad.to_dense()
    untouched = torch.ones(model.memory_values.shape[0], dtype=torch.bool)
    untouched[read] = False
    assert dense[untouched].abs().sum() == 0


def test_left_padding_gives_the_same_logits_for_real_tokens():
    torch.manual_seed(0)
    model = build_model("tiny", n_layers=2, memory_layers=(1,), memory={"num_slots": 32 ** 2}).double()
    tokens = torch.randint(0, 8000, (1, 9))
    plain = model(tokens)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), tokens], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.bool), torch.ones(1, 9, dtype=torch.bool)], dim=1)
    out = model(padded, padding_mask=mask)
    torch.testing.assert_close(out.logits[:, 4:], plain.logits)
    assert torch.equal(out.memory_indices[0][:, 4:], plain.memory_indices[0])


def test_dense_gradient_option():
    model = build_model("tiny", n_layers=2, memory_layers=(1,), memory={"num_slots": 32 ** 2, "sparse_grad": False})
    model(torch.randint(0, 8000, (2, 8))).logits.sum().backward()
    assert not model.memory_values.grad.is_sparse


def test_tiny_overfits_a_repeated_batch():
    torch.manual_seed(0)
    model = build_model("tiny", seed=0, memory={"sparse_grad": False})   # AdamW needs dense grads
    tokens = torch.randint(0, 8000, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        logits = model(tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, losses


@pytest.mark.parametrize("preset,layers,counts", [
    ("paper-1.3b", (12,), {"total": 2_641_457_152, "memory_values": 1_073_741_824,
                           "memory_other": 10_487_808, "dense": 1_557_227_520}),
    ("memplus-1.3b", (4, 12, 20), {"total": 2_561_769_472, "memory_values": 1_073_741_824,
                                   "memory_other": 31_463_424, "dense": 1_456_564_224}),
])
def test_meta_build_of_paper_presets(preset, layers, counts):
    model = build_model(preset, device="meta")
    assert model.memory_values.is_meta and model.memory_values.shape == (1024 ** 2, 1024)
    assert model.config.n_layers == 22 and model.config.dim == 2048 and model.config.memory_layers == layers
    assert model.layers[12].memory.sub_keys.shape == (4, 2, 1024, 256)
    assert model.layers[12].memory.query.weight.shape == (4 * 512, 2048)
    assert model.layers[0].feed_forward.w1.weight.shape == (8192, 2048)
    assert model.output.weight.shape == (32000, 2048)
    assert model.num_params() == counts


def test_overrides_and_validation():
    cfg = make_config("tiny", dim=128, **{"memory.heads": 2}, memory_layers="1,2")
    assert cfg.dim == 128 and cfg.memory.heads == 2 and cfg.memory_layers == (1, 2)
    with pytest.raises(ValueError, match="unknown config key 'model.bogus'"):
        make_config("tiny", bogus=1)
    with pytest.raises(ValueError, match="perfect square"):
        make_config("tiny", memory={"num_slots": 1000})
    with pytest.raises(ValueError, match="wrong type"):
        make_config("tiny", dim="wide")
    with pytest.raises(ValueError, match="unknown model preset"):
        make_config("huge")


def test_sub_key_balance_loss_is_one_when_uniform_and_n_when_collapsed():
    from model.memory import sub_key_balance_loss, sub_key_scores, topk_of_halves
    n, k, heads, m = 16, 4, 2, 64
    # uniform: equal scores everywhere, and every sub-key chosen equally often
    flat = torch.zeros(m, heads, n)
    chosen = (torch.arange(m * heads * k) % n).view(m, heads, k)
    assert sub_key_balance_loss(flat, flat, chosen, chosen).item() == pytest.approx(1.0)
    # collapsed: every token puts its probability and its choice on sub-key 0
    peaked = torch.full((m, heads, n), -1e4)
    peaked[..., 0] = 0.0
    zeros = torch.zeros(m, heads, 1, dtype=torch.long)
    assert sub_key_balance_loss(peaked, peaked, zeros, zeros).item() == pytest.approx(n)
    # the same top-k as product_key_topk, and the loss sends gradient to the sub-keys
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(m, heads, 8, generator=gen)
    keys = torch.randn(heads, 2, n, 4, generator=gen, requires_grad=True)
    s1, s2 = sub_key_scores(query, keys)
    scores, slots, i1, i2 = topk_of_halves(s1, s2, k)
    ref_scores, ref_slots = product_key_topk(query, keys, k)
    assert torch.equal(slots, ref_slots)
    sub_key_balance_loss(s1, s2, i1, i2).backward()
    assert keys.grad is not None and keys.grad.abs().sum() > 0


def test_forward_reports_the_balance_loss_only_when_asked():
    torch.manual_seed(0)
    model = build_model("tiny", n_layers=2, memory_layers=(1,), memory={"num_slots": 32 ** 2})
    tokens = torch.randint(0, 8000, (2, 10))
    assert model(tokens).balance_loss is None
    out = model(tokens, balance_loss=True)
    assert out.balance_loss.ndim == 0 and 0.5 < out.balance_loss.item() < 32   # ~1 at init, n = 32 if collapsed
    torch.testing.assert_close(out.logits, model(tokens).logits)   # the lookup itself is unchanged
