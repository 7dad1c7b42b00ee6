"""Faults survived under real 2-rank torchrun: kill -9 of a rank, a crash mid-save, a diverged replica,
a NaN loss. Faults in the trainer are injected with SMF_FAULT (training/faults.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.launch import REPO, SMALL, TRAIN, env, losses, summary, train
from training.checkpoint import list_checkpoints, load_tree

pytestmark = pytest.mark.distributed

FT = ["--config", "recipes/configs/tiny_fact_learning.yaml", "--sparse.top_t=20", "--optim.lr=50",
      "--eval.sets=[heldout_text]", "--checkpoint.interval=2", "--checkpoint.keep_latest=3", *SMALL,
      "--data.num_new_facts=6"]


def values_of(run_dir):
    return load_tree(list_checkpoints(run_dir)[-1] / "values.safetensors")["values"]


@pytest.fixture(scope="module")
def reference(tiny_runs):
    out = tiny_runs / "rel_reference"
    train(*FT, f"--output_dir={out}", f"--init_from={tiny_runs / 'bg'}")
    return out


def log_rows(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_kill_9_of_one_rank_resumes_and_matches_the_uninterrupted_run(tiny_runs, reference):
    out = tiny_runs / "rel_killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           str(TRAIN), *FT, f"--output_dir={out}", f"--init_from={tiny_runs / 'bg'}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    deadline = time.time() + 600
    while killed is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if (out / "metrics.jsonl").is_file() and 3 in losses(out):
            workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            if workers:
                killed = int(workers[-1])
                os.kill(killed, signal.SIGKILL)
    output, _ = proc.communicate(timeout=900)
    assert killed is not None, output[-3000:]
    assert proc.returncode == 0, output[-5000:]
    rows = log_rows(out)
    resumes = [i for i, r in enumerate(rows) if r["kind"] == "resume"]
    assert resumes, "the restarted workers did not resume from a checkpoint"
    restart_step = rows[resumes[-1]]["step"]
    after = [r for r in rows[resumes[-1]:] if r["kind"] == "train"]
    assert [r["step"] for r in after] == list(range(restart_step + 1, 7))   # each step once after the restart
    ref_facts = {r["step"]: r["fact_id"] for r in log_rows(reference) if r["kind"] == "train"}
    assert [r["fact_id"] for r in after] == [ref_facts[s] for s in range(restart_step + 1, 7)]
    assert losses(out) == losses(reference)       # the last logged value of every step
    assert summary(out)["metrics"] == summary(reference)["metrics"]
    assert torch.equal(values_of(out), values_of(reference))


def test_kill_9_after_a_checkpoint_resumes_to_the_uninterrupted_summary(tiny_runs, reference):
    """Every rank dies (kill -9) right after the step-4 checkpoint; the re-run resumes from it. Everything the
    summary reports comes from checkpointed state: updated rows (the union over all steps) and the memory
    diagnostics equal the uninterrupted run's (before: rows of steps 1-4 and the diagnostics were lost)."""
    out = tiny_runs / "rel_killed_after_save"
    proc = train(*FT, f"--output_dir={out}", f"--init_from={tiny_runs / 'bg'}", check=False,
                 extra=["--max-restarts=0"], env_extra={"SMF_FAULT": "crash_after_save:4"})
    assert proc.returncode != 0
    assert list_checkpoints(out)[-1].name == "step_000004" and not (out / "summary.json").exists()
    again = train(*FT, f"--output_dir={out}", f"--init_from={tiny_runs / 'bg'}")
    assert "resumed from" in again.stdout and "step_000004" in again.stdout
    got, want = summary(out), summary(reference)
    got.pop("wall_time_s"), want.pop("wall_time_s")
    assert got == want
    assert "memory/updated_rows" in got["diagnostics"]
    rows = lambda run: load_tree(run / "updated_rows.safetensors")["rows"]   # noqa: E731
    assert torch.equal(rows(out), rows(reference))
    picks = lambda run: load_tree(run / "selections.safetensors")   # noqa: E731  (every step's rows, fact)
    got_sel, want_sel = picks(out), picks(reference)
    assert got_sel["fact_ids"] == want_sel["fact_ids"] and len(got_sel["fact_ids"]) == 6
    for key in ("rows", "offsets", "steps"):
        assert torch.equal(got_sel[key], want_sel[key]), key
    train_steps = [r["step"] for r in log_rows(out) if r["kind"] == "train"]
    assert train_steps == sorted(set(train_steps))                          # one line per step
    assert torch.equal(values_of(out), values_of(reference))


