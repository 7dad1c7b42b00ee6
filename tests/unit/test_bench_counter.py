"""benchmarks/dist_worker.CollectiveCounter counts every collective the count exchange uses.

The count exchange of the selection (SparseMemoryFinetuner._global_counts) is an all_reduce of N counts
(dense) or an all_reduce(MAX) of one width and an all_gather of (slot, count) pairs (sparse): the counter
must see the all_gather too (it once wrapped only all_reduce, so count_bytes_ratio read 8 bytes), and agree
with the finetuner's own count_bytes_last_step.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from benchmarks.dist_worker import CollectiveCounter

N, T = 64, 4


def test_measure_counts_what_each_collective_leaves_on_a_rank():
    x = torch.zeros(3, 2, dtype=torch.int32)
    assert CollectiveCounter.measure("all_reduce", (x,), {})[0] == 24
    # all_gather: the whole output (world x the input), as count_bytes_last_step counts it
    assert CollectiveCounter.measure("all_gather", ([x.clone(), x.clone()], x), {})[0] == 48
    assert CollectiveCounter.measure("all_gather_into_tensor", (torch.zeros(6, 2, dtype=torch.int32), x), {})[0] == 48
    # FSDP2's parameter all-gather (torch 2.13: dist.all_gather_single), the whole output
    assert CollectiveCounter.measure("all_gather_single", (torch.zeros(12, dtype=torch.float32), x), {})[0] == 48
    obj_bytes = CollectiveCounter.measure("all_gather_object", ([None, None], {"a": 1}), {})[0]
    assert obj_bytes > 0 and obj_bytes % 2 == 0


def _worker(rank: int, world: int, port: int, mode: str, queue) -> None:
    import torch.distributed as dist
    from sparse_update import SparseMemoryFinetuner, SparseMemoryFinetuningArgs

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        counter = CollectiveCounter()          # installed after init, as in dist_worker.main
        values = torch.nn.Parameter(torch.zeros(N, 8))
        finetuner = SparseMemoryFinetuner(
            SparseMemoryFinetuningArgs(enabled=True, top_t=T, use_idf=False, count_exchange=mode), values)
        indices = torch.arange(rank * 5, rank * 5 + 10 + rank).view(1, -1)   # ranks read different slots
        counter.set_phase("selection")
        finetuner.update_trainable_indices(indices)
        counter.set_phase(None)
        sel = [c for c in counter.calls if c["phase"] == "selection"]
        counter.restore()
        queue.put((rank, {"ops": sorted({c["op"] for c in sel}),
                          "bytes": sum(c["bytes"] for c in sel),
                          "width_bytes": sum(c["bytes"] for c in sel if c["op"] == "all_reduce" and c["shape"] == [1]),
                          "reported": finetuner.count_bytes_last_step,
                          "restored": dist.all_gather is counter._orig["all_gather"]}))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_the_count_exchange_is_counted_on_two_ranks(mode):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(2, _free_port(), mode, queue), nprocs=2, join=True, start_method="spawn")
    got = dict(queue.get() for _ in range(2))
    for rank, r in got.items():
        assert r["restored"], rank
        assert r["bytes"] - r["width_bytes"] == r["reported"] > 0, (rank, r)
        if mode == "sparse":
            # one int64 width, then world x the largest rank's read slots (11) x (slot, count) int32
            assert r["ops"] == ["all_gather", "all_reduce"] and r["width_bytes"] == 8, r
            assert r["reported"] == 2 * 11 * 2 * 4
        else:
            assert r["ops"] == ["all_reduce"] and r["bytes"] == N * 4, r
