"""Trainer callbacks (training/callbacks.py), in this process, no torchrun: a registered callback is called at
each hook point in order; the loss it returns is the one trained on; the fault callbacks act through the hooks;
the trainer no longer reads SMF_FAULT (the entry point turns it into a callback once)."""
from __future__ import annotations

import os

import pytest
import torch

from tests.launch import train
from training import faults, signals, trainer
from training.callbacks import Callback
from training.checkpoint import list_checkpoints
from training.config import resolve_config


def tiny(run_dir, **overrides):
    """A 2-layer tiny pretrain with a 32²-row memory: about a second per step on one CPU core."""
    return resolve_config("recipes/configs/tiny_pretrain.yaml", {
        "output_dir": str(run_dir), "max_steps": 3, "checkpoint.interval": 2, "logging.progress": False,
        "device": "cpu", "model.n_layers": 2, "model.memory_layers": [1], "model.memory.num_slots": 32 ** 2,
        "data.batch_size": 4, "data.seq_len": 32, "data.num_known_facts": 40, "data.fact_offset": 40,
        "data.num_new_facts": 4, "data.num_background_facts": 40, **overrides})


@pytest.fixture(autouse=True)
def in_process(monkeypatch):
    """No preemption handler in the test process; release the run-directory locks the runs take."""
    monkeypatch.setattr(signals, "install", lambda: None)
    held = len(trainer._held_locks)
    yield
    while len(trainer._held_locks) > held:
        os.close(trainer._held_locks.pop())


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_start(self, dist_info):
        self.calls.append(("start", dist_info.rank))

    def on_loss(self, step, loss):
        self.calls.append(("loss", step))
        return loss

    def on_step_end(self, step, *, values, metrics):
        assert values is not None and "train/loss" in metrics
        self.calls.append(("end", step))

    def in_save(self, step):
        self.calls.append(("in_save", step))

    def after_save(self, step):
        self.calls.append(("after_save", step))


def test_a_registered_callback_is_called_at_each_hook_in_order(tmp_path):
    rec = Recorder()
    summary = trainer.run(tiny(tmp_path / "run"), callbacks=[rec])
    assert summary["steps"] == 3
    assert rec.calls == [("start", 0), ("loss", 1), ("end", 1), ("loss", 2), ("end", 2), ("in_save", 2),
                         ("after_save", 2), ("loss", 3), ("end", 3), ("in_save", 3), ("after_save", 3)]


def test_the_loss_a_callback_returns_is_trained_on(tmp_path):
    """A NaN loss from on_loss at step 2 stops the run before updating, the step-1 checkpoint kept -- the
    nan_loss fault, here from the fault callback registered in process."""
    run_dir = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match="the loss is not finite at step 2"):
        trainer.run(tiny(run_dir, **{"checkpoint.interval": 1}), callbacks=[faults.parse("nan_loss:2")])
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_000001"]


def test_a_crash_in_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """crash_in_save through the in_save hook (os._exit made an exception here): the step-2 checkpoint was
    left half-written under its .tmp name and the step-1 one is still the latest complete."""
    class Died(BaseException):
        pass

    def die(code):
        raise Died(code)
    monkeypatch.setattr(faults.os, "_exit", die)
    run_dir = tmp_path / "crash"
    with pytest.raises(Died):
        trainer.run(tiny(run_dir, **{"checkpoint.interval": 1}), callbacks=[faults.parse("crash_in_save:2")])
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_000001"]
    assert (run_dir / "checkpoints" / "step_000002.tmp" / "sharded").is_dir()


def test_fault_callbacks_fire_on_their_step_and_rank_only():
    from training.distributed import DistInfo
    diverge = faults.parse("diverge:2:1")
    diverge.on_start(DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu")))
    values = torch.zeros(3, 2)
    diverge.on_step_end(1, values=values, metrics={})
    assert not values.any()
    diverge.on_step_end(2, values=values, metrics={})
    assert values[0].eq(1e-3).all() and not values[1:].any()
    other = faults.parse("diverge:2:1")
    other.on_start(DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu")))
    values = torch.zeros(3, 2)
    other.on_step_end(2, values=values, metrics={})
    assert not values.any()
    nan = faults.parse("nan_loss:3")            # no rank: every rank
    assert torch.isfinite(nan.on_loss(2, torch.tensor(1.0))) and torch.isnan(nan.on_loss(3, torch.tensor(1.0)))
    assert faults.from_env({}) == [] and faults.from_env({"SMF_FAULT": ""}) == []
    for bad in ("nan_loss", "nan_loss:x", "nan:3", "diverge:1:2:3"):
        with pytest.raises(ValueError, match="SMF_FAULT="):
            faults.from_env({"SMF_FAULT": bad})


def test_the_trainer_does_not_read_smf_fault(tmp_path, monkeypatch):
    monkeypatch.setenv("SMF_FAULT", "nan_loss:1")
    assert trainer.run(tiny(tmp_path / "env", max_steps=1))["steps"] == 1


def test_the_entry_point_turns_smf_fault_into_a_callback():
    """recipes/train.py reads SMF_FAULT once: a malformed one is a one-line error before anything runs."""
    proc = train("--config", "recipes/configs/tiny_pretrain.yaml", "--output_dir=/nonexistent/unused", nproc=1,
                 check=False, env_extra={"SMF_FAULT": "nan_loss"})
    assert proc.returncode == 2 and "error: SMF_FAULT='nan_loss' is not kind:step[:rank]" in proc.stderr
