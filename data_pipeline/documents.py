"""Document learning: documents -> ~paragraph chunks -> one chunk's batch of augmentations per step.

Documents file (jsonl, one per line)::

    {"id": "doc-1", "text": "...", "title": "optional",
     "questions": [{"question": "...", "answer": "..."} or {"question": "...", "answers": ["...", ...]}, ...]}

Chunking (:func:`split_chunks`): paragraphs are blank-line separated; paragraphs shorter than
``min_chars`` are merged with the next, longer than ``max_chars`` are split at sentence ends (and a
single over-long sentence at whitespace).

Augmentations of a chunk (:func:`augment`, cycled in this order, the random ones re-drawn each time
from ``(seed, chunk id, row)``): 0 the chunk verbatim; 1 sentences shuffled; 2 prefixed with the
document title (or id); 3 a random window of consecutive sentences (at least half of them); 4 title +
shuffled; 5 preceded by the last sentence of the previous chunk (title-prefixed for a first chunk).
Rows are ``[bos] + augmentation + [eos]`` right-padded/truncated to ``seq_len`` (see batch.py).

Offline stand-in: the paper learns the Wikipedia pages behind 100 SimpleQA questions; those pages are
not available offline. :func:`simpleqa_standin_documents` writes a short document per SimpleQA
question from its answer and metadata instead. It is clearly marked (``stand_in=True``, id prefix
``standin-``, and a ``note`` field in the written jsonl; the note is kept out of the training text) and it states the question-answer pair almost verbatim, so
results on it measure fact absorption from a short note, not reading comprehension of a real page.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from data_pipeline.batch import Batch, pad_rows
from data_pipeline.item_stream import ItemStream
from data_pipeline.atomic import atomic_write
from data_pipeline.records import DocumentRecord, QARecord, SimpleQARecord, dedupe
from data_pipeline.sources import DataError
from data_pipeline.tokenizer import Tokenizer

__all__ = [
    "Chunk", "load_documents", "write_documents", "split_chunks", "split_sentences", "augment",
    "DocumentStream", "simpleqa_standin_documents", "STAND_IN_NOTE",
]

STAND_IN_NOTE = ("[Stand-in document: written offline from a SimpleQA answer and its metadata, "
                 "because the source Wikipedia page is not available offline.]")
_AUGMENTATIONS = ("verbatim", "shuffled", "titled", "window", "titled_shuffled", "with_context")
# a sentence ends at . ! or ? (optionally followed by a closing quote/bracket) before whitespace and
# an upper-case letter, digit or opening quote/bracket; line breaks always separate.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])|\s*\n\s*")


@dataclass(frozen=True)
class Chunk:
    """One ~paragraph of a document: ``id`` is ``"<doc id>#<index>"``."""

    id: str
    doc_id: str
    index: int
    text: str
    title: str
    previous_text: str = ""


# ----------------------------------------------------------------------------------------- files
def _question(obj: object, where: str, doc_id: str, j: int) -> QARecord:
    if not isinstance(obj, dict) or not isinstance(obj.get("question"), str):
        raise DataError(where, 'each question must be an object {"question": str, "answer": str} or {"question": str, "answers": [str, ...]}')
    answers = obj.get("answers", [obj["answer"]] if "answer" in obj else None)
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise DataError(where, f"question {j} needs 'answer' (str) or 'answers' (non-empty list of str)")
    return QARecord(id=str(obj.get("id", f"{doc_id}/q{j}")), question=obj["question"].strip(), answers=dedupe([a.strip() for a in answers]))


def load_documents(path: str | os.PathLike) -> list[DocumentRecord]:
    """Read a documents jsonl (see the module docstring); raises DataError on bad input."""
    from data_pipeline.sources import _check_file, _lines

    path = Path(path)
    expected = '{"id", "text", "questions": [...]}'
    _check_file(path, f"a documents jsonl with {expected}")
    docs: list[DocumentRecord] = []
    for lineno, row in _lines(path, expected):
        where = f"{path}:{lineno}"
        for key, typ in (("id", (str, int)), ("text", str), ("questions", list)):
            if not isinstance(row.get(key), typ):
                raise DataError(where, f"missing or wrongly typed field {key!r}; expected {expected}")
        if not row["text"].strip():
            raise DataError(where, "empty 'text'")
        doc_id = str(row["id"])
        questions = [_question(q, where, doc_id, j) for j, q in enumerate(row["questions"])]
        docs.append(DocumentRecord(id=doc_id, text=row["text"], questions=questions, title=str(row.get("title", "")), stand_in=bool(row.get("stand_in", False))))
    if not docs:
        raise DataError(path, f"no documents; expected lines {expected}")
    return docs


def write_documents(path: str | os.PathLike, docs: Sequence[DocumentRecord]) -> int:
    """Write documents in the format :func:`load_documents` reads; returns the count."""
    lines = []
    for d in docs:
        row = {"id": d.id, "title": d.title, "stand_in": d.stand_in, **({"note": STAND_IN_NOTE} if d.stand_in else {}), "text": d.text,
               "questions": [{"id": q.id, "question": q.question, "answers": q.answers} for q in d.questions]}
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    atomic_write(path, "".join(lines))
    return len(docs)


# -------------------------------------------------------------------------------------- chunking
def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def _split_long(paragraph: str, max_chars: int) -> list[str]:
    pieces: list[str] = []
    for sentence in split_sentences(paragraph):
        while len(sentence) > max_chars:  # one over-long "sentence": cut at whitespace
            cut = sentence.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            pieces.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if pieces and len(pieces[-1]) + 1 + len(sentence) <= max_chars:
            pieces[-1] = pieces[-1] + " " + sentence
        elif sentence:
            pieces.append(sentence)
    return pieces


def split_chunks(text: str, *, max_chars: int = 1500, min_chars: int = 200) -> list[str]:
    """Split ``text`` into ~paragraph chunks of at most ``max_chars`` characters (see module docstring)."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    chunks: list[str] = []
    carry = ""
    for p in paragraphs:
        p = f"{carry}\n\n{p}" if carry else p
        carry = ""
        if len(p) < min_chars:
            carry = p
            continue
        chunks.extend(_split_long(p, max_chars) if len(p) > max_chars else [p])
    if carry:
        if chunks and len(chunks[-1]) + 2 + len(carry) <= max_chars:
            chunks[-1] = f"{chunks[-1]}\n\n{carry}"
        else:
            chunks.extend(_split_long(carry, max_chars) if len(carry) > max_chars else [carry])
    return chunks


