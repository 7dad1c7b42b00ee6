"""Memory diagnostics that decide whether sparse memory finetuning can work (DESIGN.md section 8).

* usage over the background: fraction of slots ever read, usage entropy and KL from uniform
  (Lample et al. 2019 report these to show how well the memory is used);
* answer-position lookups: the slots a fact's evaluation prompt reads at the position that predicts
  the first answer token, and the share of those lookups that land in slots with a high background
  document frequency (generic slots, which TF-IDF ranks low);
* coverage: how many of those answer slots a step's trainable selection contains, and how many of the
  slots read anywhere in the prompt (a mid-depth memory stores facts at the question's tokens);
* interference: the share of known facts' answer lookups that hit rows a finetune updated.

Forward passes here run on every rank with the same inputs (FSDP gathers parameters in forward), so
call these functions on all ranks alike.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

HIGH_DF_FRACTION = 0.75   # "high document frequency": read in >= 75% of the background batches


def usage_stats(total_counts: Tensor) -> dict[str, float]:
    """From the per-slot read counts of a corpus: used fraction, entropy (nats), KL from uniform."""
    counts = total_counts.double()
    n = counts.numel()
    total = counts.sum()
    if total == 0:
        return {"slots_used_frac": 0.0, "usage_entropy": 0.0, "usage_kl_uniform": math.log(n)}
    p = counts[counts > 0] / total
    entropy = float(-(p * p.log()).sum())
    return {"slots_used_frac": float((counts > 0).double().mean()), "usage_entropy": entropy,
            "usage_kl_uniform": math.log(n) - entropy}


@torch.no_grad()
def answer_position_lookups(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *,
                            device: torch.device, batch_size: int = 16) -> list[Tensor]:
    """For each prompt, every slot index read (all memory layers, heads, k) at its last token, which
    predicts the first answer token. Left-padded batches; returns one LongTensor per prompt."""
    return [last for last, _ in prompt_lookups(model, tokenizer, prompts, device=device, batch_size=batch_size)]


@torch.no_grad()
def prompt_lookups(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *,
                   device: torch.device, batch_size: int = 16) -> list[tuple[Tensor, Tensor]]:
    """For each prompt: (slots read at its last token, slots read at any of its tokens). A memory layer
    below the top can store a fact at the question's tokens, from where attention carries it to the
    answer position; the second set shows whether a selection reaches those slots."""
    was_training = model.training
    model.eval()
    out: list[tuple[Tensor, Tensor]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            rows = [tokenizer.encode(p, bos=True, eos=False) for p in prompts[start:start + batch_size]]
            width = max(len(r) for r in rows)
            tokens = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.bool)
            for i, r in enumerate(rows):
                tokens[i, width - len(r):] = torch.tensor(r)
                mask[i, width - len(r):] = True
            result = model(tokens.to(device), padding_mask=mask.to(device))
            every = torch.cat(list(result.memory_indices), dim=-1).cpu()       # (B, T, layers*heads*k)
            for i, r in enumerate(rows):
                out.append((every[i, -1], every[i, width - len(r):].flatten()))
    finally:
        model.train(was_training)
    return out


def high_df_share(lookups: Sequence[Tensor], document_frequency: Tensor, num_batches: int,
                  threshold: float = HIGH_DF_FRACTION) -> float:
    """Share of all lookups (with multiplicity) whose slot was read in >= threshold of background batches."""
    if not lookups or num_batches == 0:
        return float("nan")
    flat = torch.cat(list(lookups))
    df = document_frequency.cpu()[flat].double()
    return float((df >= threshold * num_batches).double().mean())


def coverage(selected: Tensor | None, lookups: Tensor) -> float:
    """Fraction of the distinct answer slots that the selection contains."""
    answer = lookups.unique()
    if selected is None or answer.numel() == 0:
        return 0.0
    return float(torch.isin(answer, selected.cpu()).double().mean())


def hits_in_rows(lookups: Sequence[Tensor], rows: Tensor) -> float:
    """Share of all lookups (with multiplicity) that read one of `rows` (e.g. rows a finetune updated)."""
    if not lookups:
        return float("nan")
    flat = torch.cat(list(lookups))
    return float(torch.isin(flat, rows.cpu()).double().mean())
