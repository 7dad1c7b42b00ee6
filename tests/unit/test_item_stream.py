"""The one stream base (data_pipeline/item_stream.py) under both streams: the state keys the checkpoints
already hold, and a state for other items refused with the stream's name."""
from __future__ import annotations

import pytest

from data_pipeline import SAMPLES_DIR, TINY_TOKENIZER, Tokenizer, load_source
from data_pipeline.documents import DocumentStream
from data_pipeline.facts import FactStream
from data_pipeline.item_stream import ItemStream
from data_pipeline.records import DocumentRecord


@pytest.fixture(scope="module")
def streams():
    tok = Tokenizer(TINY_TOKENIZER)
    facts = load_source("triviaqa", SAMPLES_DIR / "triviaqa_validation_sample.jsonl")[:3]
    docs = [DocumentRecord(id=f"d{i}", text=f"Document {i} says one thing. It says it twice.", questions=[])
            for i in range(2)]
    return (lambda items=facts: FactStream(items, tok, num_paraphrases=2, seq_len=32, num_passes=2),
            lambda items=docs: DocumentStream(items, tok, num_augmentations=2, seq_len=32, num_passes=2),
            facts, docs)


def test_both_streams_share_the_base_and_keep_their_state_keys(streams):
    make_facts, make_docs, facts, docs = streams
    f, d = make_facts(), make_docs()
    assert isinstance(f, ItemStream) and isinstance(d, ItemStream)
    next(f), next(d)
    assert f.state_dict() == {"position": 1, "num_facts": 3, "first_fact_id": facts[0].id}
    assert d.state_dict() == {"position": 1, "num_chunks": 2, "first_chunk_id": "d0#0"}
    assert len(f) == 6 and len(d) == 4 and len(list(f)) == 5 and len(list(d)) == 3


def test_a_state_for_other_items_or_out_of_range_is_refused(streams):
    make_facts, make_docs, facts, docs = streams
    with pytest.raises(ValueError, match=r"FactStream state is for 3 facts starting at .*this stream has 2"):
        make_facts(facts[1:]).load_state_dict(make_facts().state_dict())
    with pytest.raises(ValueError, match=r"DocumentStream state is for 2 chunks starting at 'd0#0'"):
        make_docs(docs[1:]).load_state_dict(make_docs().state_dict())
    with pytest.raises(ValueError, match=r"DocumentStream position 9 out of range 0..4"):
        make_docs().load_state_dict({**make_docs().state_dict(), "position": 9})
