"""recipes/train.py under real 2-rank torchrun (gloo): stages, replicated values, resume, TensorBoard."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
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
    # the memory-health gate is part of the stage's output (issue 17): usage, top-k sharpness, low-DF
    # share of the facts' answer reads, slot sharing, and each target with its verdict
    health = summary(bg)["health"]
    assert 0 < health["health/slots_read_frac"] <= 1
    assert 1 <= health["health/topk_exp_entropy"] <= health["health/topk_k"]
    assert 0 <= health["health/new_answer_weight_low_df"] <= 1
    assert health["health/known_answer_slots_per_fact"] > 0
    assert set(health["health/targets"]) == {"slots_read_frac", "answer_weight_low_df", "jaccard_new_known_max",
                                             "memory_reliance"}
    # reliance: the known facts' F1 with and without the memory (the tiny base may know none: reliance None)
    assert 0 <= health["health/known_f1_memory_off"] <= 1 and 0 <= health["health/known_f1"] <= 1
    assert health["health/known_answer_nll_memory_off"] > 0
    assert all(isinstance(t["met"], bool) for t in health["health/targets"].values())


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


@pytest.mark.parametrize("ranking,nproc", [("tf", 1), ("tf", 2), ("kl", 1), ("kl", 2), ("seq_tfidf", 1),
                                           ("seq_tfidf", 2)])
def test_rankings_run_through_the_recipe(runs, ranking, nproc):
    """--sparse.ranking=tf|kl|seq_tfidf: the background stage records the access counts KL needs; each step
    moves at most t rows, all of them selected; the replicas stay identical on 2 ranks."""
    out = runs / f"ft_{ranking}_{nproc}"
    train("--config", "recipes/configs/tiny_fact_learning.yaml", f"--output_dir={out}", f"--init_from={runs / 'bg'}",
          f"--sparse.ranking={ranking}", "--sparse.top_t=20", "--optim.lr=50", "--max_steps=2",
          "--eval.sets=[heldout_text]", *SMALL, nproc=nproc)
    s = summary(out)
    assert s["values_replicas_identical"] is True
    assert yaml.safe_load((out / "config.yaml").read_text())["sparse"]["ranking"] == ranking
    changed = (values_of(runs / "bg") != values_of(out)).any(dim=1).nonzero().flatten()
    selected = load_tree(out / "updated_rows.safetensors")["rows"]
    assert 0 < changed.numel() <= 2 * 20 and set(changed.tolist()) <= set(selected.tolist())
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["sparse_update/selected"] for r in rows if r["kind"] == "train"] == [20, 20]


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


def test_answer_only_loss_and_loss_position_counts(runs):
    """--optim.loss_on=answer --sparse.count_positions=loss on 2 ranks: the ranking sees only the reads at
    answer positions (far fewer slots than all positions), only selected rows move, and the summary carries
    the paper-regime diagnostics (answer NLL, answer/other training loss, F1 by steps since the update,
    overlap of the selection with memory_all's largest moves)."""
    common = ["--config", "recipes/configs/tiny_fact_learning.yaml", f"--init_from={runs / 'bg'}",
              "--method=memory_all", "--optim.lr=50", *SMALL]
    answer, every = runs / "ft_answer", runs / "ft_answer_all_positions"
    train(*common, f"--output_dir={answer}", "--optim.loss_on=answer", "--sparse.count_positions=loss")
    train(*common, f"--output_dir={every}", "--optim.loss_on=answer", "--sparse.count_positions=all")
    rows = lambda run: [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()  # noqa: E731
                        if json.loads(l)["kind"] == "train"]
    a, e = rows(answer), rows(every)
    assert len(a) == len(e) == 4
    for ra, re_ in zip(a, e):
        assert 0 < ra["sparse_update/accessed"] < re_["sparse_update/accessed"]
        assert {"train/loss_answer", "train/loss_other"} <= set(ra)
    s = summary(answer)
    assert "new_facts/answer_nll" in s["metrics"] and s["metrics"]["new_facts/answer_nll"]["before"] > 0
    curve = s["diagnostics"]["new_facts/f1_by_steps_since_update"]
    assert sum(b["num_facts"] for b in curve) == 4
    for key in ("memory/known_answer_lookups_in_updated_rows", "memory/known_prompt_slots_in_updated_rows"):
        assert 0.0 <= s["diagnostics"][key] <= 1.0, key
    # memory_all with all positions counted selects every row it reads: exactly memory_all's moves. Counting
    # only the answer positions misses rows read earlier that still get gradient through attention.
    assert summary(every)["diagnostics"]["memory/topt_overlap_memory_all_mean"] == 1.0
    assert 0 < s["diagnostics"]["memory/topt_overlap_memory_all_mean"] < 1.0
    changed = (values_of(runs / "bg") != values_of(answer)).any(dim=1).nonzero().flatten()
    assert set(changed.tolist()) <= set(load_tree(answer / "updated_rows.safetensors")["rows"].tolist())
