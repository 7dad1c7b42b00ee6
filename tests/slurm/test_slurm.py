"""The slurm/*.sh scripts, submitted with sbatch to a real single-node Slurm cluster on this machine.

CPU mode (DEVICE=cpu, 2 processes, `sbatch --gres=none`), the tiny fact-learning config with small
overrides, finetuning the shared tiny base + background run (tests/conftest.py `tiny_runs`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.launch import SMALL

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}

# the trainer tests' small settings, and no evaluation or diagnostics: here only the launch, the signal
# path and the resume matter. --data.passes=3: 4 facts x 3 passes = 12 finetune steps available.
FINETUNE = " ".join([*SMALL, "--eval.sets=[]", "--logging.memory_diagnostics=False", "--data.passes=3"])


def submit(cluster, script: str, out_dir: Path, config: str, overrides: str, **env_extra: str) -> str:
    env = dict(cluster.env, DEVICE="cpu", NPROC_PER_NODE="2", CONFIG=f"recipes/configs/{config}",
               OUTPUT_DIR=str(out_dir), OVERRIDES=overrides, **env_extra)
    logs = out_dir.parent / "slurm-logs"
    logs.mkdir(exist_ok=True)
    # sbatch options override the scripts' #SBATCH GPU defaults: no GPUs here
    res = cluster.run("sbatch", "--parsable", "--gres=none", f"--cpus-per-task={min(2, os.cpu_count() or 1)}",
                      "--time=10", f"--output={logs}/%x-%j.out", f"slurm/{script}", env=env, check=False)
    assert res.returncode == 0, f"sbatch failed: {res.stderr}"
    return res.stdout.strip().split(";")[0]


def finished(info: dict) -> bool:
    return info.get("JobState") in TERMINAL


def job_log(out_dir: Path, job_id: str) -> str:
    path = out_dir / f"slurm-{job_id}.log"
    return path.read_text(errors="replace") if path.exists() else "(no log in the run directory)"


def wait_done(cluster, job_id: str, out_dir: Path, timeout: float) -> dict:
    info = cluster.wait(job_id, finished, timeout, "the job to finish")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", \
        f"job {job_id}: {info['JobState']} exit {info['ExitCode']}\n{job_log(out_dir, job_id)[-3000:]}"
    return info


@pytest.fixture(scope="module")
def base_run(tiny_runs) -> Path:
    """The background run of the shared tiny base (tests/conftest.py): what a finetune starts from."""
    return tiny_runs / "bg"


def test_fact_learning_job_completes(slurm_cluster, base_run, tmp_path):
    out = tmp_path / "run"
    t0 = time.monotonic()
    job = submit(slurm_cluster, "fact_learning.sh", out, "tiny_fact_learning.yaml",
                 f"--init_from={base_run} --max_steps=2 {FINETUNE}")
    info = wait_done(slurm_cluster, job, out, 300)
    print(f"\nfact_learning job: {time.monotonic() - t0:.1f}s")
    assert info["Restarts"] == "0"
    for name in ("config.yaml", "summary.json", "metrics.jsonl", f"slurm-{job}.log"):
        assert (out / name).is_file(), f"{name} missing from the run directory"
    assert (out / "tensorboard").is_dir() and any((out / "checkpoints").iterdir())
    assert not (out / "PREEMPTED").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["stage"] == "finetune"
    log = job_log(out, job)
    assert "nodes: 1 x 2 processes, device cpu" in log and "--device=cpu" in log


def test_failed_training_fails_the_job(slurm_cluster, tmp_path):
    out = tmp_path / "run"
    # finetune without --init_from (INIT_FROM= switches the chain default off): the trainer refuses in one
    # line, exit code 2
    job = submit(slurm_cluster, "fact_learning.sh", out, "tiny_fact_learning.yaml", "--max_steps=2", INIT_FROM="")
    info = slurm_cluster.wait(job, finished, 240, "the job to finish")
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", info
    assert info["Restarts"] == "0"
    log = job_log(out, job)
    assert "init_from" in log and "training failed" in log


def wait_for(cluster, job: str, out: Path, ready, what: str, timeout: float = 300) -> None:
    """Poll the run directory fast (a step takes a fraction of a second), the job state every 2 s."""
    deadline = last_check = time.monotonic()
    deadline += timeout
    while not ready():
        assert time.monotonic() < deadline, f"job {job}: no {what} after {timeout:.0f}s:\n{job_log(out, job)[-3000:]}"
        if time.monotonic() - last_check > 2:
            last_check = time.monotonic()
            info = cluster.job(job)
            assert not finished(info), f"job {job} ended before {what}: {info}\n{job_log(out, job)[-3000:]}"
        time.sleep(0.1)


def train_steps(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if r.get("kind") == "train"]


def test_preemption_signal_requeues_and_resumes(slurm_cluster, base_run, tmp_path):
    """Two preemptions of one job: a signal while the trainer is still starting (before its handler is
    installed; the batch shell re-sends it), then one mid-run. Each time: checkpoint, PREEMPTED, requeue,
    resume; in the end every step ran exactly once."""
    # Enough steps that neither stop can fall at the end however fast the machine runs the trainer. A step
    # takes 0.1-0.3 s. The batch shell forwards a signal no earlier than 5 s after its srun started (then every
    # RESIGNAL_S = 2 s), so up to ~7 s of steps may run between the signal and the stop. With 30 steps the
    # resumed run's remaining 15 once finished before the second signal reached it (CI: resumed [15, 30]);
    # 120 steps leave >= 80 after the first stop: 30 passes x 4 steps.
    steps_total = 120
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"
    t0 = time.monotonic()
    job = submit(slurm_cluster, "fact_learning.sh", out, "tiny_fact_learning.yaml",
                 f"--init_from={base_run} --max_steps={steps_total} {FINETUNE} --data.passes=30", RESIGNAL_S="2")
    log = lambda: job_log(out, job)  # noqa: E731

    # 1) as soon as srun has launched torchrun: the workers are still importing torch
    wait_for(slurm_cluster, job, out, lambda: "+ srun " in log(), "srun launch")
    # what Slurm does N seconds before the time limit with `--signal=B:USR1@N`: signal the batch shell only
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
    wait_for(slurm_cluster, job, out, lambda: "restart 1 on" in log(), "requeue")
    first_stop = train_steps(metrics)[-1] if train_steps(metrics) else 0
    assert 0 < first_stop < steps_total - 2, f"stopped at step {first_stop}\n{log()[-3000:]}"

    # 2) mid-run, once the resumed run has trained a step
    wait_for(slurm_cluster, job, out, lambda: train_steps(metrics)[-1] > first_stop, "step after the resume")
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
    info = wait_done(slurm_cluster, job, out, 400)
    print(f"\ntwice preempted fact_learning job: {time.monotonic() - t0:.1f}s")
    text = log()
    assert info["Restarts"] == "2", f"job was not requeued twice: {info}\n{text[-3000:]}"
    assert text.count("batch shell got SIGUSR1") == 2 and text.count("requeueing job") == 2, text[-3000:]
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", text)]
    assert len(resumed) == 2 and resumed[0] == first_stop and first_stop < resumed[1] < steps_total, resumed
    assert not (out / "PREEMPTED").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps_total
    # every step ran exactly once across the three runs of the job
    assert train_steps(metrics) == list(range(1, steps_total + 1)), train_steps(metrics)


def _sbatch_opts(logs: Path) -> list[str]:
    # sbatch options override the scripts' #SBATCH GPU defaults: no GPUs here
    return ["--gres=none", f"--cpus-per-task={min(2, os.cpu_count() or 1)}", "--time=10", f"--output={logs}/%x-%j.out"]


def _copy_checkout(dest: Path) -> Path:
    """The repository's files (tracked and untracked, not ignored: no .venv, data/ or runs/) as a user's checkout."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.mark.timeout(900)
