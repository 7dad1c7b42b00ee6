"""The background stage: the base model reads `sparse.background_batches` batches of the background corpus,
and the finetuner's tracker records which memory rows they read (document frequency, access counts) -- the
statistics a later finetune's TF-IDF and KL rankings compare against. It trains nothing. It also measures
the memory's health (usage, the facts' prompt reads, reliance on the memory): the gate before a sweep.

A resumed background stage is redone from its first batch (see checkpoint.restore): its checkpoint is
written once, after the statistics are complete.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from data_pipeline.facts import eval_prompt
from evaluation import build_summary, write_summary
from evaluation.memory_diagnostics import (HIGH_DF_FRACTION, ReadRecorder, memory_health, memory_reliance,
                                          prompt_reads, usage_stats)
from training import checkpoint as C
from training import distributed as D
from training.callbacks import Callbacks
from training.metrics import MetricsLogger, progress_bar

HEALTH_WEIGHT_BATCHES = 50   # background batches whose read weights feed health/topk_exp_entropy


def run_background(config, dist_info, run_dir: Path, log: MetricsLogger, parts, t_start: float, *,
                   callbacks: Callbacks) -> dict:
    """Collect the statistics, log usage and health, checkpoint them, write summary.json. `parts` is the
    trainer's set-up (strategy, finetuner, stream, values, tokenizer, facts)."""
    num = config.sparse.background_batches
    if config.max_steps:
        num = min(num, config.max_steps)
    tracker = parts.finetuner.background_tracker
    stage_offset = log.offset()     # a resume rewinds metrics.jsonl to here (the stage is redone whole)
    total_counts, weights = _collect(config, dist_info, parts, num)
    df = tracker.document_frequency.float()
    diag = {f"memory/{k}": v for k, v in usage_stats(total_counts).items()}
    diag["memory/high_df_slots_frac"] = float((df >= HIGH_DF_FRACTION * num).float().mean())
    log.log(num, diag, kind="background")
    health = _health(config, dist_info, parts, total_counts, weights)
    log.log(num, {k: v for k, v in health.items() if isinstance(v, (int, float))}, kind="health", console=False)
    C.save_checkpoint(run_dir, num, strategy=parts.strategy, values=parts.values, values_optimizer=None,
                      sparse_state=parts.finetuner.state_dict(),
                      trainer_state={"stage": "background", "method": "-", "fingerprint": config.fingerprint(),
                                     "metrics_offset": stage_offset},
                      rank_state={"stream": parts.stream.state_dict()}, dist_info=dist_info,
                      keep_latest=config.checkpoint.keep_latest, callbacks=callbacks)
    summary = build_summary(stage="background", method="-", steps=num, wall_time_s=time.time() - t_start,
                            trainable_params_per_step=0, before=None, after=None)
    summary["background"] = {"num_batches": tracker.num_batches, **diag}
    summary["health"] = health
    if dist_info.is_main:
        write_summary(run_dir / "summary.json", summary)
    D.close(together=True)
    return summary


@torch.no_grad()
def _collect(config, dist_info, parts, num: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward `num` batches, the tracker counting the rows they read. Returns every row's total reads and
    the read weights of the first HEALTH_WEIGHT_BATCHES batches (real tokens only)."""
    tracker, module = parts.finetuner.background_tracker, parts.strategy.module
    tracker.start_collection()
    total_counts = torch.zeros(parts.values.shape[0], dtype=torch.int64)
    module.eval()
    bar = progress_bar(config, dist_info, num, 0)
    weights = []
    for i in range(num):
        batch = next(parts.stream)
        with ReadRecorder(module) if i < HEALTH_WEIGHT_BATCHES else contextlib.nullcontext() as recorder:
            out = module(batch.tokens.to(dist_info.device), padding_mask=batch.padding_mask.to(dist_info.device),
                         reads_only=True)    # the reads are all it records: no blocks above the memory, no logits
            if recorder is not None:
                weights.append(recorder.weights()[batch.padding_mask.cpu()])
        total_counts += tracker.add_batch_indices(out.memory_indices).cpu().to(torch.int64)
        if bar is not None:
            bar.update(1)
    tracker.stop_collection()
    if bar is not None:
        bar.close()
    return total_counts, weights


def _health(config, dist_info, parts, total_counts: torch.Tensor, weights: list[torch.Tensor]) -> dict:
    """Memory health (the gate before a finetune sweep): background usage, the facts' evaluation-prompt
    reads, and whether the model answers from its memory at all (known F1 with the memory switched off)."""
    module, tracker, facts = parts.strategy.module, parts.finetuner.background_tracker, parts.facts
    reads = {name: prompt_reads(module, parts.tokenizer, [eval_prompt(r) for r in records], device=dist_info.device)
             for name, records in (("known", facts.known), ("new", facts.new))}
    reliance = memory_reliance(module, parts.tokenizer, facts.known[:config.eval.max_items],
                               batch_size=config.eval.batch_size, device=dist_info.device,
                               max_new_tokens=config.eval.max_new_tokens) if facts.known else None
    return memory_health(total_counts=total_counts, document_frequency=tracker.document_frequency,
                         num_batches=tracker.num_batches, known=reads["known"], new=reads["new"],
                         background_weights=torch.cat(weights) if weights else None,
                         k=module.config.memory.k, reliance=reliance)
