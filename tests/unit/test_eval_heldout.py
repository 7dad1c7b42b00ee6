"""Held-out metrics: NLLs against a direct F.cross_entropy computation, HellaSwag on constructed cases."""
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_fakes import GSM8K, QA, CharTokenizer, HellaSwag, OracleLM, PrefixMeanLM, Text, UnigramLM  # noqa: E402

from evaluation import (continuation_nll, gsm8k_context, gsm8k_nll, heldout_text_nll,  # noqa: E402
                        hellaswag_accuracy, hellaswag_preprocess, known_facts_retention)


def _direct_continuation_nll(model, tok, pairs) -> float:
    """Sum of F.cross_entropy over continuation tokens / number of continuation tokens, one at a time."""
    model.eval()
    total, count = 0.0, 0
    for ctx, cont in pairs:
        c = tok.encode(ctx, bos=True, eos=False)
        ids = torch.tensor(c + tok.encode(cont, bos=False, eos=False))
        logits = model(ids[None, :-1]).logits[0]
        total += F.cross_entropy(logits[len(c) - 1:], ids[len(c):], reduction="sum").item()
        count += len(ids) - len(c)
    return total / count


PAIRS = [("Question: what is 2+3?\nAnswer:", " 2+3=5. #### 5"),
         ("Hi", " there, this is a much longer continuation of the context"),
         ("A long context that goes on and on before the short bit", " x")]


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_continuation_nll_matches_cross_entropy(batch_size: int) -> None:
    tok = CharTokenizer()
    model = PrefixMeanLM(tok.vocab_size, seed=7)
    got = continuation_nll(model, tok, PAIRS, batch_size=batch_size)["nll"]
    assert got == pytest.approx(_direct_continuation_nll(model, tok, PAIRS), rel=1e-12)


def test_gsm8k_nll_scores_solution_given_question() -> None:
    tok = CharTokenizer()
    model = PrefixMeanLM(tok.vocab_size, seed=8)
    records = [GSM8K("a", "What is 2+3?", "2+3=5\n#### 5"), GSM8K("b", "Half of 8?", "8/2=4\n#### 4")]
    expected = _direct_continuation_nll(model, tok, [(gsm8k_context(r.question), " " + r.answer) for r in records])
    assert gsm8k_nll(model, tok, records, batch_size=2)["nll"] == pytest.approx(expected, rel=1e-12)
    first_only = _direct_continuation_nll(model, tok, [(gsm8k_context(records[0].question), " " + records[0].answer)])
    assert gsm8k_nll(model, tok, records, batch_size=2, max_items=1)["nll"] == pytest.approx(first_only, rel=1e-12)


def test_heldout_text_nll_windows_match_cross_entropy() -> None:
    tok = CharTokenizer()
    model = PrefixMeanLM(tok.vocab_size, seed=9).eval()
    texts = [Text("1", "The quick brown fox jumps over the lazy dog."), Text("2", "Short."), Text("3", "")]
    window = 8
    total, count = 0.0, 0
    for r in texts:
        ids = tok.encode(r.text, bos=True, eos=False)
        for start in range(0, len(ids) - 1, window):
            w = torch.tensor(ids[start:start + window + 1])
            total += F.cross_entropy(model(w[None, :-1]).logits[0], w[1:], reduction="sum").item()
            count += len(w) - 1
    assert count == sum(len(r.text) for r in texts)  # every token after BOS scored exactly once
    for batch_size in (1, 4):
        got = heldout_text_nll(model, tok, texts, batch_size=batch_size, window=window)["nll"]
        assert got == pytest.approx(total / count, rel=1e-12)
    # Without a window and without model.config the whole text is one sequence.
    whole = heldout_text_nll(model, tok, texts[:1], batch_size=1)["nll"]
    ids = torch.tensor(tok.encode(texts[0].text, bos=True, eos=False))
    direct = F.cross_entropy(model(ids[None, :-1]).logits[0], ids[1:]).item()
    assert whole == pytest.approx(direct, rel=1e-12)


