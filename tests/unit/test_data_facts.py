"""Fact statements and FactStream batches: one fact per step, P paraphrases, masks, paraphrase file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_pipeline import IGNORE_INDEX, SAMPLES_DIR, TINY_TOKENIZER, DataError, Tokenizer, load_source
from data_pipeline.facts import TEMPLATES, VARIATION_PREFIXES, FactStream, eval_prompt, fact_statements, load_paraphrases


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(TINY_TOKENIZER)


@pytest.fixture(scope="module")
def facts():
    return load_source("triviaqa", SAMPLES_DIR / "triviaqa_validation_sample.jsonl")[:6]


def test_eval_prompt_matches_qa_template(facts) -> None:
    q = facts[0]
    assert eval_prompt(q) == f"Question: {q.question}\nAnswer:"
    assert fact_statements(q)[0] == eval_prompt(q) + " " + q.answers[0]


def test_at_least_eight_distinct_templates(facts) -> None:
    for q in facts:
        statements = fact_statements(q)
        assert len(set(statements)) == len(TEMPLATES) >= 8
        assert all(q.answers[0] in s and q.question in s for s in statements)
        assert not any(".." in s.replace("...", "") for s in statements)


def _check_alignment(batch, tok: Tokenizer) -> list[str]:
    """Assert the documented layout; return each row's decoded text."""
    tokens, mask, labels = batch.tokens, batch.padding_mask, batch.labels
    assert tokens.dtype == torch.long and labels.dtype == torch.long and mask.dtype == torch.bool
    assert torch.equal(mask, labels != IGNORE_INDEX)
    assert torch.all(tokens[~mask] == tok.pad_id)
    assert torch.all(tokens[:, 0] == tok.bos_id)
    texts = []
    for i in range(tokens.shape[0]):
        n = int(mask[i].sum())
        assert mask[i, :n].all() and not mask[i, n:].any()  # right padding
        assert torch.equal(labels[i, : n - 1], tokens[i, 1:n])  # labels are the next tokens
        if batch.num_truncated == 0:
            assert labels[i, n - 1] == tok.eos_id
        texts.append(tok.decode(tokens[i, :n].tolist() + [int(labels[i, n - 1])]))
    return texts


def test_one_fact_per_step_in_order(tok: Tokenizer, facts) -> None:
    stream = FactStream(facts, tok, num_paraphrases=16, seq_len=64, seed=0)
    batches = list(stream)
    assert len(batches) == len(facts) == len(stream)
    assert [b.fact_id for b in batches] == [q.id for q in facts]
    for b, q in zip(batches, facts):
        assert b.tokens.shape == b.labels.shape == b.padding_mask.shape == (16, 64)
        texts = _check_alignment(b, tok)
        assert all(q.answers[0] in t for t in texts)
        assert set(texts) <= {p + s for p in VARIATION_PREFIXES for s in fact_statements(q)}
        assert texts[0] == fact_statements(q)[0]  # the QA-format statement is always included


def test_default_64_paraphrases_are_distinct(tok: Tokenizer, facts) -> None:
    stream = FactStream(facts, tok, seq_len=64)
    statements = stream.statements(facts[0])
    assert len(statements) == 64 and len(set(statements)) == 64
    b = next(stream)
    assert b.tokens.shape == (64, 64)
    _check_alignment(b, tok)


def test_deterministic_and_seeded(tok: Tokenizer, facts) -> None:
    a = FactStream(facts, tok, num_paraphrases=5, seed=1)
    b = FactStream(facts, tok, num_paraphrases=5, seed=1)
    c = FactStream(facts, tok, num_paraphrases=5, seed=2)
    for x, y in zip(a, b):
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.labels, y.labels)
    assert any(a.statements(q) != c.statements(q) for q in facts)  # rotation depends on the seed


