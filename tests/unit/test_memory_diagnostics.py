"""Memory diagnostics (evaluation/memory_diagnostics.py) on the repository's own model, shrunk."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_fakes import CharTokenizer  # noqa: E402

from evaluation.memory_diagnostics import (answer_position_lookups, coverage, high_df_share,  # noqa: E402
                                           hits_in_rows, prompt_lookups, usage_stats)

model_pkg = pytest.importorskip("model")
PROMPTS = ["Question: who?\nAnswer:", "Question: where was it written down?\nAnswer:", "Q?\nAnswer:"]


@pytest.fixture(scope="module")
def setup():
    tok = CharTokenizer()
    model = model_pkg.build_model("tiny", seed=0, vocab_size=tok.vocab_size, dim=64, n_layers=3, n_heads=2,
                                  ffn_hidden=128, max_seq_len=64, memory_layers=(0, 2),
                                  memory=dict(num_slots=16 ** 2, heads=2, k=4, k_dim=16, value_dim=64))
    return model, tok


def test_prompt_lookups_match_unpadded_forwards(setup) -> None:
    model, tok = setup
    got = prompt_lookups(model, tok, PROMPTS, device=torch.device("cpu"), batch_size=3)   # left-padded batch
    assert len(got) == len(PROMPTS)
    model.eval()
    for prompt, (last, every) in zip(PROMPTS, got):
        ids = torch.tensor([tok.encode(prompt, bos=True, eos=False)])
        with torch.no_grad():
            indices = model(ids).memory_indices              # one (1, T, heads*k) per memory layer
        want_all = torch.cat(indices, dim=-1)[0]
        assert torch.equal(last, want_all[-1])               # 2 layers x 2 heads x k=4 slots at the last token
        assert last.numel() == 2 * 2 * 4
        assert torch.equal(every, want_all.flatten())       # every real token, no padding (-1) entries
        assert (every >= 0).all()
    assert all(torch.equal(a, b) for a, (b, _) in zip(answer_position_lookups(model, tok, PROMPTS,
                                                                              device=torch.device("cpu")), got))


def test_coverage_share_and_usage_numbers() -> None:
    lookups = [torch.tensor([1, 1, 2, 3]), torch.tensor([3, 4])]
    assert coverage(torch.tensor([1, 3]), lookups[0]) == pytest.approx(2 / 3)       # distinct slots {1,2,3}
    assert coverage(None, lookups[0]) == 0.0
    df = torch.zeros(8, dtype=torch.long)
    df[torch.tensor([1, 4])] = 8                                                  # read by every batch
    assert high_df_share(lookups, df, 8) == pytest.approx(3 / 6)                # 1, 1, 4 of 6 lookups
    assert hits_in_rows(lookups, torch.tensor([3])) == pytest.approx(2 / 6)
    stats = usage_stats(torch.tensor([2.0, 2.0, 0.0, 0.0]))
    assert stats["slots_used_frac"] == 0.5
    assert stats["usage_entropy"] == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert stats["usage_kl_uniform"] == pytest.approx(torch.log(torch.tensor(2.0)).item())
