"""DeepSpeed ZeRO-1/2/3 behind the strategy seam, against FSDP2, under real 2-rank torchrun (gloo).

One chain of small runs is shared by the tests (each launch costs ~15 s of start-up on a 2-core CPU):
  pretrain   fsdp2, zero1, zero3 (same seed and data; AdamW, clipping active)
  background zero3, init_from the FSDP2 pretrain (FSDP2 DCP weights -> ZeRO-3 engine)
  finetune   sparse under fsdp2, zero1, zero2, zero3, init_from the ZeRO-3 background (and so ZeRO -> FSDP2)
  lora       zero2;  resume: zero3 pretrain (DeepSpeed engine checkpoint) and zero3 sparse (frozen engine)
Every launch goes through tests/distributed/workers/zero_probe.py, which runs recipes/train.py's main and
records, on each rank at each checkpoint, the SHA-256 of its live values table and how the engine holds
its parameters.

The model ties its embeddings (as the larger presets do): `to_empty` unties shared weights, which the
strategies must restore.

Tolerances (why they are what they are):
- sparse finetune: the engine is frozen and its weights are the same bits under every strategy (loaded
  from one checkpoint), the forward runs the same ops on them, and only the values table trains, outside
  the engine, through the same code. Observed: losses and tables bit-identical. Allowed: 1e-6 relative
  on losses and 1e-6 absolute on the table (a few float32 ulps, for BLAS kernels that pick a code path by
  memory alignment), and the selected rows must be the same set.
- pretrain: the dense gradients are averaged in a different order (FSDP2 reduce-scatter per parameter,
  ZeRO buckets; ZeRO-3 reduces the two uses of the tied embedding separately), so they differ in the
  last float32 bits, and AdamW (update ~ m / sqrt(v)) magnifies that where a gradient is ~0. Observed
  after 4 steps: losses <= 1.1e-7 relative, grad norms <= 4.1e-5 relative, each weight tensor <= 1.6e-4
  relative (Frobenius norm of the difference; a few elements whose gradient is a cancellation).
  Allowed: 1e-5 on losses, 1e-3 on grad norms and weights (a norm computed over the wrong partitions,
  or a weight written in the wrong layout, is off by tens of percent). Not clipping the engine's
  gradients (clip 1.0 is active) moves the step-3 loss by 1.8e-4 relative, 18x the tolerance.
- resume and cross-rank replication: exact (bit-identical), as under FSDP2.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests.launch import REPO, env, losses
from tests.launch import train as launch_train
from training.checkpoint import list_checkpoints, load_tree

WORKER = Path(__file__).resolve().parent / "workers" / "zero_probe.py"
MODEL = ["--model.n_layers=2", "--model.memory_layers=1", "--model.dim=64", "--model.ffn_hidden=128",
         "--model.memory.num_slots=1024", "--model.memory.k_dim=32", "--model.memory.value_dim=64",
         "--model.memory.k=8", "--model.tie_embeddings=True", "--logging.progress=False"]
PRETRAIN = ["--config", "recipes/configs/tiny_pretrain.yaml", "--max_steps=4", "--optim.lr=0.01",
            "--optim.warmup_steps=0", "--optim.grad_clip=1.0", "--checkpoint.interval=2", "--data.batch_size=4",
            "--data.seq_len=32", *MODEL]
BACKGROUND = ["--config", "recipes/configs/tiny_background.yaml", "--sparse.background_batches=4",
              "--data.batch_size=4", "--data.seq_len=32", *MODEL]
TOP_T, NUM_FACTS = 20, 3
FINETUNE = ["--config", "recipes/configs/tiny_fact_learning.yaml", f"--data.num_new_facts={NUM_FACTS}",
            "--data.num_paraphrases=8", "--data.seq_len=32", f"--sparse.top_t={TOP_T}", "--optim.lr=50",
            "--eval.sets=[]", "--checkpoint.interval=1", "--checkpoint.keep_latest=2", *MODEL]
STAGES = ("zero1", "zero2", "zero3")


def train(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """recipes/train.py's main under torchrun, 2 ranks, through the probe worker."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def strategy_args(strategy: str, root: Path) -> list[str]:
    args = [f"--strategy={strategy}"]
    if strategy == "zero3":
        # The tiny test model's parameters are all below DeepSpeed's default persistence threshold
        # (1e5 elements: such parameters stay whole on every rank); 0 makes ZeRO-3 partition all of them.
        args.append(f"--deepspeed_config={root / 'zero3_partition_all.json'}")
    return args


