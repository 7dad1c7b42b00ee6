"""recipes/inspect.py on a real finetune run: inspect.md + the overlap PNG, numbers checked against the run's own
selections; one-line errors; and the script's name does not shadow the standard library for its neighbours."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from tests.launch import REPO, SMALL, env, train
from training.checkpoint import list_checkpoints, load_tree

pytestmark = pytest.mark.distributed

INSPECT = REPO / "recipes" / "inspect.py"


def inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(INSPECT), *args], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def finetune(tiny_runs):
    out = tiny_runs / "inspect_ft"
    train("--config", "recipes/configs/tiny_fact_learning.yaml", f"--output_dir={out}",
          f"--init_from={tiny_runs / 'bg'}", "--sparse.top_t=20", "--optim.lr=50", "--eval.sets=[known_facts]", *SMALL,
          nproc=1)
    return out


def test_inspect_writes_the_report_and_the_heatmap(finetune):
    proc = inspect(str(finetune), "--background_batches=2", "--top_slots=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sel = load_tree(finetune / "selections.safetensors")
    off = sel["offsets"].tolist()
    per_step = [set(sel["rows"][off[i]:off[i + 1]].tolist()) for i in range(len(sel["fact_ids"]))]
    assert len(per_step) == 4 and all(len(s) == 20 for s in per_step)      # one fact per step, t rows each
    updated = set(load_tree(finetune / "updated_rows.safetensors")["rows"].tolist())
    assert set().union(*per_step) == updated
    pairs = [len(a & b) / len(a | b) for i, a in enumerate(per_step) for j, b in enumerate(per_step) if i != j]
    md = (finetune / "inspect.md").read_text()
    m = re.search(r"Jaccard of the row sets of two facts: mean ([0-9.]+), max ([0-9.]+)", md)
    assert m and float(m.group(1)) == pytest.approx(sum(pairs) / len(pairs), abs=1e-3)
    assert float(m.group(2)) == pytest.approx(max(pairs), abs=1e-3)
    for fact, rows in zip(sel["fact_ids"], per_step):
        assert re.search(rf"\| {re.escape(fact)} \| {len(rows)} \|", md), fact
    num_slots = load_tree(list_checkpoints(finetune)[-1] / "values.safetensors")["values"].shape[0]
    assert f"{len(updated)} of {num_slots} value rows updated" in md
    top = md.split("who reads them on background text")[1].split("## Slot usage")[0]
    assert len([l for l in top.splitlines() if re.match(r"\| \d+ \|", l)]) == 3
    assert "## Slot usage of the base (background lookups)" in md
    png = (finetune / "inspect_overlap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_inspect_bad_input_is_one_line(tiny_runs, tmp_path):
    for args, needle in ([str(tiny_runs / "pre")], "selections.safetensors"), \
                        ([str(tmp_path / "nowhere")], "no such run directory"), \
                        ([str(tiny_runs / "pre"), "--top_slots=x"], "malformed option"):
        proc = inspect(*args)
        assert proc.returncode != 0
        lines = [l for l in proc.stderr.splitlines() if l.strip()]
        assert lines[0].startswith("error: ") and needle in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr


def test_the_name_does_not_shadow_the_standard_library_for_the_other_recipes():
    """Every script in recipes/ has that folder as sys.path[0]; `import inspect` there must still give the
    standard library's module (dataclasses, asyncio and torch need inspect.signature)."""
    code = "import inspect, dataclasses; print(inspect.__file__); print(callable(inspect.signature))"
    proc = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(INSPECT.parent)!r}); {code}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    path, ok = proc.stdout.split()
    assert "recipes" not in path and ok == "True"
