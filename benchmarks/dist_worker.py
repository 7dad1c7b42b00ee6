"""Item 3 (and item 1 with real collectives): a 2-rank torchrun worker.

    torchrun --standalone --nproc_per_node=2 -m benchmarks.dist_worker --profile JSON --out FILE

Bytes are counted at the collective: torch.distributed.all_reduce, all_gather, all_gather_into_tensor
and all_gather_object are wrapped for the whole run (CollectiveCounter) and every call records its bytes,
tagged with the phase of the step it ran in ("selection": the slot-count exchange inside
update_trainable_indices -- a dense all_reduce of N int32 counts, or under count_exchange=auto/sparse an
all_reduce(MAX) of one int64 width and an all_gather of every rank's (slot, count) pairs; "values_sync":
the row all-reduce in the values optimizer's pre-hook). The values-sync bytes are cross-checked against the
finetuner's own `synced_bytes_last_step`, the count exchange's against `count_bytes_last_step`. DDP (or FSDP's reduce-scatter, which moves the same volume per rank
in a ring) would all-reduce the full N x d gradient: N·d·4 bytes.

Timing: the same `smf` and `plain` steps as item 1 (each rank its half of the global batch), plus
`union_sync` (no selection, but the union of accessed rows all-reduced: the library's memory_all
method, the cheapest correct 2-rank step without selection; `plain` leaves the replicas drifting),
interleaved, barrier before each; a rep's time is the slowest rank's. Then the two all-reduces are
timed on their own: the t x d selected rows vs a full N x d tensor.
"""
from __future__ import annotations

import argparse
import gc
import json
import pickle
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.common import interleaved, median, paired_ratio, profile_from_dict, summary, token_batches
from benchmarks.finetune_step import cycler, make_setup, make_union, plain_step, smf_step, union_step
from training.distributed import close


