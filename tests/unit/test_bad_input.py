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


def tamper(path, payload: bytes) -> None:
    """Write `payload` over a checkpoint file and update the checkpoint's manifest to match, as an attacker
    would: the manifest proves a save finished, it is no defence against a crafted file."""
    import json
    from pathlib import Path
    path = Path(path)
    path.write_bytes(payload)
    ckpt = next(p for p in path.parents if (p / "COMPLETE.json").is_file())
    manifest = json.loads((ckpt / "COMPLETE.json").read_text())
    manifest["files"][str(path.relative_to(ckpt))] = len(payload)
    (ckpt / "COMPLETE.json").write_text(json.dumps(manifest))


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
    tamper(meta, pickle.dumps(Evil()))
    if os.path.exists(MARKER):
        os.remove(MARKER)
    msg = one_line_error(finetune(tmp_path / "2", init_from=evil))
    assert "sharded" in msg and "refusing to load" in msg
    assert not os.path.exists(MARKER)
    assert meta.read_bytes() == pickle.dumps(Evil())          # nothing overwritten


DOTTED = [("torch.distributed.checkpoint.metadata", "os.system"),
          ("torch.distributed.checkpoint.metadata", "torch.os.system"), ("torch", "os.system")]


def checkpoint_contents(run_dir) -> dict:
    """What a refused load must leave alone: every checkpoint file, the stage's results and its recorded
    config, by content (run.lock only holds the pid of whoever holds the lock)."""
    run_dir = Path(run_dir)
    kept = ("summary.json", "updated_rows.safetensors", "config.yaml", "PREEMPTED")
    files = [p for p in sorted(run_dir.rglob("*")) if p.is_file() and
             (p.relative_to(run_dir).parts[0] == "checkpoints" or p.name in kept)]
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.parametrize("entry", ["init_from", "resume", "evaluate"])
@pytest.mark.parametrize("module,dotted", DOTTED)
def test_dotted_global_through_an_allowed_module_is_refused(tmp_path, base, module, dotted, entry):
    """The DCP metadata unpickler allows exact (module, name) pairs only; a dotted name naming os.system
    through an allowed module must neither run nor load (it ran the command before this fix), whichever way
    the checkpoint is reached: `--init_from`, resuming the run that holds it, or `evaluate.py --checkpoint`."""
    evil = tmp_path / "evil"
    shutil.copytree(base, evil)
    meta = list_checkpoints(evil)[-1] / "sharded" / ".metadata"
    payload = dotted_global_pickle(module, dotted, f"touch {MARKER}")
    tamper(meta, payload)
    before = checkpoint_contents(evil)
    if os.path.exists(MARKER):
        os.remove(MARKER)
    if entry == "init_from":
        proc = finetune(tmp_path / "ft", init_from=evil)
    elif entry == "resume":    # the same stage, asked for one step more: it resumes from the crafted checkpoint
        proc = train("--config", "recipes/configs/tiny_pretrain.yaml", f"--output_dir={evil}", "--max_steps=2",
                     *SMALL, nproc=1, check=False)
    else:
        proc = recipe("evaluate.py", "--checkpoint", evil)
    msg = one_line_error(proc)
    assert "refusing to load" in msg and dotted in msg and str(evil) in msg, msg
    assert not os.path.exists(MARKER)
    assert meta.read_bytes() == payload
    assert checkpoint_contents(evil) == before


def test_exact_allow_list_unit() -> None:
    import io
    from training.safe_dcp import _MetadataUnpickler
    payload = dotted_global_pickle("torch.distributed.checkpoint.metadata", "os.system", "true")
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        _MetadataUnpickler(io.BytesIO(payload)).load()
    from torch.distributed.checkpoint.metadata import Metadata
    assert isinstance(_MetadataUnpickler(io.BytesIO(pickle.dumps(Metadata(state_dict_metadata={})))).load(), Metadata)


def test_zero_safe_torch_load_refuses_a_reduce_pickle_without_running_it(tmp_path) -> None:
    """DeepSpeed's checkpoint files (torch.save pickles) go through zero._safe_torch_load: a `__reduce__`
    payload, plain or as a dotted protocol-4 global, is refused and never runs; a plain tensor file loads."""
    from training.parallel.zero import _safe_torch_load
    plain, dotted, good = tmp_path / "reduce.pt", tmp_path / "dotted.pt", tmp_path / "good.pt"
    plain.write_bytes(pickle.dumps(Evil()))
    dotted.write_bytes(dotted_global_pickle("torch", "os.system", f"touch {MARKER}"))
    torch.save({"w": torch.arange(3.0)}, good)
    for path in (plain, dotted):
        if os.path.exists(MARKER):
            os.remove(MARKER)
        with pytest.raises(pickle.UnpicklingError):
            _safe_torch_load(str(path))
        assert not os.path.exists(MARKER), path
    assert torch.equal(_safe_torch_load(str(good))["w"], torch.arange(3.0))


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


