"""The 2-rank figures (item sync_traffic): the trainer's own finetune step under a real 2-process gloo group.

    torchrun --standalone --nproc_per_node=2 -m benchmarks.dist_worker --profile JSON --out FILE

Each rank builds the trainer's parts exactly as `python -m recipes.train` does under torchrun
(training.distributed.init_distributed, then benchmarks/stepper_bench.build_stepper = training/trainer.py
`_setup`: fsdp2 -- the dense weights, frozen here, sharded over the 2 ranks --, the values table replicated,
finetuner, values lane) from `tiny_fact_learning.yaml`, method sparse (TF-IDF top-t, SGD on the values),
the profile's model (N = 1024²) and t, and times, interleaved rep by rep (order ABCD, DCBA, ...), barrier
before each, a rep's time being the slowest rank's (wall clock):
  stepper    - `training.step.Stepper.step`: forward, the selection (count exchange across ranks, TF-IDF,
               top-t), the finite-loss check, backward, the strategy's (empty) step, the values lane whose
               optimizer pre-hook masks the gradient to the t rows and all-reduces them, SGD;
  plain      - the hand loop of smf_overhead_ratio_stepper (the same baseline as at one rank): forward through
               the same model, cross-entropy, backward, SGD on every accessed row of the same table (a second
               nn.Parameter over its storage); no selection, mask or values collective (the replicas drift).
               Its forward/backward pays FSDP2's all-gathers of the sharded weights, as the Stepper's does;
  union_sync - a second Stepper on the same model with method memory_all (every accessed row trains, the union
               of accessed rows all-reduced: the cheapest correct 2-rank step without selection);
  reimpl     - benchmarks/finetune_step.smf_step (the re-implementation the 2-rank figure timed before), as a
               cross-check.
Each rank steps its own batch of batch / 2 rows (as trainer._loop's shard_rows gives it its rows of the
global batch).

Bytes are counted at the collective, on one Stepper step: torch.distributed.all_reduce, all_gather,
all_gather_into_tensor, all_gather_single and all_gather_object are wrapped for the whole run (CollectiveCounter) and every call
records its bytes, tagged with the phase of the step it ran in: "selection" (the finetuner's
update_trainable_indices: a dense all_reduce of N int32 counts, or under count_exchange=auto/sparse an
all_reduce(MAX) of one int64 width and an all_gather of every rank's (slot, count) pairs), "values_sync" (the
values lane's step: the row all-reduce in the optimizer pre-hook) and "other" (FSDP2's parameter all-gathers,
of the frozen weights, the finite-loss flag, the dense grad-norm all-reduce). The values-sync bytes are cross-checked against the
finetuner's own `synced_bytes_last_step`, the count exchange's against `count_bytes_last_step`. DDP (or FSDP's
reduce-scatter, which moves the same volume per rank in a ring) would all-reduce the full N x d values
gradient: N·d·4 bytes. Then the two all-reduces are timed on their own: the t x d selected rows vs a full
N x d tensor (and the dense N int32 counts).
"""
from __future__ import annotations

import argparse
import gc
import json
import pickle
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from benchmarks.common import capacity_from_rates, interleaved, matmul_rate, median, paired_ratio, profile_from_dict, summary
from benchmarks.finetune_step import cycler
from benchmarks.stepper_bench import (build_stepper, finetune_config, finetune_variants, hand_and_reimpl, lm_batches,
                                      view_stepper)
from training import distributed as D


