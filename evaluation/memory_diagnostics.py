"""Memory diagnostics that decide whether sparse memory finetuning can work (DESIGN.md section 8).

* usage over the background: fraction of slots ever read, usage entropy and KL from uniform
  (Lample et al. 2019 report these to show how well the memory is used);
* answer-position lookups: the slots a fact's evaluation prompt reads at the position that predicts
  the first answer token, and the share of those lookups that land in slots with a high background
  document frequency (generic slots, which TF-IDF ranks low);
* coverage: how many of those answer slots a step's trainable selection contains, and how many of the
  slots read anywhere in the prompt (a mid-depth memory stores facts at the question's tokens);
* interference: the share of known facts' answer lookups that hit rows a finetune updated;
* reliance: how much the model's answers depend on the memory at all -- known-fact F1 and answer NLL
  with every memory layer's output zeroed (:class:`memory_off`). A memory the model does not use for its
  facts cannot be the place where sparse finetuning writes new ones.

Forward passes here run on every rank with the same inputs (FSDP gathers parameters in forward), so
call these functions on all ranks alike.
"""
from __future__ import annotations

import contextlib
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
    reads = prompt_reads(model, tokenizer, prompts, device=device, batch_size=batch_size, weights=False)
    return [(r["last_slots"], r["all_slots"]) for r in reads]


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


def selection_vs_largest_rows(selected: Tensor, rows: Tensor, sq_norms: Tensor) -> dict[str, float]:
    """Compare a selection of rows with the rows of largest gradient norm (those that SGD on every read
    row, memory_all, moves most). `rows`: the rows with a gradient, `sq_norms`: their squared norms.
    Returns memory/topt_overlap_memory_all: |selection ∩ the |selection| largest rows| / |selection| (1 when
    the selection is exactly memory_all's largest moves), and memory/topt_grad_mass: the share of the total
    squared gradient norm inside the selection."""
    if selected.numel() == 0 or rows.numel() == 0:
        return {"memory/topt_overlap_memory_all": 0.0, "memory/topt_grad_mass": 0.0}
    k = min(selected.numel(), rows.numel())
    largest = rows[torch.topk(sq_norms, k).indices]
    inside = torch.isin(rows, selected)
    total = float(sq_norms.double().sum())
    return {"memory/topt_overlap_memory_all": float(torch.isin(largest, selected).double().sum()) / selected.numel(),
            "memory/topt_grad_mass": float(sq_norms[inside].double().sum()) / total if total > 0 else 0.0}


def f1_by_steps_since_update(steps_since: Sequence[int], f1: Sequence[float], *, num_bins: int = 4) -> list[dict]:
    """Mean F1 of facts grouped by how many steps ago they were last trained (0 = the last step), in
    `num_bins` bins of equal width over the observed range: a forgetting curve within the stream."""
    if len(steps_since) != len(f1):
        raise ValueError(f"{len(steps_since)} step counts for {len(f1)} F1 values")
    if not steps_since:
        return []
    lo, hi = min(steps_since), max(steps_since)
    width = max(1, math.ceil((hi - lo + 1) / num_bins))
    out = []
    for b in range(num_bins):
        start, end = lo + b * width, lo + (b + 1) * width - 1
        vals = [v for s, v in zip(steps_since, f1) if start <= s <= end]
        if vals:
            out.append({"steps_since": [start, end], "num_facts": len(vals), "f1": sum(vals) / len(vals)})
    return out


# ---------------------------------------------------------------- memory health (issue 17, rung 1)
LOW_DF_FRACTION = 0.05   # "low document frequency": read in < 5% of the background batches
HEALTH_TARGETS = {"slots_read_frac": 0.60, "answer_weight_low_df": 0.50, "jaccard_new_known_max": 0.10}
"""Gate before any finetune sweep: >= 60% of slots read on background text, > 50% of the new facts'
answer-position softmax weight on low-DF slots, new-known Jaccard of answer-slot sets < 0.1."""


