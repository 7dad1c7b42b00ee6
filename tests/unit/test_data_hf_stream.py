"""The streaming pretraining path (HF datasets, data.streaming) yields the in-RAM path's batches."""
from __future__ import annotations

import pytest
import torch

from data_pipeline import SAMPLES_DIR, TINY_TOKENIZER, Tokenizer
from data_pipeline.hf_stream import StreamingLMStream, hf_builder
from data_pipeline.lm_stream import LMStream, load_texts

SAMPLE = SAMPLES_DIR / "prose_sample_small.jsonl"   # 40 real passages


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(TINY_TOKENIZER)


def _take(stream, n):
    return [next(stream) for _ in range(n)]


@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2)])
def test_streaming_yields_the_in_ram_batches(tok, rank, world_size):
    """Without a shuffle buffer the stream reads the files in order: the same windows as LMStream over
    load_texts() in file order, past the end of the first epoch (rank sharding included)."""
    texts = load_texts(SAMPLE)
    mine = texts[rank::world_size]
    tokens_per_epoch = sum(len(tok.encode(t, bos=True, eos=True)) for t in mine)
    n = tokens_per_epoch // (4 * 32) + 3                        # into the second epoch
    ram = LMStream(texts, tok, seq_len=32, batch_size=4, rank=rank, world_size=world_size, shuffle=False)
    streamed = StreamingLMStream([SAMPLE], tok, seq_len=32, batch_size=4, rank=rank, world_size=world_size)
    for a, b in zip(_take(ram, n), _take(streamed, n)):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels)
        assert b.padding_mask.all() and b.tokens.shape == (4, 32)
    assert streamed.state_dict()["epoch"] == 1


def test_streaming_resumes_exactly_and_shuffles_with_a_buffer(tok):
    stream = StreamingLMStream([SAMPLE], tok, seq_len=16, batch_size=2, shuffle_buffer=8, seed=3)
    _take(stream, 5)
    state = stream.state_dict()
    expected = _take(stream, 4)
    resumed = StreamingLMStream([SAMPLE], tok, seq_len=16, batch_size=2, shuffle_buffer=8, seed=3)
    resumed.load_state_dict(state)
    for a, b in zip(expected, _take(resumed, 4)):
        assert torch.equal(a.tokens, b.tokens)
    plain = StreamingLMStream([SAMPLE], tok, seq_len=16, batch_size=2)
    shuffled = StreamingLMStream([SAMPLE], tok, seq_len=16, batch_size=2, shuffle_buffer=8, seed=3)
    assert not all(torch.equal(a.tokens, b.tokens) for a, b in zip(_take(plain, 6), _take(shuffled, 6)))
    with pytest.raises(ValueError, match="seed"):
        StreamingLMStream([SAMPLE], tok, seq_len=16, batch_size=2, shuffle_buffer=8, seed=4).load_state_dict(state)


def test_builders_by_file_type():
    assert [hf_builder(p) for p in ("a.jsonl", "a.jsonl.zst", "b.json.gz", "c.csv", "d.parquet")] == \
        ["json", "json", "json", "csv", "parquet"]
    with pytest.raises(ValueError, match="cannot stream"):
        hf_builder("e.txt")


def test_config_key_selects_the_streaming_path(tok):
    """data.streaming (default false) swaps LMStream for the streaming one; the streamed training text
    skips the first 64 documents, which are then the held-out text (the default sample holds hundreds)."""
    from training.config import resolve_config
    from training.data import lm_stream
    off = resolve_config(str(SAMPLES_DIR.parent.parent / "recipes/configs/tiny_pretrain.yaml"),
                         {"data.batch_size": 4, "data.seq_len": 16})
    assert off.data.streaming is False
    assert type(lm_stream(off, tok, [], rank=0, world_size=1).streams[0]).__name__ == "LMStream"
    on = resolve_config(str(SAMPLES_DIR.parent.parent / "recipes/configs/tiny_pretrain.yaml"),
                        {"data.batch_size": 4, "data.seq_len": 16, "data.streaming": True, "data.shuffle_buffer": 0})
    stream = lm_stream(on, tok, [], rank=0, world_size=1)
    assert isinstance(stream.streams[0], StreamingLMStream)
    assert next(stream).tokens.shape == (4, 16)
    from training.data import data_path, heldout_texts
    held = heldout_texts(on)
    texts = load_texts(data_path(on.data.text[0], key="data.text"), max_docs=65)
    assert len(held) == 64 and held[0].text == texts[0][:2000]
    first = tok.encode(texts[64], bos=True, eos=True)
    again = lm_stream(on, tok, [], rank=0, world_size=1)
    assert next(again).tokens[0].tolist() == first[:16]


def test_csv_and_parquet_copies_stream_the_same_batches(tok, tmp_path):
    import pandas as pd
    frame = pd.DataFrame({"text": load_texts(SAMPLE)})
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet")
    ref = _take(StreamingLMStream([SAMPLE], tok, seq_len=32, batch_size=4), 3)
    for path in (tmp_path / "t.csv", tmp_path / "t.parquet"):
        for a, b in zip(ref, _take(StreamingLMStream([path], tok, seq_len=32, batch_size=4), 3)):
            assert torch.equal(a.tokens, b.tokens), path


def test_two_files_two_ranks_skip_the_first_documents_of_the_stream(tmp_path):
    """The held-out documents are the first skip_docs of the whole stream, whatever the files and ranks: with
    2 files on 2 ranks datasets' "auto" split gave each rank a file and skipped the first docs of *each* file,
    so held-out documents of the first file were trained on."""
    import json
    from data_pipeline.hf_stream import stream_text_dataset
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{name}{i}"}) + "\n" for i in range(10)))
    files = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    every = [f"{n}{i}" for n in "ab" for i in range(10)]
    seen = [[row["text"] for row in stream_text_dataset(files, rank=r, world_size=2, skip_docs=4)] for r in (0, 1)]
    assert sorted(seen[0] + seen[1]) == sorted(every[4:])
    assert seen[0] == every[4::2] and seen[1] == every[5::2]


def test_a_row_without_a_text_string_is_an_error_naming_the_file(tmp_path):
    from data_pipeline.hf_stream import stream_text_dataset
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 7}\n')
    with pytest.raises(ValueError, match="bad.jsonl"):
        list(stream_text_dataset([bad]))
