"""Background document frequencies (the IDF side) and their file format.

A "document" is one global background batch: every rank's data of one step. df(i) counts the global
batches in which slot i was looked up at least once.

The tracker also sums the raw lookup counts over those batches, C_bg(i) (the background access
distribution of the KL ranking, arXiv 2604.05248).

File format (safetensors, never pickle): one int64 tensor `document_frequency` of length N, optionally an
int64 tensor `access_counts` of length N (files written before the KL ranking lack it), and string
metadata `format`, `format_version`, `num_slots`, `num_batches` plus whatever the caller adds.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

import torch
from torch import Tensor

from .tfidf import Indices, background_access_probability, inverse_document_frequency

FORMAT_NAME = "sparse_update.background"
FORMAT_VERSION = 1
DF_KEY = "document_frequency"
ACCESS_KEY = "access_counts"
_RESERVED_METADATA = ("format", "format_version", "num_slots", "num_batches")


class BackgroundTracker:
    """Accumulates document frequencies over background batches (collective when distributed)."""

    def __init__(self, *, num_slots: int, global_counts: Callable[[Indices], Tensor]) -> None:
        # global_counts: indices -> counts of the global batch (bincount + all_reduce), supplied by the finetuner.
        self._num_slots = int(num_slots)
        self._global_counts = global_counts
        self._df = torch.zeros(self._num_slots, dtype=torch.int64)
        self._access: Tensor | None = torch.zeros(self._num_slots, dtype=torch.int64)
        self._num_batches = 0
        self._collecting = False
        self._idf: Tensor | None = None  # cached: the statistics are fixed while finetuning
        self._q: Tensor | None = None

    @property
    def num_slots(self) -> int:
        """N, the number of memory slots (rows of the values table)."""
        return self._num_slots

    @property
    def document_frequency(self) -> Tensor:
        """int64 tensor [N]: number of background batches in which each slot was accessed."""
        return self._df

    @property
    def access_counts(self) -> Tensor | None:
        """int64 tensor [N]: lookups of each slot summed over the background batches, C_bg(i); None when the
        statistics were loaded from a file or checkpoint written before they were recorded."""
        return self._access

    @property
    def num_batches(self) -> int:
        """|B|: number of background batches counted."""
        return self._num_batches

    @property
    def is_collecting(self) -> bool:
        """True between start_collection() and stop_collection()."""
        return self._collecting

    def inverse_document_frequency(self) -> Tensor:
        """float64 [N]: ln((|B|+1)/(df(i)+1)), computed once per change of the statistics."""
        if self._idf is None or self._idf.device != self._df.device:
            self._idf = inverse_document_frequency(self._df, self._num_batches)
        return self._idf

    def background_access_probability(self) -> Tensor:
        """float64 [N]: q of the KL ranking from the access counts, computed once per change of the statistics."""
        if self._access is None:
            raise RuntimeError("no background access counts (statistics written before they were recorded); "
                               "re-run the background stage")
        if self._q is None or self._q.device != self._access.device:
            self._q = background_access_probability(self._access)
        return self._q

    def start_collection(self, *, reset: bool = True) -> None:
        """Begin counting; reset=False continues from the current statistics (e.g. after resuming)."""
        if reset:
            self._df = torch.zeros(self._num_slots, dtype=torch.int64, device=self._df.device)
            self._access = torch.zeros_like(self._df)
            self._num_batches = 0
            self._idf = self._q = None
        self._collecting = True

    def add_batch_indices(self, indices: Indices) -> Tensor:
        """Count one background batch (this rank's part of the global batch); returns its global counts.

        Collective when distributed: every rank calls it once per global batch.
        """
        if not self._collecting:
            raise RuntimeError("background_tracker.start_collection() must be called before add_batch_indices()")
        counts = self._global_counts(indices)
        if self._df.device != counts.device:
            self._df = self._df.to(counts.device)
        self._df += counts > 0
        if self._access is not None:
            self._access = self._access.to(counts.device) + counts.to(torch.int64)
        self._num_batches += 1
        self._idf = self._q = None
        return counts

    def stop_collection(self) -> None:
        """Stop counting; the statistics stay available."""
        self._collecting = False

    def set_statistics(self, document_frequency: Tensor, num_batches: int,
                       access_counts: Tensor | None = None) -> None:
        """Replace the statistics (used by loading); validates shape, dtype and range."""
        df = _validate_df(document_frequency, num_batches, self._num_slots, source="statistics")
        if access_counts is not None:
            access_counts = _validate_access(access_counts, df, source="statistics")
        self._df = df.to(self._df.device)
        self._access = access_counts.to(self._df.device) if access_counts is not None else None
        self._num_batches = int(num_batches)
        self._idf = self._q = None


def _validate_df(df: Tensor, num_batches: int, num_slots: int, *, source: str) -> Tensor:
    if not isinstance(df, Tensor) or df.dtype != torch.int64 or df.dim() != 1:
        raise ValueError(f"{source}: document_frequency must be a 1-D int64 tensor")
    if df.numel() != num_slots:
        raise ValueError(f"{source}: document_frequency has {df.numel()} entries, expected N={num_slots}")
    if num_batches < 0:
        raise ValueError(f"{source}: num_batches must be >= 0, got {num_batches}")
    if df.numel() and (int(df.min()) < 0 or int(df.max()) > num_batches):
        raise ValueError(f"{source}: document frequencies must lie in [0, num_batches={num_batches}]")
    return df


def _validate_access(access: Tensor, df: Tensor, *, source: str) -> Tensor:
    if not isinstance(access, Tensor) or access.dtype != torch.int64 or access.shape != df.shape:
        raise ValueError(f"{source}: access_counts must be an int64 tensor of {df.numel()} entries")
    if access.numel() and (int(access.min()) < 0 or bool(((access > 0) != (df > 0)).any())):
        raise ValueError(f"{source}: access_counts must be >= 0 and nonzero exactly where document_frequency is")
    return access


def save_background_file(
    path: str | os.PathLike,
    *,
    document_frequency: Tensor,
    num_batches: int,
    access_counts: Tensor | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write the statistics as safetensors, atomically (temp file + rename)."""
    from safetensors.torch import save_file

    extra = dict(metadata or {})
    for key, value in extra.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"background metadata must map str to str, got {key!r}: {value!r}")
        if key in _RESERVED_METADATA:
            raise ValueError(f"background metadata key {key!r} is reserved; use another name")
    meta = {
        **extra,
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "num_slots": str(document_frequency.numel()),
        "num_batches": str(int(num_batches)),
    }
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        tensors = {DF_KEY: document_frequency.detach().to("cpu", torch.int64).contiguous()}
        if access_counts is not None:
            tensors[ACCESS_KEY] = access_counts.detach().to("cpu", torch.int64).contiguous()
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_background_file(path: str | os.PathLike, *, num_slots: int) -> tuple[Tensor, int, dict[str, str]]:
    """Read and validate a background file: (document_frequency int64 [N], num_batches, metadata)."""
    df, num_batches, _, meta = load_background_statistics(path, num_slots=num_slots)
    return df, num_batches, meta


