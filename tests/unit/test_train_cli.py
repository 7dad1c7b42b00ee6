"""One-process recipes/train.py: --help, and bad input failing in one line with a non-zero exit."""
from __future__ import annotations

import pytest

from tests.launch import SMALL, train
from training.config import resolve_config


def one_line_error(proc) -> str:
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.strip() and "Warning" not in l and "warn" not in l]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_help_lists_stages_and_sections():
    proc = train("--help", nproc=1)
    assert "pretrain | background | finetune" in proc.stdout
    for section in ("[model]", "[data]", "[optim]", "[sparse]", "[lora]", "[checkpoint]", "[eval]"):
        assert section in proc.stdout


def test_help_lists_every_model_key_and_each_is_settable():
    """--help lists the ModelConfig/MemoryConfig keys; --model.KEY and --model.memory.KEY set them."""
    import dataclasses
    from model.config import ModelConfig, MemoryConfig
    proc = train("--help", nproc=1)
    for f in dataclasses.fields(ModelConfig):
        if f.name != "memory":
            assert f"--model.{f.name}=" in proc.stdout, f.name
    for f in dataclasses.fields(MemoryConfig):
        assert f"--model.memory.{f.name}=" in proc.stdout, f.name
    cfg = resolve_config("recipes/configs/tiny_pretrain.yaml", {"model.memory.k": 8, "model.ffn_hidden": 96,
                                                                "output_dir": "/tmp/unused"})
    assert cfg.model_config().memory.k == 8 and cfg.model_config().ffn_hidden == 96


@pytest.mark.parametrize("args,needle", [
    (["--bogus=1"], "unknown config key 'bogus'"),
    (["--model.memory.bogus=1"], "model.memory.bogus"),
    (["--sparse.count_exchange=ring"], "sparse.count_exchange"),
    (["--optim.lr=fast"], "optim.lr"),
    (["--optim.lr=0"], "optim.lr"),
    (["--stage=finetune", "--method=sparse", "--optim.momentum=0.9", "--init_from=x"], "optim.momentum"),
    (["--sparse.top_t=0"], "sparse.top_t"),
    (["--optim.values_lr_mult=0"], "optim.values_lr_mult"),
    (["--optim.values_weight_decay=-1"], "optim.values_weight_decay"),
    (["--optim.values_max_row_norm=-1"], "optim.values_max_row_norm"),
    (["--optim.values_max_row_norm=nan"], "optim.values_max_row_norm"),
    (["--stage=finetune", "--method=lora", "--optim.values_max_row_norm=5", "--init_from=x"],
     "optim.values_max_row_norm"),
    (["--optim.memory_balance_loss=-0.1"], "optim.memory_balance_loss"),
    (["--optim.memory_balance_loss=0.1", "--model.memory_layers=[]"], "optim.memory_balance_loss"),
    (["--stage=finetune", "--method=sparse", "--optim.weight_decay=0", "--optim.values_weight_decay=0.1",
      "--init_from=x"], "optim.values_weight_decay"),
])
def test_bad_config_fails_in_one_line(tmp_path, args, needle):
    proc = train("--config", "recipes/configs/tiny_pretrain.yaml", f"--output_dir={tmp_path / 'r'}", *args,
                 nproc=1, check=False)
    assert needle in one_line_error(proc)
    assert not (tmp_path / "r").exists()


def test_missing_checkpoint_fails_in_one_line(tmp_path):
    proc = train("--config", "recipes/configs/tiny_fact_learning.yaml", f"--output_dir={tmp_path / 'r'}",
                 f"--init_from={tmp_path / 'nothing'}", *SMALL, nproc=1, check=False)
    assert "no complete checkpoint" in one_line_error(proc)


@pytest.mark.parametrize("name", ["tiny_pretrain", "tiny_background", "tiny_fact_learning", "tiny_document_learning",
                                  "paper_1.3b_pretrain", "paper_1.3b_background", "paper_1.3b_fact_learning",
                                  "paper_1.3b_document_learning"])
def test_shipped_configs_resolve(name):
    cfg = resolve_config(f"recipes/configs/{name}.yaml", {"init_from": "x"})
    if "fact" in name:
        assert cfg.stage == "finetune" and cfg.method == "sparse" and cfg.data.seq_len == 64
        assert cfg.sparse.top_t == 500 and cfg.optim.lr == 2.0
    if "document" in name:
        assert cfg.sparse.top_t == 10000
    if name.startswith("paper"):
        assert cfg.model.preset == "paper-1.3b"


def test_values_table_gets_its_own_lr_and_weight_decay():
    """optim.values_lr_mult / values_weight_decay reach the values optimizer only; the dense one keeps optim.*."""
    import torch

    from training.step import optimizer_factory
    cfg = resolve_config("recipes/configs/tiny_pretrain.yaml",
                         {"optim.values_lr_mult": 10, "optim.values_weight_decay": 0.0})
    p = [torch.nn.Parameter(torch.zeros(2))]
    values = optimizer_factory(cfg, sgd=False, values=True)(p).param_groups[0]
    dense = optimizer_factory(cfg, sgd=False)(p).param_groups[0]
    assert values["lr"] == pytest.approx(10 * cfg.optim.lr) and values["weight_decay"] == 0.0
    assert dense["lr"] == pytest.approx(cfg.optim.lr) and dense["weight_decay"] == cfg.optim.weight_decay > 0
    sgd = resolve_config("recipes/configs/tiny_fact_learning.yaml", {"init_from": "x", "optim.values_lr_mult": 3})
    assert optimizer_factory(sgd, sgd=True, values=True)(p).param_groups[0]["lr"] == pytest.approx(3 * sgd.optim.lr)


def test_memory_balance_loss_is_logged_and_trains_the_router(tmp_path):
    """--optim.memory_balance_loss adds the sub-key load-balancing loss: logged per step, and its gradient
    changes the model (step 2's language-model loss differs from the same run without it)."""
    import json
    runs = {}
    for name, extra in (("plain", []), ("balanced", ["--optim.memory_balance_loss=1.0"])):
        out = tmp_path / name
        train("--config", "recipes/configs/tiny_pretrain.yaml", f"--output_dir={out}", "--max_steps=2",
              "--checkpoint.interval=0", *SMALL, *extra, nproc=1)
        runs[name] = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()
                      if json.loads(l).get("kind") == "train"]
    assert all("train/balance_loss" not in r for r in runs["plain"])
    aux = [r["train/balance_loss"] for r in runs["balanced"]]
    assert len(aux) == 2 and all(0.5 < a < 1000 for a in aux), aux
    assert runs["plain"][0]["train/loss"] == pytest.approx(runs["balanced"][0]["train/loss"], rel=1e-6)
    assert runs["plain"][1]["train/loss"] != pytest.approx(runs["balanced"][1]["train/loss"], rel=1e-6)


def test_full_finetuning_uses_the_weight_decay_it_is_given():
    """An explicit --optim.weight_decay=0 stays 0 for --method=full (no silent 0.1), and 0.1 is 0.1."""
    import torch

    from training.step import optimizer_factory
    p = [torch.nn.Parameter(torch.zeros(2))]
    for wd in (0.0, 0.1):
        cfg = resolve_config("recipes/configs/tiny_fact_learning.yaml",
                             {"init_from": "x", "method": "full", "optim.lr": 1e-4, "optim.weight_decay": wd})
        assert optimizer_factory(cfg, sgd=False)(p).param_groups[0]["weight_decay"] == wd
