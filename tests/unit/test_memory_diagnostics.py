"""Memory diagnostics (evaluation/memory_diagnostics.py) on the repository's own model, shrunk."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_fakes import CharTokenizer  # noqa: E402

from evaluation.memory_diagnostics import (answer_position_lookups, coverage, high_df_share,  # noqa: E402
                                           hits_in_rows, prompt_lookups, usage_stats)

model_pkg = pytest.importorskip("model")
PROMPTS = ["Question: who?\nAnswer:", "Question: where was it written down?\nAnswer:", "Q?\nAnswer:"]


@pytest.fixture(scope="module")
def setup():
    tok = CharTokenizer()
    model = model_pkg.build_model("tiny", seed=0, vocab_size=tok.vocab_size, dim=64, n_layers=3, n_heads=2,
                                  ffn_hidden=128, max_seq_len=64, memory_layers=(0, 2),
                                  memory=dict(num_slots=16 ** 2, heads=2, k=4, k_dim=16, value_dim=64))
    return model, tok


def test_prompt_lookups_match_unpadded_forwards(setup) -> None:
    model, tok = setup
    got = prompt_lookups(model, tok, PROMPTS, device=torch.device("cpu"), batch_size=3)   # left-padded batch
    assert len(got) == len(PROMPTS)
    model.eval()
    for prompt, (last, every) in zip(PROMPTS, got):
        ids = torch.tensor([tok.encode(prompt, bos=True, eos=False)])
        with torch.no_grad():
            indices = model(ids).memory_indices              # one (1, T, heads*k) per memory layer
        want_all = torch.cat(indices, dim=-1)[0]
        assert torch.equal(last, want_all[-1])               # 2 layers x 2 heads x k=4 slots at the last token
        assert last.numel() == 2 * 2 * 4
        assert torch.equal(every, want_all.flatten())       # every real token, no padding (-1) entries
        assert (every >= 0).all()
    assert all(torch.equal(a, b) for a, (b, _) in zip(answer_position_lookups(model, tok, PROMPTS,
                                                                              device=torch.device("cpu")), got))


def test_coverage_share_and_usage_numbers() -> None:
    lookups = [torch.tensor([1, 1, 2, 3]), torch.tensor([3, 4])]
    assert coverage(torch.tensor([1, 3]), lookups[0]) == pytest.approx(2 / 3)       # distinct slots {1,2,3}
    assert coverage(None, lookups[0]) == 0.0
    df = torch.zeros(8, dtype=torch.long)
    df[torch.tensor([1, 4])] = 8                                                  # read by every batch
    assert high_df_share(lookups, df, 8) == pytest.approx(3 / 6)                # 1, 1, 4 of 6 lookups
    assert hits_in_rows(lookups, torch.tensor([3])) == pytest.approx(2 / 6)
    stats = usage_stats(torch.tensor([2.0, 2.0, 0.0, 0.0]))
    assert stats["slots_used_frac"] == 0.5
    assert stats["usage_entropy"] == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert stats["usage_kl_uniform"] == pytest.approx(torch.log(torch.tensor(2.0)).item())


# ---------------------------------------------------------------- memory health (issue 17)
def test_read_recorder_weights_are_the_layers_own_softmax(setup) -> None:
    """prompt_reads' weights are each memory layer's top-k softmax at the slots memory_indices reports:
    every head's k weights sum to 1, and re-scoring the layer input gives the same numbers."""
    from evaluation.memory_diagnostics import prompt_reads
    model, tok = setup
    reads = prompt_reads(model, tok, PROMPTS, device=torch.device("cpu"), batch_size=3)
    for prompt, r in zip(PROMPTS, reads):
        assert r["last_weights"].shape == r["last_slots"].shape == (2 * 2 * 4,)
        sums = r["last_weights"].view(-1, 4).sum(dim=1)      # (layers*heads) groups of k=4
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
        n = len(tok.encode(prompt, bos=True))
        assert r["all_slots"].numel() == r["all_weights"].numel() == n * 16
    # the recorded weights follow the slots: the top weight of each head is its first (best-scored) slot
    w = reads[0]["all_weights"].view(-1, 4)
    assert bool((w[:, 0] >= w.max(dim=1).values - 1e-6).all())


