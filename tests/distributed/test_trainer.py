"""recipes/train.py under real 2-rank torchrun (gloo): stages, replicated values, resume, TensorBoard."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.launch import SMALL, losses, summary, train
from training.checkpoint import list_checkpoints, load_tree

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def runs(tiny_runs):
    return tiny_runs


def values_of(run_dir):
    return load_tree(list_checkpoints(run_dir)[-1] / "values.safetensors")["values"]


def test_pretrain_writes_run_dir_and_checkpoints(runs):
    pre = runs / "pre"
    assert (pre / "config.yaml").is_file() and (pre / "summary.json").is_file()
    assert [p.name for p in list_checkpoints(pre)] == ["step_000002", "step_000003"]
    assert set(losses(pre)) == {1, 2, 3}
    s = summary(pre)
    assert s["stage"] == "pretrain" and s["steps"] == 3 and s["values_replicas_identical"] is True


def test_background_records_document_frequencies(runs):
    bg = runs / "bg"
    state = load_tree(list_checkpoints(bg)[-1] / "sparse.safetensors")
    assert int(state["num_batches"]) == 3
    df = state["document_frequency"]
    assert df.max() <= 3 and df.sum() > 0
    # the model weights are carried over unchanged from the pretrain checkpoint
    assert torch.equal(values_of(bg), values_of(runs / "pre"))


def test_sparse_finetune_keeps_replicas_identical_and_moves_only_selected_rows(runs):
    ft = runs / "ft_sparse"
    train("--config", "recipes/configs/tiny_fact_learning.yaml", f"--output_dir={ft}", f"--init_from={runs / 'bg'}",
          "--sparse.top_t=20", "--optim.lr=50", "--sparse.consistency_interval=1", *SMALL)
    s = summary(ft)
    assert s["method"] == "sparse" and s["steps"] == 4 and s["values_replicas_identical"] is True
    assert {"new_facts/f1", "known_facts/f1", "heldout_text/nll"} <= set(s["metrics"])
    base, after = values_of(runs / "bg"), values_of(ft)
    changed = (base != after).any(dim=1).nonzero().flatten()
    selected = load_tree(ft / "updated_rows.safetensors")["rows"]
    assert 0 < changed.numel() <= 4 * 20
    assert set(changed.tolist()) <= set(selected.tolist())
    log = [json.loads(l) for l in (ft / "metrics.jsonl").read_text().splitlines()]
    trained = [r["fact_id"] for r in log if r["kind"] == "train"]
    assert len(trained) == 4 and len(set(trained)) == 4          # one fact per step, in order, once


@pytest.mark.parametrize("method", ["full", "lora", "memory_all", "tf_only"])
def test_other_methods_run(runs, method):
    out = runs / f"ft_{method}"
    lr = {"full": "1e-4", "lora": "1e-3", "memory_all": "1.0", "tf_only": "1.0"}[method]
    train("--config", "recipes/configs/tiny_fact_learning.yaml", f"--output_dir={out}", f"--init_from={runs / 'bg'}",
          f"--method={method}", f"--optim.lr={lr}", "--max_steps=2", "--eval.sets=[heldout_text]", *SMALL)
    s = summary(out)
    assert s["method"] == method and s["steps"] == 2 and s["values_replicas_identical"] is True
    base, after = values_of(runs / "bg"), values_of(out)
    if method == "lora":
        assert torch.equal(base, after) and s["trainable_params_per_step"] > 0
    else:
        assert not torch.equal(base, after)


def test_before_evaluation_is_cached_next_to_the_base_checkpoint(runs):
    """A sweep from one base evaluates the base once: the second run reuses the first's 'before' numbers;
    any change to what they depend on (here eval.max_items) misses; a damaged entry is a one-line error."""
    cache_dir = list_checkpoints(runs / "bg")[-1] / "eval_cache"
    existing = set(cache_dir.glob("*.json")) if cache_dir.is_dir() else set()
    common = ["--config", "recipes/configs/tiny_fact_learning.yaml", f"--init_from={runs / 'bg'}", "--max_steps=1",
              "--eval.sets=[known_facts,heldout_text]", *SMALL, "--eval.max_items=3"]
    first = train(*common, f"--output_dir={runs / 'cache_a'}", "--optim.lr=10")
    assert "reused" not in first.stdout
    new = set(cache_dir.glob("*.json")) - existing
    assert len(new) == 1
    second = train(*common, f"--output_dir={runs / 'cache_b'}", "--optim.lr=30")
    assert "[eval] before: reused" in second.stdout
    before = {k: v["before"] for k, v in summary(runs / "cache_a")["metrics"].items()}
    assert before == {k: v["before"] for k, v in summary(runs / "cache_b")["metrics"].items()}
    assert json.loads((runs / "cache_b" / "eval_before.json").read_text()) == json.loads(next(iter(new)).read_text())
    third = train(*common, f"--output_dir={runs / 'cache_c'}", "--eval.max_items=2")
    assert "reused" not in third.stdout and len(set(cache_dir.glob("*.json")) - existing) == 2
    next(iter(new)).write_text("{not json")
    bad = train(*common, f"--output_dir={runs / 'cache_d'}", check=False)
    assert bad.returncode != 0 and "unreadable evaluation cache" in bad.stderr + bad.stdout
    next(iter(new)).unlink()


def test_resume_reproduces_the_uninterrupted_losses(runs):
    straight, split = runs / "straight", runs / "split"
    common = ["--config", "recipes/configs/tiny_fact_learning.yaml", f"--init_from={runs / 'bg'}",
              "--sparse.top_t=20", "--optim.lr=50", "--eval.sets=[heldout_text]", *SMALL]
    train(*common, f"--output_dir={straight}")
    train(*common, f"--output_dir={split}", "--max_steps=2")
    assert set(losses(split)) == {1, 2}
    proc = train(*common, f"--output_dir={split}")
    assert "resumed from" in proc.stdout and "step_000002" in proc.stdout
    assert losses(split) == losses(straight)
    assert torch.equal(values_of(split), values_of(straight))


def test_tensorboard_event_files_hold_the_scalars(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ft = runs / "ft_sparse"
    acc = EventAccumulator(str(ft / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/tokens_per_s", "train/step_time_s", "train/grad_norm",
                "memory/rss_gb", "sparse_update/accessed", "sparse_update/selected", "sparse_update/overlap_prev",
                "sparse_update/score_p50", "eval/new_facts/f1", "eval/heldout_text/nll"):
        assert tag in tags, tag
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert acc.Scalars("train/loss")[0].value == pytest.approx(losses(ft)[1])
