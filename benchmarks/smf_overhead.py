"""Item 1 (one process): the cost of TF-IDF selection + mask + row sync on a finetune step.

Two steps on one model and one values table, interleaved rep by rep on the same batches:
  smf   - forward, finetuner.update_trainable_indices (counts, TF-IDF, top-t), backward with the
          finetuner's masking hook, then the optimizer step whose pre-hook masks and syncs, and plain
          SGD on the t selected rows;
  plain - forward, backward, SGD on the same table with no selection (every accessed row moves).
Ratio smf / plain, median of per-rep ratios of CPU time (one thread; see common.ratio_clock; the
wall-clock ratio is kept as ratio_wall). The step is benchmarks/finetune_step.smf_step, a re-implementation of
the trainer's; item smf_overhead_stepper (stepper_bench.py) times the trainer's own Stepper.step against the same
plain step, and this step beside it; the 2-rank figure (dist_worker.py) times the trainer's Stepper under a
2-process gloo group, where the count exchange and the row sync really communicate.
"""
from __future__ import annotations

import torch

from benchmarks.common import interleaved, median, paired_ratio, ratio_clock, summary
from benchmarks.finetune_step import cycler, make_setup, plain_step, smf_step


def run(profile) -> dict:
    s = make_setup(profile.model, top_t=profile.top_t, batch=profile.batch, seq=profile.seq,
                   num_batches=profile.reps + profile.warmup)
    nxt_a, nxt_b = cycler(s.batches), cycler(s.batches)
    cpu: dict = {}
    wall = interleaved({"smf": lambda: smf_step(s, nxt_a()), "plain": lambda: plain_step(s, nxt_b())},
                       reps=profile.reps, warmup=profile.warmup, cpu=cpu)
    clock = ratio_clock()
    times = cpu if clock == "cpu" else wall
    select_s = s.select_s[profile.warmup:]
    sync_s = s.sync_s[profile.warmup:]
    cfg = s.model.config
    result = {
        "ratio": paired_ratio(times["smf"], times["plain"]),
        "clock": clock,
        "ratio_samples": [round(a / b, 4) for a, b in zip(times["smf"], times["plain"])],
        "ratio_wall": paired_ratio(wall["smf"], wall["plain"]),
        "ratio_cpu": paired_ratio(cpu["smf"], cpu["plain"]),
        "inputs": {"N": cfg.memory.num_slots, "d": cfg.memory.value_dim, "t": profile.top_t,
                   "batch": profile.batch, "seq": profile.seq, "reps": profile.reps, "ranks": 1,
                   "model": "tiny preset, " + ", ".join(f"{k}={v}" for k, v in profile.model.items()),
                   "threads": torch.get_num_threads(), "optimizer": "SGD (values only)"},
        "step_s": {k: summary(v) for k, v in wall.items()},
        "step_cpu_s": {k: summary(v) for k, v in cpu.items()},
        "selection_ms": median(select_s) * 1e3,
        "mask_sync_ms": median(sync_s) * 1e3,
        # cross-check free of step-to-step noise: the plain step plus the finetuner's own calls
        # (not the masking hook inside backward, nor the cheaper SGD on 500 rows)
        "ratio_from_components": (median(wall["plain"]) + median(select_s) + median(sync_s)) / median(wall["plain"]),
        "selected_rows": s.selection_stats.get("selected"),
        "accessed_rows": s.selection_stats.get("accessed"),
    }
    return result
