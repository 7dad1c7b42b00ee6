"""Evaluation worker: computes every metric on stand-in data and writes them as exact float hex.

Run under `python -m torch.distributed.run --standalone --nproc_per_node=2 eval_worker.py OUT_DIR` (gloo)
or as a plain `python eval_worker.py OUT_DIR` (no process group). Each rank writes OUT_DIR/rank<r>.json.
The model does a collective in every forward (as FSDP2 / ZeRO-3 do when they gather parameters), so a
rank running a different number of forwards than the others would deadlock or fail here.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

REPO = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "unit")]

from eval_fakes import GSM8K, QA, CharTokenizer, HellaSwag, OracleLM, PrefixMeanLM, Text, qa_prompt  # noqa: E402

from training.distributed import close  # noqa: E402
from evaluation import (evaluate_sets, gsm8k_nll, heldout_text_nll, hellaswag_accuracy,  # noqa: E402
                        known_facts_retention, qa_scores)


class CollectiveInForward(nn.Module):
    """Wraps a model; joins an all-reduce in every forward and counts forwards."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.num_forwards = 0

    def forward(self, tokens, padding_mask=None):
        self.num_forwards += 1
        if dist.is_initialized():
            marker = torch.ones(3, dtype=torch.float32)  # a shape no metric reduction uses
            dist.all_reduce(marker)
            assert marker[0].item() == dist.get_world_size()
        return self.inner(tokens, padding_mask=padding_mask)


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    distributed = "LOCAL_RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    tok = CharTokenizer()
    lm = CollectiveInForward(PrefixMeanLM(tok.vocab_size, seed=11))
    oracle_answers = {qa_prompt(QA("", f"q{i}?", [])): a for i, a in enumerate(
        [" Paris", " the Beatles", " John Smith", " 42", " a very long answer indeed", " x", " Rome"])}
    oracle = CollectiveInForward(OracleLM(tok, oracle_answers))

    questions = [QA(str(i), f"q{i}?", [g]) for i, g in enumerate(
        ["Paris", "Beatles", "John Ronald Smith", "41", "long answer", "y", "Rome", "z", "w"])]  # 9 items
    texts = [Text(str(i), ("lorem ipsum dolor sit amet " * (i + 1))[: 15 + 9 * i]) for i in range(7)]
    hs = [HellaSwag(str(i), f"Context number {i}: the man", [f"ending {j} for {i}" + "!" * j for j in range(4)],
                    label=i % 4) for i in range(5)]
    gsm = [GSM8K(str(i), f"What is {i}+{i}?", f"{i}+{i}={2 * i}\n#### {2 * i}") for i in range(6)]

    results: dict[str, float] = {}
    for name, value in qa_scores(oracle, tok, questions, batch_size=2, prompt_fn=qa_prompt,
                                 max_new_tokens=12).items():
        results[f"oracle_qa/{name}"] = value
    for name, value in known_facts_retention(lm, tok, questions, batch_size=3, max_items=8,
                                             prompt_fn=qa_prompt, max_new_tokens=10).items():
        results[f"random_qa/{name}"] = value
    results["heldout_text/nll"] = heldout_text_nll(lm, tok, texts, batch_size=2, window=16)["nll"]
    for name, value in hellaswag_accuracy(lm, tok, hs, batch_size=3).items():
        results[f"hellaswag/{name}"] = value
    # An explicit process group (the whole world) instead of the default one.
    group = dist.new_group(list(range(dist.get_world_size()))) if distributed else None
    results["gsm8k/nll"] = gsm8k_nll(lm, tok, gsm, batch_size=4, process_group=group)["nll"]
    results.update(evaluate_sets(lm, tok, {"suite_text": ("text_nll", texts), "suite_gsm8k": ("gsm8k", gsm)},
                                 batch_size=5, max_items={"suite_text": 5}))

    forwards = [lm.num_forwards, oracle.num_forwards]
    if distributed:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, forwards)
        assert all(g == forwards for g in gathered), f"ranks ran different numbers of forwards: {gathered}"
    out = {"metrics": {k: float(v).hex() for k, v in results.items()},
           "world_size": dist.get_world_size() if distributed else 1, "forwards": forwards}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(out, indent=1))
    if distributed:
        close(together=True)   # gc, barrier, destroy: see training.distributed.close


if __name__ == "__main__":
    main(sys.argv[1])
