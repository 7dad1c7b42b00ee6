"""The fact diagnostics' cheaper paths give the numbers of the paths they replace (issue 19, item 4): a forward
that stops at the last memory block reads the same slots, the one-process selection-vs-memory_all comparison
equals the rank-summed one, and the forgetting curve taken from the final evaluation's items equals the one
generated again."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_fakes import QA, CharTokenizer  # noqa: E402

from evaluation.memory_diagnostics import prompt_lookups, selection_vs_largest_rows  # noqa: E402
from model import build_model  # noqa: E402
from training.diagnostics import FactDiagnostics  # noqa: E402


def _model(memory_layers=(1,)):
    tok = CharTokenizer()
    model = build_model("tiny", seed=0, vocab_size=tok.vocab_size, dim=64, n_layers=4, n_heads=2, ffn_hidden=128,
                        max_seq_len=64, memory_layers=memory_layers,
                        memory=dict(num_slots=16 ** 2, heads=2, k=4, k_dim=16, value_dim=64))
    torch.nn.init.normal_(model.memory_values, std=0.1)
    return model.eval(), tok


def test_reads_only_forward_reads_the_same_slots_without_the_blocks_above():
    model, tok = _model()
    rows = [tok.encode(p, bos=True) for p in ("Question: who?\nAnswer:", "Q?\nAnswer:")]
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), True
    called = []
    hooks = [b.register_forward_hook(lambda m, i, o, n=n: called.append(n)) for n, b in enumerate(model.layers)]
    with torch.no_grad():
        full = model(tokens, padding_mask=mask)
        assert called == [0, 1, 2, 3]
        called.clear()
        reads = model(tokens, padding_mask=mask, reads_only=True)
    for h in hooks:
        h.remove()
    assert called == [0, 1] and reads.logits is None             # stops after the memory block (1 of 4)
    assert len(reads.memory_indices) == 1 and torch.equal(reads.memory_indices[0], full.memory_indices[0])
    # prompt_lookups (every diagnostic forward) reads the slots of the full forward
    got = prompt_lookups(model, tok, ["Question: who?\nAnswer:"], device=torch.device("cpu"))
    with torch.no_grad():
        want = model(torch.tensor([rows[0]])).memory_indices[0][0]
    assert torch.equal(got[0][0], want[-1]) and torch.equal(got[0][1], want.flatten())


def _buffered(selected, grad, n):
    """The rank-summed comparison as FactDiagnostics computes it across ranks (union buffer), in one process."""
    if grad.is_sparse:
        g = grad.coalesce()
        rows, vals = g.indices()[0], g.values().float()
    else:
        rows = grad.abs().sum(dim=1).nonzero().flatten()
        vals = grad.index_select(0, rows).float()
    present = torch.zeros(n, dtype=torch.int32)
    present[rows] = 1
    union = present.nonzero().flatten()
    buf = torch.zeros(union.numel(), vals.shape[1])
    buf[torch.searchsorted(union, rows)] = vals
    return selection_vs_largest_rows(selected, union, buf.pow(2).sum(dim=1))


@pytest.mark.parametrize("layout", ["sparse", "dense"])
def test_one_process_selection_vs_memory_all_equals_the_buffered_one(layout):
    n, d = 256, 8
    gen = torch.Generator().manual_seed(0)
    lookups = torch.randint(0, n, (300,), generator=gen)               # repeated rows: an uncoalesced gradient
    grad = torch.sparse_coo_tensor(lookups[None], torch.randn(300, d, generator=gen), (n, d),
                                   check_invariants=True)
    if layout == "dense":
        grad = grad.to_dense()
    selected = torch.randperm(n, generator=gen)[:40]
    diag = FactDiagnostics.__new__(FactDiagnostics)
    diag.finetuner = SimpleNamespace(trainable_indices=selected, num_slots=n)
    assert diag._selection_vs_memory_all(grad) == _buffered(selected, grad, n)
    assert diag._selection_vs_memory_all(None) == _buffered(selected, torch.zeros(n, d), n)


def test_forgetting_curve_from_the_final_evaluation_items_equals_the_generated_one():
    from evaluation import evaluate_sets
    model, tok = _model()
    new = [QA(id=f"f{i}", question=q, answers=[a]) for i, (q, a) in
           enumerate([("who?", "x"), ("where is it?", "y"), ("when?", "z"), ("why?", "w")])]
    options = {"batch_size": 2, "max_new_tokens": 2}
    diag = FactDiagnostics(model=model, tokenizer=tok, facts=SimpleNamespace(new=new, known=[]), finetuner=None,
                           device=torch.device("cpu"), max_known=0, eval_options=options)
    diag.last_update = {"f0": 1, "f1": 2, "f2": 3, "f3": 4}
    items: dict = {"new_facts": []}
    metrics = evaluate_sets(model, tok, {"new_facts": ("qa", new)}, batch_size=2, device=torch.device("cpu"),
                            options={"new_facts": {"max_new_tokens": 2}}, items=items)
    assert set(metrics) == {"new_facts/f1", "new_facts/em", "new_facts/answer_nll"}
    assert [i for i, _ in items["new_facts"]] == ["f0", "f1", "f2", "f3"]
    generated = diag.after(None, step=4)
    assert diag.after(None, step=4, new_fact_items=items["new_facts"]) == generated
    # the items are what it reads when they are the trained facts in order; otherwise it generates
    marked = [(i, {"f1": 0.25 * k}) for k, (i, _) in enumerate(items["new_facts"])]
    curve = diag.after(None, step=4, new_fact_items=marked)["new_facts/f1_by_steps_since_update"]
    assert [b["f1"] for b in curve] == [0.75, 0.5, 0.25, 0.0]          # steps since update 0..3 = f3..f0
    assert diag.after(None, step=4, new_fact_items=marked[::-1]) == generated