class CollectiveCounter:
    """Wraps the torch.distributed collectives that move tensors (all_reduce, all_gather,
    all_gather_into_tensor, all_gather_single -- FSDP2's parameter all-gather in torch 2.13 --,
    all_gather_object); records (op, phase, bytes, dtype, shape) of every call.

    Bytes are those the call leaves on each rank: an all_reduce's tensor; an all_gather's whole output
    (world x the input: what the finetuner's `count_bytes_last_step` counts for the sparse count exchange);
    an all_gather_object's pickled object times the world size. Modules that call `dist.all_gather` (as
    sparse_update/comm.py does) look the attribute up at call time, so they go through the wrapper."""

    OPS = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "all_gather_object")

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.phase: str | None = None
        self._orig = {op: getattr(dist, op) for op in self.OPS if hasattr(dist, op)}
        for op, fn in self._orig.items():
            setattr(dist, op, self._wrap(op, fn))

    def _wrap(self, op: str, fn):
        def counting(*args, **kwargs):
            nbytes, dtype, shape = self.measure(op, args, kwargs)
            self.calls.append({"op": op, "phase": self.phase, "bytes": nbytes, "dtype": dtype, "shape": shape})
            return fn(*args, **kwargs)
        return counting

    @staticmethod
    def measure(op: str, args: tuple, kwargs: dict) -> tuple[int, str | None, list]:
        def size(t: torch.Tensor) -> int:
            return t.numel() * t.element_size()

        def dtype(t: torch.Tensor) -> str:
            return str(t.dtype).replace("torch.", "")
        if op == "all_reduce":
            t = args[0] if args else kwargs["tensor"]
            return size(t), dtype(t), list(t.shape)
        if op == "all_gather":
            out = args[0] if args else kwargs["tensor_list"]
            return sum(size(t) for t in out), dtype(out[0]), [len(out), *out[0].shape]
        if op in ("all_gather_into_tensor", "all_gather_single"):
            out = args[0] if args else kwargs["output_tensor"]
            return size(out), dtype(out), list(out.shape)
        out = args[0] if args else kwargs["object_list"]             # all_gather_object
        obj = args[1] if len(args) > 1 else kwargs["obj"]
        return len(pickle.dumps(obj)) * len(out), None, [len(out)]

    def set_phase(self, name: str | None) -> None:
        self.phase = name

    def bytes_by_phase(self, since: int = 0) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.calls[since:]:
            out[str(c["phase"])] = out.get(str(c["phase"]), 0) + c["bytes"]
        return out

    def restore(self) -> None:
        for op, fn in self._orig.items():
            setattr(dist, op, fn)