def test_paraphrase_file_wins(tmp_path: Path, tok: Tokenizer, facts) -> None:
    target = facts[1]
    paras = [f"{target.answers[0]} answers it: {target.question}", "A user paraphrase.", "Another one."]
    p = tmp_path / "paraphrases.jsonl"
    p.write_text(json.dumps({"id": target.id, "paraphrases": paras}) + "\n" + json.dumps({"id": "not-in-stream", "paraphrases": ["x"]}) + "\n")
    stream = FactStream(facts, tok, num_paraphrases=7, seq_len=64, paraphrase_file=p)
    batches = {b.fact_id: b for b in stream}
    got = _check_alignment(batches[target.id], tok)
    assert set(got[:3]) == set(paras)  # first pass: exactly the file's paraphrases
    assert all(any(t == pre + para for pre in VARIATION_PREFIXES for para in paras) for t in got)
    assert not any(t in fact_statements(target) for t in got)
    other = _check_alignment(batches[facts[0].id], tok)
    assert other[0] == fact_statements(facts[0])[0]  # facts without an entry keep the templates


@pytest.mark.parametrize(
    "content, match",
    [("", "empty file"), ('{"id": "a"}\n', "paraphrases"), ('{"id": "a", "paraphrases": []}\n', "paraphrases"),
     ('{"paraphrases": ["x"]}\n', "'id'"), ('{"id": "a", "paraphrases": ["x"]}\n{"id": "a", "paraphrases": ["y"]}\n', "duplicate"),
     ("{not json\n", "malformed JSON")],
)
def test_bad_paraphrase_file(tmp_path: Path, content: str, match: str) -> None:
    p = tmp_path / "p.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=match):
        load_paraphrases(p)


def test_state_dict_resume(tok: Tokenizer, facts) -> None:
    full = [b for b in FactStream(facts, tok, num_paraphrases=4, num_passes=2)]
    assert len(full) == 2 * len(facts)
    s = FactStream(facts, tok, num_paraphrases=4, num_passes=2)
    for _ in range(7):
        next(s)
    state = s.state_dict()
    resumed = FactStream(facts, tok, num_paraphrases=4, num_passes=2)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - 7
    assert all(torch.equal(x.tokens, y.tokens) and x.fact_id == y.fact_id for x, y in zip(rest, full[7:]))
    with pytest.raises(ValueError):
        FactStream(facts[1:], tok).load_state_dict(state)


def test_truncation_is_counted(tok: Tokenizer, facts) -> None:
    b = next(FactStream(facts, tok, num_paraphrases=4, seq_len=8))
    assert b.num_truncated == 4 and b.padding_mask.all() and b.tokens.shape == (4, 8)
    _check_alignment(b, tok)


def test_bad_arguments(tok: Tokenizer, facts) -> None:
    with pytest.raises(ValueError):
        FactStream([], tok)
    with pytest.raises(ValueError):
        FactStream(facts + facts[:1], tok)
    with pytest.raises(ValueError):
        FactStream(facts, tok, num_paraphrases=0)


def test_split_disjoint() -> None:
    from data_pipeline.facts import split_disjoint

    recs = load_source("triviaqa", SAMPLES_DIR / "triviaqa_validation_sample.jsonl")
    new, known, background = split_disjoint(recs, [20, 100, 50], seed=0)
    ids = [r.id for r in new + known + background]
    assert (len(new), len(known), len(background)) == (20, 100, 50) and len(set(ids)) == 170
    assert split_disjoint(recs, [20, 100, 50], seed=0)[0] == new != split_disjoint(recs, [20], seed=1)[0]
    with pytest.raises(ValueError):
        split_disjoint(recs, [200, 200])


def test_encode_pair_splits_prompt_and_answer(tok: Tokenizer, facts) -> None:
    for q in facts:
        prompt_ids, answer_ids = tok.encode_pair(eval_prompt(q), " " + q.answers[0])
        assert prompt_ids + answer_ids == tok.encode(eval_prompt(q) + " " + q.answers[0])
        assert prompt_ids == tok.encode(eval_prompt(q)) and tok.decode(answer_ids) == q.answers[0]


def test_data_error_is_one_line_value_error() -> None:
    e = DataError("f.jsonl:3", "bad\nthing")
    assert isinstance(e, ValueError) and str(e) == "f.jsonl:3: bad thing"
    assert str(DataError("just a message")) == "just a message"
