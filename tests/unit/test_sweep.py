"""recipes/sweep.py: points and commands of grids and presets, skipping finished points, local runs (with a
stand-in trainer), the Slurm array submission (a fake sbatch) and slurm/sweep_array.sh's point lookup."""
from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "recipes" / "configs" / "tiny_fact_learning.yaml"
FAKE_TRAIN = REPO / "tests" / "unit" / "fake_train.py"


def _load_sweep():
    spec = importlib.util.spec_from_file_location("sweep_recipe", REPO / "recipes" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module      # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


sweep = _load_sweep()


@pytest.fixture
def init_run(tmp_path: Path) -> Path:
    (tmp_path / "bg").mkdir()   # sweep.py only checks that it exists; train.py reads it
    return tmp_path / "bg"


def run_sweep(capsys, *argv: str) -> tuple[int, str, str]:
    rc = sweep.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def listed(out: str) -> dict[str, tuple[str, str]]:
    """name -> (status, command) from the dry-run listing."""
    rows = {}
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[1].startswith("["):
            rows[parts[0]] = (parts[1], parts[2] if len(parts) > 2 else "")
    return rows


def test_grid_dry_run_lists_points_and_commands(capsys, tmp_path, init_run):
    out_dir = tmp_path / "sweep"
    rc, out, _ = run_sweep(capsys, "--grid", "method=sparse t=500,1000 lr=2,0.1", "--grid", "method=full lr=1e-5",
                           "--base-config", BASE, "--init_from", init_run, "--out", out_dir, "--nproc", "2",
                           "--dry_run", "--eval.max_items=4")
    assert rc == 0
    rows = listed(out)
    assert list(rows) == ["sparse_t500_lr2", "sparse_t500_lr0.1", "sparse_t1000_lr2", "sparse_t1000_lr0.1",
                          "full_lr1e-5"]
    status, cmd = rows["sparse_t1000_lr0.1"]
    assert status == "[to run]"
    assert cmd.split() == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "recipes" / "train.py"), "--config", str(BASE),
                           f"--output_dir={out_dir / 'sparse_t1000_lr0.1'}", "--method=sparse",
                           "--sparse.top_t=1000", "--optim.lr=0.1", f"--init_from={init_run}", "--eval.max_items=4"]
    assert "--optim.lr=1e-5" in rows["full_lr1e-5"][1] and "--sparse.top_t" not in rows["full_lr1e-5"][1]
    assert not out_dir.exists()   # a dry run writes nothing


def test_presets_are_the_papers_grids():
    paper = sweep.build_points(sweep.load_preset("paper_fact_learning")[0]["grids"])
    sparse = [p for p in paper if p.overrides["method"] == "sparse"]
    assert {(p.overrides["sparse.top_t"], p.overrides["optim.lr"]) for p in sparse} == \
        {(t, lr) for t in (25, 50, 100, 200, 500, 1000) for lr in (0.1, 2)}
    assert "sparse_lr2_t500" in {p.name for p in sparse}
    full = {p.overrides["optim.lr"] for p in paper if p.overrides["method"] == "full"}
    assert {5e-6, 1e-5, 2e-5} <= full
    lora = [p.overrides for p in paper if p.overrides["method"] == "lora"]
    assert {o["lora.rank"] for o in lora} == {32, 128, 256}
    assert all(o["lora.alpha"] == 2 * o["lora.rank"] and o["optim.weight_decay"] == 0.1 for o in lora)
    assert len({o["optim.lr"] for o in lora}) >= 3
    tiny = sweep.build_points(sweep.load_preset("tiny_fact_learning")[0]["grids"])
    assert 2 <= len(tiny) <= 6 and {p.overrides["method"] for p in tiny} >= {"sparse", "full"}


def test_finished_points_are_skipped_and_the_rest_run(capsys, tmp_path, init_run):
    out_dir = tmp_path / "sweep"
    done = out_dir / "sparse_lr30_t1000"
    done.mkdir(parents=True)
    (done / "summary.json").write_text('{"fabricated": true}')
    args = ["--preset", "tiny_fact_learning", "--init_from", init_run, "--out", out_dir, "--max_steps=1"]
    (done / "config.yaml").write_text(f"fingerprint: {point_fingerprint(done, init_run)}\n")

    rc, out, _ = run_sweep(capsys, *args, "--dry_run")
    rows = listed(out)
    assert rc == 0 and rows["sparse_lr30_t1000"][0] == "[finished, skip]"
    assert all(status == "[to run]" for name, (status, _) in rows.items() if name != "sparse_lr30_t1000")

    # run for real with a stand-in trainer (same command line, no torch): only the unfinished points run
    rc, out, _ = run_sweep(capsys, *args, "--train_script", FAKE_TRAIN)
    assert rc == 0, out
    assert json.loads((done / "summary.json").read_text()) == {"fabricated": True}
    assert not (done / "sweep.log").exists()
    others = [out_dir / name for name in rows if name != "sparse_lr30_t1000"]
    for run_dir in others:
        assert json.loads((run_dir / "summary.json").read_text())["steps"] == 1
        config = (run_dir / "config.yaml").read_text()   # fake_train records the arguments it got
        assert f"init_from: {init_run}" in config and f"config: {BASE}" in config
    assert "lr: 300" in (out_dir / "sparse_lr300_t1000" / "config.yaml").read_text()
    # a second run has nothing left to do
    rc, out, _ = run_sweep(capsys, *args, "--train_script", FAKE_TRAIN)
    assert rc == 0 and "0 to run" in out and "running" not in out


