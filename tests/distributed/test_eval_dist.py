"""2-rank torchrun (gloo) evaluation gives bit-identical metrics to one process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "workers" / "eval_worker.py"
TIMEOUT_S = 300


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _run(cmd: list[str]) -> None:
    try:
        res = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"timed out after {TIMEOUT_S}s: {' '.join(cmd)}\n{e.stdout}\n{e.stderr}")
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_two_ranks_match_single_process(tmp_path: Path) -> None:
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
          str(tmp_path / "dist")])
    _run([sys.executable, str(WORKER), str(tmp_path / "single")])
    rank0, rank1 = _load(tmp_path / "dist" / "rank0.json"), _load(tmp_path / "dist" / "rank1.json")
    single = _load(tmp_path / "single" / "rank0.json")
    assert rank0["world_size"] == 2 and single["world_size"] == 1
    assert rank0["metrics"] == rank1["metrics"]        # every rank gets the reduced result
    assert rank0["metrics"] == single["metrics"]       # exactly (float hex), not approximately
    values = {k: float.fromhex(v) for k, v in single["metrics"].items()}
    # Not vacuous: the oracle gets 3 of 9 exactly right (Paris, the Beatles, Rome).
    assert values["oracle_qa/em"] == pytest.approx(3 / 9)
    assert 0 < values["oracle_qa/f1"] < 1 and values["heldout_text/nll"] > 0 and values["gsm8k/nll"] > 0
    assert values["suite_gsm8k/nll"] == values["gsm8k/nll"]
    assert set(values) >= {"hellaswag/acc", "hellaswag/acc_norm", "random_qa/f1", "suite_text/nll"}
    # Both ranks together ran the forwards the single process ran, split in lock-step.
    assert rank0["forwards"] == rank1["forwards"]