def probe(run_dir: Path) -> list[dict]:
    rows = []
    for rank in (0, 1):
        rows += [json.loads(l) for l in (run_dir / "probe" / f"rank{rank}.jsonl").read_text().splitlines()]
    return rows


def grad_norms(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/grad_norm"] for r in rows if r.get("kind") == "train"}


def last_values(run_dir: Path) -> torch.Tensor:
    return load_tree(list_checkpoints(run_dir)[-1] / "values.safetensors")["values"]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


def sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def dcp_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint's DCP folder, read in this (single) process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    path = str(ckpt / "sharded")
    meta = FileSystemReader(path).read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items() if k.startswith("model.")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)    # "assuming the intent is to load in a single process"
        dcp.load(state, checkpoint_id=path, no_dist=True)
    return state


def resume_copy(run_dir: Path, dest: Path) -> Path:
    """`run_dir` as if it had stopped after its second-to-last checkpoint: later checkpoints, metrics and
    probes removed, so everything the resumed run reports is its own."""
    shutil.copytree(run_dir, dest)
    shutil.rmtree(list_checkpoints(dest)[-1])
    for name in ("metrics.jsonl", "summary.json", "probe", "tensorboard"):
        target = dest / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    return dest


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero")
    cfg = json.loads((REPO / "recipes/configs/deepspeed/zero3.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (out / "zero3_partition_all.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def pretrain(root) -> dict[str, Path]:
    runs = {}
    for strategy in ("fsdp2", "zero1", "zero3"):
        runs[strategy] = root / f"pre_{strategy}"
        train(*PRETRAIN, f"--output_dir={runs[strategy]}", *strategy_args(strategy, root))
    return runs


@pytest.fixture(scope="module")
def background(root, pretrain) -> Path:
    out = root / "bg_zero3"
    train(*BACKGROUND, f"--output_dir={out}", f"--init_from={pretrain['fsdp2']}", *strategy_args("zero3", root))
    return out


@pytest.fixture(scope="module")
def finetune(root, background) -> dict[str, Path]:
    runs = {}
    for strategy in ("fsdp2", *STAGES):
        runs[strategy] = root / f"ft_{strategy}"
        train(*FINETUNE, f"--output_dir={runs[strategy]}", f"--init_from={background}", *strategy_args(strategy, root))
    return runs


# ---- pretrain: the engine trains (AdamW, clipping), same trajectory as FSDP2 ----------------------------
@pytest.mark.distributed
def test_pretrain_matches_fsdp2_step_by_step(pretrain):
    ref, ref_norm = losses(pretrain["fsdp2"]), grad_norms(pretrain["fsdp2"])
    assert sorted(ref) == [1, 2, 3, 4]
    assert ref_norm[1] > 1.0       # the clip (1.0) is active, so the seam's clipping is exercised
    for strategy in ("zero1", "zero3"):
        got, got_norm = losses(pretrain[strategy]), grad_norms(pretrain[strategy])
        assert sorted(got) == [1, 2, 3, 4], strategy
        for step in ref:
            assert got[step] == pytest.approx(ref[step], rel=1e-5), (strategy, step)
            assert got_norm[step] == pytest.approx(ref_norm[step], rel=1e-3), (strategy, step)
    assert ref[4] < ref[1] - 0.1   # it really trained


@pytest.mark.distributed
def test_zero3_partitions_the_engine_and_never_the_values(pretrain):
    for strategy, run in pretrain.items():
        rows = probe(run)
        assert {r["step"] for r in rows} == {2, 4} and len(rows) == 4, strategy
        for r in rows:
            # no strategy holds the table: build.py made it, the model reads it by reference
            assert not r["values_in_module"] and not r["values_is_zero_param"], (strategy, r)
            assert r["values_requires_grad"]
        shas: dict[int, set] = {}
        for r in rows:
            shas.setdefault(r["step"], set()).add(r["values_sha256"])
        assert all(len(s) == 1 for s in shas.values()), strategy       # both ranks hold the same bits
        local = {r["rank"]: r["local_numel"] for r in rows}
        full = rows[0]["full_numel"]
        # right after materialize, before any engine: ZeRO-3 (like FSDP2) never held the whole model
        at_build = {r["rank"]: r["materialized_local_numel"] for r in rows}
        assert all(r["materialized_full_numel"] == full for r in rows), strategy
        if strategy == "zero1":
            assert local == {0: full, 1: full}                    # ZeRO-1 replicates the weights
            assert at_build == {0: full, 1: full}
        else:
            assert sum(local.values()) >= full and max(local.values()) < 0.6 * full, (strategy, local, full)
            assert sum(at_build.values()) >= full and max(at_build.values()) < 0.6 * full, (strategy, at_build, full)
    engine_dir = list_checkpoints(pretrain["zero3"])[-1] / "sharded" / "deepspeed" / "engine"
    assert sorted(p.name for p in engine_dir.iterdir()) == [
        f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]


@pytest.mark.distributed
def test_pretrain_checkpoints_hold_the_same_weights(pretrain):
    ref = dcp_weights(list_checkpoints(pretrain["fsdp2"])[-1])
    for strategy in ("zero1", "zero3"):
        got = dcp_weights(list_checkpoints(pretrain[strategy])[-1])
        assert got.keys() == ref.keys() and "model.memory_values" not in got
        for key in ref:
            assert got[key].shape == ref[key].shape
            assert rel_diff(got[key], ref[key]) < 1e-3, (strategy, key)    # a layout error would be O(1)
        assert rel_diff(last_values(pretrain[strategy]), last_values(pretrain["fsdp2"])) < 1e-3, strategy


# ---- background under ZeRO-3 from an FSDP2 checkpoint ---------------------------------------------
@pytest.mark.distributed
def test_background_under_zero3_loads_fsdp2_weights_exactly(pretrain, background):
    base = dcp_weights(list_checkpoints(pretrain["fsdp2"])[-1])
    got = dcp_weights(list_checkpoints(background)[-1])
    assert got.keys() == base.keys()
    for key in base:
        assert torch.equal(got[key], base[key]), key      # FSDP2 DCP -> ZeRO-3 partitions -> DCP, bit-exact
    assert torch.equal(last_values(background), last_values(pretrain["fsdp2"]))
    state = load_tree(list_checkpoints(background)[-1] / "sparse.safetensors")
    assert int(state["num_batches"]) == 4 and state["document_frequency"].sum() > 0
    assert not (list_checkpoints(background)[-1] / "sharded" / "deepspeed").exists()   # nothing to optimise


# ---- sparse finetune: FSDP2 == ZeRO-1 == ZeRO-2 == ZeRO-3 ----------------------------------------------
@pytest.mark.distributed
def test_sparse_finetune_same_losses_and_table_under_every_strategy(finetune):
    ref = losses(finetune["fsdp2"])
    ref_values = last_values(finetune["fsdp2"])
    ref_rows = load_tree(finetune["fsdp2"] / "updated_rows.safetensors")["rows"]
    assert sorted(ref) == list(range(1, NUM_FACTS + 1))
    for strategy in STAGES:
        got = losses(finetune[strategy])
        assert sorted(got) == sorted(ref), strategy
        for step in ref:
            assert got[step] == pytest.approx(ref[step], rel=1e-6), (strategy, step)
        torch.testing.assert_close(last_values(finetune[strategy]), ref_values, rtol=0, atol=1e-6)
        rows = load_tree(finetune[strategy] / "updated_rows.safetensors")["rows"]
        assert torch.equal(rows, ref_rows), strategy


@pytest.mark.distributed
def test_values_bit_identical_across_ranks_and_only_selected_rows_move(finetune, background):
    base = last_values(background)
    base_weights = dcp_weights(list_checkpoints(background)[-1])
    for strategy, run in finetune.items():
        rows = probe(run)
        by_step: dict[int, dict[int, str]] = {}
        for r in rows:
            assert not r["values_in_module"] and not r["values_is_zero_param"], (strategy, r)
            by_step.setdefault(r["step"], {})[r["rank"]] = r["values_sha256"]
        assert sorted(by_step) == list(range(1, NUM_FACTS + 1)), strategy
        for step, shas in by_step.items():
            assert shas[0] == shas[1], (strategy, step)       # every step, every stage: the same bits
        after = last_values(run)
        assert sha256(after) == by_step[NUM_FACTS][0]      # the saved table is the live one
        changed = (after != base).any(dim=1).nonzero().flatten()
        selected = load_tree(run / "updated_rows.safetensors")["rows"]
        assert 0 < changed.numel() <= NUM_FACTS * TOP_T, strategy
        assert set(changed.tolist()) <= set(selected.tolist()), strategy
        # the frozen model round-trips bit-exactly through every strategy's load and save
        weights = dcp_weights(list_checkpoints(run)[-1])
        assert weights.keys() == base_weights.keys()
        assert all(torch.equal(weights[k], base_weights[k]) for k in base_weights), strategy


@pytest.mark.distributed
def test_lora_under_zero2_trains_only_the_adapters(root, background):
    out = root / "lora_zero2"
    train(*FINETUNE, f"--output_dir={out}", f"--init_from={background}", "--method=lora", "--optim.lr=1e-3",
          "--max_steps=2", *strategy_args("zero2", root))
    assert sorted(losses(out)) == [1, 2] and all(math.isfinite(v) for v in losses(out).values())
    base = dcp_weights(list_checkpoints(background)[-1])
    got = dcp_weights(list_checkpoints(out)[-1])
    lora = {k for k in got if "lora_" in k}
    assert lora and set(got) - lora == set(base)
    for key in base:
        assert torch.equal(got[key], base[key]), key                     # frozen base weights
    assert any(got[k].abs().sum() > 0 for k in lora if k.endswith("lora_B"))   # B starts at 0: it trained
    assert torch.equal(last_values(out), last_values(background))
    assert (list_checkpoints(out)[-1] / "sharded" / "deepspeed" / "engine").is_dir()


# ---- resume under ZeRO-3 -----------------------------------------------------------------------------
@pytest.mark.distributed
def test_resume_under_zero3_pretrain_reproduces_the_uninterrupted_run(root, pretrain):
    """The engine trains: its state comes back from DeepSpeed's own checkpoint (fp32 partitions, AdamW)."""
    straight = pretrain["zero3"]
    split = resume_copy(straight, root / "pre_zero3_resumed")
    proc = train(*PRETRAIN, f"--output_dir={split}", *strategy_args("zero3", root))
    assert "resumed from" in proc.stdout and "step_000002" in proc.stdout
    assert losses(split) == {s: v for s, v in losses(straight).items() if s > 2}
    assert grad_norms(split) == {s: v for s, v in grad_norms(straight).items() if s > 2}
    assert torch.equal(last_values(split), last_values(straight))
    a, b = dcp_weights(list_checkpoints(split)[-1]), dcp_weights(list_checkpoints(straight)[-1])
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.distributed
def test_resume_under_zero3_sparse_reproduces_the_uninterrupted_run(root, finetune, background):
    straight = finetune["zero3"]
    split = resume_copy(straight, root / "ft_zero3_resumed")
    proc = train(*FINETUNE, f"--output_dir={split}", f"--init_from={background}", *strategy_args("zero3", root))
    assert "resumed from" in proc.stdout and f"step_{NUM_FACTS - 1:06d}" in proc.stdout
    assert losses(split) == {NUM_FACTS: losses(straight)[NUM_FACTS]}
    assert torch.equal(last_values(split), last_values(straight))
    assert [r["values_sha256"] for r in probe(split)] == [r["values_sha256"] for r in probe(straight)
                                                          if r["step"] == NUM_FACTS]


# ---- the DeepSpeed JSON (no launch) ----------------------------------------------------------------------
def test_deepspeed_configs_load_and_bad_ones_fail_in_one_line(tmp_path):
    from training.parallel.zero import load_deepspeed_config
    shipped = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "deepspeed"
    for stage in (1, 2, 3):
        cfg = load_deepspeed_config(str(shipped / f"zero{stage}.json"), stage)
        assert cfg["zero_optimization"]["stage"] == stage and cfg["gradient_clipping"] == 0.0
    with pytest.raises(ValueError, match="'deepspeed_config' is empty"):
        load_deepspeed_config("", 2)
    bad = {"stage": ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage=2"),
           "clip": ({"gradient_clipping": 1.0}, "--optim.grad_clip"),
           "optim": ({"optimizer": {"type": "Adam"}}, "'optimizer' section"),
           "sparse": ({"sparse_gradients": True}, "sparse_gradients"),
           "accum": ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps"),
           "bf16": ({"bf16": {"enabled": True}}, "enables bf16"),
           "offload": ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}, "offload")}
    for name, (cfg, message) in bad.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match="deepspeed_config") as err:
            load_deepspeed_config(str(path), 3)
        assert message in str(err.value) and "\n" not in str(err.value), name
    with pytest.raises(ValueError, match="does not exist"):
        load_deepspeed_config(str(tmp_path / "missing.json"), 1)


def test_zero_without_torchrun_fails_in_one_line(tmp_path):
    proc = launch_train("--config", "recipes/configs/tiny_pretrain.yaml", f"--output_dir={tmp_path / 'run'}",
                        "--strategy=zero2", *MODEL, nproc=1, check=False, timeout=300)
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert proc.returncode == 2 and lines and "torchrun" in lines[0] and "Traceback" not in proc.stderr