def load_background_statistics(path: str | os.PathLike, *, num_slots: int
                               ) -> tuple[Tensor, int, Tensor | None, dict[str, str]]:
    """Read and validate a background file: (document_frequency, num_batches, access_counts or None when the
    file predates them, metadata).

    Raises ValueError naming the file when it is not a valid background file or was made for another N.
    The file is parsed by safetensors only; nothing in it is ever executed or unpickled.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"background file {path} does not exist; run the background stage first")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            keys = list(f.keys())
            df = f.get_tensor(DF_KEY) if DF_KEY in keys else None
            access = f.get_tensor(ACCESS_KEY) if ACCESS_KEY in keys else None
    except Exception as e:  # safetensors raises its own error types for truncated/foreign files
        raise ValueError(
            f"background file {path} is not a valid background statistics file "
            f"(expected safetensors written by save_background_indices): {e}"
        ) from None

    def invalid(why: str) -> ValueError:
        return ValueError(f"background file {path} is not a valid background statistics file: {why}")

    if meta.get("format") != FORMAT_NAME:
        raise invalid(f"metadata format is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    try:
        version = int(meta["format_version"])
        file_slots = int(meta["num_slots"])
        num_batches = int(meta["num_batches"])
    except (KeyError, ValueError) as e:
        raise invalid(f"missing or malformed metadata ({e})") from None
    if version > FORMAT_VERSION:
        raise invalid(f"format_version {version} is newer than this code supports ({FORMAT_VERSION}); update the code")
    if df is None:
        raise invalid(f"no {DF_KEY!r} tensor")
    if file_slots != num_slots:
        raise ValueError(
            f"background file {path} was collected for N={file_slots}, this model has N={num_slots}; "
            f"re-run the background stage"
        )
    try:
        df = _validate_df(df, num_batches, file_slots, source=f"background file {path}")
        if access is not None:
            access = _validate_access(access, df, source=f"background file {path}")
    except ValueError as e:
        raise invalid(str(e)) from None
    return df, num_batches, access, meta