def test_pipeline_of_bare_scripts_uses_their_default_run_directories(slurm_cluster, tmp_path):
    """`sbatch slurm/pretrain.sh`, then collect_background.sh, then fact_learning.sh, typed in a checkout with
    no OUTPUT_DIR or INIT_FROM: runs/base -> runs/background (from runs/base) -> runs/fact_learning-JOBID
    (from runs/background), all under the submit directory. Only the tiny configs and small overrides are
    set; each job waits on the previous one (afterok), as a user would wait for it."""
    checkout = _copy_checkout(tmp_path / "checkout")
    logs = tmp_path / "slurm-logs"
    logs.mkdir()
    small = " ".join(SMALL)
    stages = [("pretrain.sh", "tiny_pretrain.yaml", f"--max_steps=2 {small}"),
              ("collect_background.sh", "tiny_background.yaml", f"--sparse.background_batches=2 {small}"),
              ("fact_learning.sh", "tiny_fact_learning.yaml", f"--max_steps=2 {FINETUNE}")]
    jobs: list[str] = []
    for script, config, overrides in stages:
        env = dict(slurm_cluster.env, DEVICE="cpu", NPROC_PER_NODE="2", CONFIG=f"recipes/configs/{config}",
                   OVERRIDES=overrides)
        for key in ("OUTPUT_DIR", "INIT_FROM", "RUNS", "REPO_DIR"):
            env.pop(key, None)
        dep = [f"--dependency=afterok:{jobs[-1]}"] if jobs else []
        res = slurm_cluster.run("sbatch", "--parsable", *dep, *_sbatch_opts(logs), f"slurm/{script}", env=env,
                                cwd=checkout, check=False)
        assert res.returncode == 0, f"sbatch slurm/{script} failed: {res.stderr}"
        jobs.append(res.stdout.strip().split(";")[0])
    runs = checkout / "runs"
    t0 = time.monotonic()
    for job, out in zip(jobs, (runs / "base", runs / "background", runs / f"fact_learning-{jobs[2]}")):
        wait_done(slurm_cluster, job, out, 400)
    print(f"\nbare pretrain -> background -> fact_learning: {time.monotonic() - t0:.1f}s")
    assert json.loads((runs / "base" / "summary.json").read_text())["stage"] == "pretrain"
    assert json.loads((runs / "background" / "summary.json").read_text())["stage"] == "background"
    fact = json.loads((runs / f"fact_learning-{jobs[2]}" / "summary.json").read_text())
    assert fact["stage"] == "finetune" and fact["steps"] == 2
    assert sorted(p.name for p in runs.iterdir()) == ["background", "base", f"fact_learning-{jobs[2]}"]
    # the scripts found the checkout (not this repository) and chained through its runs/
    base_log = job_log(runs / "base", jobs[0])
    assert f"config:     {checkout / 'recipes/configs/tiny_pretrain.yaml'}" in base_log, base_log[-2000:]
    assert f"output_dir: {runs / 'base'}" in base_log and "--init_from" not in base_log
    assert f"--init_from={runs / 'base'}" in job_log(runs / "background", jobs[1])
    assert f"--init_from={runs / 'background'}" in job_log(runs / f"fact_learning-{jobs[2]}", jobs[2])


