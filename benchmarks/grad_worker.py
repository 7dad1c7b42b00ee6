"""Item 2 child process: step time and peak memory of one way to hold the values gradient.

    python -m benchmarks.grad_worker --variant sparse|dense_mask|dense_lib --profile JSON --out FILE

One variant per process, so that each one's peak resident memory is its own (ru_maxrss/VmHWM is a
process-wide high-water mark: a second variant in the same process would hide under the first's).
Variants (same model, same batches, same TF-IDF selection of t rows, same SGD):
  sparse     - ours: embedding_bag(sparse=True) gives a COO gradient of the looked-up rows only; the
               finetuner's hook drops every row outside the top t, its optimizer pre-hook keeps them;
  dense_mask - the dense-mask approach of the reference implementations: embedding_bag(sparse=False)
               gives a full N x d gradient, and a tensor hook masks it every step with
               `mask = zeros_like(grad); mask[rows] = 1; grad * mask` (an N x d mask and product);
  dense_lib  - this library's own dense path (memory.sparse_grad=False with the finetuner's hooks):
               a full N x d gradient masked by index_select/index_copy into a fresh zero tensor.
Memory: the high-water RSS is reset (/proc/self/clear_refs) after the model, finetuner, optimizer
and batches exist; extra = peak during the steps - RSS at that moment, i.e. what the steps add on top
of the model (gradient, mask, activations, optimizer work).
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from benchmarks.common import peak_rss_bytes, profile_from_dict, ratio_clock, reset_peak_rss, rss_bytes
from benchmarks.finetune_step import lm_loss, make_setup

VARIANTS = ("sparse", "dense_mask", "dense_lib")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=VARIANTS, required=True)
    ap.add_argument("--profile", required=True, help="Profile as JSON")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    profile = profile_from_dict(json.loads(args.profile))
    overrides = dict(profile.model)
    overrides["memory.sparse_grad"] = args.variant == "sparse"
    steps = profile.grad_steps + 1
    s = make_setup(overrides, top_t=profile.top_t, batch=profile.batch, seq=profile.seq, num_batches=steps,
                   attach=args.variant != "dense_mask")
    model, values, finetuner = s.model, s.values, s.finetuner
    if args.variant == "dense_mask":
        finetuner.remove()          # keep its selection, drop its hooks: masking is the reference hook below

        def reference_mask(grad: torch.Tensor) -> torch.Tensor:
            mask = torch.zeros_like(grad)
            mask[finetuner.trainable_indices] = 1.0
            return grad * mask
        values.register_hook(reference_mask)

    gc.collect()
    hwm_reset = reset_peak_rss()
    base = rss_bytes()
    times, cpu = [], []
    for i in range(steps):
        c0, t0 = time.process_time(), time.perf_counter()
        out = model(s.batches[i])
        finetuner.update_trainable_indices(out.memory_indices)
        lm_loss(out.logits, s.batches[i]).backward()
        s.opt.step()        # sparse / dense_lib: the finetuner's pre-hook masks (and syncs) first
        s.opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = peak_rss_bytes()
    Path(args.out).write_text(json.dumps({
        "variant": args.variant, "step_s": times[1:], "step_cpu_s": cpu[1:], "warmup_s": times[0],
        "clock": ratio_clock(),
        "rss_before_steps": base, "peak_rss": peak, "extra_rss": peak - base, "hwm_reset": hwm_reset,
        "grad_layout": "sparse" if args.variant == "sparse" else "dense",
        "threads": torch.get_num_threads(),
        "N": values.shape[0], "d": values.shape[1],
    }))


if __name__ == "__main__":
    main()
