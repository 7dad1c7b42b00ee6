"""The benchmark runner works end to end on tiny sizes (`--smoke`); no timing is asserted.

It launches real subprocesses and torchrun (2 ranks, gloo) like the benchmarks do, hence the
`distributed` marker (so `make test-fast` skips it).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FLOAT_KEYS = ("smf_overhead_ratio", "sparse_vs_dense_time_ratio", "sparse_vs_dense_mem_ratio", "sync_bytes_ratio",
              "pk_vs_bruteforce_speedup", "memory_vs_ffn_time_ratio", "tokens_per_s_1rank", "tokens_per_s_2rank",
              "smf_overhead_ratio_stepper", "trainer_vs_plain_loop_ratio", "count_bytes_ratio",
              "smf_overhead_ratio_2rank", "smf_vs_union_sync_ratio_2rank", "cpu_parallel_capacity_2rank")


@pytest.mark.distributed
def test_runner_smoke_writes_every_figure(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = json.loads(out.read_text())
    assert results["profile"] == "smoke" and results["errors"] == {}
    assert isinstance(results["commit"], str) and len(results["commit"]) >= 7 and isinstance(results["dirty"], bool)
    for key in FLOAT_KEYS:
        value = results[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    assert results["pk_matches_bruteforce"] is True      # exactness holds at any size
    # the figures carry their inputs and machine
    machine = results["machine"]
    assert isinstance(machine["cpu_count"], int) and isinstance(machine["torch_threads"], int)
    assert isinstance(machine["torch_version"], str)
    items = results["items"]
    for name in ("smf_overhead", "smf_overhead_stepper", "trainer_vs_plain_loop", "sparse_vs_dense", "sync_traffic",
                 "pk_lookup", "memory_vs_ffn", "throughput"):
        assert "inputs" in items[name], name
    assert items["smf_overhead"]["inputs"]["N"] == 64 ** 2
    assert items["smf_overhead"]["step_s"]["smf"]["n"] == results["profile_sizes"]["reps"]
    # bytes counted at the collective agree with the finetuner's own account, and the ratio is exact
    sync = items["sync_traffic"]
    assert sync["counted_matches_reported"] is True
    # the count exchange's all_gather is counted too (the finetuner's count_bytes_last_step, plus its 8-byte width)
    assert sync["count_counted_matches_reported"] is True and sync["selection_bytes"] > 8
    n, d, t = sync["inputs"]["N"], sync["inputs"]["d"], sync["inputs"]["t"]
    assert sync["values_sync_bytes"] == (t * d + 1) * 4 and sync["dense_bytes"] == n * d * 4
    assert sync["values_checksum_equal_across_ranks_after_smf_step"] is True
    # the 2-rank figures time the trainer's own Stepper (beside the hand loop, memory_all and the re-implementation)
    assert sync["inputs"]["step"].startswith("training.step.Stepper.step") and sync["inputs"]["ranks"] == 2
    assert set(sync["step_s"]) == {"stepper", "plain", "union_sync", "reimpl"}
    assert all(v["n"] == results["profile_sizes"]["dist_reps"] for v in sync["step_s"].values())
    assert sync["selected_rows"] == t and sync["fsdp_allgather_bytes"] > 0   # FSDP2 shards the frozen weights
    for name, alt in items["pk_lookup"]["alternatives"].items():   # benchmark-local top-k variants
        assert alt["identical_to_ours"] is True, name
    # a CPU machine records why the CUDA throughput was skipped
    if not machine["cuda"]:
        assert "skipped" in items["throughput_cuda"]
    assert "smf_overhead_ratio" in proc.stdout           # the table was printed
