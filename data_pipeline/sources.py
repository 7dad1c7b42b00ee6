"""Readers for the official file formats users download; ``load_source(kind, path)`` is the one entry.

Accepted inputs per ``kind`` (``path`` may be a str or Path):

- ``triviaqa``: the raw TriviaQA JSON (``{"Data": [{"Question", "QuestionId", "Answer": {"Value",
  "Aliases", "NormalizedAliases", ...}}, ...]}``), or the HF schema (``question``, ``question_id``,
  ``answer.{value, aliases, normalized_aliases}``) as ``.parquet``, ``.jsonl`` or a ``save_to_disk``
  folder. -> ``list[QARecord]`` (answers = value, aliases, normalized value/aliases; deduplicated).
- ``nq_open``: NQ-open jsonl ``{"question", "answer": [...]}`` (also parquet / save_to_disk). ->
  ``list[QARecord]``, id ``nq_open-<row>``.
- ``hellaswag``: official jsonl (int ``label``) or HF rows (str ``label``); ``ctx``, ``endings[4]``. ->
  ``list[HellaSwagRecord]``, id ``hellaswag-<row>`` (``ind`` is not unique in the official files).
- ``gsm8k``: jsonl ``{"question", "answer"}`` or the gzipped oe-eval requests file
  (``requests.jsonl.gz``, fields under ``doc``; one request per problem, deduplicated by ``doc.id``).
  -> ``list[GSM8KRecord]``.
- ``simpleqa``: the official ``simple_qa_test_set.csv`` (``metadata`` is a Python dict repr, parsed
  with ``ast.literal_eval``; ``problem``; ``answer``; extra columns ignored; ``.csv.gz`` too). ->
  ``list[SimpleQARecord]``, id ``simpleqa-<row>``.
- ``dclm`` (alias ``text``): jsonl with a ``text`` key, plain or compressed (``.jsonl.zst``,
  ``.jsonl.zstd``, ``.jsonl.gz``). Streamed: returns an *iterator* of ``TextRecord`` (id = the row's
  ``id`` if present, else ``<file name>:<line>``).

Every jsonl/json/csv/parquet file may be gzip-compressed (``.gz``). Bad input raises
:class:`DataError` (a ``ValueError``) with a one-line message naming the file (and line, for line
formats) and what was expected. Nothing here touches the network or the HF cache (``HF_DATASETS_OFFLINE=1``,
streaming reads, ``keep_in_memory``).

Which reader reads what, and why:

- ``.jsonl`` and ``.parquet`` evaluation sets (triviaqa, nq_open, hellaswag, gsm8k) are read with
  ``datasets.load_dataset("json" | "parquet", data_files=path, streaming=True)``; ``save_to_disk``
  folders with ``datasets.load_from_disk``. ``datasets`` reports no line numbers and its Arrow schema
  spans the whole file: it raises on a column that is a string in one row and a list in another (NQ's
  ``answer`` may be either) and promotes a column mixing ints and floats to floats. So when it fails, or
  a row it gave does not pass the field checks, the file is read again line by line with ``json``
  (:func:`iter_rows`): that reader accepts what the library's schema cannot hold and names ``file:line``
  in the error. Records are identical either way (tested on every sample and on such files).
- ``.csv`` (SimpleQA) stays on the stdlib ``csv`` module: ``load_dataset("csv")`` is pandas, which turns
  the answer ``1987`` into ``1987.0`` and ``NA`` into null unless every column is typed, fills a row with
  a missing column with ``""`` instead of failing, and knows no line numbers for a bad ``metadata``
  cell; typing the columns and a line-numbered validation pass would be this reader again.
- ``dclm``/``text`` streams by hand so that a record without an ``id`` is named ``<file name>:<line>``;
  training streams pretraining text through ``datasets`` instead (``data.streaming``,
  :mod:`data_pipeline.hf_stream`).
- A raw ``.json`` document (TriviaQA ``{"Data": [...]}``) is one ``json.load``.
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from data_pipeline.records import (
    GSM8KRecord,
    HellaSwagRecord,
    QARecord,
    SimpleQARecord,
    TextRecord,
    dedupe,
)

__all__ = ["DataError", "load_source", "iter_rows", "SOURCE_KINDS"]

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b"


class DataError(ValueError):
    """A data file is missing, unreadable or not in the expected format (message is one line)."""

    def __init__(self, where: str | os.PathLike, message: str | None = None) -> None:
        # DataError(where, message) -> "where: message"; DataError(message) also works.
        self.where = str(where) if message is not None else ""
        text = f"{where}: {message}" if message is not None else str(where)
        super().__init__(" ".join(text.split()))


# ----------------------------------------------------------------------------------------- opening
def _check_file(path: Path, expected: str) -> None:
    if not path.exists():
        raise DataError(path, f"file not found; expected {expected}")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(path, f"empty file; expected {expected}")


def _compression(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".zst") or name.endswith(".zstd"):
        return "zstd"
    if name.endswith(".gz"):
        return "gzip"
    return None


def _open_text(path: Path) -> io.TextIOBase:
    """Open a (possibly gzip/zstd-compressed) file as UTF-8 text; bad compression -> DataError."""
    comp = _compression(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if comp == "zstd":
        if head != _ZSTD_MAGIC:
            raise DataError(path, "unreadable compression: not a zstd stream (expected zstd magic bytes)")
        import zstandard

        raw = open(path, "rb")
        stream = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True, read_across_frames=True)
        return io.TextIOWrapper(stream, encoding="utf-8")
    if comp == "gzip":
        if head[:2] != _GZIP_MAGIC:
            raise DataError(path, "unreadable compression: not a gzip file")
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _base_suffix(path: Path) -> str:
    """'.jsonl' for x.jsonl, x.jsonl.gz, x.jsonl.zst; '.csv' for x.csv.gz; '' for folders."""
    if path.is_dir():
        return ""
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in (".gz", ".zst", ".zstd"):
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _lines(path: Path, expected: str) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line of a jsonl file."""
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}", f"malformed JSON ({e.msg}, column {e.colno}); expected one JSON object per line with {expected}") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{lineno}", f"expected a JSON object with {expected}, got {type(obj).__name__}")
                yield lineno, obj
    except DataError:
        raise
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(path, f"unreadable file ({type(e).__name__}: {e}); expected {expected}") from None
    except Exception as e:  # zstandard.ZstdError has no common base with OSError
        if type(e).__module__.startswith("zstandard"):
            raise DataError(path, f"unreadable compression ({e}); expected a zstd-compressed jsonl with {expected}") from None
        raise