# ---- every numeric range, every bad path, through the real CLIs: one line naming the key or file, a
# non-zero exit, and no file of the existing run (`base`) changed --------------------------------------
import hashlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from tests.launch import REPO, env  # noqa: E402


def snapshot(run_dir) -> dict:
    return {str(p.relative_to(run_dir)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns,
                                          p.stat().st_mode)
            for p in sorted(Path(run_dir).rglob("*")) if p.is_file()}


def recipe(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "recipes" / script), *map(str, args)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=600)


def one_error_line(proc) -> str:
    """Exit != 0, exactly one line (warnings aside) carrying 'error:', no traceback."""
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if l.strip() and "Warning" not in l and "return func" not in l]
    assert len(lines) == 1 and "error: " in lines[0], proc.stderr[-3000:]
    return lines[0]


RANGES = [
    ("--data.num_known_facts=-5", "data.num_known_facts"), ("--data.num_new_facts=-1", "data.num_new_facts"),
    ("--data.fact_offset=-1", "data.fact_offset"), ("--data.num_background_facts=-3", "data.num_background_facts"),
    ("--data.background_offset=-2", "data.background_offset"), ("--data.fact_ratio=1.5", "data.fact_ratio"),
    ("--data.fact_ratio=-0.1", "data.fact_ratio"), ("--checkpoint.interval=-1", "checkpoint.interval"),
    ("--checkpoint.keep_latest=0", "checkpoint.keep_latest"), ("--logging.interval=0", "logging.interval"),
    ("--optim.lr=1e999", "optim.lr"), ("--optim.lr=-0.1", "optim.lr"),
    ("--optim.weight_decay=-0.1", "optim.weight_decay"), ("--optim.momentum=1.5", "optim.momentum"),
    ("--optim.betas=(0.9,1.5)", "optim.betas"), ("--optim.warmup_steps=-1", "optim.warmup_steps"),
    ("--optim.grad_clip=-1", "optim.grad_clip"), ("--optim.values_lr_mult=1e999", "optim.values_lr_mult"),
    ("--sparse.consistency_interval=-1", "sparse.consistency_interval"), ("--lora.alpha=0", "lora.alpha"),
    ("--eval.interval=-1", "eval.interval"), ("--eval.max_items=0", "eval.max_items"),
    ("--eval.batch_size=0", "eval.batch_size"), ("--eval.max_new_tokens=0", "eval.max_new_tokens"),
    ("--seed=-1", "seed"), ("--max_steps=-3", "max_steps"), ("--sparse.ranking=bm25", "sparse.ranking"),
]


@pytest.mark.parametrize("arg,key", RANGES, ids=[a for a, _ in RANGES])
def test_numeric_range_into_an_existing_run(base, arg, key):
    before = snapshot(base)
    proc = train("--config", "recipes/configs/tiny_pretrain.yaml", f"--output_dir={base}", "--max_steps=1", *SMALL,
                 arg, nproc=1, check=False)
    assert f"'{key}'" in one_line_error(proc)
    assert snapshot(base) == before


