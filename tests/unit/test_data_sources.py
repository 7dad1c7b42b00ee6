"""load_source on every committed sample format, and every bad-input case."""

from __future__ import annotations

import gzip
import json
import shutil
import types
from pathlib import Path

import pytest

from data_pipeline import SAMPLES_DIR, DataError, load_source
from data_pipeline.records import GSM8KRecord, HellaSwagRecord, QARecord, SimpleQARecord, TextRecord

S = SAMPLES_DIR


# ------------------------------------------------------------------------------------- good input
@pytest.mark.parametrize(
    "path, count",
    [
        ("triviaqa_validation_sample.jsonl", 300),
        ("triviaqa_validation_sample.parquet", 50),
        ("triviaqa_validation_sample_arrow", 50),
        ("triviaqa_raw_sample.json", 20),
    ],
)
def test_triviaqa_formats_agree(path: str, count: int) -> None:
    recs = load_source("triviaqa", S / path)
    assert len(recs) == count and all(isinstance(r, QARecord) for r in recs)
    reference = load_source("triviaqa", S / "triviaqa_validation_sample.jsonl")[:20]
    assert recs[:20] == reference
    first = recs[0]
    assert first.id == "tc_33" and first.question.startswith("Which Lloyd Webber musical")
    assert first.answers[0] == "Sunset Boulevard"  # canonical value first
    assert "Sunset Blvd" in first.answers and "sunset bulevard" in first.answers  # aliases + normalized
    assert len(first.answers) == len(set(first.answers))


def test_triviaqa_json_list_of_hf_rows(tmp_path: Path) -> None:
    rows = [json.loads(l) for l in (S / "triviaqa_validation_sample.jsonl").read_text().splitlines()[:3]]
    p = tmp_path / "rows.json"
    p.write_text(json.dumps(rows))
    assert load_source("triviaqa", p) == load_source("triviaqa", S / "triviaqa_validation_sample.jsonl")[:3]


def test_nq_open() -> None:
    recs = load_source("nq_open", S / "nq_open_validation_sample.jsonl")
    assert len(recs) == 300 and recs[0] == QARecord("nq_open-0", "when was the last time anyone was on the moon", ["14 December 1972 UTC", "December 1972"])


def test_hellaswag_int_and_str_labels() -> None:
    official = load_source("hellaswag", S / "hellaswag_val_sample.jsonl")
    hf = load_source("hellaswag", S / "hellaswag_hf_sample.jsonl")
    assert len(official) == 300 and len(hf) == 20
    assert all(isinstance(r, HellaSwagRecord) and isinstance(r.label, int) and len(r.endings) == 4 for r in official)
    assert hf == official[:20]
    # lm-eval-harness prompt: "{activity_label}: {ctx_a} {ctx_b.capitalize()}"
    assert official[0].label == 3 and official[0].ctx == "Roof shingle removal: A man is sitting on a roof. He"


def test_gsm8k_jsonl_and_requests_file() -> None:
    plain = load_source("gsm8k", S / "gsm8k_test_sample.jsonl")
    requests = load_source("gsm8k", S / "gsm8k_requests_sample.jsonl.gz")
    assert len(plain) == 300 and len(requests) == 20 and all(isinstance(r, GSM8KRecord) for r in plain)
    assert [(r.question, r.answer) for r in requests] == [(r.question, r.answer) for r in plain[:20]]
    assert plain[0].answer.endswith("#### 18")


def test_simpleqa_csv() -> None:
    recs = load_source("simpleqa", S / "simple_qa_test_set_sample.csv")
    assert len(recs) == 300 and all(isinstance(r, SimpleQARecord) for r in recs)
    r = recs[0]
    assert r.question == "Who received the IEEE Frank Rosenblatt Award in 2010?" and r.answer == "Michio Sugeno"
    assert r.metadata["topic"] == "Science and technology" and isinstance(r.metadata["urls"], list)


@pytest.mark.parametrize("name", ["prose_sample.jsonl.zst", "prose_sample.jsonl.zstd", "prose_sample.jsonl", "prose_sample.jsonl.gz"])
def test_dclm_streamed_in_every_format(tmp_path: Path, name: str) -> None:
    import zstandard

    text = zstandard.ZstdDecompressor().stream_reader(open(S / "prose_sample.jsonl.zst", "rb")).read()
    target = tmp_path / name
    if name.endswith((".zst", ".zstd")):
        shutil.copy(S / "prose_sample.jsonl.zst", target)
    elif name.endswith(".gz"):
        target.write_bytes(gzip.compress(text))
    else:
        target.write_bytes(text)
    it = load_source("dclm", target)
    assert isinstance(it, types.GeneratorType)  # streamed, not materialised
    first = next(it)
    assert isinstance(first, TextRecord) and first.id == "lambada-0" and first.text
    rest = list(it)
    assert 1 + len(rest) == text.count(b"\n") == 2189


