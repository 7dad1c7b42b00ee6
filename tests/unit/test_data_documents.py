"""Documents: chunking, augmentation batches, documents file, SimpleQA stand-in documents."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from data_pipeline import IGNORE_INDEX, SAMPLES_DIR, TINY_TOKENIZER, DataError, Tokenizer, load_source
from data_pipeline.documents import (
    STAND_IN_NOTE, DocumentStream, augment, chunk_documents, load_documents, simpleqa_standin_documents,
    split_chunks, split_sentences, write_documents,
)
from data_pipeline.records import DocumentRecord, QARecord


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(TINY_TOKENIZER)


def _doc(n_paragraphs: int = 4) -> DocumentRecord:
    paragraphs = [" ".join(f"Paragraph {p} sentence {s} talks about topic {p * 10 + s}." for s in range(8)) for p in range(n_paragraphs)]
    return DocumentRecord(id="d1", text="\n\n".join(paragraphs), questions=[QARecord("d1/q0", "What?", ["topic 3"])], title="Doc One")


def test_split_chunks_paragraphs_merge_and_split() -> None:
    doc = _doc()
    chunks = split_chunks(doc.text, max_chars=1500, min_chars=100)
    assert chunks == doc.text.split("\n\n")  # ~paragraph chunks
    small = split_chunks("Short one.\n\nShort two.\n\n" + doc.text.split("\n\n")[0], max_chars=1500, min_chars=100)
    assert small[0].startswith("Short one.\n\nShort two.\n\nParagraph 0")  # short paragraphs merged forward
    long = split_chunks(" ".join([doc.text.replace("\n\n", " ")] * 2), max_chars=300, min_chars=50)
    assert len(long) > 4 and all(len(c) <= 300 for c in long)
    assert all(c.endswith(".") for c in long)  # split at sentence ends
    assert split_chunks("x" * 700, max_chars=300, min_chars=10) == ["x" * 300, "x" * 300, "x" * 100]


def test_split_sentences() -> None:
    assert split_sentences('He said "Stop." Then [it ended.] And 3 more.\n\nTitle\nNext.') == ['He said "Stop."', "Then [it ended.]", "And 3 more.", "Title", "Next."]


def test_augmentations(tok: Tokenizer) -> None:
    chunks = chunk_documents([_doc()], min_chars=100)
    c = chunks[1]
    augs = augment(c, num=12, seed=0)
    assert augs == augment(c, num=12, seed=0) and augs != augment(c, num=12, seed=1)
    assert augs[0] == c.text
    sentences = split_sentences(c.text)
    assert Counter(split_sentences(augs[1])) == Counter(sentences) and augs[1] != c.text  # shuffled
    assert augs[2] == f"Doc One\n\n{c.text}"
    assert set(split_sentences(augs[3])) <= set(sentences) and len(split_sentences(augs[3])) >= len(sentences) // 2
    assert augs[5].startswith(split_sentences(chunks[0].text)[-1])  # previous chunk's last sentence


def test_document_stream_batches(tok: Tokenizer) -> None:
    docs = [_doc(), DocumentRecord(id="d2", text="Only one paragraph here. It is short.", questions=[])]
    stream = DocumentStream(docs, tok, num_augmentations=6, seq_len=128, max_chunk_chars=600, min_chunk_chars=100)
    batches = list(stream)
    assert [b.fact_id for b in batches] == [c.id for c in stream.chunks] == ["d1#0", "d1#1", "d1#2", "d1#3", "d2#0"]
    assert len(stream.questions) == 1
    for b, c in zip(batches, stream.chunks):
        assert b.tokens.shape == (6, 128)
        assert torch.equal(b.padding_mask, b.labels != IGNORE_INDEX) and torch.all(b.tokens[:, 0] == tok.bos_id)
        n = int(b.padding_mask[0].sum())
        assert tok.decode(b.tokens[0, :n].tolist()) == c.text and b.labels[0, n - 1] == tok.eos_id
        assert torch.equal(b.labels[0, : n - 1], b.tokens[0, 1:n])
    s = DocumentStream(docs, tok, num_augmentations=2, seq_len=64, max_chunk_chars=600, min_chunk_chars=100, num_passes=2)
    for _ in range(3):
        next(s)
    resumed = DocumentStream(docs, tok, num_augmentations=2, seq_len=64, max_chunk_chars=600, min_chunk_chars=100, num_passes=2)
    resumed.load_state_dict(s.state_dict())
    assert all(torch.equal(x.tokens, y.tokens) and x.fact_id == y.fact_id for x, y in zip(resumed, s))


def test_documents_file_round_trip_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "docs.jsonl"
    p.write_text(json.dumps({"id": "a", "text": "Text.", "questions": [{"question": "Q?", "answer": "A"}, {"question": "Q2?", "answers": ["B", "b"]}]}) + "\n")
    docs = load_documents(p)
    assert docs[0].questions == [QARecord("a/q0", "Q?", ["A"]), QARecord("a/q1", "Q2?", ["B", "b"])]
    write_documents(tmp_path / "again.jsonl", docs)
    assert load_documents(tmp_path / "again.jsonl") == docs
    for bad, match in [({"id": "a", "text": "t"}, "questions"), ({"id": "a", "text": "t", "questions": ["Q?"]}, "question"),
                       ({"id": "a", "text": " ", "questions": []}, "empty"), ({"text": "t", "questions": []}, "'id'")]:
        p.write_text(json.dumps(bad) + "\n")
        with pytest.raises(DataError, match=match):
            load_documents(p)


def test_simpleqa_standin_documents(tmp_path: Path, tok: Tokenizer) -> None:
    rows = load_source("simpleqa", SAMPLES_DIR / "simple_qa_test_set_sample.csv")
    docs = simpleqa_standin_documents(rows, limit=100)
    assert len(docs) == 100 and all(d.stand_in and d.id.startswith("standin-") for d in docs)
    d, r = docs[0], rows[0]
    assert d.title == "IEEE Frank Rosenblatt Award" and r.answer in d.text and STAND_IN_NOTE not in d.text
    assert d.questions == [QARecord(r.id, r.question, [r.answer])]
    path = tmp_path / "standin.jsonl"
    write_documents(path, docs)
    first = json.loads(path.read_text().splitlines()[0])
    assert first["stand_in"] is True and first["note"] == STAND_IN_NOTE
    assert load_documents(path) == docs
    stream = DocumentStream(docs, tok, num_augmentations=4, seq_len=512)
    assert len(stream.chunks) >= 100 and next(stream).num_truncated == 0
