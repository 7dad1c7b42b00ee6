"""Configuration of sparse memory finetuning (one dataclass, validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

MODES = ("top_t", "all_accessed")
RANKINGS = ("tfidf", "tf", "kl", "seq_tfidf")
COUNT_EXCHANGES = ("auto", "dense", "sparse")
"""tfidf: the paper's c(i)/Σc · idf(i) over the global batch; tf: c(i) alone (the TF-only ablation); kl: each
slot's term of KL(batch access distribution ‖ background access distribution) (arXiv 2604.05248);
seq_tfidf: every sequence of the global batch ranks by its own TF-IDF and contributes its top t/R slots (R
sequences), the union is kept and the rest of the budget filled by the batch TF-IDF (see tfidf.py)."""


@dataclass
class SparseMemoryFinetuningArgs:
    """Which memory-value rows are trainable each step, and how their gradients are handled."""

    enabled: bool = False
    """Mask and sync the values gradient; False makes the finetuner inert (no hooks, no collectives)."""
    top_t: int = 500
    """Number of value rows trainable per step in mode "top_t" (paper: 500 for facts, 10,000 for documents)."""
    use_idf: bool = True
    """Rank against the background statistics; False is the TF-only ablation (the same as ranking="tf")."""
    ranking: str = "tfidf"
    """How mode "top_t" ranks the accessed slots: one of RANKINGS. use_idf=False turns "tfidf" into "tf";
    after construction use_idf is True exactly when the ranking needs background statistics."""
    mode: str = "top_t"
    """"top_t": train the top_t rows by score; "all_accessed": train every row the global batch accessed."""
    count_exchange: str = "auto"
    """How ranks combine their slot counts each step: "dense" all-reduces N int32 counts; "sparse" all-gathers
    each rank's (slot, count) pairs of the slots it read; "auto" takes whichever moves fewer bytes this step
    (decided alike on every rank). The global counts, and so the selection, are identical either way."""
    dense_output: bool = False
    """Hand the optimizer a dense values gradient (needed for AdamW, which rejects sparse gradients)."""
    mask_in_backward: bool = True
    """Mask the gradient during backward (tensor hook); False masks only at optimizer.step (needs attach())."""
    num_background_batches: int = 1000
    """Background batches finetuner.collect_background_indices() reads (the reference implementation's
    option; the paper: 1000). The trainer's background stage uses its config key sparse.background_batches."""

    def __post_init__(self) -> None:
        for name in ("enabled", "use_idf", "dense_output", "mask_in_backward"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(
                    f"sparse_update.{name} must be true or false, got {value!r} ({type(value).__name__})"
                )
        if isinstance(self.top_t, bool) or not isinstance(self.top_t, int):
            raise ValueError(
                f"sparse_update.top_t must be a positive integer, got {self.top_t!r} ({type(self.top_t).__name__})"
            )
        if isinstance(self.num_background_batches, bool) or not isinstance(self.num_background_batches, int) \
                or self.num_background_batches < 1:
            raise ValueError(f"sparse_update.num_background_batches must be an integer >= 1, "
                             f"got {self.num_background_batches!r}")
        if self.top_t <= 0:
            raise ValueError(
                f"sparse_update.top_t must be > 0, got {self.top_t}; the paper uses 500 (facts) or 10000 (documents)"
            )
        if self.ranking not in RANKINGS:
            raise ValueError(
                f"sparse_update.ranking must be one of {', '.join(repr(r) for r in RANKINGS)}, got {self.ranking!r}"
            )
        if not self.use_idf:
            if self.ranking not in ("tfidf", "tf"):
                raise ValueError(f"sparse_update.use_idf=False is the TF-only ranking; it contradicts "
                                 f"ranking={self.ranking!r} (drop use_idf or set ranking='tf')")
            self.ranking = "tf"
        self.use_idf = self.ranking != "tf"
        if self.count_exchange not in COUNT_EXCHANGES:
            raise ValueError(f"sparse_update.count_exchange must be one of {', '.join(map(repr, COUNT_EXCHANGES))}, "
                             f"got {self.count_exchange!r}")
        if self.mode not in MODES:
            raise ValueError(
                f"sparse_update.mode must be one of {', '.join(repr(m) for m in MODES)}, got {self.mode!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (for checkpoints and logging)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SparseMemoryFinetuningArgs":
        """Build from a dict, rejecting unknown keys with the list of valid ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown sparse_update option(s) {unknown}; valid options are {sorted(known)}"
            )
        return cls(**dict(values))