class ReadRecorder:
    """Records the softmax weights of every memory read (forward hooks on the model's memory layers),
    aligned with ``model(...).memory_indices`` concatenated over layers: ``weights()`` is (B, T, layers*heads*k),
    0 at padded positions. Re-scores each layer's lookup from its input, so it costs one extra lookup."""

    def __init__(self, model: nn.Module) -> None:
        from model.memory import ProductKeyMemory
        self.layers = [m for m in model.modules() if isinstance(m, ProductKeyMemory)]
        self._handles: list[Any] = []
        self._current: list[Tensor] = []

    def __enter__(self) -> "ReadRecorder":
        for layer in self.layers:
            self._handles.append(layer.register_forward_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        x = args[0]
        mask = args[2] if len(args) > 2 else kwargs.get("padding_mask")
        batch, seq, dim = x.shape
        flat = x.reshape(-1, dim)
        real = mask.reshape(-1) if mask is not None else torch.ones(flat.shape[0], dtype=torch.bool, device=x.device)
        with torch.no_grad():
            weights, _ = module.lookup(flat[real])
        full = weights.new_zeros(batch * seq, weights.shape[1] * weights.shape[2])
        full[real] = weights.reshape(weights.shape[0], -1)
        self._current.append(full.view(batch, seq, -1).float().cpu())

    def weights(self) -> Tensor:
        """The weights of the last forward (all layers), then forget them."""
        out, self._current = torch.cat(self._current, dim=-1), []
        return out


@torch.no_grad()
def prompt_reads(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, device: torch.device,
                 batch_size: int = 16, weights: bool = True) -> list[dict[str, Tensor]]:
    """Per prompt: slots and softmax weights read at its last token (``last_slots``, ``last_weights``) and at
    all its tokens (``all_slots``, ``all_weights``; without ``weights`` only the slots, no extra lookup).
    Left-padded batches; same forwards on every rank (call on all ranks)."""
    was_training = model.training
    model.eval()
    out: list[dict[str, Tensor]] = []
    try:
        with ReadRecorder(model) if weights else contextlib.nullcontext() as recorder:
            for start in range(0, len(prompts), batch_size):
                rows = [tokenizer.encode(p, bos=True, eos=False) for p in prompts[start:start + batch_size]]
                width = max(len(r) for r in rows)
                tokens = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.bool)
                for i, r in enumerate(rows):
                    tokens[i, width - len(r):] = torch.tensor(r)
                    mask[i, width - len(r):] = True
                result = model(tokens.to(device), padding_mask=mask.to(device), reads_only=True)   # no logits
                slots = torch.cat(list(result.memory_indices), dim=-1).cpu()   # (B, T, layers*heads*k)
                read = recorder.weights() if recorder is not None else None
                for i, r in enumerate(rows):
                    entry = {"last_slots": slots[i, -1], "all_slots": slots[i, width - len(r):].flatten()}
                    if read is not None:
                        entry.update(last_weights=read[i, -1], all_weights=read[i, width - len(r):].flatten())
                    out.append(entry)
    finally:
        model.train(was_training)
    return out


class memory_off:
    """Context manager: every memory layer of ``model`` outputs zeros (its reads are still reported), as if
    the layer were removed from the residual stream. An ablation for :func:`memory_reliance`."""

    def __init__(self, model: nn.Module) -> None:
        from model.memory import ProductKeyMemory
        self.layers = [m for m in model.modules() if isinstance(m, ProductKeyMemory)]
        self._handles: list[Any] = []

    @staticmethod
    def _hook(module: nn.Module, args: tuple, output: Any) -> Any:
        out, slots = output
        return torch.zeros_like(out), slots

    def __enter__(self) -> "memory_off":
        self._handles = [layer.register_forward_hook(self._hook) for layer in self.layers]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def memory_reliance(model: nn.Module, tokenizer: Any, records: Sequence[Any], *, batch_size: int,
                    device: torch.device, max_new_tokens: int, prefix: str = "known") -> dict[str, float | None]:
    """QA F1 and answer NLL of ``records`` with the memory as it is and with it switched off
    (:class:`memory_off`), and ``{prefix}_memory_reliance`` = the share of the F1 lost without the memory
    (0: the facts live elsewhere; 1: only the memory holds them; None when F1 is 0). Call on every rank."""
    from evaluation.qa import qa_scores

    kwargs = dict(batch_size=batch_size, device=device, max_new_tokens=max_new_tokens)
    on = qa_scores(model, tokenizer, records, **kwargs)
    with memory_off(model):
        off = qa_scores(model, tokenizer, records, **kwargs)
    reliance = (on["f1"] - off["f1"]) / on["f1"] if on["f1"] > 0 else None   # undefined: nothing known
    return {f"{prefix}_f1": on["f1"], f"{prefix}_f1_memory_off": off["f1"],
            f"{prefix}_answer_nll": on["answer_nll"], f"{prefix}_answer_nll_memory_off": off["answer_nll"],
            f"{prefix}_memory_reliance": reliance}