def slowest(xs: list[float]) -> list[float]:
    t = torch.tensor(xs, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


class Tagged:
    """Shadows the method `obj.name` with an instance attribute: each call runs under counter phase `phase`
    and its wall time is kept (`times`). `undo()` removes the shadow."""

    def __init__(self, counter: CollectiveCounter, obj, name: str, phase: str) -> None:
        self.times: list[float] = []
        self._obj, self._name = obj, name
        orig = getattr(obj, name)

        def tagged(*args, **kwargs):
            counter.set_phase(phase)
            t0 = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                self.times.append(time.perf_counter() - t0)
                counter.set_phase(None)
        setattr(obj, name, tagged)

    def undo(self) -> None:
        delattr(self._obj, self._name)


def tag_step(counter: CollectiveCounter, stepper) -> tuple[Tagged, Tagged]:
    """Phases of a Stepper's step: its finetuner's selection and its values lane's step (mask + row sync +
    SGD); every other collective of the step stays untagged ("other")."""
    return (Tagged(counter, stepper.finetuner, "update_trainable_indices", "selection"),
            Tagged(counter, stepper.values_lane, "step", "values_sync"))


def phase_bytes(calls: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in calls:
        key = c["phase"] or "other"
        out[key] = out.get(key, 0) + c["bytes"]
    return out


def capacity_in_group(seconds: float) -> dict:
    """common.parallel_capacity measured in the two ranks themselves (no fresh processes): rank 0's
    1-thread matmul loop alone while rank 1 sleeps, then both ranks' loops at once."""
    dist.barrier()
    if dist.get_rank() == 0:
        solo = matmul_rate(seconds)
    else:
        solo = 0.0
        time.sleep(seconds + 0.2)     # idle, not in a collective, while rank 0 runs alone
    dist.barrier()
    rates = torch.zeros(dist.get_world_size(), 2, dtype=torch.float64)
    rates[dist.get_rank()] = torch.tensor([solo, matmul_rate(seconds)])
    dist.all_reduce(rates)
    return capacity_from_rates(float(rates[0, 0]), rates[:, 1].tolist())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    profile = profile_from_dict(json.loads(args.profile))

    dist_info = D.init_distributed("cpu")
    rank, world = dist_info.rank, dist_info.world_size
    config, overrides = finetune_config(profile)
    torch.manual_seed(config.seed)
    stepper, model, values, finetuner = build_stepper(config, background=True, dist_info=dist_info)
    plain, opt_plain, reimpl = hand_and_reimpl(model, values, top_t=profile.top_t, lr=config.optim.lr)
    union_config, _ = finetune_config(profile, method="memory_all")
    union_view = nn.Parameter(values.data)
    union = view_stepper(union_config, stepper, union_view)
    counter = CollectiveCounter()

    local_batch = max(1, profile.batch // world)
    reps, warmup = profile.dist_reps, profile.warmup
    # every rank: the same model and table (seed, synthetic background), its own rows
    batches = lm_batches(reps + warmup, local_batch, profile.seq, model.config.vocab_size, seed=1000 + rank)

    # --- bytes of one Stepper step, counted at the collective ----------------------------------------
    tags = tag_step(counter, stepper)
    mark = len(counter.calls)
    metrics = stepper.step(batches[0], 0)
    step_calls = counter.calls[mark:]
    per_phase = phase_bytes(step_calls)
    ours = per_phase.get("values_sync", 0)
    selection_bytes = per_phase.get("selection", 0)
    dense = values.numel() * values.element_size()
    reported = finetuner.synced_bytes_last_step
    count_reported = finetuner.count_bytes_last_step
    # the finetuner's count_bytes_last_step leaves out the one-element width all_reduce(MAX) of the sparse exchange
    width_bytes = sum(c["bytes"] for c in step_calls
                      if c["phase"] == "selection" and c["op"] == "all_reduce" and c["shape"] == [1])
    fsdp_bytes = sum(c["bytes"] for c in step_calls
                     if c["phase"] is None and c["op"] in ("all_gather_into_tensor", "all_gather_single"))
    identical = _checksum_equal(values)   # before any plain step (those do not sync: ranks drift)
    with torch.no_grad():   # what a sparse exchange of counts would send: this rank's distinct slots
        local = torch.cat([i.flatten() for i in model(batches[0].tokens, padding_mask=batches[0].padding_mask).memory_indices])
        accessed_local = int(torch.unique(local[local >= 0]).numel())

    # --- the memory_all Stepper (no selection, union of accessed rows synced): its bytes --------------
    union_tags = tag_step(counter, union)
    mark = len(counter.calls)
    model.memory_values = union_view
    union.step(batches[0], 0)
    model.memory_values = values
    union_bytes = phase_bytes(counter.calls[mark:])

    # --- step time, 2 ranks, interleaved ------------------------------------------------------------
    for t in (*tags, *union_tags):
        t.times.clear()
    steps = finetune_variants(stepper, model, values, plain, opt_plain, reimpl, batches)
    nxt_u = cycler(batches)
    step_no = {"i": 0}

    def union_step():
        model.memory_values = union_view
        union.step(nxt_u(), step_no["i"])
        step_no["i"] += 1
        model.memory_values = values
    steps = {"stepper": steps["stepper"], "plain": steps["plain"], "union_sync": union_step,
             "reimpl": steps["reimpl"]}
    seconds = 0.5 if profile.name == "smoke" else 3.0
    capacity_before = capacity_in_group(seconds)
    cpu: dict = {}
    wall = interleaved(steps, reps=reps, warmup=warmup, sync=dist.barrier, cpu=cpu)
    capacity_after = capacity_in_group(seconds)
    times = {k: slowest(v) for k, v in wall.items()}
    cpu_times = {k: slowest(v) for k, v in cpu.items()}
    select_s = slowest(tags[0].times[warmup:])
    sync_s = slowest(tags[1].times[warmup:])
    for t in (*tags, *union_tags):
        t.undo()

    # --- the all-reduces alone: t x d selected rows (+1 flag) vs the full N x d table ----------------
    rows = torch.zeros(ours // values.element_size(), dtype=values.dtype)
    model.memory_values = None
    finetuner.remove()
    union.finetuner.remove()
    reimpl.finetuner.remove()
    shape, dtype = tuple(values.shape), values.dtype
    cfg = model.config
    stepper = union = reimpl = model = values = finetuner = plain = opt_plain = union_view = steps = None
    gc.collect()              # free model and table before allocating the N x d buffer
    full = torch.zeros(shape, dtype=dtype)
    counts = torch.zeros(shape[0], dtype=torch.int32)
    ar = interleaved({"rows": lambda: dist.all_reduce(rows), "counts": lambda: dist.all_reduce(counts),
                      "dense": lambda: dist.all_reduce(full)},
                     reps=profile.dense_allreduce_reps, warmup=1, sync=dist.barrier)
    ar = {k: slowest(v) for k, v in ar.items()}
    counter.restore()

    if rank == 0:
        Path(args.out).write_text(json.dumps({
            "inputs": {"N": shape[0], "d": shape[1], "t": profile.top_t, "ranks": world,
                       "batch_global": local_batch * world, "batch_per_rank": local_batch, "seq": profile.seq,
                       "reps": reps, "allreduce_reps": profile.dense_allreduce_reps, "backend": "gloo",
                       "threads_per_rank": torch.get_num_threads(), "clock": "wall, slowest rank per rep",
                       "step": "training.step.Stepper.step (setup: training.trainer._setup via "
                               "benchmarks.stepper_bench.build_stepper, logging.memory_diagnostics=False)",
                       "config": "recipes/configs/tiny_fact_learning.yaml", "overrides": overrides,
                       "method": "sparse", "baseline": "plain hand loop (SGD on every accessed row, no values "
                                                       "collective), as smf_overhead_ratio_stepper",
                       "strategy": f"{config.strategy} ({world} ranks: dense weights sharded, values replicated)",
                       "optimizer": f"SGD lr={config.optim.lr} (values only)",
                       "count_exchange": config.sparse.count_exchange,
                       "model": "tiny preset, " + ", ".join(f"{k}={v}" for k, v in profile.model.items()),
                       "vocab": cfg.vocab_size},
            "values_sync_bytes": ours,
            "values_sync_bytes_reported": reported,
            "counted_matches_reported": ours == reported,
            "selection_bytes": selection_bytes,
            "other_bytes": per_phase.get("other", 0),
            "fsdp_allgather_bytes": fsdp_bytes,
            "dense_bytes": dense,
            "sync_bytes_ratio": dense / ours if ours else None,
            "sync_bytes_ratio_incl_counts": dense / (ours + selection_bytes) if ours else None,
            # the count exchange (sparse_update count_exchange=auto) over the row sync, bytes per step
            "count_bytes_ratio": selection_bytes / ours if ours else None,
            "count_bytes_reported": count_reported,
            "count_counted_matches_reported": selection_bytes - width_bytes == count_reported,
            "count_exchange_ops": sorted({c["op"] for c in step_calls if c["phase"] == "selection"}),
            "accessed_rows_global": metrics.get("sparse_update/accessed"),
            "selected_rows": metrics.get("sparse_update/selected"),
            "accessed_rows_rank0": accessed_local,
            "sparse_counts_bytes_estimate": 8 * accessed_local,
            "collectives_per_step": [{k: c[k] for k in ("op", "phase", "bytes", "dtype", "shape")} for c in step_calls],
            "smf_overhead_ratio": paired_ratio(times["stepper"], times["plain"]),
            "smf_overhead_ratio_samples": [round(a / b, 4) for a, b in zip(times["stepper"], times["plain"])],
            "smf_vs_union_sync_ratio": paired_ratio(times["stepper"], times["union_sync"]),
            "stepper_vs_reimpl_ratio": paired_ratio(times["stepper"], times["reimpl"]),
            "reimpl_vs_plain_ratio": paired_ratio(times["reimpl"], times["plain"]),
            # CPU time (user + system) of the busier rank per rep: leaves out waiting for a core or a peer
            "smf_overhead_ratio_cpu": paired_ratio(cpu_times["stepper"], cpu_times["plain"]),
            "union_sync_bytes": union_bytes.get("values_sync", 0),
            "union_selection_bytes": union_bytes.get("selection", 0),
            "step_s": {k: summary(v) for k, v in times.items()},
            "step_cpu_s": {k: summary(v) for k, v in cpu_times.items()},
            "selection_ms": median(select_s) * 1e3,
            "mask_sync_ms": median(sync_s) * 1e3,
            "allreduce_s": {k: summary(v) for k, v in ar.items()},
            "allreduce_time_ratio": paired_ratio(ar["dense"], ar["rows"]),
            "values_checksum_equal_across_ranks_after_smf_step": identical,
            # how many cores the two ranks really had (2.0 = two idle cores), just before and after the steps
            "cpu_parallel_capacity": {"before": capacity_before, "after": capacity_after, "seconds": seconds,
                                      "capacity_cores": round((capacity_before["capacity_cores"]
                                                               + capacity_after["capacity_cores"]) / 2, 2)},
        }))
    D.close(together=True)


def _checksum_equal(values: torch.Tensor) -> bool:
    """Sanity check that the synced step left the table identical on every rank (sum and weighted sum)."""
    rows = values.detach().sum(1, dtype=torch.float64)
    h = torch.stack([rows.sum(), (rows * torch.arange(rows.numel(), dtype=torch.float64)).sum()])
    lo, hi = h.clone(), h.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


if __name__ == "__main__":
    main()
