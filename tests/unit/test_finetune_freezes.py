"""A sparse finetune moves only the selected value rows: with query BatchNorm, its running statistics
and every other parameter stay bit-identical (one process, real recipes/train.py)."""
from __future__ import annotations

import torch

from model import build_model
from tests.launch import SMALL, train
from training import safe_dcp
from training.checkpoint import list_checkpoints, load_tree

BN = "--model.memory.query_batchnorm=true"


def model_state(run_dir):
    ckpt = list_checkpoints(run_dir)[-1]
    model = build_model("tiny", memory={"query_batchnorm": True})
    state = {"model": {k: v.clone() for k, v in model.state_dict().items() if k != "memory_values"}}
    safe_dcp.load(state, ckpt / "sharded")
    state["model"]["memory_values"] = load_tree(ckpt / "values.safetensors")["values"]
    return state["model"]


def test_sparse_finetune_changes_only_selected_value_rows(tmp_path):
    pre, bg, ft = tmp_path / "pre", tmp_path / "bg", tmp_path / "ft"
    train("--config", "recipes/configs/tiny_pretrain.yaml", f"--output_dir={pre}", "--max_steps=2", BN, *SMALL, nproc=1)
    train("--config", "recipes/configs/tiny_background.yaml", f"--output_dir={bg}", f"--init_from={pre}",
          "--sparse.background_batches=2", BN, *SMALL, nproc=1)
    train("--config", "recipes/configs/tiny_fact_learning.yaml", f"--output_dir={ft}", f"--init_from={bg}",
          "--max_steps=2", "--sparse.top_t=10", "--optim.lr=100", "--eval.sets=[]", BN, *SMALL, nproc=1)
    before, after = model_state(bg), model_state(ft)
    assert any("query_norm.running_mean" in k for k in before)
    for key in before:
        if key != "memory_values":
            assert torch.equal(before[key], after[key]), key
    changed = (before["memory_values"] != after["memory_values"]).any(dim=1).nonzero().flatten()
    selected = load_tree(ft / "updated_rows.safetensors")["rows"]
    assert 0 < changed.numel() <= 20 and set(changed.tolist()) <= set(selected.tolist())
