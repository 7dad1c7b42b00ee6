"""Typed records produced by :func:`data_pipeline.load_source`.

Every loader turns an official file format into one of these frozen dataclasses, so the rest of the
repository never touches raw JSON/CSV/Arrow. ``id`` is always a string that is unique within one file:
the dataset's own id where it has one (TriviaQA ``question_id``, HellaSwag ``ind``, GSM8K ``doc.id``),
otherwise a stable ``"<kind>-<row index>"`` (row index counted from 0 in file order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "QARecord",
    "TextRecord",
    "HellaSwagRecord",
    "GSM8KRecord",
    "SimpleQARecord",
    "DocumentRecord",
    "dedupe",
]


def dedupe(values: list[str]) -> list[str]:
    """Drop empty strings and exact duplicates, keeping first-seen order."""
    seen: set[str] = set()
    out: list[str] = []
    for v in values:
        if v and v not in seen:
            seen.add(v)
            out.append(v)
    return out


@dataclass(frozen=True)
class QARecord:
    """A short-answer question (TriviaQA, NQ-open, or a question attached to a document).

    ``answers[0]`` is the canonical answer (TriviaQA ``Answer.Value``; NQ-open's first answer); the
    rest are accepted aliases, TriviaQA's ``Aliases`` then ``NormalizedAliases``, deduplicated. There
    is always at least one answer. Training statements use ``answers[0]``; evaluation scores against
    all of them (max over answers).
    """

    id: str
    question: str
    answers: list[str]


@dataclass(frozen=True)
class TextRecord:
    """A plain-text document for pretraining or background statistics (DCLM-style ``text``)."""

    id: str
    text: str


@dataclass(frozen=True)
class HellaSwagRecord:
    """A HellaSwag item: ``ctx`` continued by one of ``endings`` (always 4); ``label`` is the index
    (int, 0-3) of the correct ending. HF's string labels are converted to int."""

    id: str
    ctx: str
    endings: list[str]
    label: int


@dataclass(frozen=True)
class GSM8KRecord:
    """A GSM8K problem; ``answer`` is the full worked solution ending in ``#### <number>``."""

    id: str
    question: str
    answer: str


@dataclass(frozen=True)
class SimpleQARecord:
    """A SimpleQA row: ``question`` is the official ``problem`` column, ``answer`` the gold answer,
    ``metadata`` the parsed ``metadata`` column (``topic``, ``answer_type``, ``urls``)."""

    id: str
    question: str
    answer: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DocumentRecord:
    """A document to learn (document-QA task) with the questions it should answer afterwards.

    ``title`` is optional (used by the "prefixed" augmentation). ``stand_in`` is True for the offline
    documents built from SimpleQA answers/metadata instead of the real Wikipedia pages.
    """

    id: str
    text: str
    questions: list[QARecord]
    title: str = ""
    stand_in: bool = False
