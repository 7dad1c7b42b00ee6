"""Finetune-time memory diagnostics (see evaluation/memory_diagnostics.py), logged under memory/*."""
from __future__ import annotations

from typing import Any

import torch

from data_pipeline.facts import eval_prompt
from evaluation.memory_diagnostics import answer_position_lookups, coverage, high_df_share, hits_in_rows, prompt_lookups


class FactDiagnostics:
    """Answer-slot statistics for a fact stream; every method runs the same forwards on every rank."""

    def __init__(self, *, model, tokenizer, facts, finetuner, device: torch.device, max_known: int) -> None:
        self.model, self.tokenizer, self.finetuner, self.device = model, tokenizer, finetuner, device
        self.records = {r.id: r for r in facts.new}
        self.known = list(facts.known[:max_known])
        self.known_lookups: list[torch.Tensor] = []
        self.coverages: list[float] = []
        self.prompt_coverages: list[float] = []

    def before(self) -> dict[str, float]:
        tracker = self.finetuner.background_tracker if self.finetuner is not None else None
        new = answer_position_lookups(self.model, self.tokenizer, [eval_prompt(r) for r in self.records.values()],
                                      device=self.device)
        self.known_lookups = answer_position_lookups(self.model, self.tokenizer,
                                                     [eval_prompt(r) for r in self.known], device=self.device)
        out: dict[str, float] = {}
        if tracker is not None and tracker.num_batches:
            df, b = tracker.document_frequency, tracker.num_batches
            out["memory/new_answer_lookups_high_df"] = high_df_share(new, df, b)
            if self.known_lookups:
                out["memory/known_answer_lookups_high_df"] = high_df_share(self.known_lookups, df, b)
        return out

    def step(self, fact_id: str | None) -> dict[str, float]:
        """Coverage of this fact's answer slots (current model) by this step's trainable rows."""
        record = self.records.get(fact_id) if fact_id is not None else None
        if record is None or self.finetuner is None or self.finetuner.trainable_indices is None:
            return {}
        ((last, every),) = prompt_lookups(self.model, self.tokenizer, [eval_prompt(record)], device=self.device)
        value = coverage(self.finetuner.trainable_indices, last)
        whole = coverage(self.finetuner.trainable_indices, every)
        self.coverages.append(value)
        self.prompt_coverages.append(whole)
        return {"memory/answer_slot_coverage": value, "memory/prompt_slot_coverage": whole}

    def after(self, updated_rows: torch.Tensor | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.coverages:
            out["memory/answer_slot_coverage_mean"] = sum(self.coverages) / len(self.coverages)
            out["memory/prompt_slot_coverage_mean"] = sum(self.prompt_coverages) / len(self.prompt_coverages)
        if updated_rows is not None and self.known_lookups:
            out["memory/known_answer_lookups_in_updated_rows"] = hits_in_rows(self.known_lookups, updated_rows)
        if updated_rows is not None:
            out["memory/updated_rows"] = int(updated_rows.numel())
        return out
