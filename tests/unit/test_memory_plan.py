"""benchmarks/memory_plan.py against counts made by hand from the tiny preset's shapes."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from benchmarks.memory_plan import plan
from model import make_config

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def tiny_dense_params() -> int:
    c = make_config("tiny")
    m = c.memory
    attention = 4 * c.dim * c.dim
    norms = 2 * c.dim
    ffn = 3 * c.dim * c.ffn_hidden
    memory = (c.dim * m.heads * m.k_dim + m.heads * m.k_dim            # query (with bias)
              + m.heads * 2 * math.isqrt(m.num_slots) * (m.k_dim // 2)  # two sub-key tables per head
              + c.dim * m.value_dim + m.value_dim * c.dim)             # gate and output projections
    blocks = sum(attention + norms + (memory if i in c.memory_layers else ffn) for i in range(c.n_layers))
    return 2 * c.vocab_size * c.dim + c.dim + blocks                  # embeddings + output, final norm


def test_tiny_plan_matches_the_hand_count():
    c = make_config("tiny")
    dense = tiny_dense_params()
    n, d = c.memory.num_slots, c.memory.value_dim
    z3 = plan("tiny", world_size=4, strategy="zero3", dtype="fp32", method="full", seq_len=32, batch=8)
    assert z3["params"] == {"dense": dense, "memory_values": n * d}
    r = z3["per_rank_bytes"]
    assert r["dense_params"] == math.ceil(dense / 4) * 4
    assert r["dense_grads"] == math.ceil(dense / 4) * 4
    assert r["dense_optimizer"] == math.ceil(dense / 4) * 8            # two fp32 moments, no master in fp32
    assert r["values_table"] == n * d * 4
    assert r["values_grad"] == n * d * 4 and r["values_optimizer"] == n * d * 8

    z1 = plan("tiny", world_size=4, strategy="zero1", dtype="bf16", method="full")
    assert z1["per_rank_bytes"]["dense_params"] == dense * 2 and z1["per_rank_bytes"]["dense_grads"] == dense * 2
    assert z1["per_rank_bytes"]["dense_optimizer"] == math.ceil(dense / 4) * 12   # + fp32 master with bf16

    sparse = plan("tiny", world_size=2, strategy="fsdp2", dtype="fp32", method="sparse", seq_len=16, batch=4,
                  top_t=50)["per_rank_bytes"]
    lookups = 2 * 16 * c.memory.heads * c.memory.k * len(c.memory_layers)   # this rank's 2 rows of 16 tokens
    assert sparse["dense_grads"] == 0 and sparse["dense_optimizer"] == 0 and sparse["values_optimizer"] == 0
    assert sparse["values_grad_before_mask"] == lookups * (d * 4 + 8)
    assert sparse["values_grad"] == 50 * (d * 4 + 8)
    assert sparse["dense_params"] >= dense * 4 / 2                        # dim-0 shards round up


def test_paper_values_table_is_exactly_n_times_d_and_every_strategy_runs(tmp_path):
    for strategy in ("fsdp2", "zero1", "zero2", "zero3"):
        out = tmp_path / f"{strategy}.json"
        proc = subprocess.run([sys.executable, "-m", "benchmarks.memory_plan", "--preset", "paper-1.3b",
                               "--world_size", "8", "--strategy", strategy, "--dtype", "fp32", "--out", str(out)],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        result = json.loads(out.read_text())
        assert result["per_rank_bytes"]["values_table"] == 4_294_967_296
        assert result["per_rank_total_bytes"] > result["per_rank_bytes"]["values_table"]


@pytest.mark.parametrize("args,needle", [(["--strategy", "ring"], "--strategy"), (["--dtype", "fp8"], "--dtype"),
                                         (["--method", "lora"], "--method"), (["--world_size", "0"], "--world_size")])
def test_bad_options_fail_in_one_line(args, needle):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory_plan", "--preset", "tiny", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and needle in proc.stderr
