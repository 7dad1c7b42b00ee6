"""The reference implementation's API names, as thin aliases over this package (issue 21, item 7).

Code written against the reference implementation (``src/sparse_finetuning``: ``tfidf_ranker.py``,
``gradient_mask.py``, ``sparse_finetuner.py``) ports by changing its imports to ``sparse_update``. Every
name here delegates to the functions the trainer uses (tfidf.py, hook.py, background.py, finetuner.py);
none holds an algorithm of its own. README.md "The library API" has the migration table.

Where the reference and this package differ, the alias follows this package and says so:
- statistics are a dense int64 tensor of N slots, so ``BackgroundCorpusIndexTracker`` needs ``num_slots``;
- background files are safetensors (``save``/``load``), never pickle, and are not the reference's .pt files;
- ``tracker.num_batches`` is the number of batches counted (the reference's ``current_batch_id``, also
  available); the reference's collection limit is ``max_batches``;
- indices < 0 are padding and never counted or selected;
- ``TFIDFRanker`` and ``SparseMemoryGradientMask`` are one-process tools, as in the reference; distributed
  training selects with ``finetuner.update_trainable_indices`` (counts all-reduced) and syncs the selected
  rows with ``finetuner.attach(optimizer)``.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .background import BackgroundTracker, load_background_statistics, save_background_file
from .hook import mask_rows
from .tfidf import Indices, count_slot_accesses, score_slots, select_top_t

__all__ = ["BackgroundCorpusIndexTracker", "ReferenceFinetunerAPI", "SparseMemoryGradientMask", "TFIDFRanker"]


class BackgroundCorpusIndexTracker(BackgroundTracker):
    """Reference ``BackgroundCorpusIndexTracker(num_batches=1000)``: a :class:`BackgroundTracker` that stops
    collecting by itself after ``num_batches`` batches (later ``add_batch_indices`` calls are ignored, as in
    the reference). ``num_slots`` (N, rows of the values table) is required; ``global_counts`` defaults to
    this process's counts (pass the finetuner's to count global batches under torch.distributed)."""

    def __init__(self, num_batches: int = 1000, *, num_slots: int,
                 global_counts: Callable[[Indices], Tensor] | None = None) -> None:
        if global_counts is None:
            def global_counts(indices: Indices) -> Tensor:
                return count_slot_accesses(indices, int(num_slots))
        super().__init__(num_slots=num_slots, global_counts=global_counts)
        self.max_batches = int(num_batches)
        """The collection limit (the reference's ``tracker.num_batches``)."""

    @property
    def current_batch_id(self) -> int:
        """Reference name of :attr:`num_batches`: batches counted so far."""
        return self.num_batches

    def add_batch_indices(self, indices: Indices) -> Tensor | None:
        """Count one background batch; None (nothing counted) once ``max_batches`` were counted."""
        if self.num_batches >= self.max_batches:
            self.stop_collection()
            return None
        counts = super().add_batch_indices(indices)
        if self.num_batches >= self.max_batches:
            self.stop_collection()
        return counts

    def get_document_frequency(self, index: int) -> int:
        """Background batches in which slot ``index`` was looked up (df)."""
        return int(self.document_frequency[int(index)])

    def save(self, path: str | os.PathLike) -> None:
        """Write the statistics (safetensors; see background.py for the format)."""
        save_background_file(path, document_frequency=self.document_frequency, num_batches=self.num_batches,
                             access_counts=self.access_counts)

    def load(self, path: str | os.PathLike) -> None:
        """Read statistics written by :meth:`save` or ``finetuner.save_background_indices``."""
        df, num_batches, access, _ = load_background_statistics(path, num_slots=self.num_slots)
        self.stop_collection()
        self.set_statistics(df, num_batches, access)


class TFIDFRanker:
    """Reference ``TFIDFRanker(background_tracker, use_idf=True, smoothing=1.0)``: the paper's score
    c(i)/Σc · ln((|B|+1)/(df(i)+1)) of :func:`tfidf.score_slots` over one batch's indices."""

    def __init__(self, background_tracker: BackgroundTracker, use_idf: bool = True, smoothing: float = 1.0) -> None:
        if smoothing != 1.0:
            raise ValueError(f"smoothing={smoothing!r}: only the paper's +1 smoothing (smoothing=1.0) is supported")
        self.background_tracker = background_tracker
        self.use_idf = bool(use_idf)
        self.smoothing = 1.0

    @property
    def num_background_batches(self) -> int:
        """|B|, the background batches behind the IDF."""
        return self.background_tracker.num_batches

    def rank_indices(self, batch_indices: Indices, top_k: int) -> Tensor:
        """The ``top_k`` accessed slots of this batch by score, highest first (equal scores: lower slot first)."""
        tracker = self.background_tracker
        counts = count_slot_accesses(batch_indices, tracker.num_slots)
        idf = tracker.inverse_document_frequency().to(counts.device) if self.use_idf else None
        scores = score_slots(counts, idf)
        selected = select_top_t(scores, counts, top_k)                      # ascending slot order
        order = torch.sort(scores.index_select(0, selected), descending=True, stable=True).indices
        return selected[order]


class SparseMemoryGradientMask:
    """Reference ``SparseMemoryGradientMask(memory_values_param)``: a gradient hook on the values parameter
    that keeps only the rows given to :meth:`set_trainable_indices` (:func:`hook.mask_rows`, sparse or dense
    gradients). Before any indices are set the gradient passes unchanged, as in the reference."""

    def __init__(self, memory_values_param: torch.nn.Parameter) -> None:
        self.memory_values_param = memory_values_param
        self.trainable_indices: Tensor | None = None
        self.hook_handle: RemovableHandle | None = None
        self.device = memory_values_param.device

    def set_trainable_indices(self, indices: Tensor) -> None:
        """The rows that receive gradients from the next backward on (any order, duplicates allowed)."""
        self.trainable_indices = torch.unique(indices.detach().reshape(-1).to(self.device, torch.long))

    def gradient_mask_hook(self, grad: Tensor) -> Tensor:
        """The gradient with every row outside the trainable indices dropped (sparse) or zeroed (dense)."""
        if self.trainable_indices is None:
            return grad
        return mask_rows(grad, self.trainable_indices.to(grad.device), dense_output=False)

    def register_hook(self) -> None:
        """Install the hook on the parameter (replacing one this mask installed before)."""
        self.remove_hook()
        self.hook_handle = self.memory_values_param.register_hook(self.gradient_mask_hook)

    def remove_hook(self) -> None:
        """Uninstall the hook; the parameter's gradients are no longer masked."""
        if self.hook_handle is not None:
            self.hook_handle.remove()
            self.hook_handle = None


class ReferenceFinetunerAPI:
    """The reference finetuner's extra methods; :class:`SparseMemoryFinetuner` inherits them."""

    def get_stats(self) -> dict[str, float]:
        """Reference statistics: num_trainable_indices, total_memory_indices, trainable_pct (once rows are
        selected) and num_background_batches (once background statistics exist)."""
        stats: dict[str, float] = {}
        rows = self.trainable_indices
        if rows is not None:
            stats["num_trainable_indices"] = int(rows.numel())
            stats["total_memory_indices"] = self.num_slots
            stats["trainable_pct"] = 100.0 * rows.numel() / self.num_slots
        if self.background_tracker.num_batches:
            stats["num_background_batches"] = self.background_tracker.num_batches
        return stats

    def collect_background_indices(self, dataloader: Iterable[Any], model: torch.nn.Module,
                                   max_batches: int | None = None) -> None:
        """Count the memory indices of the first ``max_batches`` (default ``args.num_background_batches``)
        batches of ``dataloader`` as background statistics, without gradients. A batch is a token tensor, an
        object with ``.tokens`` (and ``.padding_mask``), or a tuple of model arguments; the model returns an
        output with ``.memory_indices`` or, as the reference's, a tuple ``(output, memory_indices)``.
        Collective when distributed: every rank must supply at least that many batches."""
        limit = self.args.num_background_batches if max_batches is None else int(max_batches)
        tracker = self.background_tracker
        tracker.start_collection()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for i, batch in enumerate(dataloader):
                    if i >= limit:
                        break
                    tracker.add_batch_indices(_memory_indices(model, batch))
        finally:
            tracker.stop_collection()
            model.train(was_training)

    def cleanup(self) -> None:
        """Reference name of :meth:`SparseMemoryFinetuner.remove`: remove every hook."""
        self.remove()


def _memory_indices(model: torch.nn.Module, batch: Any) -> Indices:
    if isinstance(batch, Tensor):
        out = model(batch)
    elif hasattr(batch, "tokens"):
        out = model(batch.tokens, padding_mask=getattr(batch, "padding_mask", None))
    else:
        out = model(*batch)
    if hasattr(out, "memory_indices"):
        return out.memory_indices
    return out[1]