def iter_rows(path: str | os.PathLike, *, expected: str = "records") -> Iterator[tuple[str, dict]]:
    """Yield (location, row dict) from a jsonl / json list / parquet file or a ``save_to_disk`` folder.

    ``location`` is ``"file:line"`` for jsonl and ``"file row i"`` otherwise; loaders put it in errors.
    """
    path = Path(path)
    _check_file(path, expected)
    suffix = _base_suffix(path)
    if path.is_dir():
        yield from _arrow_folder_rows(path, expected)
    elif suffix == ".jsonl":
        for lineno, obj in _lines(path, expected):
            yield f"{path}:{lineno}", obj
    elif suffix == ".json":
        data = _load_json(path, expected)
        if not isinstance(data, list):
            raise DataError(path, f"expected a JSON list of objects with {expected}, got {type(data).__name__}")
        for i, obj in enumerate(data):
            if not isinstance(obj, dict):
                raise DataError(f"{path} row {i}", f"expected an object with {expected}")
            yield f"{path} row {i}", obj
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise DataError(path, f"unreadable parquet ({type(e).__name__}: {e}); expected a parquet table with {expected}") from None
        for i, obj in enumerate(table.to_pylist()):
            yield f"{path} row {i}", obj
    else:
        raise DataError(path, f"unsupported file type {''.join(path.suffixes) or '(none)'}; expected .jsonl, .json, .parquet or a save_to_disk folder with {expected}")


class _LibraryCannot(Exception):
    """``datasets`` could not read the file (or gave a row the field checks reject): read it line by line."""


