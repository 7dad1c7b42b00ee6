"""QA normalisation, F1/EM against hand-worked examples, and QA scoring by greedy generation."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_fakes import QA, CharTokenizer, OracleLM, SimpleQA  # noqa: E402

from evaluation import exact_match, f1_score, normalize_answer, qa_scores, score_answer  # noqa: E402


@pytest.mark.parametrize("raw, expected", [
    ("The Beatles", "beatles"),
    ("  An   apple, a day!  ", "apple day"),
    ("Paris.", "paris"),
    ("U.S.A.", "usa"),
    ("the theatre", "theatre"),          # "the" only as a whole word
    ("Anand", "anand"),                  # "an" only as a whole word
    ("A", ""),
    ("rock-'n'-roll", "rocknroll"),
])
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_f1_hand_worked() -> None:
    # pred tokens [john, smith], gold [john, ronald, smith]: common 2, P = 1, R = 2/3, F1 = 0.8
    assert f1_score("John Smith", "John Ronald Smith") == pytest.approx(0.8)
    # pred [new, york, city] vs gold [new, york]: P = 2/3, R = 1 -> 0.8
    assert f1_score("the New York City", "New York") == pytest.approx(0.8)
    # repeated tokens count with multiplicity: pred [a, a] is not an article here -> [b, b] vs [b]
    assert f1_score("b b", "b") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert f1_score("Paris", "London") == 0.0
    # articles and punctuation vanish: exact
    assert f1_score("The Beatles!", "beatles") == 1.0
    # empty after normalisation on one side only -> 0; on both sides -> 1
    assert f1_score("the", "Paris") == 0.0
    assert f1_score("", "The") == 1.0


def test_exact_match_hand_worked() -> None:
    assert exact_match("  the eiffel Tower. ", "Eiffel tower") == 1.0
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0


def test_best_over_aliases() -> None:
    f1, em = score_answer("JFK", ["John F. Kennedy", "JFK", "Kennedy"])
    assert (f1, em) == (1.0, 1.0)
    f1, em = score_answer("Kennedy airport", ["John F. Kennedy", "Kennedy"])
    # vs "john f kennedy": common 1, P 1/2, R 1/3 -> 0.4; vs "kennedy": P 1/2, R 1 -> 2/3
    assert f1 == pytest.approx(2 / 3) and em == 0.0
    assert score_answer("x", []) == (0.0, 0.0)


def test_qa_scores_by_generation() -> None:
    tok = CharTokenizer()
    scripts = {
        "Q1:": " Paris\nQ2: ignored",       # stops at the newline -> "Paris"      F1 1,   EM 1
        "Q2:": " the Beatles!",             # EOS after the script -> normalised "beatles" F1 1, EM 1
        "Q3:": " Johnn Smith",              # vs "John Smith": common 1 of 2/2 -> F1 .5, EM 0
        "Q4:": " a b c d e f g h i j k l",  # cut at max_new_tokens=14 -> " a b c d e f g"
        #                                     -> "b c d e f g" vs "c": P 1/6, R 1 -> F1 2/7
    }
    model = OracleLM(tok, scripts)
    records = [QA("1", "Q1:", ["paris", "Paris, France"]), QA("2", "Q2:", ["Beatles"]),
               QA("3", "Q3:", ["John Smith"]), QA("4", "Q4:", ["c"]), QA("5", "Q5:", ["x"])]
    expected_f1 = (1 + 1 + 0.5 + 2 / 7 + 0) / 5
    expected_em = (1 + 1 + 0 + 0 + 0) / 5
    for batch_size in (1, 2, 5):
        out = qa_scores(model, tok, records, batch_size=batch_size, prompt_fn=lambda r: r.question,
                        max_new_tokens=14)
        assert out["f1"] == pytest.approx(expected_f1)
        assert out["em"] == pytest.approx(expected_em)
    out = qa_scores(model, tok, records, batch_size=2, max_items=2, prompt_fn=lambda r: r.question)
    assert {k: out[k] for k in ("f1", "em")} == {"f1": 1.0, "em": 1.0}


def test_qa_answer_nll_is_the_teacher_forced_nll_of_the_gold_answer() -> None:
    """answer_nll (and per-item values) equal a direct computation: -log p(" " + answer | prompt)
    averaged over the answer's tokens, then over questions; independent of the batch size."""
    from eval_fakes import PrefixMeanLM
    tok = CharTokenizer()
    model = PrefixMeanLM(tok.vocab_size, seed=3).eval()
    records = [QA("1", "Q1:", ["ab"]), QA("2", "Longer Q2:", ["xyz", "alias"]), QA("3", "Q3:", ["c"])]
    expected = []
    for r in records:
        ctx = tok.encode(r.question, bos=True)
        ids = tok.encode(r.question + " " + r.answers[0], bos=True)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits.float(), dim=-1)[0]
        expected.append(-sum(float(logp[j - 1, ids[j]]) for j in range(len(ctx), len(ids))) / (len(ids) - len(ctx)))
    for batch_size in (1, 3):
        out = qa_scores(model, tok, records, batch_size=batch_size, prompt_fn=lambda r: r.question,
                        max_new_tokens=3, return_items=True)
        assert out["answer_nll"] == pytest.approx(sum(expected) / 3, rel=1e-5)
        assert [item["answer_nll"] for item in out["items"]] == pytest.approx(expected, rel=1e-5)
        assert len({round(e, 4) for e in expected}) == 3    # the three questions differ: the test can fail


def test_qa_scores_simpleqa_records_and_errors() -> None:
    tok = CharTokenizer()
    model = OracleLM(tok, {"Who?": " Ada Lovelace"})
    out = qa_scores(model, tok, [SimpleQA("s", "Who?", "Ada Lovelace")], batch_size=4,
                    prompt_fn=lambda r: r.question)
    assert {k: out[k] for k in ("f1", "em")} == {"f1": 1.0, "em": 1.0}
    with pytest.raises(ValueError, match="no records"):
        qa_scores(model, tok, [], batch_size=4, prompt_fn=lambda r: r.question)
    with pytest.raises(ValueError, match="batch_size"):
        qa_scores(model, tok, [SimpleQA("s", "Who?", "x")], batch_size=0, prompt_fn=lambda r: r.question)


def test_nq_f1_on_the_committed_sample() -> None:
    """NQ-open (the paper's held-out QA) through the loader and qa_scores: the best F1 over the aliases, with
    the evaluation prompt the finetunes use."""
    from pathlib import Path

    from data_pipeline.facts import eval_prompt
    from data_pipeline.sources import load_source
    sample = Path(__file__).resolve().parents[2] / "data_pipeline" / "samples" / "nq_open_validation_sample.jsonl"
    records = load_source("nq_open", sample)[:3]
    assert records[0].question == "when was the last time anyone was on the moon"
    tok = CharTokenizer()
    scripts = {eval_prompt(records[0]): " December 1972",     # the second alias exactly: F1 1
               eval_prompt(records[1]): " Bob Russell",       # the second alias: F1 1
               eval_prompt(records[2]): " zzz"}               # shares no token with the gold answers: F1 0
    out = qa_scores(OracleLM(tok, scripts), tok, records, batch_size=2, max_new_tokens=20)
    assert out["f1"] == pytest.approx(2 / 3) and out["em"] == pytest.approx(2 / 3)
