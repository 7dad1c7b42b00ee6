"""The run directory as a unit of record (one process): a completed stage is never rewritten, checkpoints are
replaced atomically and proven complete by a manifest, one run at a time holds a directory, resume checks
the checkpoint's own fingerprint, metrics.jsonl has one value per step, and every file follows the umask."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.launch import SMALL, losses, summary, train
from training import checkpoint as C


def snapshot(run_dir: Path) -> dict[str, tuple]:
    """Every file under run_dir: content hash, size, mtime, mode (a re-run must change none of them)."""
    out = {}
    for p in sorted(Path(run_dir).rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(run_dir))] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size,
                                                st.st_mtime_ns, st.st_mode)
    return out


def pretrain(out: Path, *args: str, check: bool = True, env_extra: dict | None = None):
    return train("--config", "recipes/configs/tiny_pretrain.yaml", f"--output_dir={out}", *SMALL, *args,
                 nproc=1, check=check, env_extra=env_extra)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A completed 2-step pretrain with a checkpoint at every step."""
    out = tmp_path_factory.mktemp("run_dir") / "pre"
    pretrain(out, "--max_steps=2", "--checkpoint.interval=1")
    return out


def test_rerun_of_a_completed_stage_leaves_it_exactly_as_it_was(done):
    before = snapshot(done)
    proc = pretrain(done, "--max_steps=2", "--checkpoint.interval=1")
    assert proc.returncode == 0
    assert proc.stdout.strip().splitlines() == [f"stage already complete in {done}"], proc.stdout
    assert snapshot(done) == before
    assert summary(done)["final_train_loss"] is not None
    # a shorter request is complete too (nothing is rolled back)
    assert pretrain(done, "--max_steps=1", "--checkpoint.interval=1").stdout.strip() == \
        f"stage already complete in {done}"
    assert snapshot(done) == before


def test_rerun_of_a_completed_finetune_leaves_its_results_byte_identical(done, tmp_path):
    """The finetune case of the test above: re-running the same finetune into its finished run directory
    used to resume and rewrite summary.json (its updated rows 1014 -> 0) and updated_rows.safetensors."""
    ft = tmp_path / "ft"
    args = ("--config", "recipes/configs/tiny_fact_learning.yaml", f"--output_dir={ft}", f"--init_from={done}",
            "--method=tf_only", "--max_steps=2", "--eval.sets=[]", *SMALL)
    train(*args, nproc=1)
    results = {name: (ft / name).read_bytes() for name in ("summary.json", "updated_rows.safetensors")}
    assert summary(ft)["diagnostics"]["memory/updated_rows"] > 0
    before = snapshot(ft)
    proc = train(*args, nproc=1)
    assert proc.stdout.strip().splitlines() == [f"stage already complete in {ft}"], proc.stdout
    assert {name: (ft / name).read_bytes() for name in results} == results
    assert snapshot(ft) == before


def test_a_longer_request_continues_and_metrics_hold_one_value_per_step(done, tmp_path):
    run = tmp_path / "longer"
    shutil.copytree(done, run)
    proc = pretrain(run, "--max_steps=3", "--checkpoint.interval=1")
    assert "resumed from" in proc.stdout and "step_000002" in proc.stdout
    assert summary(run)["steps"] == 3 and summary(run)["final_train_loss"] is not None


def test_resume_after_a_crash_drops_the_replayed_metrics_lines(tmp_path):
    """Killed mid-save of step 3 (after logging step 3): the resumed run logs step 3 again; metrics.jsonl
    must keep one line per step (it held step 3 twice before)."""
    run = tmp_path / "crash"
    proc = pretrain(run, "--max_steps=4", "--checkpoint.interval=1", check=False,
                    env_extra={"SMF_FAULT": "crash_in_save:3"})
    assert proc.returncode != 0
    assert [p.name for p in C.list_checkpoints(run)] == ["step_000001", "step_000002"]
    assert 3 in losses(run)
    pretrain(run, "--max_steps=4", "--checkpoint.interval=1")
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4], steps
    straight = tmp_path / "straight"
    pretrain(straight, "--max_steps=4", "--checkpoint.interval=1")
    assert losses(run) == losses(straight)
    drop = {"wall_time_s"}
    assert {k: v for k, v in summary(run).items() if k not in drop} == \
        {k: v for k, v in summary(straight).items() if k not in drop}


