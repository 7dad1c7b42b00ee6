"""The run summary (``summary.json``): before/after of every metric and its relative change.

Shape (every run, every stage, so tools such as ``recipes/plot_pareto.py`` can read any run)::

    {"stage": "finetune", "method": "sparse", "steps": 1000, "wall_time_s": 812.5,
     "trainable_params_per_step": 512000,
     "metrics": {"new_facts/f1": {"before": 0.02, "after": 0.81, "rel_change": 39.5}, ...}}

* Metric names are ``<set>/<metric>``. A set that was not evaluated is *absent*, never zero.
* ``rel_change = (after - before) / |before|`` (the paper's "NQ F1 drops 89%" is ``-0.89``). It is
  ``null`` when it is undefined: ``before == 0``, either side missing (a metric evaluated only before
  or only after), or either side not finite. A missing or non-finite side is written as ``null`` too
  (JSON has no NaN).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from data_pipeline.atomic import atomic_write

__all__ = ["SUMMARY_KEYS", "relative_change", "metric_entry", "flatten_metrics", "build_summary",
           "write_summary", "read_summary", "lower_is_better"]

SUMMARY_KEYS = ("stage", "method", "steps", "wall_time_s", "trainable_params_per_step", "metrics")
_LOWER_IS_BETTER_SUFFIXES = ("nll", "loss", "ppl", "perplexity", "bpb")


def lower_is_better(metric_name: str) -> bool:
    """True for loss-like metrics (``.../nll``, ``.../loss``, ``.../ppl``, ``.../bpb``)."""
    return metric_name.rsplit("/", 1)[-1].lower().endswith(_LOWER_IS_BETTER_SUFFIXES)


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def relative_change(before: float | None, after: float | None) -> float | None:
    """``(after - before) / |before|``; None when before is 0, missing or not finite (or after is)."""
    before, after = _finite_or_none(before), _finite_or_none(after)
    if before is None or after is None or before == 0:
        return None
    return (after - before) / abs(before)


def metric_entry(before: float | None, after: float | None) -> dict[str, float | None]:
    """One ``{"before", "after", "rel_change"}`` entry."""
    return {"before": _finite_or_none(before), "after": _finite_or_none(after),
            "rel_change": relative_change(before, after)}


def flatten_metrics(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``{"nq": {"f1": .1, "em": .0}}`` -> ``{"nq/f1": .1, "nq/em": .0}``."""
    flat: dict[str, float] = {}
    for set_name, metrics in results.items():
        if "/" in set_name or not set_name:
            raise ValueError(f"set name {set_name!r} must be non-empty and contain no '/'")
        for metric, value in metrics.items():
            flat[f"{set_name}/{metric}"] = float(value)
    return flat


def _check_names(metrics: Mapping[str, Any], which: str) -> None:
    for name in metrics:
        head, sep, tail = name.partition("/")
        if not (head and sep and tail) or "/" in tail:
            raise ValueError(f"{which} metric name {name!r} must look like '<set>/<metric>'")


def build_summary(*, stage: str, method: str, steps: int, wall_time_s: float,
                  trainable_params_per_step: int | None, before: Mapping[str, float] | None,
                  after: Mapping[str, float] | None) -> dict[str, Any]:
    """The summary dict. `before`/`after` map ``<set>/<metric>`` to a value (None: not evaluated).

    Metrics appear in `after`'s order, then those only in `before`; a name in neither is absent.
    """
    before, after = dict(before or {}), dict(after or {})
    _check_names(before, "before")
    _check_names(after, "after")
    names = list(after) + [n for n in before if n not in after]
    return {
        "stage": str(stage),
        "method": str(method),
        "steps": int(steps),
        "wall_time_s": float(wall_time_s),
        "trainable_params_per_step": None if trainable_params_per_step is None else int(trainable_params_per_step),
        "metrics": {n: metric_entry(before.get(n), after.get(n)) for n in names},
    }


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write via a temporary name + rename (data_pipeline.atomic.atomic_write)."""
    atomic_write(path, data)


def write_summary(path: str | os.PathLike[str], summary: Mapping[str, Any]) -> None:
    """Write `summary` as JSON atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode())


def read_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a summary.json; raises ValueError (one-line message) when it is not valid."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: not found") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    missing = [k for k in SUMMARY_KEYS if k not in data]
    if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(missing)}")
    if not isinstance(data["metrics"], dict):
        raise ValueError(f"{path}: 'metrics' must be an object")
    for name, entry in data["metrics"].items():
        if not isinstance(entry, dict) or "after" not in entry:
            raise ValueError(f"{path}: metric {name!r} must be an object with 'before'/'after'/'rel_change'")
    return data