class CollectiveCounter:
    """Wraps the torch.distributed collectives that move tensors (all_reduce, all_gather,
    all_gather_into_tensor, all_gather_object); records (op, phase, bytes, dtype, shape) of every call.

    Bytes are those the call leaves on each rank: an all_reduce's tensor; an all_gather's whole output
    (world x the input: what the finetuner's `count_bytes_last_step` counts for the sparse count exchange);
    an all_gather_object's pickled object times the world size. Modules that call `dist.all_gather` (as
    sparse_update/comm.py does) look the attribute up at call time, so they go through the wrapper."""

    OPS = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object")

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
        if op == "all_gather_into_tensor":
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    profile = profile_from_dict(json.loads(args.profile))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    counter = CollectiveCounter()

    local_batch = max(1, profile.batch // world)
    reps, warmup = profile.dist_reps, profile.warmup
    s = make_setup(profile.model, top_t=profile.top_t, batch=local_batch, seq=profile.seq,
                   num_batches=reps + warmup, seed=0)
    # every rank: the same model (seed 0), its own data
    s.batches = token_batches(reps + warmup, local_batch, profile.seq, s.model.config.vocab_size,
                              seed=1000 + rank)
    values = s.values

    # --- bytes of one step, counted at the collective -------------------------------------------
    mark = len(counter.calls)
    smf_step(s, s.batches[0], phase=counter.set_phase)
    per_phase = counter.bytes_by_phase(mark)
    step_calls = counter.calls[mark:]
    ours = per_phase.get("values_sync", 0)
    selection_bytes = per_phase.get("selection", 0)
    dense = values.numel() * values.element_size()
    reported = s.finetuner.synced_bytes_last_step
    count_reported = s.finetuner.count_bytes_last_step
    # the finetuner's count_bytes_last_step leaves out the one-element width all_reduce(MAX) of the sparse exchange
    width_bytes = sum(c["bytes"] for c in step_calls
                      if c["phase"] == "selection" and c["op"] == "all_reduce" and c["shape"] == [1])
    identical = _checksum_equal(values)   # before any plain step (those do not sync: ranks drift)
    accessed_global = s.selection_stats.get("accessed")
    with torch.no_grad():   # what a sparse exchange of counts would send: this rank's distinct slots
        local = torch.cat([i.flatten() for i in s.model(s.batches[0]).memory_indices])
        accessed_local = int(torch.unique(local[local >= 0]).numel())

    # --- the memory_all-style step (no selection, union of accessed rows synced): its bytes ------------
    union = make_union(s)
    mark = len(counter.calls)
    union_step(s, union, s.batches[0], phase=counter.set_phase)
    union_bytes = counter.bytes_by_phase(mark)

    # --- step time, 2 ranks, interleaved ------------------------------------------------------------
    s.select_s.clear()
    s.sync_s.clear()
    nxt_a, nxt_b, nxt_c = cycler(s.batches), cycler(s.batches), cycler(s.batches)
    times = interleaved({"smf": lambda: smf_step(s, nxt_a()), "plain": lambda: plain_step(s, nxt_b()),
                         "union_sync": lambda: union_step(s, union, nxt_c())},
                        reps=reps, warmup=warmup, sync=dist.barrier)
    times = {k: slowest(v) for k, v in times.items()}
    select_s = slowest(s.select_s[warmup:])
    sync_s = slowest(s.sync_s[warmup:])

    # --- the all-reduces alone: t x d selected rows (+1 flag) vs the full N x d table ----------------
    rows = torch.zeros(ours // values.element_size(), dtype=values.dtype)
    s.model.memory_values = None
    s.finetuner.remove()
    union.finetuner.remove()
    s = union = None          # free model and table views before allocating the N x d buffer
    gc.collect()
    full = torch.zeros_like(values)
    counts = torch.zeros(values.shape[0], dtype=torch.int32)
    ar = interleaved({"rows": lambda: dist.all_reduce(rows), "counts": lambda: dist.all_reduce(counts),
                      "dense": lambda: dist.all_reduce(full)},
                     reps=profile.dense_allreduce_reps, warmup=1, sync=dist.barrier)
    ar = {k: slowest(v) for k, v in ar.items()}
    counter.restore()

    if rank == 0:
        Path(args.out).write_text(json.dumps({
            "inputs": {"N": values.shape[0], "d": values.shape[1], "t": profile.top_t, "ranks": world,
                       "batch_global": local_batch * world, "batch_per_rank": local_batch, "seq": profile.seq,
                       "reps": reps, "allreduce_reps": profile.dense_allreduce_reps, "backend": "gloo",
                       "threads_per_rank": torch.get_num_threads()},
            "values_sync_bytes": ours,
            "values_sync_bytes_reported": reported,
            "counted_matches_reported": ours == reported,
            "selection_bytes": selection_bytes,
            "dense_bytes": dense,
            "sync_bytes_ratio": dense / ours if ours else None,
            "sync_bytes_ratio_incl_counts": dense / (ours + selection_bytes) if ours else None,
            # the count exchange (sparse_update count_exchange=auto) over the row sync, bytes per step
            "count_bytes_ratio": selection_bytes / ours if ours else None,
            "count_bytes_reported": count_reported,
            "count_counted_matches_reported": selection_bytes - width_bytes == count_reported,
            "count_exchange_ops": sorted({c["op"] for c in step_calls if c["phase"] == "selection"}),
            "accessed_rows_global": accessed_global,
            "accessed_rows_rank0": accessed_local,
            "sparse_counts_bytes_estimate": 8 * accessed_local,
            "collectives_per_step": [{k: c[k] for k in ("op", "phase", "bytes", "dtype", "shape")} for c in step_calls],
            "smf_overhead_ratio": paired_ratio(times["smf"], times["plain"]),
            "smf_vs_union_sync_ratio": paired_ratio(times["smf"], times["union_sync"]),
            "union_sync_bytes": union_bytes.get("values_sync", 0),
            "union_selection_bytes": union_bytes.get("selection", 0),
            "step_s": {k: summary(v) for k, v in times.items()},
            "selection_ms": median(select_s) * 1e3,
            "mask_sync_ms": median(sync_s) * 1e3,
            "allreduce_s": {k: summary(v) for k, v in ar.items()},
            "allreduce_time_ratio": paired_ratio(ar["dense"], ar["rows"]),
            "values_checksum_equal_across_ranks_after_smf_step": identical,
        }))
    close(together=True)


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