def test_results_follow_the_umask(done):
    want = 0o666 & ~0o022
    ckpt = C.list_checkpoints(done)[-1]
    for path in (done / "summary.json", done / "updated_rows.safetensors", ckpt / "values.safetensors",
                 ckpt / "sparse.safetensors", done / "config.yaml"):
        assert path.stat().st_mode & 0o777 == want, (path, oct(path.stat().st_mode))


def test_run_dir_lock_names_the_directory_and_the_holder(done, tmp_path):
    run = tmp_path / "locked"
    shutil.copytree(done, run)
    before = snapshot(run)
    with open(run / "run.lock", "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.seek(0), f.truncate(), f.write(f"{os.getpid()}\n"), f.flush()
        before = snapshot(run)
        proc = pretrain(run, "--max_steps=3", check=False)
    from tests.unit.test_bad_input import one_line_error
    msg = one_line_error(proc)
    assert str(run) in msg and f"pid {os.getpid()}" in msg
    assert snapshot(run) == before
    # the lock dies with its holder: a lock file left by a dead process does not block
    (run / "run.lock").write_text("999999\n")
    assert "resumed from" in pretrain(run, "--max_steps=3").stdout


def test_resume_checks_the_checkpoint_fingerprint_without_config_yaml(done, tmp_path):
    run = tmp_path / "noconfig"
    shutil.copytree(done, run)
    (run / "config.yaml").unlink()
    (run / "summary.json").unlink()
    before = snapshot(run)
    from tests.unit.test_bad_input import one_line_error
    msg = one_line_error(pretrain(run, "--max_steps=3", "--optim.lr=0.5", check=False))
    assert "holds a run with a different config" in msg and "trainer.json" in msg
    assert snapshot(run) == before


# ---- checkpoint replacement and the manifest (in process, no model) ----------------------------------
class FakeStrategy:
    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def save(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "shard.bin").write_bytes(self.payload)


def fake_save(run_dir: Path, step: int, payload: bytes) -> Path:
    info = SimpleNamespace(is_main=True, rank=0, world_size=1)
    return C.save_checkpoint(run_dir, step, strategy=FakeStrategy(payload), values=torch.arange(4.0),
                             values_optimizer=None, sparse_state=None, trainer_state={"stage": "pretrain"},
                             rank_state={}, dist_info=info, keep_latest=2)


def test_replacing_a_checkpoint_never_leaves_only_the_tmp_copy(tmp_path, monkeypatch):
    """A kill between moving the old copy aside and renaming the new one in: a complete checkpoint of that
    step is still listed (before: the old one was deleted first and only step_N.tmp held a good copy)."""
    fake_save(tmp_path, 5, b"old")
    real = os.replace
    calls = []

    def dying_replace(src, dst):
        calls.append((src, dst))
        if Path(src).name.startswith(C.PREFIX) and str(src).endswith(".tmp"):
            raise KeyboardInterrupt("killed")       # stands for the kill: nothing after it runs
        return real(src, dst)
    monkeypatch.setattr(C.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        fake_save(tmp_path, 5, b"new")
    monkeypatch.setattr(C.os, "replace", real)
    found = C.list_checkpoints(tmp_path)
    assert len(found) == 1 and C._step_of(found[0]) == 5
    C.verify_checkpoint(found[0])
    assert (found[0] / "sharded" / "shard.bin").read_bytes() == b"old"
    C.recover(tmp_path)
    assert [p.name for p in C.list_checkpoints(tmp_path)] == ["step_000005"]
    fake_save(tmp_path, 5, b"new")                   # and the next replacement completes
    assert (C.list_checkpoints(tmp_path)[0] / "sharded" / "shard.bin").read_bytes() == b"new"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000005"]


def test_the_manifest_is_written_last_and_checked_on_load(tmp_path):
    ckpt = fake_save(tmp_path, 1, b"x" * 100)
    manifest = json.loads((ckpt / C.MANIFEST).read_text())
    assert set(manifest["files"]) == {"sharded/shard.bin", "values.safetensors", "trainer.json"}
    shard = ckpt / "sharded" / "shard.bin"
    shard.write_bytes(b"x" * 50)
    with pytest.raises(ValueError, match=str(shard)):
        C.resolve_checkpoint(tmp_path)
    (ckpt / C.MANIFEST).unlink()              # trainer.json present, manifest missing: not complete
    assert C.list_checkpoints(tmp_path) == []
    with pytest.raises(ValueError, match="manifest"):
        C.resolve_checkpoint(ckpt)