def _library_rows(path: str | os.PathLike, *, expected: str = "records") -> Iterator[tuple[str, dict]]:
    """Like :func:`iter_rows`, with ``.jsonl`` and ``.parquet`` files read by ``datasets.load_dataset``.

    Raises :class:`_LibraryCannot` where the library fails; locations are ``"file row i"`` (no lines).
    """
    path = Path(path)
    _check_file(path, expected)
    builder = {".jsonl": "json", ".parquet": "parquet"}.get(_base_suffix(path)) if path.is_file() else None
    if builder is None:
        yield from iter_rows(path, expected=expected)
        return
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    # the builder logs its failures; here a failure only means "read it line by line"
    builder_log = logging.getLogger(f"datasets.packaged_modules.{builder}.{builder}")
    level = builder_log.level
    builder_log.setLevel(logging.CRITICAL)
    try:  # streaming: no Arrow copy of the file; the builder's lock files go to a throwaway cache_dir
        with tempfile.TemporaryDirectory(prefix="smf-datasets-") as cache:
            rows = list(datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True,
                                              cache_dir=cache))
    except Exception as e:
        raise _LibraryCannot(f"{type(e).__name__}: {e}") from None
    finally:
        builder_log.setLevel(level)
    if not rows:
        raise _LibraryCannot("no rows")
    for i, obj in enumerate(rows):
        yield f"{path} row {i}", obj


def _load_json(path: Path, expected: str) -> Any:
    try:
        with _open_text(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}", f"malformed JSON ({e.msg}, column {e.colno}); expected {expected}") from None
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(path, f"unreadable file ({type(e).__name__}: {e}); expected {expected}") from None


def _arrow_folder_rows(path: Path, expected: str) -> Iterator[tuple[str, dict]]:
    if (path / "dataset_dict.json").exists():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise DataError(path, f"is a DatasetDict folder; pass one split folder (one of {splits})")
    if not (path / "state.json").exists():
        raise DataError(path, f"folder is not a datasets save_to_disk folder (no state.json); expected {expected}")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    try:
        ds = datasets.load_from_disk(str(path), keep_in_memory=True)
    except Exception as e:
        raise DataError(path, f"unreadable save_to_disk folder ({type(e).__name__}: {e})") from None
    for i, obj in enumerate(ds):
        yield f"{path} row {i}", obj


# ------------------------------------------------------------------------------------------ fields
def _field(row: dict, key: str, where: str, typ: type | tuple[type, ...], expected: str) -> Any:
    if key not in row or row[key] is None:
        raise DataError(where, f"missing field {key!r}; expected {expected}")
    value = row[key]
    if not isinstance(value, typ):
        names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise DataError(where, f"field {key!r} should be {names}, got {type(value).__name__}; expected {expected}")
    return value


