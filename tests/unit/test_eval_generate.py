"""Batched greedy generation: left padding matches one-at-a-time generation; stop conditions."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_fakes import CharTokenizer, OracleLM, PrefixMeanLM  # noqa: E402

from evaluation import greedy_generate  # noqa: E402
from evaluation.generate import cut_at_stop  # noqa: E402

PROMPTS = ["Question: Who wrote Hamlet?\nAnswer:", "Q: 2+2?", "x", "The capital of France is",
           "Hello there, general", "ab"]


def test_left_padded_batch_equals_one_at_a_time() -> None:
    tok = CharTokenizer()
    model = PrefixMeanLM(tok.vocab_size, seed=3)
    single = [greedy_generate(model, tok, [p], max_new_tokens=12, batch_size=1)[0] for p in PROMPTS]
    for batch_size in (2, 4, len(PROMPTS)):
        assert greedy_generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=batch_size) == single
    # Not vacuous: the outputs differ from each other and are not all empty.
    assert len(set(single)) > 1 and any(single)


def test_padding_mask_is_passed() -> None:
    # A model that ignores padding_mask sees the pad tokens and generates differently in a batch.
    tok = CharTokenizer()
    inner = PrefixMeanLM(tok.vocab_size, seed=3)

    class NoMask(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, tokens, padding_mask=None):
            return self.inner(tokens, padding_mask=None)

    single = [greedy_generate(inner, tok, [p], max_new_tokens=12, batch_size=1)[0] for p in PROMPTS]
    assert greedy_generate(NoMask(), tok, PROMPTS, max_new_tokens=12, batch_size=len(PROMPTS)) != single


def test_stops_at_newline_eos_and_max_new_tokens() -> None:
    tok = CharTokenizer()
    model = OracleLM(tok, {"A:": " one\ntwo", "B:": " four", "C:": " a long answer that goes on"})
    out = greedy_generate(model, tok, ["A:", "B:", "C:", "D:"], max_new_tokens=8, batch_size=4)
    assert out == [" one", " four", " a long ", ""]
    out = greedy_generate(model, tok, ["A:"], max_new_tokens=8, batch_size=1, stop_strings=("w",))
    assert out == [" one\nt"]


def test_stops_early_when_all_rows_finish() -> None:
    tok = CharTokenizer()
    model = OracleLM(tok, {"A:": " hi"})
    calls = []
    original = model.forward

    def counting(tokens, padding_mask=None):
        calls.append(tokens.shape)
        return original(tokens, padding_mask=padding_mask)

    model.forward = counting
    assert greedy_generate(model, tok, ["A:"], max_new_tokens=50, batch_size=1) == [" hi"]
    assert len(calls) == 4  # " ", "h", "i", then EOS


def test_eval_mode_and_restore() -> None:
    tok = CharTokenizer()
    model = PrefixMeanLM(tok.vocab_size, seed=1)
    model.train()
    a = greedy_generate(model, tok, PROMPTS[:2], max_new_tokens=6, batch_size=2)
    b = greedy_generate(model, tok, PROMPTS[:2], max_new_tokens=6, batch_size=2)
    assert a == b  # dropout off during evaluation
    assert model.training and model.dropout.training
    model.dropout.eval()  # a submodule's own flag is restored too
    greedy_generate(model, tok, PROMPTS[:1], max_new_tokens=2, batch_size=1)
    assert model.training and not model.dropout.training


def test_long_prompt_is_cut_from_the_left() -> None:
    tok = CharTokenizer()
    seen = []

    class Capped(OracleLM):
        config = SimpleNamespace(max_seq_len=10)

        def forward(self, tokens, padding_mask=None):
            seen.append(tokens.shape[1])
            return super().forward(tokens, padding_mask)

    model = Capped(tok, {"swer:": " yes"})  # BOS + the last 5 characters survive (10 - 4 new tokens)
    out = greedy_generate(model, tok, ["a very long preamble then Answer:"], max_new_tokens=4, batch_size=1)
    assert out == [" yes"]
    assert max(seen) <= 10
    assert seen[0] == 6


def test_cut_at_stop() -> None:
    assert cut_at_stop("ab\ncd", ["\n"]) == ("ab", True)
    assert cut_at_stop("abcd", ["\n"]) == ("abcd", False)
    assert cut_at_stop("a.b\nc", ["\n", "."]) == ("a", True)


def test_bad_batch_size() -> None:
    tok = CharTokenizer()
    with pytest.raises(ValueError):
        greedy_generate(OracleLM(tok, {}), tok, ["a"], batch_size=0)
