"""Run several evaluation sets and return ``<set>/<metric>`` values (what summary.json records)."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from evaluation.heldout import gsm8k_nll, heldout_text_nll, hellaswag_accuracy
from evaluation.qa import qa_scores
from evaluation.summary import flatten_metrics

__all__ = ["METRIC_KINDS", "evaluate_sets"]

# kind -> metric function; every function has the (model, tokenizer, records, *, batch_size,
# max_items, process_group, device) signature and returns {metric: float}.
METRIC_KINDS: dict[str, Callable[..., dict[str, float]]] = {
    "qa": qa_scores,                 # QARecord / SimpleQARecord -> f1, em (new facts, known facts, NQ, SimpleQA)
    "text_nll": heldout_text_nll,    # TextRecord -> nll
    "hellaswag": hellaswag_accuracy,  # HellaSwagRecord -> acc, acc_norm (lm-eval's)
    "gsm8k": gsm8k_nll,              # GSM8KRecord -> nll
}


def evaluate_sets(model: nn.Module, tokenizer: Any, sets: Mapping[str, tuple[str, Sequence[Any]]], *,
                  batch_size: int, max_items: int | Mapping[str, int | None] | None = None,
                  process_group: Any = None, device: torch.device | str | None = None,
                  options: Mapping[str, Mapping[str, Any]] | None = None,
                  items: dict[str, list] | None = None) -> dict[str, float]:
    """Evaluate each ``set_name -> (kind, records)`` and return ``{"<set_name>/<metric>": value}``.

    `max_items` is one limit for all sets or a per-set mapping; `options` passes extra keyword
    arguments per set (e.g. ``{"new_facts": {"max_new_tokens": 16}}``). Sets not given are absent.
    `items`: for each QA set named among its keys, filled with ``(record id, per-item scores)`` of the items
    evaluated (qa_scores' ``return_items``), for callers that also need them per item.
    """
    results: dict[str, dict[str, float]] = {}
    for name, (kind, records) in sets.items():
        if kind not in METRIC_KINDS:
            raise ValueError(f"set {name!r}: unknown kind {kind!r}; choose one of {sorted(METRIC_KINDS)}")
        limit = max_items.get(name) if isinstance(max_items, Mapping) else max_items
        extra = dict((options or {}).get(name, {}))
        keep = items is not None and name in items and kind == "qa"
        if keep:
            extra["return_items"] = True
        results[name] = METRIC_KINDS[kind](model, tokenizer, records, batch_size=batch_size, max_items=limit,
                                           process_group=process_group, device=device, **extra)
        if keep:
            per_item = results[name].pop("items")
            items[name] = [(getattr(r, "id", None), scores) for r, scores in zip(records, per_item)]
    return flatten_metrics(results)