@pytest.mark.timeout(1200)
def test_pipeline_chains_the_stages(slurm_cluster, tmp_path):
    """slurm/pipeline.sh submits pretrain -> background -> fact learning with afterok dependencies, and with
    SWEEP_PRESET the tiny preset's job array after the background (afterok); every job finishes and the
    chain's run directories are RUNS/base -> RUNS/background -> RUNS/fact_learning and RUNS/sweep/POINT."""
    runs = tmp_path / "runs"
    logs = tmp_path / "slurm-logs"
    logs.mkdir()
    small = " ".join(SMALL)
    env = dict(slurm_cluster.env, DEVICE="cpu", NPROC_PER_NODE="2", RUNS=str(runs),
               CONFIG_PRETRAIN="recipes/configs/tiny_pretrain.yaml", OVERRIDES_PRETRAIN=f"--max_steps=2 {small}",
               CONFIG_BACKGROUND="recipes/configs/tiny_background.yaml",
               OVERRIDES_BACKGROUND=f"--sparse.background_batches=2 {small}",
               CONFIG_FACT="recipes/configs/tiny_fact_learning.yaml", OVERRIDES_FACT=f"--max_steps=2 {FINETUNE}",
               SWEEP_PRESET="tiny_fact_learning", OVERRIDES_SWEEP=f"--max_steps=2 {FINETUNE}")
    res = slurm_cluster.run("bash", "slurm/pipeline.sh", *_sbatch_opts(logs), env=env, check=False)
    assert res.returncode == 0, res.stderr
    jobs = res.stdout.split()
    assert len(jobs) == 4 and all(j.isdigit() for j in jobs), res.stdout + res.stderr
    pre, bg, fact, sweep = jobs
    assert f"afterok:{pre}" in slurm_cluster.job(bg).get("Dependency", "") or \
        finished(slurm_cluster.job(pre)), slurm_cluster.job(bg)
    # the array waits on the background job (afterok), not on the fact-learning job
    assert f"afterok:{bg}" in slurm_cluster.job(sweep).get("Dependency", "") or \
        finished(slurm_cluster.job(bg)), slurm_cluster.job(sweep)
    points = [line.split("\t")[0] for line in (runs / "sweep" / "sweep_points.tsv").read_text().splitlines()]
    assert points == ["sparse_lr30_t1000", "sparse_lr300_t1000", "full_lr0.0001", "lora_lr0.001_rank32"], points
    t0 = time.monotonic()
    for job, name in zip(jobs, ("base", "background", "fact_learning")):
        wait_done(slurm_cluster, job, runs / name, 400)
    assert json.loads((runs / "base" / "summary.json").read_text())["stage"] == "pretrain"
    assert json.loads((runs / "background" / "summary.json").read_text())["stage"] == "background"
    fact_summary = json.loads((runs / "fact_learning" / "summary.json").read_text())
    assert fact_summary["stage"] == "finetune" and fact_summary["steps"] == 2
    assert f"--init_from={runs / 'base'}" in job_log(runs / "background", bg)
    assert f"--init_from={runs / 'background'}" in job_log(runs / "fact_learning", fact)
    bg_end = slurm_cluster.job(bg)["EndTime"]
    for i, name in enumerate(points):
        info = wait_done(slurm_cluster, f"{sweep}_{i}", runs / "sweep" / name, 400)
        assert info["StartTime"] >= bg_end, (info["StartTime"], bg_end)     # ISO times: afterok held it
        summary = json.loads((runs / "sweep" / name / "summary.json").read_text())
        assert summary["stage"] == "finetune" and summary["steps"] == 2, summary
        log = "".join(p.read_text(errors="replace") for p in (runs / "sweep" / name).glob("slurm-*.log"))
        assert f"--init_from={runs / 'background'}" in log, log[-2000:]
    print(f"\npipeline with a 4-point sweep: {time.monotonic() - t0:.1f}s after submission")
