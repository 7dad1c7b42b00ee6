"""Infinite, deterministic, rank-sharded, resumable streams for pretraining and background batches.

- :class:`LMStream` packs documents (``[bos] + text + [eos]``) back to back into fixed windows of
  ``seq_len + 1`` ids; consecutive windows overlap by one id so every token is a target exactly once
  (``tokens = window[:-1]``, ``labels = window[1:]``, no padding, attention spans document
  boundaries as usual for packed pretraining). Epoch ``e`` visits the documents in the permutation
  ``default_rng([seed, e]).permutation(N)``; rank ``r`` takes every ``world_size``-th document of it
  (``perm[r::world_size]``), so within an epoch ranks see disjoint documents, and the stream runs on
  into the next epoch (reshuffled) without a gap.
- :class:`StatementStream` yields padded rows of single fact statements (all (fact, template) pairs,
  reshuffled each epoch, sharded the same way) — "known" facts for pretraining, or statements of
  unrelated facts for the TF-IDF background (DESIGN §8).
- :class:`MixedStream` concatenates the rows of several streams into one batch per step; the mixing
  ratio is the ratio of their ``batch_size``s (e.g. 16 prose windows + 16 statements).

All three: ``next(stream)`` -> :class:`~data_pipeline.batch.Batch` (``fact_id=None``);
``state_dict()`` / ``load_state_dict()`` capture the exact position (a resumed stream yields exactly
the batches the uninterrupted one would have). Tokenisation is lazy and cached per document.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from data_pipeline.batch import Batch, concat_batches, pad_rows
from data_pipeline.records import QARecord, TextRecord
from data_pipeline.tokenizer import Tokenizer

__all__ = ["LMStream", "StatementStream", "MixedStream", "load_texts"]


def load_texts(paths: str | os.PathLike | Iterable[str | os.PathLike], *, max_docs: int | None = None) -> list[str]:
    """Texts of jsonl ``text`` files (plain, .zst, .zstd, .gz) in file order, at most ``max_docs``."""
    from data_pipeline.sources import load_source

    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    texts: list[str] = []
    for p in paths:
        for rec in load_source("text", p):
            if max_docs is not None and len(texts) >= max_docs:
                return texts
            texts.append(rec.text)
    return texts


def _epoch_order(n: int, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)[rank::world_size]


def _check_shard(n: int, rank: int, world_size: int, what: str) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    if n < world_size:
        raise ValueError(f"{what}: {n} items cannot be sharded over {world_size} ranks (each rank needs at least one)")


class LMStream:
    """Packed language-modelling batches of ``batch_size`` (per rank) windows of ``seq_len`` tokens."""

    def __init__(
        self,
        texts: Sequence[str | TextRecord],
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        # shuffle=False: every epoch reads the documents in file order (rank r: every world_size-th from r),
        # as the streaming path (data_pipeline/hf_stream.py) does without a shuffle buffer
        self.texts = [t.text if isinstance(t, TextRecord) else t for t in texts]
        self.texts = [t for t in self.texts if t.strip()]
        _check_shard(len(self.texts), rank, world_size, "LMStream")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"need seq_len >= 1 and batch_size >= 1, got {seq_len}, {batch_size}")
        self.tokenizer = tokenizer
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self._ids: dict[int, np.ndarray] = {}
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)
        # cursor: the next window starts at token `offset` of document order[doc_pos] in `epoch`
        self.epoch, self.doc_pos, self.offset = 0, 0, 0

    def documents_for_epoch(self, epoch: int) -> list[int]:
        """Indices (into ``texts``) of the documents this rank reads in ``epoch``, in reading order."""
        return self._order_of(epoch).tolist()

    def _order_of(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.texts))[self.rank::self.world_size]
        return _epoch_order(len(self.texts), self.seed, epoch, self.rank, self.world_size)

    def _order_for(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = self._order_of(epoch)
            self._order_epoch = epoch
        return self._order

    def _doc_ids(self, index: int) -> np.ndarray:
        ids = self._ids.get(index)
        if ids is None:
            ids = np.asarray(self.tokenizer.encode(self.texts[index], bos=True, eos=True), dtype=np.int64)
            self._ids[index] = ids
        return ids

    def _read(self, cursor: tuple[int, int, int], n: int) -> tuple[list[np.ndarray], tuple[int, int, int]]:
        """Read ``n`` ids starting at ``cursor``; return the pieces and the cursor after them."""
        epoch, pos, off = cursor
        pieces: list[np.ndarray] = []
        while n > 0:
            order = self._order_for(epoch)
            if pos >= len(order):
                epoch, pos, off = epoch + 1, 0, 0
                continue
            ids = self._doc_ids(int(order[pos]))
            take = ids[off: off + n]
            pieces.append(take)
            n -= len(take)
            off += len(take)
            if off >= len(ids):
                pos, off = pos + 1, 0
        return pieces, (epoch, pos, off)

    def next_window(self) -> np.ndarray:
        """The next ``seq_len + 1`` ids; the cursor advances by ``seq_len`` (one id of overlap)."""
        body, after = self._read((self.epoch, self.doc_pos, self.offset), self.seq_len)
        last, _ = self._read(after, 1)
        self.epoch, self.doc_pos, self.offset = after
        return np.concatenate(body + last)

    def __iter__(self) -> LMStream:
        return self

    def __next__(self) -> Batch:
        windows = torch.from_numpy(np.stack([self.next_window() for _ in range(self.batch_size)]))
        return Batch(tokens=windows[:, :-1].contiguous(), padding_mask=torch.ones(self.batch_size, self.seq_len, dtype=torch.bool),
                     labels=windows[:, 1:].contiguous())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "doc_pos": self.doc_pos, "offset": self.offset, "num_docs": len(self.texts),
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("num_docs", "seed", "rank", "world_size"):
            if state.get(key) != mine[key]:
                raise ValueError(f"LMStream state has {key}={state.get(key)!r} but this stream has {mine[key]!r}; resume with the same data, seed and world size")
        self.epoch, self.doc_pos, self.offset = int(state["epoch"]), int(state["doc_pos"]), int(state["offset"])


class StatementStream:
    """Padded rows of single statements of ``records`` (every (fact, template) pair once per epoch).

    With ``paraphrase_file`` a fact listed there contributes its paraphrases instead of the templates.
    With ``pack`` the statements (``[bos] + statement + [eos]``, in the same per-epoch order) are packed
    back to back into the rows as :class:`LMStream` packs documents: no padding, a statement may continue
    on the next row, attention spans statement boundaries, and a row holds more statements (more tokens
    of facts per step at the same cost).
    """

    def __init__(
        self,
        records: Sequence[QARecord],
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        paraphrase_file: str | os.PathLike | None = None,
        variation_prefixes: bool = False,
        pack: bool = False,
    ) -> None:
        from data_pipeline.facts import VARIATION_PREFIXES, fact_statements, load_paraphrases

        paraphrases = load_paraphrases(paraphrase_file) if paraphrase_file is not None else {}
        # variation_prefixes: every statement also with each of the fact stream's variation prefixes
        # ("Fun fact: ", ...), the generic wrappers its rows carry when P exceeds a fact's paraphrases
        prefixes = VARIATION_PREFIXES if variation_prefixes else ("",)
        pairs = [(r.id, pre + s) for r in records for s in (paraphrases.get(r.id) or fact_statements(r))
                 for pre in prefixes]
        self.statements = [s for _, s in pairs]
        self.fact_ids = [i for i, _ in pairs]
        _check_shard(len(self.statements), rank, world_size, "StatementStream")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"need seq_len >= 1 and batch_size >= 1, got {seq_len}, {batch_size}")
        self.tokenizer = tokenizer
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.pos = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)
        # packed: LMStream over the statements reads them in this stream's order (_epoch_order, same seed)
        self.packed = LMStream(self.statements, tokenizer, seq_len=seq_len, batch_size=batch_size, rank=rank,
                               world_size=world_size, seed=seed) if pack else None

    def next_index(self) -> int:
        if self._order_epoch != self.epoch:
            self._order = _epoch_order(len(self.statements), self.seed, self.epoch, self.rank, self.world_size)
            self._order_epoch = self.epoch
        index = int(self._order[self.pos])
        self.pos += 1
        if self.pos >= len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
        return index

    def __iter__(self) -> StatementStream:
        return self

    def __next__(self) -> Batch:
        if self.packed is not None:
            return next(self.packed)
        texts = [self.statements[self.next_index()] for _ in range(self.batch_size)]
        rows = self.tokenizer.encode_batch(texts, bos=True, eos=True)
        return pad_rows(rows, seq_len=self.seq_len, pad_id=self.tokenizer.pad_id)

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "pos": self.pos, "num_statements": len(self.statements),
                 "seed": self.seed, "rank": self.rank, "world_size": self.world_size}
        if self.packed is not None:
            state["packed"] = self.packed.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("num_statements", "seed", "rank", "world_size"):
            if state.get(key) != mine[key]:
                raise ValueError(f"StatementStream state has {key}={state.get(key)!r} but this stream has {mine[key]!r}")
        if ("packed" in state) != (self.packed is not None):
            raise ValueError(f"StatementStream state was written with{'' if 'packed' in state else 'out'} packed "
                             f"statements, this stream packs {'' if self.packed is not None else 'not '}"
                             "(data.pack_statements must match to resume)")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        if self.packed is not None:
            self.packed.load_state_dict(state["packed"])


class MixedStream:
    """One batch per step made of the next batch of every component stream, stacked along rows."""

    def __init__(self, streams: Sequence[LMStream | StatementStream]) -> None:
        if not streams:
            raise ValueError("MixedStream needs at least one stream")
        widths = {s.seq_len for s in streams}
        if len(widths) != 1:
            raise ValueError(f"all mixed streams need the same seq_len, got {sorted(widths)}")
        self.streams = list(streams)
        self.seq_len = widths.pop()
        self.batch_size = sum(s.batch_size for s in streams)

    def __iter__(self) -> MixedStream:
        return self

    def __next__(self) -> Batch:
        return concat_batches([next(s) for s in self.streams])

    def state_dict(self) -> dict:
        return {"streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        if len(state.get("streams", [])) != len(self.streams):
            raise ValueError(f"MixedStream state has {len(state.get('streams', []))} streams, this one has {len(self.streams)}")
        for s, st in zip(self.streams, state["streams"]):
            s.load_state_dict(st)