def _str_list(value: Any, key: str, where: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise DataError(where, f"field {key!r} should be a list of strings")
    return list(value)


# ----------------------------------------------------------------------------------------- sources
_TQA_EXPECTED = "TriviaQA fields (HF: question, question_id, answer.value/aliases; raw: Question, QuestionId, Answer.Value/Aliases)"


def _triviaqa_row(row: dict, where: str) -> QARecord:
    if "Question" in row:  # raw TriviaQA (QuestionId / Answer.Value / Answer.Aliases)
        q = _field(row, "Question", where, str, _TQA_EXPECTED)
        qid = _field(row, "QuestionId", where, str, _TQA_EXPECTED)
        ans = _field(row, "Answer", where, dict, _TQA_EXPECTED)
        keys = ("Value", "Aliases", "NormalizedValue", "NormalizedAliases")
    else:
        q = _field(row, "question", where, str, _TQA_EXPECTED)
        qid = _field(row, "question_id", where, str, _TQA_EXPECTED)
        ans = _field(row, "answer", where, dict, _TQA_EXPECTED)
        keys = ("value", "aliases", "normalized_value", "normalized_aliases")
    value = _field(ans, keys[0], where, str, _TQA_EXPECTED)
    answers = [value]
    answers += _str_list(ans.get(keys[1]) or [], keys[1], where)
    if isinstance(ans.get(keys[2]), str):
        answers.append(ans[keys[2]])
    answers += _str_list(ans.get(keys[3]) or [], keys[3], where)
    answers = dedupe([a.strip() for a in answers])
    if not answers:
        raise DataError(where, f"empty answer for question {qid!r}")
    return QARecord(id=qid, question=q.strip(), answers=answers)


def _load_triviaqa(path: Path, rows: Callable[..., Iterator[tuple[str, dict]]] = iter_rows) -> list[QARecord]:
    if _base_suffix(path) == ".json":  # raw format is one JSON document {"Data": [...]}
        _check_file(path, "a TriviaQA JSON file")
        data = _load_json(path, 'a TriviaQA JSON object {"Data": [...]}')
        if isinstance(data, dict):
            items = data.get("Data")
            if not isinstance(items, list):
                raise DataError(path, 'missing field "Data"; expected the raw TriviaQA format {"Data": [...], ...}')
            return [_triviaqa_row(_as_dict(r, f"{path} Data[{i}]"), f"{path} Data[{i}]") for i, r in enumerate(items)]
        if isinstance(data, list):  # a JSON list of HF-schema rows
            return [_triviaqa_row(_as_dict(r, f"{path} row {i}"), f"{path} row {i}") for i, r in enumerate(data)]
        raise DataError(path, f'expected the raw TriviaQA format {{"Data": [...]}} or a list of rows, got {type(data).__name__}')
    return [_triviaqa_row(row, where) for where, row in rows(path, expected=_TQA_EXPECTED)]


def _as_dict(obj: Any, where: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(where, f"expected an object, got {type(obj).__name__}")
    return obj


def _load_nq_open(path: Path, rows: Callable[..., Iterator[tuple[str, dict]]] = iter_rows) -> list[QARecord]:
    expected = 'NQ-open fields {"question": str, "answer": [str, ...]}'
    out = []
    for i, (where, row) in enumerate(rows(path, expected=expected)):
        q = _field(row, "question", where, str, expected)
        ans = _field(row, "answer", where, (list, tuple, str), expected)
        answers = dedupe([a.strip() for a in ([ans] if isinstance(ans, str) else _str_list(ans, "answer", where))])
        if not answers:
            raise DataError(where, f"empty answer list; expected {expected}")
        out.append(QARecord(id=f"nq_open-{i}", question=q.strip(), answers=answers))
    return out


def _load_hellaswag(path: Path, rows: Callable[..., Iterator[tuple[str, dict]]] = iter_rows) -> list[HellaSwagRecord]:
    expected = 'HellaSwag fields {"ctx": str, "endings": [4 str], "label": int or str}'
    out = []
    for i, (where, row) in enumerate(rows(path, expected=expected)):
        ctx = _field(row, "ctx", where, str, expected)
        if all(isinstance(row.get(k), str) for k in ("activity_label", "ctx_a", "ctx_b")):
            # lm-eval-harness's prompt: "{activity_label}: {ctx_a} {ctx_b.capitalize()}"
            ctx = f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}"
        endings = _str_list(_field(row, "endings", where, (list, tuple), expected), "endings", where)
        label = _field(row, "label", where, (int, str), expected)
        try:
            label = int(label)
        except ValueError:
            raise DataError(where, f"field 'label' should be an integer (or its string), got {label!r}") from None
        if not 0 <= label < len(endings):
            raise DataError(where, f"label {label} out of range for {len(endings)} endings")
        out.append(HellaSwagRecord(id=f"hellaswag-{i}", ctx=ctx, endings=endings, label=label))
    return out


def _load_gsm8k(path: Path, rows: Callable[..., Iterator[tuple[str, dict]]] = iter_rows) -> list[GSM8KRecord]:
    expected = 'GSM8K fields {"question": str, "answer": str} (or the oe-eval requests file with doc.question/doc.answer)'
    out, seen = [], set()
    for i, (where, row) in enumerate(rows(path, expected=expected)):
        if "doc" in row:  # oe-eval requests file: one request per problem, problem under "doc"
            doc = _as_dict(row["doc"], where)
            doc_id = doc.get("id")   # null or absent: the row (datasets fills an absent key with null)
            if isinstance(doc_id, float) and doc_id.is_integer():
                doc_id = int(doc_id)     # datasets makes an id column floats if one id is a float
            rid = f"gsm8k-{i if doc_id is None else doc_id}"
            if rid in seen:
                continue
            seen.add(rid)
            row = doc
        else:
            rid = f"gsm8k-{i}"
        q = _field(row, "question", where, str, expected)
        a = _field(row, "answer", where, str, expected)
        out.append(GSM8KRecord(id=rid, question=q, answer=a))
    return out


def _load_simpleqa(path: Path) -> list[SimpleQARecord]:
    expected = "the SimpleQA csv columns metadata, problem, answer"
    _check_file(path, expected)
    if _base_suffix(path) != ".csv":
        raise DataError(path, f"unsupported file type {''.join(path.suffixes)}; expected a .csv with {expected}")
    out = []
    try:
        with _open_text(path) as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("metadata", "problem", "answer") if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}:1", f"missing column(s) {missing} in header {reader.fieldnames}; expected {expected}")
            for i, row in enumerate(reader):
                where = f"{path}:{reader.line_num}"
                if None in row or any(row[c] is None for c in ("metadata", "problem", "answer")):
                    raise DataError(where, f"wrong number of columns; expected {expected}")
                try:
                    meta = ast.literal_eval(row["metadata"]) if row["metadata"].strip() else {}
                except (ValueError, SyntaxError):
                    raise DataError(where, "metadata is not a Python dict literal (expected e.g. \"{'topic': ..., 'answer_type': ..., 'urls': [...]}\")") from None
                if not isinstance(meta, dict):
                    raise DataError(where, f"metadata should be a dict literal, got {type(meta).__name__}")
                out.append(SimpleQARecord(id=f"simpleqa-{i}", question=row["problem"].strip(), answer=row["answer"].strip(), metadata=meta))
    except DataError:
        raise
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(path, f"unreadable csv ({type(e).__name__}: {e}); expected {expected}") from None
    if not out:
        raise DataError(path, f"no rows; expected {expected}")
    return out