def test_background_killed_after_its_checkpoint_resumes_to_the_uninterrupted_summary(tiny_runs):
    """Every rank dies right after the background checkpoint, before summary.json. The re-run redoes the stage
    from its first batch: the same document frequencies and health numbers as the uninterrupted `bg/` run
    (before: it resumed the stream past the counted batches and logged the stage twice)."""
    out = tiny_runs / "rel_bg_killed"
    cmd = ["--config", "recipes/configs/tiny_background.yaml", f"--output_dir={out}",
           f"--init_from={tiny_runs / 'pre'}", "--sparse.background_batches=3", *SMALL]
    proc = train(*cmd, check=False, extra=["--max-restarts=0"], env_extra={"SMF_FAULT": "crash_after_save:3"})
    assert proc.returncode != 0 and not (out / "summary.json").exists()
    assert [p.name for p in list_checkpoints(out)] == ["step_000003"]
    again = train(*cmd)
    assert "resumed from" in again.stdout
    got, want = summary(out), summary(tiny_runs / "bg")
    got.pop("wall_time_s"), want.pop("wall_time_s")
    assert got == want
    df = lambda run: load_tree(list_checkpoints(run)[-1] / "sparse.safetensors")["document_frequency"]  # noqa: E731
    assert torch.equal(df(out), df(tiny_runs / "bg"))
    kinds = [r["kind"] for r in log_rows(out)]
    assert kinds.count("background") == 1 and kinds.count("health") == 1      # the stage logged once


def test_crash_while_saving_leaves_the_previous_checkpoint_and_resumes(tiny_runs, reference):
    out = tiny_runs / "rel_crash_save"
    proc = train(*FT, f"--output_dir={out}", f"--init_from={tiny_runs / 'bg'}", check=False,
                 extra=["--max-restarts=0"], env_extra={"SMF_FAULT": "crash_in_save:4"})
    assert proc.returncode != 0
    assert [p.name for p in list_checkpoints(out)] == ["step_000002"]
    assert (out / "checkpoints" / "step_000004.tmp").is_dir()          # the half-written one is ignored
    again = train(*FT, f"--output_dir={out}", f"--init_from={tiny_runs / 'bg'}")
    assert "resumed from" in again.stdout and "step_000002" in again.stdout
    assert losses(out) == losses(reference)
    assert torch.equal(values_of(out), values_of(reference))


def test_diverged_replica_aborts_with_a_clear_message(tiny_runs):
    out = tiny_runs / "rel_diverge"
    proc = train(*FT, f"--output_dir={out}", f"--init_from={tiny_runs / 'bg'}", "--sparse.consistency_interval=1",
                 check=False, env_extra={"SMF_FAULT": "diverge:2:1"})
    assert proc.returncode != 0
    assert "differs between ranks in 1 rows at step 2" in proc.stderr
    assert not (out / "summary.json").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_runs):
    out = tiny_runs / "rel_nan"
    proc = train(*FT, f"--output_dir={out}", f"--init_from={tiny_runs / 'bg'}", check=False,
                 env_extra={"SMF_FAULT": "nan_loss:3"})
    assert proc.returncode != 0
    assert "the loss is not finite at step 3" in proc.stderr
    assert [p.name for p in list_checkpoints(out)] == ["step_000002"]
    assert torch.isfinite(values_of(out)).all()
    assert not (out / "summary.json").exists()
