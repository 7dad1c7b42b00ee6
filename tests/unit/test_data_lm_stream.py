"""Packed LM stream, statement stream and mixing: determinism, rank sharding, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline import SAMPLES_DIR, TINY_TOKENIZER, Tokenizer, load_source
from data_pipeline.facts import fact_statements
from data_pipeline.lm_stream import LMStream, MixedStream, StatementStream, load_texts


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(TINY_TOKENIZER)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return load_texts(SAMPLES_DIR / "prose_sample_small.jsonl")  # 40 real passages


@pytest.fixture(scope="module")
def facts():
    return load_source("triviaqa", SAMPLES_DIR / "triviaqa_validation_sample.jsonl")[:10]


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def test_windows_are_packed_documents(tok: Tokenizer, texts: list[str]) -> None:
    s = LMStream(texts, tok, seq_len=32, batch_size=3, rank=1, world_size=2, seed=5)
    expected = np.concatenate([tok.encode(texts[i], bos=True, eos=True) for i in s.documents_for_epoch(0)])
    batches = _take(s, 4)
    for k, b in enumerate(batches):
        assert b.tokens.shape == b.labels.shape == (3, 32) and b.padding_mask.all() and b.fact_id is None
        assert torch.equal(b.labels[:, :-1], b.tokens[:, 1:])
        for j in range(3):
            start = (k * 3 + j) * 32  # windows overlap by one id: every token is a target once
            assert b.tokens[j].tolist() == expected[start: start + 32].tolist()
            assert b.labels[j].tolist() == expected[start + 1: start + 33].tolist()


def test_ranks_see_disjoint_documents(tok: Tokenizer, texts: list[str]) -> None:
    r0 = LMStream(texts, tok, seq_len=16, batch_size=2, rank=0, world_size=2, seed=0)
    r1 = LMStream(texts, tok, seq_len=16, batch_size=2, rank=1, world_size=2, seed=0)
    for epoch in range(3):
        d0, d1 = set(r0.documents_for_epoch(epoch)), set(r1.documents_for_epoch(epoch))
        assert not d0 & d1 and d0 | d1 == set(range(len(texts)))
    assert r0.documents_for_epoch(0) != r0.documents_for_epoch(1)  # reshuffled each epoch
    # and the tokens each rank yields are its own documents only
    w0 = torch.cat([b.tokens.flatten() for b in _take(r0, 5)]).tolist()
    own = np.concatenate([tok.encode(texts[i], bos=True, eos=True) for i in r0.documents_for_epoch(0)]).tolist()
    assert w0 == own[: len(w0)] != np.concatenate([tok.encode(texts[i], bos=True, eos=True) for i in r1.documents_for_epoch(0)]).tolist()[: len(w0)]


def test_deterministic_and_seeded(tok: Tokenizer, texts: list[str]) -> None:
    a = _take(LMStream(texts, tok, seq_len=16, batch_size=2, seed=3), 3)
    b = _take(LMStream(texts, tok, seq_len=16, batch_size=2, seed=3), 3)
    c = _take(LMStream(texts, tok, seq_len=16, batch_size=2, seed=4), 3)
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(a, b))
    assert not all(torch.equal(x.tokens, y.tokens) for x, y in zip(a, c))


def test_resume_mid_stream_across_epochs(tok: Tokenizer) -> None:
    docs = [f"Document number {i} says {'word ' * (i % 7)}end." for i in range(9)]
    kwargs = dict(seq_len=24, batch_size=3, rank=1, world_size=2, seed=11)
    reference = _take(LMStream(docs, tok, **kwargs), 20)
    s = LMStream(docs, tok, **kwargs)
    _take(s, 8)
    state = s.state_dict()
    assert state["epoch"] >= 1  # the saved position is past an epoch boundary
    resumed = LMStream(docs, tok, **kwargs)
    resumed.load_state_dict(state)
    for x, y in zip(_take(resumed, 12), reference[8:]):
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.labels, y.labels)
    with pytest.raises(ValueError, match="world_size"):
        LMStream(docs, tok, **{**kwargs, "world_size": 3}).load_state_dict(state)
    with pytest.raises(ValueError):
        LMStream(docs[:1], tok, seq_len=8, batch_size=1, world_size=2, rank=1)


def test_statement_stream(tok: Tokenizer, facts) -> None:
    all_statements = {s for q in facts for s in fact_statements(q)}
    r0 = StatementStream(facts, tok, seq_len=64, batch_size=4, rank=0, world_size=2, seed=1)
    r1 = StatementStream(facts, tok, seq_len=64, batch_size=4, rank=1, world_size=2, seed=1)
    per_epoch = len(all_statements) // 2  # 120 statements, 60 per rank per epoch
    seen0, seen1 = [], []
    for stream, seen in ((r0, seen0), (r1, seen1)):
        for _ in range(per_epoch // 4):
            b = next(stream)
            assert b.tokens.shape == (4, 64) and torch.equal(b.padding_mask, b.labels != -100)
            for i in range(4):
                n = int(b.padding_mask[i].sum())
                seen.append(tok.decode(b.tokens[i, :n].tolist()))
    assert set(seen0) | set(seen1) == all_statements and not set(seen0) & set(seen1)
    state = r0.state_dict()
    ref = _take(r0, 5)
    again = StatementStream(facts, tok, seq_len=64, batch_size=4, rank=0, world_size=2, seed=1)
    again.load_state_dict(state)
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(_take(again, 5), ref))


def test_statement_stream_with_variation_prefixes(tok: Tokenizer, facts) -> None:
    """variation_prefixes: every statement with each of the fact stream's prefixes, once per epoch."""
    from data_pipeline.facts import VARIATION_PREFIXES
    plain = StatementStream(facts, tok, seq_len=64, batch_size=4, seed=1)
    wrapped = StatementStream(facts, tok, seq_len=64, batch_size=4, seed=1, variation_prefixes=True)
    assert len(wrapped.statements) == len(VARIATION_PREFIXES) * len(plain.statements)
    assert set(wrapped.statements) == {p + s for p in VARIATION_PREFIXES for s in plain.statements}
    assert sorted(set(wrapped.fact_ids)) == sorted(set(plain.fact_ids))


