"""Held-out ("forgetting") metrics: continuation NLL (GSM8K), held-out text NLL, HellaSwag accuracy,
and known-fact retention.

Conventions
-----------
* NLLs are in nats per token, micro-averaged: the sum of every scored token's NLL divided by the
  number of scored tokens (long items weigh more than short ones, as in a language-model loss).
* GSM8K: the gold solution (``answer``, ending in ``#### N``) is scored after
  ``"Question: {question}\\nAnswer:"``; only the solution's tokens count.
* A context/continuation pair is tokenised as ``encode(context + continuation)`` split at
  ``len(encode(context))`` when that is a prefix (as training text is tokenised), else as the two
  encodings concatenated.
* Sequences longer than the model's ``config.max_seq_len`` + 1 lose tokens from the *left* (BOS
  kept, then context first); held-out text is cut into consecutive windows of ``window`` predicted tokens
  (default ``max_seq_len``), each token scored once, without context carried across windows.
* HellaSwag: lm-eval-harness's recipe — the prompt ``"{activity_label}: {ctx_a} {Ctx_b}"`` (the loader builds
  it when the record has those fields), text preprocessing (``[title]``/bracket removal), each ending scored
  as ``" " + ending``; reported as lm-eval reports it: ``acc`` (argmax of the log-likelihood) and
  ``acc_norm`` (argmax of the log-likelihood divided by the continuation's length in characters, the
  standard HellaSwag number).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from evaluation.distributed import (Shard, batch_rounds, dummy_forward, eval_mode, forward_logits, fsum_column,
                                    infer_device, model_max_seq_len, reduce_item_table, resolve_shard,
                                    take_items)
from evaluation.qa import encode_continuation as _encode_pair
from evaluation.qa import qa_scores

__all__ = ["continuation_nll", "gsm8k_nll", "gsm8k_context", "heldout_text_nll", "hellaswag_accuracy",
           "hellaswag_preprocess", "known_facts_retention", "score_sequences"]


def gsm8k_context(question: str) -> str:
    """The prompt the GSM8K solution is scored after."""
    return f"Question: {question}\nAnswer:"


def hellaswag_preprocess(text: str) -> str:
    """lm-eval-harness's HellaSwag text cleaning (WikiHow ``[title]`` markers, bracketed tags)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _fit(ids: list[int], num_prefix: int, max_len: int | None, bos_id: int) -> tuple[list[int], int]:
    # The forward sees ids[:-1]; keep its length within max_len by dropping tokens after BOS (context
    # first, then the start of the continuation if it alone is too long).
    if max_len is None or len(ids) - 1 <= max_len:
        return ids, num_prefix
    drop = len(ids) - 1 - max_len
    head = 1 if ids[0] == bos_id and max_len > 1 else 0
    return ids[:head] + ids[head + drop:], max(1, num_prefix - drop)


def score_sequences(model: nn.Module, sequences: Sequence[tuple[list[int], int]], *, batch_size: int,
                    shard: Shard, device: torch.device, pad_id: int) -> torch.Tensor:
    """Per-sequence ``[sum of log p(target), number of targets]`` (float64 ``[N, 2]``, all ranks).

    Each sequence is ``(ids, num_prefix)``: tokens ``ids[num_prefix:]`` are scored given everything
    before them (``num_prefix >= 1``). Call inside eval_mode. Batches are right-padded.
    """
    table = torch.zeros((len(sequences), 3), dtype=torch.float64)  # logprob sum, count, coverage
    for batch in batch_rounds(len(sequences), batch_size, shard):
        if batch is None:
            dummy_forward(model, pad_like_id=pad_id, device=device)
            continue
        rows = [sequences[i] for i in batch]
        width = max(len(ids) - 1 for ids, _ in rows)
        inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
        targets = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        scored = torch.zeros((len(rows), width), dtype=torch.bool)
        for r, (ids, num_prefix) in enumerate(rows):
            assert 1 <= num_prefix < len(ids), "need a prefix and at least one scored token"
            n = len(ids) - 1
            inputs[r, :n] = torch.tensor(ids[:-1], dtype=torch.long)
            targets[r, :n] = torch.tensor(ids[1:], dtype=torch.long)
            mask[r, :n] = True
            scored[r, num_prefix - 1:n] = True
        logits = forward_logits(model, inputs.to(device), mask.to(device))
        scored_dev = scored.to(device)
        picked = logits[scored_dev]                                   # [M, V], only scored positions
        tgt = targets.to(device)[scored_dev]
        logprob = picked.gather(1, tgt[:, None]).squeeze(1) - torch.logsumexp(picked, dim=-1)
        row_of = torch.arange(len(rows))[:, None].expand_as(scored)[scored]
        sums = torch.zeros(len(rows), dtype=torch.float64).index_add_(0, row_of, logprob.double().cpu())
        for r, i in enumerate(batch):
            table[i, 0] = sums[r]
            table[i, 1] = float(scored[r].sum())
            table[i, 2] = 1.0
    table = reduce_item_table(table, shard)
    assert bool((table[:, 2] == 1).all()), "every sequence must be scored by exactly one rank"
    return table[:, :2]


def _mean_nll(table: torch.Tensor) -> float:
    return -fsum_column(table, 0) / fsum_column(table, 1)