def point_fingerprint(run_dir: Path, init_run: Path, **overrides) -> str:
    """What train.py would record for the point at run_dir (named METHOD_lrL[_tT]) on BASE."""
    from training.config import resolve_config

    method, rest = run_dir.name.split("_lr")
    lr, _, t = rest.partition("_t")
    cli = {"method": method, "optim.lr": lr, **({"sparse.top_t": t} if t else {}), "init_from": str(init_run),
           "output_dir": str(run_dir), **overrides}
    return resolve_config(str(BASE), cli).fingerprint()


def test_a_point_finished_with_another_config_is_an_error_or_rerun(capsys, tmp_path, init_run):
    out_dir = tmp_path / "sweep"
    args = ["--preset", "tiny_fact_learning", "--init_from", init_run, "--out", out_dir, "--max_steps=1"]
    old = out_dir / "sparse_lr30_t1000"
    old.mkdir(parents=True)
    (old / "summary.json").write_text('{"fabricated": true}')
    # finished by the same grid point but another config (here another seed): never silently reused
    (old / "config.yaml").write_text(f"fingerprint: {point_fingerprint(old, init_run, seed='7')}\n")
    rc, _, err = run_sweep(capsys, *args, "--train_script", FAKE_TRAIN)
    assert rc == 2 and "sparse_lr30_t1000 holds a finished run of another config" in err
    assert "--rerun_stale" in err and len(err.strip().splitlines()) == 1
    assert json.loads((old / "summary.json").read_text()) == {"fabricated": True}
    rc, out, _ = run_sweep(capsys, *args, "--train_script", FAKE_TRAIN, "--rerun_stale")
    assert rc == 0 and "sparse_lr30_t1000: finished with another config; running it again" in out
    assert json.loads((old / "summary.json").read_text())["steps"] == 1
    rc, out, _ = run_sweep(capsys, *args, "--train_script", FAKE_TRAIN)
    assert rc == 0 and "0 to run" in out


def test_failed_point_is_reported_and_the_sweep_goes_on(capsys, tmp_path, init_run):
    rc, out, _ = run_sweep(capsys, "--grid", "method=sparse lr=2 t=100,200", "--base-config", BASE,
                           "--init_from", init_run, "--out", tmp_path / "s", "--train_script", tmp_path / "missing.py")
    assert rc == 1
    assert out.count("FAILED") == 2 and "2 point(s) failed" in out


@pytest.mark.parametrize("args,needle", [
    (["--preset", "nope"], "no such preset"),
    (["--grid", "method=sparse lr"], "not KEY=V1,V2"),
    (["--grid", "method=sparse t=100000"], "sparse.top_t"),       # validated before anything runs
    (["--grid", "method=sparse lr=2", "--optim.lr=3"], "--optim.lr is a sweep key"),
    (["--grid", "method=sparse lr=2", "stray"], "unexpected argument"),
])
def test_bad_input_is_one_line(capsys, tmp_path, init_run, args, needle):
    rc, out, err = run_sweep(capsys, *args, "--base-config", BASE, "--init_from", init_run, "--out", tmp_path / "s")
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


def _fake_bin(tmp_path: Path, name: str, body: str) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    path = bindir / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return bindir


def test_slurm_submits_one_array_over_unfinished_points(capsys, tmp_path, init_run, monkeypatch):
    record = tmp_path / "sbatch.txt"
    bindir = _fake_bin(tmp_path, "sbatch", f'printf "%s\\n" "$@" "SWEEP_POINTS=$SWEEP_POINTS" "CONFIG=$CONFIG" '
                                          f'"NPROC=$NPROC_PER_NODE" > {record}\necho "Submitted batch job 42"\n')
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    out_dir = tmp_path / "sweep"
    (out_dir / "sparse_lr2_t100").mkdir(parents=True)
    (out_dir / "sparse_lr2_t100" / "summary.json").write_text("{}")
    (out_dir / "sparse_lr2_t100" / "config.yaml").write_text(
        f"fingerprint: {point_fingerprint(out_dir / 'sparse_lr2_t100', init_run, device='cpu')}\n")
    rc, out, _ = run_sweep(capsys, "--grid", "method=sparse lr=2 t=100,200,300", "--base-config", BASE,
                           "--init_from", init_run, "--out", out_dir, "--slurm", "--nproc", "2",
                           "--sbatch_args=--gres=none --cpus-per-task=2", "--device=cpu")
    assert rc == 0 and "Submitted batch job 42" in out
    words = record.read_text().splitlines()
    assert words[:3] == ["--array=0-1", "--gres=none", "--cpus-per-task=2"]
    assert words[3] == str(REPO / "slurm" / "sweep_array.sh")
    assert words[4:] == [f"SWEEP_POINTS={out_dir / 'sweep_points.tsv'}", f"CONFIG={BASE}", "NPROC=2"]
    lines = (out_dir / "sweep_points.tsv").read_text().splitlines()
    assert [l.split("\t")[:2] for l in lines] == [["sparse_lr2_t200", str(out_dir / "sparse_lr2_t200")],
                                                   ["sparse_lr2_t300", str(out_dir / "sparse_lr2_t300")]]
    assert lines[1].split("\t")[2].split() == ["--method=sparse", "--optim.lr=2", "--sparse.top_t=300",
                                               f"--init_from={init_run}", "--device=cpu"]