def test_dclm_small_plain_jsonl_and_text_alias() -> None:
    recs = list(load_source("text", S / "prose_sample_small.jsonl"))
    assert len(recs) == 40 and all(r.text for r in recs)


# -------------------------------------------------------------------------------------- bad input
def _error(kind: str, path: Path) -> str:
    with pytest.raises(DataError) as info:
        out = load_source(kind, path)
        if not isinstance(out, list):
            list(out)
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in msg and str(path) in msg
    return msg


def test_malformed_json_line_is_named(tmp_path: Path) -> None:
    p = tmp_path / "nq.jsonl"
    p.write_text('{"question": "q", "answer": ["a"]}\n{"question": "q2", "answer": [\n')
    msg = _error("nq_open", p)
    assert f"{p}:2" in msg and "malformed JSON" in msg


def test_malformed_raw_triviaqa_json(tmp_path: Path) -> None:
    p = tmp_path / "wikipedia-dev.json"
    p.write_text('{"Data": [{"Question": "q",}]}')
    assert "malformed JSON" in _error("triviaqa", p)


def test_raw_triviaqa_without_data_key(tmp_path: Path) -> None:
    p = tmp_path / "x.json"
    p.write_text('{"Version": 1.0}')
    assert '"Data"' in _error("triviaqa", p)


@pytest.mark.parametrize(
    "kind, row, field",
    [
        ("triviaqa", {"question": "q", "question_id": "x"}, "answer"),
        ("triviaqa", {"question": "q", "question_id": "x", "answer": {"aliases": []}}, "value"),
        ("nq_open", {"answer": ["a"]}, "question"),
        ("hellaswag", {"ctx": "c", "endings": ["a", "b", "c", "d"]}, "label"),
        ("gsm8k", {"question": "q"}, "answer"),
        ("dclm", {"url": "u"}, "text"),
    ],
)
def test_missing_field_names_file_line_and_field(tmp_path: Path, kind: str, row: dict, field: str) -> None:
    p = tmp_path / "bad.jsonl"
    good = {"triviaqa": {"question": "q", "question_id": "y", "answer": {"value": "v"}}, "nq_open": {"question": "q", "answer": ["a"]},
            "hellaswag": {"ctx": "c", "endings": ["a", "b", "c", "d"], "label": 0}, "gsm8k": {"question": "q", "answer": "a"},
            "dclm": {"text": "t"}}[kind]
    p.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    msg = _error(kind, p)
    assert f"{p}:2" in msg and f"missing field {field!r}" in msg


def test_hellaswag_bad_label(tmp_path: Path) -> None:
    p = tmp_path / "h.jsonl"
    p.write_text(json.dumps({"ctx": "c", "endings": ["a", "b"], "label": "x"}) + "\n")
    assert "label" in _error("hellaswag", p)
    p.write_text(json.dumps({"ctx": "c", "endings": ["a", "b"], "label": 5}) + "\n")
    assert "out of range" in _error("hellaswag", p)


def test_simpleqa_missing_column_and_bad_metadata(tmp_path: Path) -> None:
    p = tmp_path / "s.csv"
    p.write_text("metadata,question,answer\n{},q,a\n")
    assert "missing column" in _error("simpleqa", p)
    p.write_text('metadata,problem,answer\n{},q,a\n"{\'topic\': [unclosed",q2,a2\n')
    msg = _error("simpleqa", p)
    assert "metadata" in msg and f"{p}:3" in msg


@pytest.mark.parametrize(
    "kind, name",
    [("triviaqa", "t.jsonl"), ("triviaqa", "t.json"), ("nq_open", "n.jsonl"), ("hellaswag", "h.jsonl"),
     ("gsm8k", "g.jsonl"), ("simpleqa", "s.csv"), ("dclm", "d.jsonl.zst")],
)
def test_empty_file(tmp_path: Path, kind: str, name: str) -> None:
    p = tmp_path / name
    p.write_bytes(b"")
    assert "empty file" in _error(kind, p)


def test_blank_lines_only_is_no_records(tmp_path: Path) -> None:
    p = tmp_path / "blank.jsonl"
    p.write_text("\n\n")
    assert "no records" in _error("nq_open", p)


def test_unknown_kind() -> None:
    with pytest.raises(DataError, match="unknown source kind 'squad'"):
        load_source("squad", S / "nq_open_validation_sample.jsonl")


def test_missing_file(tmp_path: Path) -> None:
    assert "file not found" in _error("triviaqa", tmp_path / "nope.jsonl")