def _yaml(tmp_path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_nan_lr_from_a_yaml_file(tmp_path, base):
    cfg = _yaml(tmp_path, "nan.yaml", f"base: {REPO / 'recipes/configs/tiny_pretrain.yaml'}\noptim:\n  lr: .nan\n")
    before = snapshot(base)
    proc = train("--config", str(cfg), f"--output_dir={base}", *SMALL, nproc=1, check=False)
    assert "'optim.lr'" in one_line_error(proc)
    assert snapshot(base) == before


@pytest.mark.parametrize("case", ["cycle", "self", "not_utf8", "not_utf8_base"])
def test_config_files_that_cannot_be_read(tmp_path, base, case):
    if case == "cycle":
        _yaml(tmp_path, "b.yaml", "base: a.yaml\n")
        cfg, needle = _yaml(tmp_path, "a.yaml", "base: b.yaml\nseed: 1\n"), "cycle"
    elif case == "self":
        cfg, needle = _yaml(tmp_path, "a.yaml", "base: a.yaml\n"), "cycle"
    elif case == "not_utf8":
        cfg, needle = _yaml(tmp_path, "latin1.yaml", "seed: 1\n# caf\xe9\n".encode("latin-1")), "UTF-8"
    else:
        bad = _yaml(tmp_path, "bad_base.yaml", b"seed: \xff\xfe\n")
        cfg, needle = _yaml(tmp_path, "child.yaml", "base: bad_base.yaml\n"), "UTF-8"
        before = snapshot(base)
        msg = one_line_error(train("--config", str(cfg), f"--output_dir={base}", nproc=1, check=False))
        assert str(bad) in msg and needle in msg
        assert snapshot(base) == before
        return
    before = snapshot(base)
    msg = one_line_error(train("--config", str(cfg), f"--output_dir={base}", nproc=1, check=False))
    assert str(cfg) in msg and needle in msg
    assert snapshot(base) == before


@pytest.mark.parametrize("case", ["empty", "file", "under_file", "not_writable", "cannot_create"])
def test_output_dirs_that_cannot_be_run_directories(tmp_path, base, case):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory\n")
    target = {"empty": "", "file": a_file, "under_file": a_file / "run", "not_writable": "/proc/1/smf_run",
              "cannot_create": "/proc/smf_no_such_dir/run"}[case]
    before, content = snapshot(base), a_file.read_text()
    proc = train("--config", "recipes/configs/tiny_pretrain.yaml", f"--output_dir={target}", "--max_steps=1", *SMALL,
                 nproc=1, check=False, timeout=300)
    msg = one_line_error(proc)
    assert "output_dir" in msg and (case == "empty" or str(target) in msg), msg
    assert snapshot(base) == before and a_file.read_text() == content
    assert not list(Path.cwd().glob("metrics.jsonl")) and not (REPO / "checkpoints").exists()


def test_init_from_a_healthy_run_of_another_model_size_says_what_differs(tmp_path, base):
    before = snapshot(base)
    msg = one_line_error(finetune(tmp_path, "--model.ffn_hidden=512", init_from=base))
    assert str(base) in msg and "shape" in msg and "[768" in msg and "512" in msg
    assert "delete" not in msg and "corrupt" not in msg
    assert snapshot(base) == before


OUT_CASES = [  # (tool, where --out points): a directory, a file, or a path under a file
    ("evaluate.py", "dir"), ("evaluate.py", "under_file"),
    ("sweep.py", "file"), ("sweep.py", "under_file"),
    ("plot_pareto.py", "dir"), ("plot_pareto.py", "under_file"),
]


@pytest.mark.parametrize("tool,case", OUT_CASES)
def test_out_paths_that_cannot_be_written(tmp_path, base, tool, case):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    name = {"evaluate.py": "eval.json", "sweep.py": "sweep", "plot_pareto.py": "x.png"}[tool]
    out = {"file": a_file, "under_file": a_file / name, "dir": tmp_path / name}[case]
    if case == "dir":
        out.mkdir()
    args = {"evaluate.py": ["--checkpoint", base],
            "sweep.py": ["--grid", "lr=1,2", "--base-config", "recipes/configs/tiny_fact_learning.yaml", "--init_from", base],
            "plot_pareto.py": [base]}[tool]
    before = snapshot(base)
    msg = one_error_line(recipe(tool, *args, "--out", out))
    assert "--out" in msg and str(out) in msg
    assert snapshot(base) == before and a_file.read_text() == "x"


@pytest.mark.parametrize("case", ["no_manifest", "wrong_size", "wrong_size_via_run_dir"])
def test_evaluate_refuses_a_checkpoint_that_fails_its_manifest(tmp_path, base, case):
    """evaluate.py --checkpoint verifies COMPLETE.json like the trainer (before: an unfinished checkpoint, or
    one whose shard had another size than its manifest says, was evaluated and eval.json written into it)."""
    run = tmp_path / "run"
    shutil.copytree(base, run)
    ckpt = list_checkpoints(run)[-1]
    if case == "no_manifest":
        named, target = ckpt / "COMPLETE.json", ckpt
        named.unlink()
    else:
        named = ckpt / "sharded" / "__0_0.distcp"
        with open(named, "ab") as f:       # DCP reads by offset: only the manifest notices the extra bytes
            f.write(b"\0" * 8)
        target = ckpt if case == "wrong_size" else run
    before = snapshot(run)
    msg = one_error_line(recipe("evaluate.py", "--checkpoint", target))
    assert str(named) in msg and "evaluate another checkpoint" in msg, msg
    assert snapshot(run) == before and not (ckpt / "eval.json").exists()