def test_mixed_stream_ratio_and_resume(tok: Tokenizer, texts: list[str], facts) -> None:
    def build() -> MixedStream:
        return MixedStream([LMStream(texts, tok, seq_len=32, batch_size=3, seed=0), StatementStream(facts, tok, seq_len=32, batch_size=1, seed=0)])

    m = build()
    b = next(m)
    assert b.tokens.shape == (4, 32) and m.batch_size == 4
    assert b.padding_mask[:3].all() and not b.padding_mask[3].all()  # 3 packed prose rows + 1 padded statement
    _take(m, 3)
    state = m.state_dict()
    ref = _take(m, 4)
    resumed = build()
    resumed.load_state_dict(state)
    assert all(torch.equal(x.tokens, y.tokens) and torch.equal(x.labels, y.labels) for x, y in zip(_take(resumed, 4), ref))
    with pytest.raises(ValueError, match="seq_len"):
        MixedStream([LMStream(texts, tok, seq_len=32, batch_size=1), StatementStream(facts, tok, seq_len=16, batch_size=1)])


def test_packed_statement_stream_has_no_padding_and_the_same_statements(tok: Tokenizer, facts) -> None:
    """pack=True: rows full of statements (no padding), the statements the padded stream reads, in its order,
    each [bos] + statement + [eos] back to back; exact resume; a padded stream's state is refused."""
    padded = StatementStream(facts, tok, seq_len=64, batch_size=4, rank=1, world_size=2, seed=3)
    packed = StatementStream(facts, tok, seq_len=64, batch_size=4, rank=1, world_size=2, seed=3, pack=True)
    order = [padded.next_index() for _ in range(60)]               # one epoch of this rank's statements
    expected = np.concatenate([tok.encode(padded.statements[i], bos=True, eos=True) for i in order]).tolist()
    stream: list[int] = []
    batch = None
    while len(stream) < len(expected):
        batch = next(packed)
        assert batch.tokens.shape == (4, 64)
        assert bool(batch.padding_mask.all()) and bool((batch.labels != -100).all())   # no padding at all
        for row_tokens, row_labels in zip(batch.tokens, batch.labels):
            assert torch.equal(row_tokens[1:], row_labels[:-1])       # next-token labels within the row
            stream.extend(row_tokens.tolist())
    assert stream[:len(expected)] == expected                      # the same statements, the same order
    # a padded batch of the same statements: ~half its tokens are padding here
    real_share = next(StatementStream(facts, tok, seq_len=64, batch_size=4, seed=3)).padding_mask.float().mean()
    assert float(real_share) < 0.9
    state = packed.state_dict()
    ref = _take(packed, 3)
    again = StatementStream(facts, tok, seq_len=64, batch_size=4, rank=1, world_size=2, seed=3, pack=True)
    again.load_state_dict(state)
    assert all(torch.equal(x.tokens, y.tokens) and torch.equal(x.labels, y.labels) for x, y in zip(_take(again, 3), ref))
    with pytest.raises(ValueError, match="pack"):
        StatementStream(facts, tok, seq_len=64, batch_size=4, rank=1, world_size=2, seed=3).load_state_dict(state)
