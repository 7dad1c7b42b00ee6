"""Evaluation: learning (QA F1/EM on new facts) vs forgetting (held-out NLL, HellaSwag, NQ, known
facts), computed sharded across ranks with results identical to one process, and the run summary.

Every metric function has the signature
``fn(model, tokenizer, records, *, batch_size, max_items=None, process_group=None, device=None)``,
runs under ``model.eval()`` + ``torch.no_grad()`` (training flags restored afterwards) and returns
``{metric_name: float}``. See :mod:`evaluation.distributed` for how ranks share the work.

Names are imported lazily, so ``evaluation.summary`` (used by plotting tools) does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "evaluation.qa": ["normalize_answer", "f1_score", "exact_match", "max_over_answers", "score_answer",
                      "gold_answers", "qa_scores"],
    "evaluation.generate": ["greedy_generate"],
    "evaluation.heldout": ["continuation_nll", "gsm8k_nll", "gsm8k_context", "heldout_text_nll",
                           "hellaswag_accuracy", "hellaswag_preprocess", "known_facts_retention"],
    "evaluation.suite": ["METRIC_KINDS", "evaluate_sets"],
    "evaluation.summary": ["SUMMARY_KEYS", "build_summary", "flatten_metrics", "lower_is_better", "metric_entry",
                           "read_summary", "relative_change", "write_summary"],
    "evaluation.distributed": ["Shard", "resolve_shard"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'evaluation' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
