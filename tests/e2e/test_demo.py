"""A cut-down `make demo` (few steps and facts, one point per method) through the same entry point."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.launch import REPO, env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]


@pytest.mark.parametrize("world", ["synthetic", "triviaqa"])
def test_quick_demo_produces_table_plots_and_summaries(tmp_path, world):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "recipes/demo.py", "--quick", "--world", world, "--out", str(out)], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| run | method |" in proc.stdout and "demo finished" in proc.stdout
    assert (out / "pareto.png").stat().st_size > 1000 and (out / "pareto_nll.png").stat().st_size > 1000
    results = (out / "results.md").read_text()
    assert "## Learning vs forgetting" in results and "## Memory diagnostics" in results
    assert "## Memory health of the base" in results and "slots_read_frac" in results
    sets = ["new_facts/f1", "known_facts/f1", "heldout_text/nll"]
    sets += ["gsm8k/nll", "hellaswag/acc_norm"] if world == "triviaqa" else ["new_facts/answer_nll"]
    methods = set()
    for run in (out / "finetune").iterdir():
        summary = json.loads((run / "summary.json").read_text())
        methods.add(summary["method"])
        for name in sets:
            entry = summary["metrics"][name]
            assert math.isfinite(entry["before"]) and math.isfinite(entry["after"]), (run.name, name)
        assert (run / "tensorboard").is_dir()
    assert methods == {"sparse", "tf_only", "full", "lora", "memory_all"}