RELIANCE_TARGET = 0.5
"""A fourth gate (found on the synthetic world, docs/world_ladder.md): switching the memory off must cost
at least half of the known facts' F1 -- otherwise the facts are stored in the dense layers."""


def topk_exp_entropy(weights: Tensor, k: int) -> float:
    """Mean over lookups (one head, one token) of exp(entropy) of the top-k softmax weights: k when the
    read is flat, 1 when one slot takes all the weight. `weights`: (..., heads*k) with 0 rows = padding."""
    w = weights.reshape(-1, k).double()
    w = w[w.sum(dim=1) > 0]
    if w.numel() == 0:
        return float("nan")
    ent = -(w * w.clamp_min(1e-30).log()).sum(dim=1)
    return float(ent.exp().mean())


def _slot_sets(slot_lists: Sequence[Tensor]) -> list[Tensor]:
    return [s[s >= 0].unique() for s in slot_lists]


def jaccard_stats(a: Sequence[Tensor], b: Sequence[Tensor] | None = None) -> dict[str, float]:
    """Jaccard overlap of slot sets: ``mean`` over all pairs (a_i, b_j) (i < j when b is None) and
    ``mean_max``: the mean over a's sets of the largest overlap with any set of b (the other a's when b is
    None). A fact whose slots another fact also writes has a high max even when the mean is low."""
    sets_a = [s for s in a]
    same = b is None
    sets_b = sets_a if same else [s for s in b]
    if not sets_a or not sets_b or (same and len(sets_a) < 2):
        return {"mean": float("nan"), "mean_max": float("nan")}
    universe = torch.cat(sets_a + sets_b).unique()

    def onehot(sets: list[Tensor]) -> Tensor:
        m = torch.zeros(len(sets), universe.numel(), dtype=torch.float64)
        for i, s in enumerate(sets):
            m[i, torch.searchsorted(universe, s)] = 1.0
        return m

    ma, mb = onehot(sets_a), onehot(sets_b)
    inter = ma @ mb.T
    union = ma.sum(1)[:, None] + mb.sum(1)[None, :] - inter
    jac = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))
    if same:
        off = ~torch.eye(len(sets_a), dtype=torch.bool)
        return {"mean": float(jac[torch.triu(off, 1)].mean()), "mean_max": float(jac.masked_fill(~off, -1).max(1).values.mean())}
    return {"mean": float(jac.mean()), "mean_max": float(jac.max(1).values.mean())}


