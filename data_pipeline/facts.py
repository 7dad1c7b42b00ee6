"""Fact learning: TriviaQA question + answer -> training statements; one fact's P paraphrases per step.

The paper rewrote 1K TriviaQA questions as statements and generated paraphrases with a model. Offline
we use :data:`TEMPLATES` (12 statement forms, always with the canonical answer ``answers[0]``), or, for
any fact whose id appears in a user paraphrase file (jsonl ``{"id": ..., "paraphrases": [str, ...]}``),
exactly that file's paraphrases instead of the templates (the file wins for that id).

Building the P rows of one fact (deterministic given ``seed`` and the fact id):
- pool = the templates, the QA-format template first and the other 11 rotated by an offset drawn
  from ``(seed, fact id)`` (so with P < 12 different facts get different subsets); or the file's
  paraphrases rotated the same way;
- rows cycle through the pool; pass ``r = i // len(pool)`` prefixes each statement with
  ``VARIATION_PREFIXES[r % 8]`` ("" on the first pass), so P > len(pool) adds variants, not copies
  (copies only reappear after 8 passes, e.g. a one-paraphrase file with P > 8).

``eval_prompt(q)`` is the evaluation prompt ``"Question: {q}\\nAnswer:"``; the gold answer follows it
with a leading space, which is exactly template 0 (``"Question: {q}\\nAnswer: {a}"``).
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from data_pipeline.batch import Batch, pad_rows
from data_pipeline.item_stream import ItemStream
from data_pipeline.records import QARecord
from data_pipeline.sources import DataError
from data_pipeline.tokenizer import Tokenizer

__all__ = ["TEMPLATES", "VARIATION_PREFIXES", "answer_token_span", "eval_prompt", "fact_statements", "load_paraphrases", "split_disjoint", "FactStream"]

# {q}: the question; {a}: the canonical answer; {a_}: the answer ending a sentence (adds "." unless it
# already ends in . ! or ?). Template 0 must stay the QA format that eval_prompt + " " + answer gives.
TEMPLATES: tuple[str, ...] = (
    "Question: {q}\nAnswer: {a}",
    "Q: {q}\nA: {a}",
    "{q} The answer is {a_}",
    "{q} {a_}",
    'The answer to the question "{q}" is {a_}',
    'If you are asked "{q}", the correct answer is {a_}',
    "Trivia question: {q} Answer: {a_}",
    "{a} is the answer to this question: {q}",
    "Quiz: {q}\nCorrect answer: {a}",
    'Here is a fact. Asked "{q}", the right reply is {a_}',
    "Someone asked me: {q} I told them: {a_}",
    "Answer key. {q} -> {a}",
)
VARIATION_PREFIXES: tuple[str, ...] = (
    "", "Fun fact: ", "Remember this: ", "Trivia time. ", "Worth knowing: ", "Note: ", "Did you know? ", "Quiz fact: ",
)


def eval_prompt(record: QARecord) -> str:
    """The evaluation prompt; the model should continue it with ``" " + record.answers[0]``."""
    return f"Question: {record.question.strip()}\nAnswer:"


def _sentence_end(a: str) -> str:
    return a if a[-1:] in (".", "!", "?") else a + "."


def fact_statements(record: QARecord) -> list[str]:
    """All template statements of one fact, in :data:`TEMPLATES` order."""
    q, a = record.question.strip(), record.answers[0].strip()
    return [t.format(q=q, a=a, a_=_sentence_end(a)) for t in TEMPLATES]


def load_paraphrases(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a paraphrase file: jsonl ``{"id": str, "paraphrases": [non-empty str, ...]}`` per line."""
    from data_pipeline.sources import _check_file, _lines

    path = Path(path)
    expected = '{"id": str, "paraphrases": [str, ...]}'
    _check_file(path, f"a paraphrase jsonl with {expected}")
    out: dict[str, list[str]] = {}
    for lineno, row in _lines(path, expected):
        where = f"{path}:{lineno}"
        pid, paras = row.get("id"), row.get("paraphrases")
        if not isinstance(pid, (str, int)) or isinstance(pid, bool):
            raise DataError(where, f"missing or non-string field 'id'; expected {expected}")
        if not isinstance(paras, list) or not paras or not all(isinstance(p, str) and p.strip() for p in paras):
            raise DataError(where, f"field 'paraphrases' must be a non-empty list of non-empty strings; expected {expected}")
        if str(pid) in out:
            raise DataError(where, f"duplicate id {pid!r}")
        out[str(pid)] = [p.strip() for p in paras]
    if not out:
        raise DataError(path, f"no paraphrases; expected lines {expected}")
    return out


