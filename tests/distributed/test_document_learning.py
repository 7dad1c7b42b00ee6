"""Document learning (paper section 5.2) end to end through recipes/train.py on 2 ranks: chunks of the first
`data.num_documents` documents are learned one per step, and their questions are the new_facts set."""
from __future__ import annotations

import json

import pytest

from data_pipeline.documents import chunk_documents, load_documents
from tests.launch import REPO, SMALL, summary, train
from training.checkpoint import list_checkpoints, load_tree

pytestmark = pytest.mark.distributed

DOCS = "data_pipeline/samples/simpleqa_standin_documents_sample.jsonl"


def test_document_learning_runs_end_to_end(tiny_runs):
    out = tiny_runs / "doc_learning"
    docs = load_documents(REPO / DOCS)[:3]
    chunks = chunk_documents(docs, max_chars=1500, min_chars=200)
    train("--config", "recipes/configs/tiny_document_learning.yaml", f"--output_dir={out}",
          f"--init_from={tiny_runs / 'bg'}", "--data.num_documents=3", "--sparse.top_t=200", "--optim.lr=50",
          "--data.seq_len=128", *SMALL, "--eval.max_items=8")
    s = summary(out)
    assert s["method"] == "sparse" and s["steps"] == len(chunks) and s["values_replicas_identical"] is True
    assert {"new_facts/f1", "new_facts/answer_nll", "heldout_text/nll"} <= set(s["metrics"])
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["fact_id"] for r in rows if r["kind"] == "train"] == [c.id for c in chunks]   # chunks in order, once
    evals = [r for r in rows if r["kind"] == "eval" and r.get("tag") == "after"]
    assert evals and "eval/new_facts/f1" in evals[-1]
    # the learned rows moved, nothing else did
    base = load_tree(list_checkpoints(tiny_runs / "bg")[-1] / "values.safetensors")["values"]
    after = load_tree(list_checkpoints(out)[-1] / "values.safetensors")["values"]
    changed = set((base != after).any(dim=1).nonzero().flatten().tolist())
    assert changed and changed <= set(load_tree(out / "updated_rows.safetensors")["rows"].tolist())


def test_num_documents_beyond_the_file_is_one_line(tiny_runs, tmp_path):
    proc = train("--config", "recipes/configs/tiny_document_learning.yaml", f"--output_dir={tmp_path / 'x'}",
                 f"--init_from={tiny_runs / 'bg'}", "--data.num_documents=999", *SMALL, nproc=1, check=False)
    assert proc.returncode != 0 and "data.num_documents" in proc.stderr and "Traceback" not in proc.stderr


def test_new_facts_are_the_questions_of_the_learned_documents():
    from training.config import resolve_config
    from training.data import eval_sets, finetune_stream, load_facts, load_tokenizer
    cfg = resolve_config("recipes/configs/tiny_document_learning.yaml",
                         {"data.num_documents": 3, "init_from": "unused", "output_dir": "/tmp/unused"})
    tok = load_tokenizer(cfg, cfg.model_config().vocab_size)
    stream = finetune_stream(cfg, tok, load_facts(cfg))
    docs = load_documents(REPO / DOCS)[:3]
    kind, records = eval_sets(cfg, load_facts(cfg), stream)["new_facts"]
    assert kind == "qa" and [r.question for r in records] == [q.question for d in docs for q in d.questions]
