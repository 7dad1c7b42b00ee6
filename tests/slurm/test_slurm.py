"""The slurm/*.sh scripts, submitted with sbatch to a real single-node Slurm cluster on this machine.

CPU mode (DEVICE=cpu, 2 processes, `sbatch --gres=none`), the tiny fact-learning config with small
overrides, finetuning the shared tiny base + background run (tests/conftest.py `tiny_runs`).
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from tests.launch import SMALL

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


def test_pipeline_chains_the_stages(slurm_cluster, tmp_path):
    """slurm/pipeline.sh submits pretrain -> background -> fact learning with afterok dependencies; the bare
    scripts' default run directories chain (RUNS/base -> RUNS/background -> RUNS/fact_learning)."""
    runs = tmp_path / "runs"
    logs = tmp_path / "slurm-logs"
    logs.mkdir()
    small = " ".join(SMALL)
    env = dict(slurm_cluster.env, DEVICE="cpu", NPROC_PER_NODE="2", RUNS=str(runs),
               CONFIG_PRETRAIN="recipes/configs/tiny_pretrain.yaml", OVERRIDES_PRETRAIN=f"--max_steps=2 {small}",
               CONFIG_BACKGROUND="recipes/configs/tiny_background.yaml",
               OVERRIDES_BACKGROUND=f"--sparse.background_batches=2 {small}",
               CONFIG_FACT="recipes/configs/tiny_fact_learning.yaml", OVERRIDES_FACT=f"--max_steps=2 {FINETUNE}")
    res = slurm_cluster.run("bash", "slurm/pipeline.sh", "--gres=none",
                            f"--cpus-per-task={min(2, os.cpu_count() or 1)}", "--time=10",
                            f"--output={logs}/%x-%j.out", env=env, check=False)
    assert res.returncode == 0, res.stderr
    jobs = res.stdout.split()
    assert len(jobs) == 3 and all(j.isdigit() for j in jobs), res.stdout
    assert f"afterok:{jobs[0]}" in slurm_cluster.job(jobs[1]).get("Dependency", "") or \
        finished(slurm_cluster.job(jobs[0])), slurm_cluster.job(jobs[1])
    for job, name in zip(jobs, ("base", "background", "fact_learning")):
        wait_done(slurm_cluster, job, runs / name, 400)
    assert json.loads((runs / "base" / "summary.json").read_text())["stage"] == "pretrain"
    assert json.loads((runs / "background" / "summary.json").read_text())["stage"] == "background"
    fact = json.loads((runs / "fact_learning" / "summary.json").read_text())
    assert fact["stage"] == "finetune" and fact["steps"] == 2
    assert f"--init_from={runs / 'base'}" in job_log(runs / "background", jobs[1])
    assert f"--init_from={runs / 'background'}" in job_log(runs / "fact_learning", jobs[2])