def memory_health(*, total_counts: Tensor, document_frequency: Tensor, num_batches: int,
                  known: Sequence[dict[str, Tensor]], new: Sequence[dict[str, Tensor]],
                  background_weights: Tensor | None, k: int,
                  reliance: dict[str, float | None] | None = None) -> dict[str, Any]:
    """The health of a memory for sparse finetuning, from background usage and the reads of the known and
    new facts' evaluation prompts (see :func:`prompt_reads`). Keys (``health/...``):

    * slots_read_frac, usage_entropy (nats; max ln N), usage_kl_uniform: background usage;
    * topk_exp_entropy: exp-entropy of the top-k weights over background reads (k = flat, 1 = one slot);
    * {new,known}_answer_lookups_low_df / _weight_low_df: share of the answer-position reads (of their softmax
      weight) on slots read by < 5% of background batches -- the slots TF-IDF can isolate;
    * known_answer_slots_per_fact: distinct answer-position slots of the known facts per known fact;
      known_facts_per_answer_slot: how many known facts read an answer slot, on average;
    * jaccard_{new_new,new_known}{,_max}: Jaccard of answer-position slot sets (mean over pairs; mean of the
      max); jaccard_lowdf_prompt_*: the same for the low-DF slots read anywhere in the prompt (what a
      TF-IDF selection of a fact's statements can reach);
    * known_f1, known_f1_memory_off, known_memory_reliance, ...: ``reliance`` (:func:`memory_reliance`), when given;
    * targets: each HEALTH_TARGETS entry (and memory_reliance >= RELIANCE_TARGET with ``reliance``) with its
      value and whether it is met.
    """
    out: dict[str, Any] = {f"health/{key}": v for key, v in usage_stats(total_counts).items()}
    out["health/slots_read_frac"] = out.pop("health/slots_used_frac")
    out["health/usage_entropy_max"] = math.log(total_counts.numel())
    if background_weights is not None:
        out["health/topk_exp_entropy"] = topk_exp_entropy(background_weights, k)
        out["health/topk_k"] = k
    df = document_frequency.cpu()
    low = df < LOW_DF_FRACTION * max(num_batches, 1)
    for name, reads in (("new", new), ("known", known)):
        if not reads:
            continue
        slots = torch.cat([r["last_slots"] for r in reads])
        weights = torch.cat([r["last_weights"] for r in reads]).double()
        valid = slots >= 0
        is_low = low[slots.clamp_min(0)] & valid
        out[f"health/{name}_answer_lookups_low_df"] = float(is_low.double().sum() / valid.sum().clamp_min(1))
        out[f"health/{name}_answer_weight_low_df"] = float(weights[is_low].sum() / weights[valid].sum().clamp_min(1e-30))
    known_sets = _slot_sets([r["last_slots"] for r in known])
    new_sets = _slot_sets([r["last_slots"] for r in new])
    if known_sets:
        distinct = torch.cat(known_sets).unique().numel()
        out["health/known_answer_slots_per_fact"] = distinct / len(known_sets)
        out["health/known_facts_per_answer_slot"] = sum(s.numel() for s in known_sets) / max(distinct, 1)
    for prefix, a_sets, k_sets in (
            ("jaccard", new_sets, known_sets),
            ("jaccard_lowdf_prompt", *[[s[low[s]] for s in _slot_sets([r["all_slots"] for r in group])]
                                       for group in (new, known)])):
        nn_ = jaccard_stats(a_sets)
        nk = jaccard_stats(a_sets, k_sets)
        out[f"health/{prefix}_new_new"], out[f"health/{prefix}_new_new_max"] = nn_["mean"], nn_["mean_max"]
        out[f"health/{prefix}_new_known"], out[f"health/{prefix}_new_known_max"] = nk["mean"], nk["mean_max"]
    values = {"slots_read_frac": out.get("health/slots_read_frac"),
              "answer_weight_low_df": out.get("health/new_answer_weight_low_df"),
              "jaccard_new_known_max": out.get("health/jaccard_new_known_max")}
    targets = dict(HEALTH_TARGETS)
    if reliance is not None:
        out.update({f"health/{key}": v for key, v in reliance.items()})
        values["memory_reliance"] = out.get("health/known_memory_reliance")
        targets["memory_reliance"] = RELIANCE_TARGET
    out["health/targets"] = {
        key: {"value": values[key], "target": (">= " if key != "jaccard_new_known_max" else "< ") + str(t),
              "met": bool(values[key] is not None and not math.isnan(values[key])
                          and (values[key] < t if key == "jaccard_new_known_max" else values[key] >= t))}
        for key, t in targets.items()}
    return out
