"""The evaluation functions on the repository's own model (model.build_model('tiny'), shrunk)."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_fakes import GSM8K, QA, CharTokenizer, HellaSwag, Text, qa_prompt  # noqa: E402

from evaluation import (gsm8k_context, gsm8k_nll, greedy_generate, heldout_text_nll,  # noqa: E402
                        hellaswag_accuracy, qa_scores)

model_pkg = pytest.importorskip("model")


@pytest.fixture(scope="module")
def setup():
    tok = CharTokenizer()
    model = model_pkg.build_model("tiny", seed=0, vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=2,
                                  ffn_hidden=128, max_seq_len=48, memory_layers=(1,),
                                  memory=dict(num_slots=16 ** 2, heads=2, k=4, k_dim=16, value_dim=64))
    return model, tok


def test_gsm8k_nll_matches_cross_entropy(setup) -> None:
    model, tok = setup
    model.train()
    records = [GSM8K("a", "What is 2+3?", "2+3=5\n#### 5"), GSM8K("b", "Half of 8?", "8/2=4\n#### 4")]
    got = gsm8k_nll(model, tok, records, batch_size=2)["nll"]
    assert model.training  # restored
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for r in records:
            ctx = tok.encode(gsm8k_context(r.question), bos=True, eos=False)
            ids = torch.tensor(ctx + tok.encode(" " + r.answer, bos=False, eos=False))
            logits = model(ids[None, :-1]).logits[0]
            total += F.cross_entropy(logits[len(ctx) - 1:], ids[len(ctx):], reduction="sum").item()
            count += len(ids) - len(ctx)
    model.train()
    assert got == pytest.approx(total / count, rel=1e-5)


def test_generation_and_other_metrics_run(setup) -> None:
    model, tok = setup
    prompts = [qa_prompt(QA("1", "Who?", [])), qa_prompt(QA("2", "Where is the Eiffel Tower?", [])), "x"]
    batched = greedy_generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [greedy_generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single  # left padding does not change the (RoPE) model's greedy choices
    qa = qa_scores(model, tok, [QA("1", "Who?", ["x"]), QA("2", "Where?", ["y"])], batch_size=2,
                   prompt_fn=qa_prompt, max_new_tokens=4)
    assert 0.0 <= qa["f1"] <= 1.0 and 0.0 <= qa["em"] <= 1.0
    long_text = [Text("t", "some held-out prose " * 10)]  # 200 chars > max_seq_len: windows of 48
    assert heldout_text_nll(model, tok, long_text, batch_size=2)["nll"] > 0
    hs = [HellaSwag("h", "A man is", ["walking.", "sitting down now.", "x", "running"], label=0)]
    assert set(hellaswag_accuracy(model, tok, hs, batch_size=4)) == {"acc", "acc_norm"}