def test_health_statistics_by_hand() -> None:
    from evaluation.memory_diagnostics import jaccard_stats, memory_health, topk_exp_entropy
    # exp-entropy: a flat read of k=4 -> 4; a one-hot read -> 1; padding rows (all 0) are skipped
    w = torch.tensor([[0.25, 0.25, 0.25, 0.25, 1.0, 0.0, 0.0, 0.0], [0, 0, 0, 0, 0, 0, 0, 0]])
    assert topk_exp_entropy(w, 4) == pytest.approx((4 + 1) / 2)
    a = [torch.tensor([1, 2, 3]), torch.tensor([3, 4])]
    b = [torch.tensor([1, 2, 3]), torch.tensor([9])]
    s = jaccard_stats(a, b)
    # pairs: (a0,b0)=1, (a0,b1)=0, (a1,b0)=1/4, (a1,b1)=0 -> mean 1.25/4; max per a: 1, 1/4
    assert s["mean"] == pytest.approx(1.25 / 4) and s["mean_max"] == pytest.approx((1 + 0.25) / 2)
    assert jaccard_stats(a)["mean"] == pytest.approx(1 / 4)
    # health: N=16 slots, 10 background batches; slots 0-3 read by every batch (high DF), 4-7 by none
    counts = torch.zeros(16, dtype=torch.int64)
    counts[:8] = 5
    df = torch.zeros(16, dtype=torch.int32)
    df[:4] = 10
    read = lambda slots, weights: {"last_slots": torch.tensor(slots), "last_weights": torch.tensor(weights),  # noqa: E731
                                   "all_slots": torch.tensor(slots), "all_weights": torch.tensor(weights)}
    new = [read([0, 4], [0.2, 0.8]), read([1, 5], [0.5, 0.5])]
    known = [read([4, 6], [0.5, 0.5]), read([2, 7], [0.9, 0.1])]
    h = memory_health(total_counts=counts, document_frequency=df, num_batches=10, known=known, new=new,
                      background_weights=None, k=2)
    assert h["health/slots_read_frac"] == pytest.approx(0.5)
    assert h["health/new_answer_lookups_low_df"] == pytest.approx(0.5)
    assert h["health/new_answer_weight_low_df"] == pytest.approx((0.8 + 0.5) / 2)
    assert h["health/known_answer_slots_per_fact"] == pytest.approx(4 / 2)
    assert h["health/known_facts_per_answer_slot"] == pytest.approx(1.0)
    # new0 {0,4} vs known0 {4,6}: 1/3; every other new-known pair 0 -> mean max (1/3 + 0) / 2
    assert h["health/jaccard_new_known_max"] == pytest.approx(1 / 6)
    targets = h["health/targets"]
    assert targets["slots_read_frac"]["met"] is False and targets["answer_weight_low_df"]["met"] is True
    assert "memory_reliance" not in targets
    # with memory_reliance's numbers: its keys and a fourth target (0.4 < 0.5: not met; None: not met)
    for value, met in ((0.4, False), (0.6, True), (None, False)):
        r = memory_health(total_counts=counts, document_frequency=df, num_batches=10, known=known, new=new,
                          background_weights=None, k=2, reliance={"known_f1": 0.5, "known_memory_reliance": value})
        assert r["health/known_f1"] == 0.5 and r["health/targets"]["memory_reliance"]["met"] is met


def test_selection_vs_memory_all_and_forgetting_curve() -> None:
    from evaluation.memory_diagnostics import f1_by_steps_since_update, selection_vs_largest_rows
    rows = torch.tensor([2, 5, 7, 9])
    sq = torch.tensor([1.0, 4.0, 3.0, 2.0])         # largest: 5, 7
    got = selection_vs_largest_rows(torch.tensor([5, 9]), rows, sq)
    assert got["memory/topt_overlap_memory_all"] == pytest.approx(0.5)
    assert got["memory/topt_grad_mass"] == pytest.approx(6 / 10)
    bins = f1_by_steps_since_update([0, 1, 2, 3, 4, 5, 6, 7], [1, 1, 1, 0, 0, 1, 0, 0], num_bins=4)
    assert [b["steps_since"] for b in bins] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [b["f1"] for b in bins] == [1.0, 0.5, 0.5, 0.0]
    with pytest.raises(ValueError):
        f1_by_steps_since_update([1], [0.5, 0.5])


def test_memory_off_equals_a_model_without_memory_output(setup) -> None:
    """memory_off zeroes exactly the memory layers' contribution: the logits equal those of a copy whose
    memory output projections are zero, they differ from the intact model's, and the hooks go away after."""
    import copy

    from evaluation.memory_diagnostics import memory_off
    model, tok = setup
    tokens = torch.tensor([tok.encode(PROMPTS[1], bos=True)])
    with torch.no_grad():
        intact = model(tokens).logits
        with memory_off(model):
            off = model(tokens).logits
        again = model(tokens).logits
        cut = copy.deepcopy(model)
        for layer in cut.layers:
            if getattr(layer, "memory", None) is not None:
                layer.memory.out.weight.zero_()
        reference = cut(tokens).logits
    assert torch.allclose(off, reference, atol=1e-6)
    assert not torch.allclose(off, intact, atol=1e-4)
    assert torch.equal(again, intact)


def test_memory_reliance_reports_f1_lost_without_the_memory(setup) -> None:
    from eval_fakes import QA

    from evaluation.memory_diagnostics import memory_off, memory_reliance
    from evaluation.qa import qa_scores
    model, tok = setup
    from data_pipeline.facts import eval_prompt
    from evaluation.generate import generate_batch
    from evaluation.distributed import resolve_shard
    questions = ("who?", "where was it?", "when?", "why?")
    # gold answers = the intact model's own greedy answers (F1 1 with the memory), one of them wrong
    prompts = [tok.encode(eval_prompt(QA(id="", question=q, answers=[])), bos=True) for q in questions]
    with torch.no_grad():
        texts = generate_batch(model.eval(), tok, prompts, max_new_tokens=2, stop_strings=["\n"],
                               device=torch.device("cpu"), shard=resolve_shard(None))
    answers = [t.strip() or "x" for t in texts[:3]] + ["zzz"]
    records = [QA(id=str(i), question=q, answers=[a]) for i, (q, a) in enumerate(zip(questions, answers))]
    kw = dict(batch_size=2, device=torch.device("cpu"), max_new_tokens=2)
    out = memory_reliance(model, tok, records, **kw)
    on = qa_scores(model, tok, records, **kw)
    with memory_off(model):
        off = qa_scores(model, tok, records, **kw)
    assert out["known_f1"] == on["f1"] and out["known_f1_memory_off"] == off["f1"]
    assert out["known_answer_nll_memory_off"] == pytest.approx(off["answer_nll"])
    assert out["known_answer_nll"] == pytest.approx(on["answer_nll"])
    assert out["known_answer_nll"] != pytest.approx(out["known_answer_nll_memory_off"])
    assert 0 < on["f1"] <= 0.75
    assert out["known_memory_reliance"] == pytest.approx((on["f1"] - off["f1"]) / on["f1"])