def continuation_nll(model: nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], *, batch_size: int,
                     max_items: int | None = None, process_group: Any = None,
                     device: torch.device | str | None = None) -> dict[str, float]:
    """Mean per-token NLL of each continuation given its context, over `(context, continuation)` pairs.
    Returns ``{"nll": ...}``."""
    items = take_items(pairs, max_items)
    shard, dev, max_len = resolve_shard(process_group), infer_device(model, device), model_max_seq_len(model)
    sequences = [_fit(*_encode_pair(tokenizer, c, x), max_len, tokenizer.bos_id) for c, x in items]
    with eval_mode(model):
        table = score_sequences(model, sequences, batch_size=batch_size, shard=shard, device=dev,
                                pad_id=tokenizer.pad_id)
    return {"nll": _mean_nll(table)}


def gsm8k_nll(model: nn.Module, tokenizer: Any, records: Sequence[Any], *, batch_size: int,
              max_items: int | None = None, process_group: Any = None,
              device: torch.device | str | None = None) -> dict[str, float]:
    """GSM8K: mean per-token NLL of the gold solution given the question. Returns ``{"nll": ...}``."""
    items = take_items(records, max_items)
    pairs = [(gsm8k_context(r.question), " " + r.answer) for r in items]
    return continuation_nll(model, tokenizer, pairs, batch_size=batch_size, process_group=process_group,
                            device=device)


def heldout_text_nll(model: nn.Module, tokenizer: Any, records: Sequence[Any], *, batch_size: int,
                     max_items: int | None = None, process_group: Any = None,
                     device: torch.device | str | None = None, window: int | None = None) -> dict[str, float]:
    """Mean per-token NLL over held-out texts (TextRecord ``text``; BOS-prefixed, every token after
    BOS scored once). Long texts are cut into windows of `window` predicted tokens (default: the
    model's max_seq_len; no windowing when neither is known). Returns ``{"nll": ...}``."""
    items = take_items(records, max_items)
    max_len = model_max_seq_len(model)
    window = window or max_len
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if window is not None and max_len is not None and window > max_len:
        raise ValueError(f"window={window} is longer than the model's max_seq_len={max_len}")
    sequences: list[tuple[list[int], int]] = []
    for r in items:
        ids = tokenizer.encode(r.text, bos=True, eos=False)
        if len(ids) < 2:
            continue  # an empty text has nothing to score
        step = window or len(ids)
        for start in range(0, len(ids) - 1, step):
            sequences.append((ids[start:start + step + 1], 1))
    if not sequences:
        raise ValueError("held-out texts are all empty: nothing to score")
    shard, dev = resolve_shard(process_group), infer_device(model, device)
    with eval_mode(model):
        table = score_sequences(model, sequences, batch_size=batch_size, shard=shard, device=dev,
                                pad_id=tokenizer.pad_id)
    return {"nll": _mean_nll(table)}


def hellaswag_accuracy(model: nn.Module, tokenizer: Any, records: Sequence[Any], *, batch_size: int,
                       max_items: int | None = None, process_group: Any = None,
                       device: torch.device | str | None = None) -> dict[str, float]:
    """HellaSwag accuracy by ending log-likelihood. `batch_size` counts sequences (item × ending).

    Returns lm-eval's ``{"acc": log-likelihood argmax, "acc_norm": argmax of the log-likelihood per
    character of the continuation " " + ending}``. Ties go to the first ending (np.argmax).
    """
    items = take_items(records, max_items)
    max_len = model_max_seq_len(model)
    sequences: list[tuple[list[int], int]] = []
    lengths: list[int] = []  # characters of each (preprocessed) ending, lm-eval's acc_norm divisor
    for r in items:
        ctx = hellaswag_preprocess(r.ctx)
        for ending in r.endings:
            ending = hellaswag_preprocess(ending)
            sequences.append(_fit(*_encode_pair(tokenizer, ctx, " " + ending), max_len, tokenizer.bos_id))
            lengths.append(len(" " + ending))
    shard, dev = resolve_shard(process_group), infer_device(model, device)
    with eval_mode(model):
        table = score_sequences(model, sequences, batch_size=batch_size, shard=shard, device=dev,
                                pad_id=tokenizer.pad_id)
    logliks = table[:, 0].tolist()
    num_norm = num_raw = 0
    pos = 0
    for r in items:
        k = len(r.endings)
        ll = logliks[pos:pos + k]
        norm = [v / length for v, length in zip(ll, lengths[pos:pos + k])]
        num_norm += int(max(range(k), key=lambda j: (norm[j], -j)) == int(r.label))
        num_raw += int(max(range(k), key=lambda j: (ll[j], -j)) == int(r.label))
        pos += k
    assert pos == len(sequences)
    return {"acc": num_raw / len(items), "acc_norm": num_norm / len(items)}


def known_facts_retention(model: nn.Module, tokenizer: Any, records: Sequence[Any], *, batch_size: int,
                          max_items: int | None = None, process_group: Any = None,
                          device: torch.device | str | None = None, **qa_kwargs: Any) -> dict[str, float]:
    """Retention of facts the base model knew: QA F1/EM on a QARecord list (see :func:`qa_scores`)."""
    return qa_scores(model, tokenizer, records, batch_size=batch_size, max_items=max_items,
                     process_group=process_group, device=device, **qa_kwargs)