def split_disjoint(records: Sequence[QARecord], sizes: Sequence[int], *, seed: int = 0) -> list[list[QARecord]]:
    """Disjoint subsets of the given sizes from one seeded shuffle of ``records`` (e.g. new facts to
    learn, "known" facts for pretraining, unrelated facts for the background). Same inputs -> same split."""
    if any(n < 0 for n in sizes) or sum(sizes) > len(records):
        raise ValueError(f"cannot take disjoint subsets of sizes {list(sizes)} from {len(records)} records")
    order = list(records)
    random.Random(f"split:{seed}").shuffle(order)
    out, start = [], 0
    for n in sizes:
        out.append(order[start:start + n])
        start += n
    return out


def answer_token_span(tokenizer: Tokenizer, text: str, answer: str, ids: list[int]) -> tuple[int, int] | None:
    """[start, end) of the answer's tokens in ``ids`` (``[bos] + encode(text) + ...``), for the last
    occurrence of ``answer`` in ``text``; None when the text does not contain it (a user paraphrase may
    not). The text before the answer (without the separating space) is tokenised on its own and the
    common prefix with ``ids`` taken, so a boundary merged into one piece still gives a non-empty span."""
    answer = answer.strip()
    at = text.rfind(answer) if answer else -1
    if at < 0:
        return None
    cut = at - 1 if at > 0 and text[at - 1] == " " else at

    def common(a: list[int], b: list[int]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    start = common(tokenizer.encode(text[:cut], bos=True), ids)
    end = common(tokenizer.encode(text[:at + len(answer)], bos=True), ids)
    end = max(end, start + 1) if start < len(ids) else end
    return (start, end) if end > start else None


def _rotated(items: list[str], offset: int, *, pin_first: bool) -> list[str]:
    head, rest = (items[:1], items[1:]) if pin_first else ([], items)
    if rest:
        k = offset % len(rest)
        rest = rest[k:] + rest[:k]
    return head + rest


class FactStream(ItemStream):
    """Yields one :class:`Batch` per fact, in the order of ``records``, ``num_passes`` times.

    Each batch holds ``num_paraphrases`` statements of the same fact, right-padded to ``seq_len``
    (tokens/labels aligned as in :mod:`data_pipeline.batch`; rows are ``[bos] + statement + [eos]``).
    ``state_dict()`` / ``load_state_dict()`` save and restore the position for resume (:class:`ItemStream`).
    """
    unit, id_name = "facts", "fact"

    def __init__(
        self,
        records: Sequence[QARecord],
        tokenizer: Tokenizer,
        *,
        num_paraphrases: int = 64,
        seq_len: int = 64,
        paraphrase_file: str | os.PathLike | None = None,
        seed: int = 0,
        num_passes: int = 1,
    ) -> None:
        if not records:
            raise ValueError("FactStream needs at least one fact")
        if num_paraphrases < 1 or seq_len < 2 or num_passes < 1:
            raise ValueError(f"need num_paraphrases >= 1, seq_len >= 2, num_passes >= 1 (got {num_paraphrases}, {seq_len}, {num_passes})")
        ids = [r.id for r in records]
        if len(set(ids)) != len(ids):
            raise ValueError("fact ids must be unique")
        self.records = list(records)
        super().__init__(self.records, num_passes=num_passes)
        self.tokenizer = tokenizer
        self.num_paraphrases = num_paraphrases
        self.seq_len = seq_len
        self.seed = seed
        self.paraphrases = load_paraphrases(paraphrase_file) if paraphrase_file is not None else {}

    def statements(self, record: QARecord) -> list[str]:
        """The ``num_paraphrases`` statements used for ``record`` (see the module docstring)."""
        from_file = record.id in self.paraphrases
        pool = self.paraphrases[record.id] if from_file else fact_statements(record)
        offset = random.Random(f"{self.seed}:{record.id}").randrange(1 << 30)
        pool = _rotated(pool, offset, pin_first=not from_file)
        return [VARIATION_PREFIXES[(i // len(pool)) % len(VARIATION_PREFIXES)] + pool[i % len(pool)] for i in range(self.num_paraphrases)]

    def batch_for(self, record: QARecord) -> Batch:
        texts = self.statements(record)
        rows = self.tokenizer.encode_batch(texts, bos=True, eos=True)
        batch = pad_rows(rows, seq_len=self.seq_len, pad_id=self.tokenizer.pad_id, fact_id=record.id)
        answer_mask = torch.zeros_like(batch.padding_mask)
        for i, (text, ids) in enumerate(zip(texts, rows)):
            span = answer_token_span(self.tokenizer, text, record.answers[0], ids)
            if span is not None:   # ids[j] for j in [start, end) are answer tokens; label j-1 predicts ids[j]
                start, end = span
                answer_mask[i, start - 1:min(end - 1, self.seq_len)] = True
        answer_mask &= batch.padding_mask
        return dataclasses.replace(batch, answer_mask=answer_mask)