def chunk_documents(docs: Sequence[DocumentRecord], *, max_chars: int = 1500, min_chars: int = 200) -> list[Chunk]:
    chunks: list[Chunk] = []
    for d in docs:
        prev = ""
        for j, text in enumerate(split_chunks(d.text, max_chars=max_chars, min_chars=min_chars)):
            chunks.append(Chunk(id=f"{d.id}#{j}", doc_id=d.id, index=j, text=text, title=d.title or d.id, previous_text=prev))
            prev = text
    return chunks


def augment(chunk: Chunk, *, num: int, seed: int) -> list[str]:
    """The ``num`` augmentations of ``chunk`` (kinds cycle as listed in the module docstring)."""
    sentences = split_sentences(chunk.text)
    prev_sentences = split_sentences(chunk.previous_text)
    out: list[str] = []
    for i in range(num):
        kind = _AUGMENTATIONS[i % len(_AUGMENTATIONS)]
        rng = random.Random(f"{seed}:{chunk.id}:{i}")
        shuffled = rng.sample(sentences, len(sentences))
        if kind == "verbatim":
            out.append(chunk.text)
        elif kind == "shuffled":
            out.append(" ".join(shuffled))
        elif kind == "titled":
            out.append(f"{chunk.title}\n\n{chunk.text}")
        elif kind == "window":
            n = rng.randint((len(sentences) + 1) // 2, len(sentences))
            start = rng.randint(0, len(sentences) - n)
            out.append(" ".join(sentences[start:start + n]))
        elif kind == "titled_shuffled":
            out.append(f"{chunk.title}\n\n" + " ".join(shuffled))
        else:
            out.append(f"{prev_sentences[-1]} {chunk.text}" if prev_sentences else f"{chunk.title}\n\n{chunk.text}")
    return out


class DocumentStream(ItemStream):
    """Yields one :class:`Batch` per chunk (``fact_id`` = chunk id), chunks in document order,
    ``num_passes`` times; ``num_augmentations`` rows per batch padded to ``seq_len``. ``state_dict()`` /
    ``load_state_dict()`` save and restore the position for resume (:class:`ItemStream`)."""
    unit, id_name = "chunks", "chunk"

    def __init__(
        self,
        documents: Sequence[DocumentRecord],
        tokenizer: Tokenizer,
        *,
        num_augmentations: int = 64,
        seq_len: int = 512,
        seed: int = 0,
        num_passes: int = 1,
        max_chunk_chars: int = 1500,
        min_chunk_chars: int = 200,
    ) -> None:
        if not documents:
            raise ValueError("DocumentStream needs at least one document")
        if num_augmentations < 1 or seq_len < 2 or num_passes < 1:
            raise ValueError(f"need num_augmentations >= 1, seq_len >= 2, num_passes >= 1 (got {num_augmentations}, {seq_len}, {num_passes})")
        self.documents = list(documents)
        self.chunks = chunk_documents(self.documents, max_chars=max_chunk_chars, min_chars=min_chunk_chars)
        super().__init__(self.chunks, num_passes=num_passes)
        self.questions = [q for d in self.documents for q in d.questions]
        self.tokenizer = tokenizer
        self.num_augmentations = num_augmentations
        self.seq_len = seq_len
        self.seed = seed

    def batch_for(self, chunk: Chunk) -> Batch:
        rows = self.tokenizer.encode_batch(augment(chunk, num=self.num_augmentations, seed=self.seed), bos=True, eos=True)
        return pad_rows(rows, seq_len=self.seq_len, pad_id=self.tokenizer.pad_id, fact_id=chunk.id)


# -------------------------------------------------------------------------------------- stand-in
def _page_title(url: str) -> str | None:
    parsed = urlparse(url)
    if "wikipedia.org" in parsed.netloc and parsed.path.startswith("/wiki/"):
        return unquote(parsed.path[len("/wiki/"):]).replace("_", " ").strip() or None
    return None


def simpleqa_standin_documents(records: Sequence[SimpleQARecord], *, limit: int | None = None) -> list[DocumentRecord]:
    """One short stand-in document per SimpleQA question, built from its answer and metadata only.

    NOT the paper's Wikipedia source pages (unavailable offline); see the module docstring.
    """
    docs = []
    for r in list(records)[:limit]:
        meta = r.metadata or {}
        urls = [u for u in meta.get("urls", []) if isinstance(u, str)]
        titles = dedupe([t for t in map(_page_title, urls) if t])
        topic = str(meta.get("topic", "general knowledge"))
        answer_type = str(meta.get("answer_type", "answer")).lower()
        subject = titles[0] if titles else topic
        answer = r.answer.rstrip(".")
        paragraphs = [
            subject,
            f"This note is about {subject}, a subject in the area of {topic.lower()}. "
            f"The question \"{r.question}\" has the answer {answer}.",
            f"In short: {r.question} {answer}. The answer, {answer}, is a {answer_type}.",
        ]
        if titles:
            paragraphs.append("Related Wikipedia articles: " + "; ".join(titles) + ".")
        questions = [QARecord(id=r.id, question=r.question, answers=[r.answer])]
        docs.append(DocumentRecord(id=f"standin-{r.id}", text="\n\n".join(paragraphs), questions=questions, title=subject, stand_in=True))
    return docs