@pytest.mark.parametrize("name", ["d.jsonl.zst", "d.jsonl.zstd", "d.jsonl.gz"])
def test_unreadable_compression_header(tmp_path: Path, name: str) -> None:
    p = tmp_path / name
    p.write_text('{"text": "not compressed"}\n')
    assert "unreadable compression" in _error("dclm", p)


def test_corrupt_zstd_body(tmp_path: Path) -> None:
    data = (S / "prose_sample.jsonl.zst").read_bytes()
    p = tmp_path / "corrupt.jsonl.zst"
    p.write_bytes(data[:4] + bytes(200) + data[204:5000])
    assert "unreadable" in _error("dclm", p)


def test_corrupt_gzip_requests_file(tmp_path: Path) -> None:
    p = tmp_path / "requests.jsonl.gz"
    p.write_bytes((S / "gsm8k_requests_sample.jsonl.gz").read_bytes()[:300])
    assert "unreadable" in _error("gsm8k", p)


def test_datasetdict_folder_and_plain_folder(tmp_path: Path) -> None:
    (tmp_path / "dd" / "validation").mkdir(parents=True)
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["validation"]}')
    assert "DatasetDict" in _error("triviaqa", tmp_path / "dd")
    (tmp_path / "plain").mkdir()
    assert "save_to_disk" in _error("triviaqa", tmp_path / "plain")


def test_unsupported_extension(tmp_path: Path) -> None:
    p = tmp_path / "x.txt"
    p.write_text("hello")
    assert "unsupported file type" in _error("nq_open", p)


# ------------------------------------------------------------------- datasets.load_dataset, line reader
@pytest.mark.parametrize(
    "kind, name",
    [("triviaqa", "triviaqa_validation_sample.jsonl"), ("triviaqa", "triviaqa_validation_sample.parquet"),
     ("nq_open", "nq_open_validation_sample.jsonl"), ("hellaswag", "hellaswag_val_sample.jsonl"),
     ("hellaswag", "hellaswag_hf_sample.jsonl"), ("gsm8k", "gsm8k_test_sample.jsonl"),
     ("gsm8k", "gsm8k_requests_sample.jsonl.gz")],
)
def test_eval_sets_are_read_by_datasets_as_the_line_reader_reads_them(kind: str, name: str, monkeypatch) -> None:
    """jsonl/parquet evaluation sets go through datasets.load_dataset; the records are the line reader's."""
    import datasets

    from data_pipeline import sources

    calls = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    via_library = sources._LOADERS[kind](S / name, sources._library_rows)    # raises if the library fails
    assert [a[0] for a, _ in calls] == ["parquet" if name.endswith(".parquet") else "json"]
    assert calls[0][1]["streaming"] and calls[0][1]["data_files"] == str(S / name)
    assert via_library == sources._LOADERS[kind](S / name) == load_source(kind, S / name)


def test_rows_the_library_schema_cannot_hold_are_read_line_by_line(tmp_path: Path, capfd) -> None:
    """A string answer next to a list answer (NQ allows both) fails datasets' one Arrow schema per file;
    the line reader reads it, and a bad row is still named file:line."""
    from data_pipeline import sources

    p = tmp_path / "nq.jsonl"
    p.write_text('{"question": "q1", "answer": ["a", "b"]}\n\n{"question": "q2", "answer": "c"}\n')
    with pytest.raises(sources._LibraryCannot):
        list(sources._library_rows(p))
    assert load_source("nq_open", p) == [QARecord("nq_open-0", "q1", ["a", "b"]), QARecord("nq_open-1", "q2", ["c"])]
    assert capfd.readouterr().err == ""     # the library's failure is not reported: it is not the user's
    # datasets promotes a column of ints and floats to floats: the float label is still an error at its line
    h = tmp_path / "h.jsonl"
    h.write_text(json.dumps({"ctx": "c", "endings": ["a", "b"], "label": 1}) + "\n"
                 + json.dumps({"ctx": "c", "endings": ["a", "b"], "label": 1.5}) + "\n")
    msg = _error("hellaswag", h)
    assert f"{h}:2" in msg and "'label'" in msg
    # an absent oe-eval doc id is the row, whichever reader filled it in
    g = tmp_path / "requests.jsonl"
    g.write_text(json.dumps({"doc": {"id": 7, "question": "q", "answer": "a"}}) + "\n"
                 + json.dumps({"doc": {"question": "q2", "answer": "b"}}) + "\n")
    assert [r.id for r in load_source("gsm8k", g)] == ["gsm8k-7", "gsm8k-1"]
    assert sources._LOADERS["gsm8k"](g) == sources._LOADERS["gsm8k"](g, sources._library_rows)
