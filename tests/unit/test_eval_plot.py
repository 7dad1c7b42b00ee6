"""recipes/plot_pareto.py on fabricated run directories (written with evaluation.write_summary)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation import build_summary, write_summary

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "recipes" / "plot_pareto.py"

RUNS = [  # name, method, params/step, new f1 (before, after), known f1 (before, after), top_t, lr
    ("sparse_t500", "sparse", 512_000, (0.02, 0.70), (0.64, 0.60), 500, 2.0),
    ("sparse_t50", "sparse", 51_200, (0.02, 0.40), (0.64, 0.63), 50, 2.0),
    ("full_lr1e-5", "full", 22_000_000, (0.02, 0.80), (0.64, 0.20), None, 1e-5),
    ("lora_r32", "lora", 1_000_000, (0.02, 0.55), (0.64, 0.30), None, 2e-4),  # dominated by sparse_t500
]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def _make_runs(root: Path) -> list[Path]:
    dirs = []
    for name, method, params, new, known, top_t, lr in RUNS:
        d = root / name
        d.mkdir()
        write_summary(d / "summary.json", build_summary(
            stage="finetune", method=method, steps=100, wall_time_s=12.5, trainable_params_per_step=params,
            before={"new_facts/f1": new[0], "known_facts/f1": known[0], "gsm8k/nll": 1.5},
            after={"new_facts/f1": new[1], "known_facts/f1": known[1], "gsm8k/nll": 1.5 + (0.64 - known[1])}))
        (d / "config.yaml").write_text(f"sparse:\n  top_t: {top_t}\noptimizer:\n  lr: {lr}\n")
        dirs.append(d)
    return dirs


def test_plot_writes_png_and_table(tmp_path: Path) -> None:
    dirs = _make_runs(tmp_path)
    out = tmp_path / "plots" / "pareto.png"
    res = _run(*map(str, dirs), "--out", str(out), "--label-keys", "sparse.top_t,optimizer.lr", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    table = (tmp_path / "plots" / "pareto.md").read_text()
    assert table == res.stdout
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    assert len(rows) == 4
    front = {Path(k).name for k, line in rows.items() if line.rstrip(" |").endswith("yes")}
    assert front == {"sparse_t500", "sparse_t50", "full_lr1e-5"}  # lora is dominated by sparse_t500
    assert "| 512000 |" in rows[str(dirs[0])] and "| 500 | 2.0 |" in rows[str(dirs[0])]
    assert "-6.3%" in rows[str(dirs[0])]  # known f1 0.64 -> 0.60: -6.25% (float: -0.0625000...06)


def test_plot_lower_is_better_y(tmp_path: Path) -> None:
    dirs = _make_runs(tmp_path)
    out = tmp_path / "nll.png"
    res = _run(*map(str, dirs), "--out", str(out), "--y", "gsm8k/nll", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    front = {Path(line.split(" | ")[0].lstrip("| ")).name for line in res.stdout.splitlines()[2:]
             if line.rstrip(" |").endswith("yes")}
    assert front == {"sparse_t500", "sparse_t50", "full_lr1e-5"}


@pytest.mark.parametrize("case", ["no_summary", "missing_metric"])
def test_plot_refuses_bad_run_dir(tmp_path: Path, case: str) -> None:
    dirs = _make_runs(tmp_path)
    bad = tmp_path / "unfinished"
    bad.mkdir()
    (bad / "config.yaml").write_text("x: 1\n")
    args = [*map(str, dirs), str(bad)]
    if case == "missing_metric":
        write_summary(bad / "summary.json", build_summary(stage="finetune", method="sparse", steps=1,
                                                          wall_time_s=1.0, trainable_params_per_step=1,
                                                          before=None, after={"nq/f1": 0.1}))
    out = tmp_path / "p.png"
    res = _run(*args, "--out", str(out), cwd=tmp_path)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert str(bad) in lines[0]
    assert ("summary.json" in lines[0]) if case == "no_summary" else ("no metric 'new_facts/f1'" in lines[0])
    assert not out.exists()


def test_plot_on_a_sweep_folder_glob_skips_its_files(tmp_path: Path) -> None:
    """`plot_pareto.py runs/sweep/* ...` after `sweep.py --plot runs/sweep/pareto.png`: the glob also names
    the sweep's files; they are skipped with a note and the runs are plotted."""
    dirs = _make_runs(tmp_path)
    (tmp_path / "pareto.png").write_bytes(b"\x89PNG\r\n\x1a\n old plot")
    (tmp_path / "sweep_points.tsv").write_text("name\tstatus\n")
    entries = sorted(tmp_path.iterdir())
    out = tmp_path / "again" / "pareto.png"
    res = _run(*map(str, entries), "--out", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()[2:]) == len(dirs)
    assert f"skipping {tmp_path / 'pareto.png'}: not a run directory" in res.stderr
    only_files = _run(str(tmp_path / "sweep_points.tsv"), "--out", str(tmp_path / "x.png"), cwd=tmp_path)
    assert only_files.returncode != 0 and "no run directory among the arguments" in only_files.stderr