def _iter_dclm(path: Path) -> Iterator[TextRecord]:
    count = 0
    for lineno, row in _lines(path, 'a "text" field'):
        text = _field(row, "text", f"{path}:{lineno}", str, 'a "text" string field (DCLM jsonl)')
        rid = row.get("id")
        count += 1
        yield TextRecord(id=str(rid) if rid is not None else f"{path.name}:{lineno}", text=text)
    if count == 0:
        raise DataError(path, 'no records; expected jsonl lines with a "text" field')


def _load_dclm(path: Path) -> Iterator[TextRecord]:
    expected = 'jsonl lines with a "text" field (.jsonl, .jsonl.zst, .jsonl.zstd or .jsonl.gz)'
    _check_file(path, expected)
    if path.is_dir() or _base_suffix(path) != ".jsonl":
        raise DataError(path, f"unsupported file type; expected {expected}")
    _open_text(path).close()  # fail now (not on first next()) on a bad compression header
    return _iter_dclm(path)


_LOADERS: dict[str, Callable[[Path], Any]] = {
    "triviaqa": _load_triviaqa,
    "nq_open": _load_nq_open,
    "hellaswag": _load_hellaswag,
    "gsm8k": _load_gsm8k,
    "simpleqa": _load_simpleqa,
    "dclm": _load_dclm,
    "text": _load_dclm,
}
SOURCE_KINDS = tuple(_LOADERS)
_VIA_DATASETS = ("triviaqa", "nq_open", "hellaswag", "gsm8k")   # .jsonl / .parquet through datasets.load_dataset


def load_source(kind: str, path: str | os.PathLike) -> Any:
    """Load ``path`` as a ``kind`` source (see the module docstring for accepted formats).

    Returns a list of records, except ``dclm``/``text`` which return a lazy iterator of TextRecord.
    Raises DataError (a ValueError) with a one-line message on any bad input.
    """
    if kind not in _LOADERS:
        raise DataError(path, f"unknown source kind {kind!r}; expected one of {', '.join(SOURCE_KINDS)}")
    path = Path(path)
    loader = _LOADERS[kind]
    records = None
    if kind in _VIA_DATASETS:
        try:
            records = loader(path, _library_rows)
        except (_LibraryCannot, DataError):
            records = None  # the line reader below gives the same records, or names file:line in the error
    if records is None:
        records = loader(path)
    if isinstance(records, list) and not records:
        raise DataError(path, f"no records found; expected a non-empty {kind} file")
    return records
