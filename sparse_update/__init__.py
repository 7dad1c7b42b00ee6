"""Sparse memory finetuning (Lin et al., 2025): TF-IDF row selection and masked, row-synced updates.

    from sparse_update import SparseMemoryFinetuner, SparseMemoryFinetuningArgs
    finetuner = SparseMemoryFinetuner(SparseMemoryFinetuningArgs(enabled=True, top_t=500), model.memory_values)

The reference implementation's names (BackgroundCorpusIndexTracker, TFIDFRanker, SparseMemoryGradientMask)
are thin aliases in compat.py.
"""

from .args import SparseMemoryFinetuningArgs
from .compat import BackgroundCorpusIndexTracker, SparseMemoryGradientMask, TFIDFRanker
from .background import BackgroundTracker, load_background_file, load_background_statistics, save_background_file
from .finetuner import SparseMemoryFinetuner
from .tfidf import (
    count_slot_accesses,
    inverse_document_frequency,
    score_slots,
    select_all_accessed,
    select_top_t,
    tfidf_scores,
    top_k_positions,
)

__all__ = [
    "BackgroundCorpusIndexTracker",
    "BackgroundTracker",
    "SparseMemoryFinetuner",
    "SparseMemoryFinetuningArgs",
    "SparseMemoryGradientMask",
    "TFIDFRanker",
    "count_slot_accesses",
    "inverse_document_frequency",
    "load_background_file",
    "load_background_statistics",
    "save_background_file",
    "score_slots",
    "select_all_accessed",
    "select_top_t",
    "tfidf_scores",
    "top_k_positions",
]