def test_window_defaults_to_model_max_seq_len_and_long_context_is_cut() -> None:
    tok = CharTokenizer()
    model = PrefixMeanLM(tok.vocab_size, seed=2).eval()
    model.config = SimpleNamespace(max_seq_len=8)
    text = [Text("1", "abcdefghijklmnopqrstuvwxyz")]
    assert heldout_text_nll(model, tok, text, batch_size=2)["nll"] == \
        heldout_text_nll(model, tok, text, batch_size=2, window=8)["nll"]
    with pytest.raises(ValueError, match="max_seq_len"):
        heldout_text_nll(model, tok, text, batch_size=2, window=9)
    # A pair longer than max_seq_len + 1 keeps BOS + the end of the context.
    ctx, cont = "0123456789abcdef", " xy"
    got = continuation_nll(model, tok, [(ctx, cont)], batch_size=1)["nll"]
    ids = tok.encode(ctx + cont, bos=True, eos=False)
    kept = torch.tensor(ids[:1] + ids[len(ids) - 8:])  # 9 tokens -> 8 inputs
    logits = model(kept[None, :-1]).logits[0]
    direct = F.cross_entropy(logits[-3:], kept[-3:]).item()
    assert got == pytest.approx(direct, rel=1e-12)


def _unigram(tok: CharTokenizer, table: dict[str, float], rest: float = -20.0) -> UnigramLM:
    lp = torch.full((tok.vocab_size,), rest, dtype=torch.float64)
    for ch, v in table.items():
        lp[tok.id_of(ch)] = v
    return UnigramLM(lp)


def test_hellaswag_picks_the_right_ending_length_normalised() -> None:
    tok = CharTokenizer()
    # log p: ' ' -1, 'a' -0.5, 'z' -3 (logits need not be normalised: the scorer log-softmaxes them)
    logits = {" ": -1.0, "a": -0.5, "z": -3.0, "q": -6.0}
    model = _unigram(tok, logits)
    lse = torch.logsumexp(model.logprobs, 0).item()
    lp = {k: v - lse for k, v in logits.items()}
    # ending 0 "z": total lp(' ')+lp('z'), 1 char; ending 1: 20 x 'a', total lp(' ')+20 lp('a'), 20 chars
    total0, total1 = lp[" "] + lp["z"], lp[" "] + 20 * lp["a"]
    total2, total3 = lp[" "] + 2 * lp["q"], lp[" "] + 3 * lp["z"]
    assert total0 > total1 and total1 / 20 > max(total0 / 1, total2 / 2, total3 / 3)
    item = HellaSwag("h", "Some context.", ["z", "a" * 20, "qq", "zzz"], label=1)
    out = hellaswag_accuracy(model, tok, [item], batch_size=3)
    assert out == {"acc_norm": 1.0, "acc": 0.0}  # per-char normalisation picks ending 1, raw picks 0
    other = HellaSwag("g", "ctx", ["qq", "z", "zzz", "a" * 7], label=3)  # per-char: a*7 wins, raw: z
    out = hellaswag_accuracy(model, tok, [item, other, HellaSwag("w", "c", ["qq", "a", "z", "zz"], label=0)],
                             batch_size=5)
    assert out["acc_norm"] == pytest.approx(2 / 3) and out["acc"] == 0.0


def test_hellaswag_uses_context() -> None:
    # A context-dependent model: the correct ending is the one the oracle continues the context with.
    tok = CharTokenizer()
    model = OracleLM(tok, {"The cat sat on the": " mat."})
    item = HellaSwag("h", "The cat sat on the", ["hat.", "mat.", "bat.", "mat!"], label=1)
    assert hellaswag_accuracy(model, tok, [item], batch_size=4)["acc_norm"] == 1.0
    assert hellaswag_accuracy(model, tok, [HellaSwag("h", item.ctx, item.endings, 2)], batch_size=4)["acc_norm"] == 0.0


def test_hellaswag_preprocess() -> None:
    assert hellaswag_preprocess(" How to X [title] Do it [step] now  ") == "How to X. Do it now"


def test_known_facts_retention_is_qa_f1() -> None:
    tok = CharTokenizer()
    model = OracleLM(tok, {"Q1": " Paris", "Q2": " Rome"})
    records = [QA("1", "Q1", ["Paris"]), QA("2", "Q2", ["Milan"])]
    out = known_facts_retention(model, tok, records, batch_size=2, prompt_fn=lambda r: r.question)
    assert {k: out[k] for k in ("f1", "em")} == {"f1": 0.5, "em": 0.5}


def test_training_mode_restored_and_results_deterministic() -> None:
    tok = CharTokenizer()
    model = PrefixMeanLM(tok.vocab_size, seed=5)
    model.train()
    a = continuation_nll(model, tok, PAIRS, batch_size=2)["nll"]
    b = continuation_nll(model, tok, PAIRS, batch_size=2)["nll"]
    assert a == b and math.isfinite(a)
    assert model.training and model.dropout.training
    assert all(p.grad is None for p in model.parameters())