def test_array_task_reads_its_point(tmp_path):
    """slurm/sweep_array.sh hands task i's point to slurm/common.sh (a stub here) and skips finished ones."""
    repo = tmp_path / "repo"
    (repo / "slurm").mkdir(parents=True)
    (repo / "slurm" / "common.sh").write_text('echo "CONFIG=$CONFIG OUTPUT_DIR=$OUTPUT_DIR OVERRIDES=$OVERRIDES"\n')
    points = tmp_path / "points.tsv"
    points.write_text(f"a\t{tmp_path / 'a'}\t--method=sparse --optim.lr=2\nb\t{tmp_path / 'b'}\t--method=full --x=1\n")
    env = {**os.environ, "SWEEP_POINTS": str(points), "CONFIG": "base.yaml", "REPO_DIR": str(repo),
           "SLURM_JOB_ID": "7"}
    script = REPO / "slurm" / "sweep_array.sh"

    def task(i: int) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": str(i)},
                              capture_output=True, text=True, timeout=30)

    proc = task(1)
    assert proc.returncode == 0, proc.stderr
    assert f"CONFIG=base.yaml OUTPUT_DIR={tmp_path / 'b'} OVERRIDES=--method=full --x=1" in proc.stdout
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "summary.json").write_text("{}")
    proc = task(0)
    assert proc.returncode == 0 and "finished" in proc.stdout and "OVERRIDES" not in proc.stdout
    proc = task(2)
    assert proc.returncode == 2 and "no point 2" in proc.stderr


def test_plot_of_finished_points(capsys, tmp_path, init_run, monkeypatch):
    from evaluation import build_summary, write_summary

    monkeypatch.setenv("MPLBACKEND", "Agg")
    out_dir = tmp_path / "sweep"
    fabricated = {"sparse_lr2": ("sparse", 0.5, 0.6), "sparse_lr0.1": ("sparse", 0.2, 0.64),
                  "full_lr2": ("full", 0.8, 0.1)}
    for name, (method, new, known) in fabricated.items():
        run_dir = out_dir / name
        run_dir.mkdir(parents=True)
        write_summary(run_dir / "summary.json", build_summary(
            stage="finetune", method=method, steps=4, wall_time_s=1.0, trainable_params_per_step=1000,
            before={"new_facts/f1": 0.0, "known_facts/f1": 0.64}, after={"new_facts/f1": new, "known_facts/f1": known}))
        (run_dir / "config.yaml").write_text(f"fingerprint: {point_fingerprint(run_dir, init_run)}\nmethod: {method}\n"
                                             f"optim:\n  lr: {name.split('_lr')[1]}\n")
    png = tmp_path / "pareto.png"
    rc, out, _ = run_sweep(capsys, "--grid", "method=sparse,full lr=2,0.1", "--grid", "method=full lr=2",
                           "--base-config", BASE, "--init_from", init_run, "--out", out_dir, "--plot", png,
                           "--train_script", tmp_path / "missing.py")
    assert rc == 1 and "full_lr0.1: FAILED" in out           # the one unfabricated point failed to run
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = png.with_suffix(".md").read_text()
    assert "| optim.lr |" in table and len(table.splitlines()) == 2 + 3     # the finished points only


def test_slurm_array_may_start_from_the_run_its_dependency_writes(capsys, tmp_path, monkeypatch):
    """slurm/pipeline.sh submits the sweep before the background run exists, after it with afterok."""
    record = tmp_path / "sbatch.txt"
    bindir = _fake_bin(tmp_path, "sbatch", f'printf "%s\\n" "$@" > {record}\necho "Submitted batch job 7"\n')
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    later = tmp_path / "runs" / "background"          # not written yet
    args = ["--grid", "method=sparse lr=2 t=100", "--base-config", BASE, "--init_from", later,
            "--out", tmp_path / "sweep", "--slurm"]
    rc, _, err = run_sweep(capsys, *args)              # no dependency: a missing run is an error
    assert rc == 2 and "does not exist" in err, err
    rc, out, _ = run_sweep(capsys, *args, "--sbatch_args=--dependency=afterok:5 --gres=none")
    assert rc == 0 and "does not exist yet" in out and "Submitted batch job 7" in out, out
    assert record.read_text().splitlines()[:3] == ["--array=0-0", "--dependency=afterok:5", "--gres=none"]
    line = (tmp_path / "sweep" / "sweep_points.tsv").read_text()
    assert f"--init_from={later}" in line.split("\t")[2].split()
