"""Streaming pretraining text through HF ``datasets`` (``data.streaming: true``): nothing is held in RAM.

:class:`LMStream` loads every document and caches its token ids, which a DCLM-size corpus cannot afford.
:class:`StreamingLMStream` reads the files with ``datasets.load_dataset("json"|"csv"|"parquet",
data_files=..., streaming=True)`` (jsonl may be .gz/.zst compressed), drops empty texts (a row without a text string is an error naming the file), gives rank r
every world_size-th document after the skipped ones (``split_dataset_by_node`` with
``strategy="examples"``: the "auto" strategy hands whole files to ranks when their count divides by
world_size, and then skips ``skip_docs`` documents of every file instead of the first ones), optionally shuffles through a buffer of
``shuffle_buffer`` documents (reseeded each epoch), and packs ``[bos] + text + [eos]`` exactly as
LMStream does: windows of seq_len + 1 ids overlapping by one. With ``shuffle_buffer=0`` it yields the
same batches as ``LMStream(load_texts(paths), shuffle=False)`` (tested).

``state_dict()`` holds the cursor (epoch, document position in this rank's stream, token offset); a
resumed stream re-reads the epoch's documents up to the cursor without tokenising them, and yields
exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.batch import Batch
from data_pipeline.tokenizer import Tokenizer

__all__ = ["StreamingLMStream", "hf_builder", "stream_text_dataset"]

_COMPRESSION = (".gz", ".zst", ".zstd", ".bz2", ".xz")


def hf_builder(path: str | os.PathLike) -> str:
    """The ``datasets`` builder of a file: json (.json/.jsonl, optionally compressed), csv or parquet."""
    name = Path(path).name.lower()
    for ext in _COMPRESSION:
        if name.endswith(ext):
            name = name[: -len(ext)]
    suffix = Path(name).suffix
    builders = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
    if suffix not in builders:
        raise ValueError(f"{path}: cannot stream a {suffix or 'suffix-less'} file; expected .jsonl/.json "
                         f"(optionally {'/'.join(_COMPRESSION)}), .csv or .parquet")
    return builders[suffix]


def stream_text_dataset(paths: Sequence[str | os.PathLike], *, text_field: str = "text", rank: int = 0,
                        world_size: int = 1, skip_docs: int = 0, seed: int = 0, shuffle_buffer: int = 0) -> Any:
    """A streaming ``datasets.IterableDataset`` of ``{text_field: str}`` rows: the files in order, empty
    texts dropped, the first ``skip_docs`` documents skipped, then this rank's share, then shuffled."""
    from datasets import load_dataset
    from datasets.distributed import split_dataset_by_node

    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("no text files to stream")
    builders = {hf_builder(p) for p in paths}
    if len(builders) != 1:
        raise ValueError(f"data.text mixes file types ({', '.join(sorted(builders))}); stream one type at a time")
    ds = load_dataset(builders.pop(), data_files=paths, split="train", streaming=True)
    ds = ds.select_columns([text_field])
    def keep(row) -> bool:
        text = row[text_field]
        if not isinstance(text, str):
            raise ValueError(f"data.text {', '.join(paths)}: a row's {text_field!r} is {type(text).__name__}, not "
                             f"a string; give every row a {text_field!r} string (or drop the row)")
        return bool(text.strip())

    ds = ds.filter(keep)
    if skip_docs:
        ds = ds.skip(skip_docs)
    if world_size > 1:
        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size, strategy="examples")
    if shuffle_buffer:
        ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer)
    return ds


class StreamingLMStream:
    """Packed language-modelling batches like :class:`~data_pipeline.lm_stream.LMStream`, streamed from files."""

    def __init__(self, paths: Sequence[str | os.PathLike], tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle_buffer: int = 0, skip_docs: int = 0,
                 text_field: str = "text") -> None:
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"need seq_len >= 1 and batch_size >= 1, got {seq_len}, {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        self.tokenizer, self.text_field = tokenizer, text_field
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.skip_docs = shuffle_buffer, skip_docs
        self.paths = [str(p) for p in paths]
        self._dataset = stream_text_dataset(self.paths, text_field=text_field, rank=rank, world_size=world_size,
                                            skip_docs=skip_docs, seed=seed, shuffle_buffer=shuffle_buffer)
        self._start(0, 0, 0)

    def _documents(self, epoch: int, pos: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """(epoch, position, ids) of this rank's documents from (epoch, pos) on, epoch after epoch."""
        while True:
            self._dataset.set_epoch(epoch)
            seen = 0
            for seen, row in enumerate(self._dataset, start=1):
                if seen - 1 >= pos:
                    ids = self.tokenizer.encode(row[self.text_field], bos=True, eos=True)
                    yield epoch, seen - 1, np.asarray(ids, dtype=np.int64)
            if seen == 0:
                raise ValueError(f"StreamingLMStream: rank {self.rank} of {self.world_size} has no documents in "
                                 f"{', '.join(self.paths)} (after skipping the first {self.skip_docs})")
            epoch, pos = epoch + 1, 0

    def _start(self, epoch: int, pos: int, offset: int) -> None:
        self._iter = self._documents(epoch, pos)
        self._queue: list[tuple[int, int, np.ndarray]] = [next(self._iter)]   # queue[0] holds the cursor
        self._offset = offset

    def _doc(self, k: int) -> np.ndarray:
        while len(self._queue) <= k:
            self._queue.append(next(self._iter))
        return self._queue[k][2]

    def next_window(self) -> np.ndarray:
        """The next ``seq_len + 1`` ids; the cursor advances by ``seq_len`` (one id of overlap)."""
        pieces, need, k, off = [], self.seq_len + 1, 0, self._offset
        while need > 0:
            ids = self._doc(k)
            take = ids[off: off + need]
            pieces.append(take)
            need, off = need - len(take), off + len(take)
            if off >= len(ids):
                k, off = k + 1, 0
        advance = self.seq_len
        while advance > 0:
            ids = self._doc(0)
            step = min(advance, len(ids) - self._offset)
            advance, self._offset = advance - step, self._offset + step
            if self._offset >= len(ids):
                self._queue.pop(0)
                self._offset = 0
        self._doc(0)
        return np.concatenate(pieces)

    def __iter__(self) -> StreamingLMStream:
        return self

    def __next__(self) -> Batch:
        windows = torch.from_numpy(np.stack([self.next_window() for _ in range(self.batch_size)]))
        return Batch(tokens=windows[:, :-1].contiguous(),
                     padding_mask=torch.ones(self.batch_size, self.seq_len, dtype=torch.bool),
                     labels=windows[:, 1:].contiguous())

    def state_dict(self) -> dict:
        epoch, pos, _ = self._queue[0]
        return {"epoch": epoch, "doc_pos": pos, "offset": self._offset, "streaming": True, "paths": self.paths,
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "shuffle_buffer": self.shuffle_buffer, "skip_docs": self.skip_docs}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("streaming", "paths", "seed", "rank", "world_size", "shuffle_buffer", "skip_docs"):
            if state.get(key) != mine[key]:
                raise ValueError(f"StreamingLMStream state has {key}={state.get(key)!r} but this stream has "
                                 f"{mine[key]!r}; resume with the same data, seed and world size")
        self._start(int(state["epoch"]), int(state["doc_pos"]), int(state["offset"]))
