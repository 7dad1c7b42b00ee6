"""Bad input to recipes/train.py: a one-line error naming the file or key, non-zero exit, no traceback,
nothing overwritten, and no pickle ever executed."""
from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch

from sparse_update import save_background_file
from tests.launch import SMALL, train
from training.checkpoint import list_checkpoints

MARKER = "/tmp/smf_pickle_executed"


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def dotted_global_pickle(module: str, dotted: str, arg: str) -> bytes:
    """A protocol-4 pickle calling `module`.`dotted`(arg): STACK_GLOBAL resolves a dotted name attribute by
    attribute, so an allowed module's own `os` attribute reaches os.system (what a module-wide allow-list let in)."""
    def text(s: str) -> bytes:
        b = s.encode()
        return b"\x8c" + bytes([len(b)]) + b                       # SHORT_BINUNICODE
    return (b"\x80\x04" + text(module) + text(dotted) + b"\x93"   # PROTO 4, STACK_GLOBAL
            + text(arg) + b"\x85" + b"R" + b".")                   # TUPLE1, REDUCE, STOP


def one_line_error(proc) -> str:
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.strip() and "Warning" not in l and "return func" not in l]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    return lines[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad_input") / "base"
    train("--config", "recipes/configs/tiny_pretrain.yaml", f"--output_dir={out}", "--max_steps=1", *SMALL, nproc=1)
    return out


def finetune(tmp_path, *args, init_from):
    return train("--config", "recipes/configs/tiny_fact_learning.yaml", f"--output_dir={tmp_path / 'ft'}",
                 f"--init_from={init_from}", "--method=tf_only", *SMALL, *args, nproc=1, check=False)


@pytest.mark.parametrize("args,needle", [
    (["--sparse.top_t=70000"], "sparse.top_t"),
    (["--optim.weight_decay=0.1"], "optim.weight_decay"),
    (["--data.facts=/nonexistent/facts.jsonl"], "/nonexistent/facts.jsonl"),
    (["--model.vocab_size=9000"], "tiny_bpe.model has 8192 tokens"),
])
def test_bad_settings(tmp_path, base, args, needle):
    assert needle in one_line_error(finetune(tmp_path, *args, init_from=base))


def test_malformed_jsonl_line_and_empty_dataset(tmp_path, base):
    good = open("data_pipeline/samples/triviaqa_validation_sample.jsonl").readline()
    bad = tmp_path / "facts.jsonl"
    bad.write_text(good + '{"question": "broken\n' + good)
    msg = one_line_error(finetune(tmp_path, f"--data.facts={bad}", init_from=base))
    assert str(bad) in msg and ":2" in msg
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert str(empty) in one_line_error(finetune(tmp_path, f"--data.facts={empty}", init_from=base))


def test_background_file_for_another_memory_size_and_pickled_background(tmp_path, base):
    other = tmp_path / "bg_other.pt"
    save_background_file(other, document_frequency=torch.zeros(16 ** 2, dtype=torch.int64), num_batches=3)
    msg = one_line_error(finetune(tmp_path, f"--sparse.background_file={other}", init_from=base))
    assert str(other) in msg and "N=256" in msg
    evil = tmp_path / "bg_evil.pt"
    evil.write_bytes(pickle.dumps(Evil()))
    if os.path.exists(MARKER):
        os.remove(MARKER)
    assert str(evil) in one_line_error(finetune(tmp_path, f"--sparse.background_file={evil}", init_from=base))
    assert not os.path.exists(MARKER)


def test_truncated_and_pickled_checkpoints_are_refused_without_executing(tmp_path, base):
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    ckpt = list_checkpoints(broken)[-1]
    values = ckpt / "values.safetensors"
    values.write_bytes(values.read_bytes()[: values.stat().st_size // 2])
    assert str(values) in one_line_error(finetune(tmp_path, init_from=broken))
    evil = tmp_path / "evil"
    shutil.copytree(base, evil)
    meta = list_checkpoints(evil)[-1] / "sharded" / ".metadata"
    meta.write_bytes(pickle.dumps(Evil()))
    if os.path.exists(MARKER):
        os.remove(MARKER)
    msg = one_line_error(finetune(tmp_path / "2", init_from=evil))
    assert "sharded" in msg and "refusing to load" in msg
    assert not os.path.exists(MARKER)
    assert meta.read_bytes() == pickle.dumps(Evil())          # nothing overwritten


@pytest.mark.parametrize("module,dotted", [("torch.distributed.checkpoint.metadata", "os.system"),
                                           ("torch.distributed.checkpoint.metadata", "torch.os.system"),
                                           ("torch", "os.system")])
def test_dotted_global_through_an_allowed_module_is_refused(tmp_path, base, module, dotted):
    """The DCP metadata unpickler allows exact (module, name) pairs only; a dotted name naming os.system
    through an allowed module must neither run nor load (it ran the command before this fix)."""
    evil = tmp_path / "evil"
    shutil.copytree(base, evil)
    meta = list_checkpoints(evil)[-1] / "sharded" / ".metadata"
    payload = dotted_global_pickle(module, dotted, f"touch {MARKER}")
    meta.write_bytes(payload)
    if os.path.exists(MARKER):
        os.remove(MARKER)
    msg = one_line_error(finetune(tmp_path / "ft", init_from=evil))
    assert "refusing to load" in msg and dotted in msg
    assert not os.path.exists(MARKER)
    assert meta.read_bytes() == payload


def test_exact_allow_list_unit() -> None:
    import io
    from training.safe_dcp import _MetadataUnpickler
    payload = dotted_global_pickle("torch.distributed.checkpoint.metadata", "os.system", "true")
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        _MetadataUnpickler(io.BytesIO(payload)).load()
    from torch.distributed.checkpoint.metadata import Metadata
    assert isinstance(_MetadataUnpickler(io.BytesIO(pickle.dumps(Metadata(state_dict_metadata={})))).load(), Metadata)


def test_existing_run_dir_of_another_config_is_not_touched(tmp_path, base):
    config = (base / "config.yaml").read_text()
    proc = train("--config", "recipes/configs/tiny_pretrain.yaml", f"--output_dir={base}", "--max_steps=1",
                 "--optim.lr=0.5", *SMALL, nproc=1, check=False)
    assert "holds a run with a different config" in one_line_error(proc)
    assert (base / "config.yaml").read_text() == config


@pytest.mark.distributed
def test_resume_with_another_world_size_is_refused(tmp_path, base):
    run = tmp_path / "ws"
    shutil.copytree(base, run)
    proc = train("--config", "recipes/configs/tiny_pretrain.yaml", f"--output_dir={run}", "--max_steps=2", *SMALL,
                 nproc=2, check=False)
    assert proc.returncode != 0
    assert "written by 1 ranks, this run has 2" in proc.stderr
