"""Short-answer QA: SQuAD-style normalisation, token F1 / exact match (best over gold aliases), and
QA scoring of a model by greedy generation after a question prompt (TriviaQA, NQ-open, SimpleQA,
known-fact retention)."""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from evaluation.distributed import (batch_rounds, dummy_forward, eval_mode, forward_logits, fsum_column,
                                    infer_device, reduce_item_table, resolve_shard, take_items)
from evaluation.generate import DEFAULT_STOP, generate_batch

__all__ = ["normalize_answer", "f1_score", "exact_match", "max_over_answers", "score_answer",
           "gold_answers", "qa_scores"]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop ASCII punctuation, drop articles a/an/the, squeeze spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token-level F1 of normalised answers. Two empty answers score 1, one empty answer scores 0
    (the SQuAD v2 convention, so an all-article gold such as "The" is still scoreable)."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, ground_truth: str) -> float:
    """1.0 when the normalised answers are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def max_over_answers(metric: Callable[[str, str], float], prediction: str, answers: Sequence[str]) -> float:
    """Best score of `prediction` over all gold answers (0.0 when there are none)."""
    return max((metric(prediction, a) for a in answers), default=0.0)


def score_answer(prediction: str, answers: Sequence[str]) -> tuple[float, float]:
    """(F1, EM) of one prediction, each the best over all gold aliases."""
    return max_over_answers(f1_score, prediction, answers), max_over_answers(exact_match, prediction, answers)


def gold_answers(record: Any) -> list[str]:
    """Gold answers of a QARecord (`answers`) or a SimpleQARecord (`answer`)."""
    if hasattr(record, "answers"):
        return list(record.answers)
    return [record.answer]


def _default_prompt(record: Any) -> str:
    # The training statements and the eval prompt must agree; data_pipeline owns that format.
    from data_pipeline.facts import eval_prompt
    return eval_prompt(record)


def qa_scores(model: nn.Module, tokenizer: Any, records: Sequence[Any], *, batch_size: int,
              max_items: int | None = None, process_group: Any = None,
              device: torch.device | str | None = None, max_new_tokens: int = 32,
              prompt_fn: Callable[[Any], str] | None = None,
              stop_strings: Sequence[str] = DEFAULT_STOP, return_items: bool = False) -> dict[str, Any]:
    """QA F1 and exact match (means over questions, best over aliases) by greedy generation, and the
    teacher-forced NLL of the canonical answer.

    Each prompt is ``prompt_fn(record)`` (default ``data_pipeline.facts.eval_prompt``, e.g.
    ``"Question: ...\\nAnswer:"``) encoded with BOS; the answer is generated greedily until a newline,
    EOS or `max_new_tokens`. ``answer_nll`` is the mean over questions of the per-token NLL of
    ``" " + answers[0]`` after the prompt (a graded signal where F1 is still 0). Returns ``{"f1", "em",
    "answer_nll"}``; with ``return_items`` also ``"items"``: one ``{"f1", "em", "answer_nll"}`` per question.
    """
    items = take_items(records, max_items)
    prompt_fn = prompt_fn or _default_prompt
    shard = resolve_shard(process_group)
    dev = infer_device(model, device)
    table = torch.zeros((len(items), 4), dtype=torch.float64)  # f1, em, coverage, answer nll
    with eval_mode(model):
        for batch in batch_rounds(len(items), batch_size, shard):
            prompts = None if batch is None else [
                tokenizer.encode(prompt_fn(items[i]), bos=True, eos=False) for i in batch]
            texts = generate_batch(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                   stop_strings=stop_strings, device=dev, shard=shard)
            nlls = _answer_nll_batch(model, tokenizer, None if batch is None else [items[i] for i in batch],
                                     prompt_fn=prompt_fn, device=dev)
            for i, text, nll in zip(batch or (), texts, nlls):
                f1, em = score_answer(text, gold_answers(items[i]))
                table[i] = torch.tensor([f1, em, 1.0, nll], dtype=torch.float64)
    table = reduce_item_table(table, shard)
    assert bool((table[:, 2] == 1).all()), "every item must be evaluated by exactly one rank"
    n = len(items)
    out: dict[str, Any] = {"f1": fsum_column(table, 0) / n, "em": fsum_column(table, 1) / n,
                           "answer_nll": fsum_column(table, 3) / n}
    if return_items:
        out["items"] = [{"f1": float(r[0]), "em": float(r[1]), "answer_nll": float(r[3])} for r in table]
    return out


def encode_continuation(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], int]:
    """Token ids of context+continuation (with BOS) and the number of context ids: the joined string
    tokenised once when the context's ids are its prefix, else the two parts tokenised apart."""
    ctx = tokenizer.encode(context, bos=True, eos=False)
    full = tokenizer.encode(context + continuation, bos=True, eos=False)
    if len(full) > len(ctx) and full[:len(ctx)] == ctx:
        return full, len(ctx)
    return ctx + tokenizer.encode(continuation, bos=False, eos=False), len(ctx)


def _answer_nll_batch(model: nn.Module, tokenizer: Any, records: Sequence[Any] | None, *,
                      prompt_fn: Callable[[Any], str], device: torch.device) -> list[float]:
    """Per-token NLL of ``" " + answers[0]`` after each record's prompt (one forward; a dummy forward
    for ``records=None`` so every rank runs the same collectives)."""
    if records is None:
        dummy_forward(model, pad_like_id=tokenizer.bos_id, device=device)
        return []
    pairs = []
    for r in records:
        ids, n = encode_continuation(tokenizer, prompt_fn(r), " " + gold_answers(r)[0].strip())
        pairs.append((ids[:n], ids[n:]))
    width = max(len(h) + len(c) for h, c in pairs)
    tokens = torch.full((len(pairs), width), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.bool)
    for i, (head, cont) in enumerate(pairs):
        ids = head + cont
        tokens[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, :len(ids)] = True
    logp = torch.log_softmax(forward_logits(model, tokens.to(device), mask.to(device)).float(), dim=-1).cpu()
    out = []
    for i, (head, cont) in enumerate(pairs):
        if not cont:
            out.append(float("nan"))
            continue
        pos = torch.arange(len(head) - 1, len(head) + len(cont) - 1)
        out.append(float(-logp[i, pos, torch.tensor(cont)].mean()))
    return out
