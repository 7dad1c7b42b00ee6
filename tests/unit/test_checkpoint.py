"""checkpoint.save_checkpoint / checkpoint.restore in this process (one rank, no torchrun): a round trip of
the model, both optimizers (the strategy's and the values lane's), the values table, the finetuner's state,
the data stream's position and the run's progress; a damaged checkpoint is a one-line error."""
from __future__ import annotations

import shutil

import pytest
import torch

from training import checkpoint as C
from training import trainer
from training.callbacks import Callback
from training.checkpoint import Progress
from training.distributed import DistInfo
from training.metrics import MetricsLogger
from training.step import Stepper
from tests.unit.test_callbacks import tiny

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def same(a, b, where="") -> None:
    """Nested dicts/lists of tensors and plain values are equal (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def state_of(parts) -> dict:
    return {"model": parts.strategy.module.state_dict(), "values": parts.values,   # the table: outside the module
            "dense_optim": parts.strategy.optimizer.state_dict(),
            "values_optim": parts.lane.optimizer.state_dict(), "sparse": parts.finetuner.state_dict(),
            "stream": parts.stream.state_dict()}


def save(run_dir, parts, progress, callbacks=None):
    return C.save_checkpoint(run_dir, progress.step, strategy=parts.strategy, values=parts.values,
                             values_optimizer=parts.lane.optimizer, sparse_state=parts.finetuner.state_dict(),
                             trainer_state={"stage": "pretrain", "method": "-", "metrics_offset": None},
                             rank_state={"stream": parts.stream.state_dict()}, dist_info=CPU, keep_latest=2,
                             run_state=C.progress_state(progress), callbacks=callbacks)


def restore(run_dir, config, parts, dist_info=CPU):
    return C.restore(run_dir, config, dist_info, strategy=parts.strategy, values=parts.values,
                     values_optimizer=parts.lane.optimizer, finetuner=parts.finetuner, stream=parts.stream,
                     log=MetricsLogger(run_dir, enabled=False), lora_names=set())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two pretrain steps (AdamW on both lanes, so both optimizers hold state), then a checkpoint."""
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    config = tiny(run_dir)
    parts = trainer._setup(config, CPU)
    stepper = Stepper(config=config, strategy=parts.strategy, finetuner=parts.finetuner, values_lane=parts.lane,
                      device=CPU.device, total_steps=3)
    metrics = [stepper.step(next(parts.stream), i) for i in range(2)]
    rows = parts.finetuner.trainable_indices.cpu()
    updated = torch.zeros(parts.values.shape[0], dtype=torch.bool)
    updated[rows] = True
    progress = Progress(step=2, metrics=metrics[-1], updated=updated,
                        selections=[(0, "None", rows[:5].to(torch.int32)), (1, "None", rows[5:7].to(torch.int32))])
    ckpt = save(run_dir, parts, progress)
    return config, run_dir, ckpt, state_of(parts), progress, next(parts.stream)


def test_save_then_restore_gives_back_every_piece_of_state(saved):
    config, run_dir, ckpt, state, progress, next_batch = saved
    fresh = trainer._setup(config, CPU)
    assert not torch.equal(fresh.values, state["values"])   # the steps moved it: a real test
    step, run_state, message = restore(run_dir, config, fresh)
    assert step == 2 and message == f"resumed from {ckpt} at step 2"
    same(state_of(fresh), state)
    assert torch.equal(next(fresh.stream).tokens, next_batch.tokens)        # the stream goes on where it was
    back = Progress(step=step, updated=torch.zeros_like(progress.updated), selections=[])
    C.restore_progress(back, run_state)
    assert back.metrics == {"train/loss": progress.metrics["train/loss"]}
    same(back.updated, progress.updated)
    same(back.selections, progress.selections)


def test_replacing_a_checkpoint_calls_in_swap_with_its_step(saved, tmp_path):
    config, run_dir, _, _, progress, _ = saved
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    seen = []

    class Swap(Callback):
        def in_swap(self, step):
            seen.append(step)
    parts = trainer._setup(config, CPU)
    restore(copy, config, parts)
    save(copy, parts, progress, callbacks=[Swap()])
    assert seen == [2] and [p.name for p in C.list_checkpoints(copy)] == ["step_000002"]


def damage_truncate(ckpt):
    path = ckpt / "values.safetensors"
    path.write_bytes(path.read_bytes()[:-16])
    return f"checkpoint file {path} is truncated or corrupted"


def damage_garble(ckpt):            # same size, so only reading it finds out
    path = ckpt / "sparse.safetensors"
    path.write_bytes(b"\xff" * path.stat().st_size)
    return f"checkpoint file {path} is truncated or corrupted"


def damage_delete(ckpt):
    path = ckpt / "run_state.safetensors"
    path.unlink()
    return f"checkpoint file {path} is missing"


def damage_manifest(ckpt):
    (ckpt / C.MANIFEST).write_text("{")
    return f"checkpoint {ckpt} is incomplete: its manifest {ckpt / C.MANIFEST} is missing or unreadable"


@pytest.mark.parametrize("damage", [damage_truncate, damage_garble, damage_delete, damage_manifest])
def test_a_damaged_checkpoint_is_a_one_line_error(saved, tmp_path, damage):
    config, run_dir, ckpt, _, _, _ = saved
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    want = damage(copy / "checkpoints" / ckpt.name)
    parts = trainer._setup(config, CPU)
    with pytest.raises(ValueError) as err:
        restore(copy, config, parts)
    message = str(err.value)
    assert "\n" not in message and message.startswith(want), message


def test_a_checkpoint_without_its_manifest_is_not_resumed(saved, tmp_path):
    """The manifest is written last: without it the save never finished, and the run starts afresh."""
    config, run_dir, ckpt, _, _, _ = saved
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "checkpoints" / ckpt.name / C.MANIFEST).unlink()
    assert C.list_checkpoints(copy) == []
    parts = trainer._setup(config, CPU)
    assert restore(copy, config, parts) == (0, None, None)     # no complete checkpoint: a fresh start


def test_resuming_with_another_world_size_is_a_one_line_error(saved):
    config, run_dir, ckpt, _, _, _ = saved
    parts = trainer._setup(config, CPU)
    two = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"written by 1 ranks, this run has 2; resume with the same number"):
        restore(run_dir, config, parts, dist_info=two)
