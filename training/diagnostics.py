"""Finetune-time memory diagnostics (see evaluation/memory_diagnostics.py), logged under memory/*."""
from __future__ import annotations

import json
from typing import Any

import torch

from data_pipeline.facts import eval_prompt
from evaluation.memory_diagnostics import (answer_position_lookups, coverage, f1_by_steps_since_update, high_df_share,
                                           hits_in_rows, prompt_lookups, selection_vs_largest_rows)
from evaluation.qa import qa_scores
from training import distributed as D


class GradTap:
    """Keeps each step's values gradient as it leaves autograd, before any row mask: what SGD on every read
    row (memory_all) would apply. Build it before the SparseMemoryFinetuner: tensor hooks run in
    registration order, and the finetuner's hook masks the gradient in backward."""

    def __init__(self, values: torch.nn.Parameter) -> None:
        self._grad: torch.Tensor | None = None
        self._handle = values.register_hook(self._keep)

    def _keep(self, grad: torch.Tensor) -> None:
        self._grad = grad.detach()

    def take(self) -> torch.Tensor | None:
        grad, self._grad = self._grad, None
        return grad


class FactDiagnostics:
    """Answer-slot statistics for a fact stream; every method runs the same forwards on every rank."""

    def __init__(self, *, model, tokenizer, facts, finetuner, device: torch.device, max_known: int,
                 eval_options: dict | None = None, grad_tap: GradTap | None = None) -> None:
        self.model, self.tokenizer, self.finetuner, self.device = model, tokenizer, finetuner, device
        self.records = {r.id: r for r in facts.new}
        self.known = list(facts.known[:max_known])
        self.known_lookups: list[torch.Tensor] = []
        self.known_prompt_slots: list[torch.Tensor] = []   # per known fact: the slots read at any prompt token
        self.coverages: list[float] = []
        self.prompt_coverages: list[float] = []
        self.eval_options = dict(eval_options or {})
        self.last_update: dict[str, int] = {}      # fact id -> the step that last trained it
        self.overlaps: list[float] = []
        self.grad_masses: list[float] = []
        self.grad_tap = grad_tap

    def state_dict(self, before: dict[str, float]) -> dict[str, Any]:
        """Everything after() reads, for the checkpoint: a resumed run reports what an uninterrupted one would.
        `before` is what before() returned (measured on the initial model, not on the resumed one)."""
        return {"known_lookups": {str(i): t.cpu() for i, t in enumerate(self.known_lookups)},
                "known_prompt_slots": {str(i): t.cpu() for i, t in enumerate(self.known_prompt_slots)},
                "json": json.dumps({"num_known_lookups": len(self.known_lookups), "before": before,
                                    "coverages": self.coverages, "prompt_coverages": self.prompt_coverages,
                                    "overlaps": self.overlaps, "grad_masses": self.grad_masses,
                                    "last_update": sorted(self.last_update.items())})}

    def load_state_dict(self, state: dict[str, Any]) -> dict[str, float]:
        """Restore state_dict()'s accumulators; returns the stored before() numbers."""
        data = json.loads(state["json"])
        lookups = state.get("known_lookups") or {}
        self.known_lookups = [lookups[str(i)].to(torch.long) for i in range(data["num_known_lookups"])]
        prompt = state.get("known_prompt_slots") or {}
        self.known_prompt_slots = [prompt[str(i)].to(torch.long) for i in range(len(prompt))]
        self.coverages, self.prompt_coverages = list(data["coverages"]), list(data["prompt_coverages"])
        self.overlaps, self.grad_masses = list(data["overlaps"]), list(data["grad_masses"])
        self.last_update = {k: int(v) for k, v in data["last_update"]}
        return dict(data["before"])

    def before(self) -> dict[str, float]:
        tracker = self.finetuner.background_tracker if self.finetuner is not None else None
        new = answer_position_lookups(self.model, self.tokenizer, [eval_prompt(r) for r in self.records.values()],
                                      device=self.device)
        known = prompt_lookups(self.model, self.tokenizer, [eval_prompt(r) for r in self.known], device=self.device)
        self.known_lookups = [last.clone() for last, _ in known]       # own storage: views of one tensor
        self.known_prompt_slots = [every.clone() for _, every in known]   # cannot be saved side by side
        out: dict[str, float] = {}
        if tracker is not None and tracker.num_batches:
            df, b = tracker.document_frequency, tracker.num_batches
            out["memory/new_answer_lookups_high_df"] = high_df_share(new, df, b)
            if self.known_lookups:
                out["memory/known_answer_lookups_high_df"] = high_df_share(self.known_lookups, df, b)
        return out

    def step(self, fact_id: str | None, step: int | None = None) -> dict[str, float]:
        """Coverage of this fact's answer slots (current model) by this step's trainable rows, and how the
        selection compares with the rows memory_all would move most (collective: every rank calls it)."""
        out: dict[str, float] = {}
        if self.grad_tap is not None and self.finetuner is not None and self.finetuner.trainable_indices is not None:
            grad = self.grad_tap.take()
            out.update(self._selection_vs_memory_all(grad))
            self.overlaps.append(out["memory/topt_overlap_memory_all"])
            self.grad_masses.append(out["memory/topt_grad_mass"])
        record = self.records.get(fact_id) if fact_id is not None else None
        if record is not None and step is not None:
            self.last_update[record.id] = step
        if record is None or self.finetuner is None or self.finetuner.trainable_indices is None:
            return out
        ((last, every),) = prompt_lookups(self.model, self.tokenizer, [eval_prompt(record)], device=self.device)
        value = coverage(self.finetuner.trainable_indices, last)
        whole = coverage(self.finetuner.trainable_indices, every)
        self.coverages.append(value)
        self.prompt_coverages.append(whole)
        return {**out, "memory/answer_slot_coverage": value, "memory/prompt_slot_coverage": whole}

    @torch.no_grad()
    def _selection_vs_memory_all(self, grad: torch.Tensor | None) -> dict[str, float]:
        """The global (rank-summed) unmasked gradient rows, compared with the selection: overlap of the
        selection with the |selection| rows of largest gradient norm, and the share of the squared gradient
        norm that the selection holds. SGD moves a row by lr x its gradient, so these are the rows memory_all
        moves most."""
        selected = self.finetuner.trainable_indices
        n = self.finetuner.num_slots
        if grad is None:
            rows, vals = torch.empty(0, dtype=torch.long), torch.empty(0, 1)
        elif grad.is_sparse:
            g = grad.coalesce()
            rows, vals = g.indices()[0].cpu(), g.values().float().cpu()
        else:
            rows = grad.abs().sum(dim=1).nonzero().flatten().cpu()
            vals = grad.index_select(0, rows.to(grad.device)).float().cpu()
        if not torch.distributed.is_initialized():   # one process: the rows are sorted and unique already
            return selection_vs_largest_rows(selected.cpu(), rows, vals.pow(2).sum(dim=1))
        present = torch.zeros(n, dtype=torch.int32)
        present[rows] = 1
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(present)
        union = present.nonzero().flatten()
        width = vals.shape[1] if vals.numel() else (grad.shape[1] if grad is not None else 1)
        width = int(D.all_reduce_max(float(width)))
        buf = torch.zeros(union.numel(), width)
        if rows.numel():
            buf[torch.searchsorted(union, rows)] = vals
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(buf)
        norms = buf.pow(2).sum(dim=1)
        return selection_vs_largest_rows(selected.cpu(), union, norms)

    def after(self, updated_rows: torch.Tensor | None, *, step: int,
              new_fact_items: list | None = None) -> dict[str, Any]:
        """`new_fact_items`: (fact id, scores) of the final evaluation's new_facts set (same model, same
        eval_options); when it holds exactly the trained facts in order, their F1 is taken from it instead of
        generating the same answers again."""
        out: dict[str, Any] = {}
        if self.overlaps:
            out["memory/topt_overlap_memory_all_mean"] = sum(self.overlaps) / len(self.overlaps)
            out["memory/topt_grad_mass_mean"] = sum(self.grad_masses) / len(self.grad_masses)
        trained = [r for r in self.records.values() if r.id in self.last_update]
        if trained:
            if new_fact_items is not None and [i for i, _ in new_fact_items] == [r.id for r in trained]:
                f1 = [scores["f1"] for _, scores in new_fact_items]
            else:
                scores = qa_scores(self.model, self.tokenizer, trained, return_items=True, device=self.device,
                                   **self.eval_options)
                f1 = [item["f1"] for item in scores["items"]]
            since = [step - self.last_update[r.id] for r in trained]
            out["new_facts/f1_by_steps_since_update"] = f1_by_steps_since_update(since, f1)
        if self.coverages:
            out["memory/answer_slot_coverage_mean"] = sum(self.coverages) / len(self.coverages)
            out["memory/prompt_slot_coverage_mean"] = sum(self.prompt_coverages) / len(self.prompt_coverages)
        if updated_rows is not None and self.known_lookups:
            out["memory/known_answer_lookups_in_updated_rows"] = hits_in_rows(self.known_lookups, updated_rows)
        if updated_rows is not None and self.known_prompt_slots:
            # the lookups at every token of a known fact's prompt (its name's too): the route by which a fact
            # stored at the name positions can be disturbed without its answer-position reads changing
            out["memory/known_prompt_slots_in_updated_rows"] = hits_in_rows(self.known_prompt_slots, updated_rows)
        if updated_rows is not None:
            out["memory/updated_rows"] = int(updated_rows.numel())
        return out
