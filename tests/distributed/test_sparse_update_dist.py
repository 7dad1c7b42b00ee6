"""sparse_update across two real processes (torchrun, gloo): one launch, many checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "workers" / "sparse_update_worker.py"
TOP_T, DIM = 6, 8


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("sparse_update_dist")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKER), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def both(results: list[dict], key: str) -> list:
    """The value each rank reported for `key`."""
    return [r[key] for r in results]


def test_two_ranks_ran(results: list[dict]) -> None:
    assert [r["world_size"] for r in results] == [2, 2]


def test_background_statistics_equal_single_process(results: list[dict]) -> None:
    for key in ("bg_counts_equal_single_process", "bg_df_equal_single_process", "bg_access_equal_single_process",
                "bg_file_roundtrip"):
        assert both(results, key) == [True, True], key
    assert both(results, "bg_num_batches") == [6, 6]
    assert both(results, "bg_local_df_differs") == [True, True]  # the ranks' data really differ


@pytest.mark.parametrize("run", ["sparse", "dense", "all_accessed", "tf", "kl", "seq_tfidf", "exchange_dense",
                                 "exchange_sparse"])
def test_attached_runs_stay_identical_and_update_only_selected_rows(results: list[dict], run: str) -> None:
    for check in ("same_selection_as_single_process", "stats_same_on_all_ranks", "changed_rows_are_selected_rows",
                  "identical_across_ranks"):
        assert both(results, f"{run}/{check}") == [True, True], check
    assert both(results, f"{run}/max_diff_across_ranks") == [0.0, 0.0]
    # Averaged gradient rows == the gradient of the global-batch mean loss (up to float rounding).
    assert max(both(results, f"{run}/max_diff_vs_single_process")) < 1e-5
    selected = results[0][f"{run}/selected_per_step"]
    if run == "all_accessed":
        assert min(selected) > TOP_T  # the union of accessed rows, not the top-t
    else:
        assert selected == [TOP_T] * 3
    rows = results[0][f"{run}/synced_rows_last_step"]
    assert rows == selected[-1]
    assert both(results, f"{run}/synced_bytes_last_step") == [(rows * DIM + 1) * 4] * 2  # fp32 rows + 1 flag


def test_control_without_attach_diverges(results: list[dict]) -> None:
    # Masked but not synced: each rank applies its own gradient, so the replicated tables drift apart.
    assert both(results, "control_no_attach/identical_across_ranks") == [False, False]
    assert min(both(results, "control_no_attach/max_diff_across_ranks")) > 0
    assert both(results, "control_no_attach/same_selection_as_single_process") == [True, True]
    assert both(results, "control_no_attach/synced_bytes_last_step") == [0, 0]


def test_rank_without_gradient(results: list[dict]) -> None:
    for check in ("identical_across_ranks", "changed_rows_within_selection", "something_changed",
                  "none_anywhere_no_change"):
        assert both(results, f"missing_grad/{check}") == [True, True], check


def test_the_rankings_choose_differently(results: list[dict]) -> None:
    """tf, kl and seq_tfidf (each equal to one process on the global batch above) are not TF-IDF in disguise."""
    tfidf = results[0]["sparse/selections"]
    for ranking in ("tf", "kl", "seq_tfidf"):
        assert results[0][f"{ranking}/selections"] != tfidf, ranking


def test_count_exchanges_select_alike_and_auto_takes_the_cheaper(results: list[dict]) -> None:
    """dense (N int32 all-reduced) and sparse (each rank's (slot, count) pairs all-gathered) give the same
    selections as one process on the global batch (checked above) and so as each other; auto moves the fewer
    bytes of the two."""
    r = results[0]
    assert r["exchange_dense/selections"] == r["exchange_sparse/selections"] == r["sparse/selections"]
    dense, sparse, auto = (r[f"{n}/count_bytes_last_step"] for n in ("exchange_dense", "exchange_sparse", "sparse"))
    assert dense == 256 * 4                                   # N int32 counts
    widest = max(x["exchange_sparse/read_slots_last_step"] for x in results)
    assert sparse == 2 * widest * 8                           # 2 ranks x (slot, count) int32 pairs, padded
    assert auto == min(dense, sparse)
