"""The batch every stream yields, and the one place that decides label alignment and padding.

Alignment (all streams): a row's token ids ``ids = [bos] + text + [eos]`` become
``tokens = ids[:-1]`` and ``labels = ids[1:]``, both of length ``T`` (``seq_len``) after right-padding
or truncation. So the loss is ``F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)``
with ``logits = model(tokens, padding_mask=padding_mask).logits`` — **no further shift in the trainer**.
``padding_mask`` is True at real input tokens; every real position has a real label (the last real
input's label is ``eos``, or the next text token when a row was truncated); labels are ``-100``
exactly where ``padding_mask`` is False. Padded input positions hold ``tokenizer.pad_id``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Batch", "IGNORE_INDEX", "pad_rows", "concat_batches"]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Batch:
    """One training step's rows.

    tokens: LongTensor[B, T] input ids (pad_id where padded).
    padding_mask: BoolTensor[B, T], True = real token.
    labels: LongTensor[B, T], next-token targets aligned with ``tokens`` (-100 at padding).
    fact_id: the fact id (FactStream) or chunk id (DocumentStream) this batch teaches; None for LM batches.
    num_truncated: rows that did not fit in T+1 ids and lost their tail (including eos).
    answer_mask: BoolTensor[B, T] or None; True at label positions whose target is a token of the
        fact's answer (FactStream; ``optim.loss_on=answer`` trains on these labels only).
    """

    tokens: torch.Tensor
    padding_mask: torch.Tensor
    labels: torch.Tensor
    fact_id: str | None = None
    num_truncated: int = 0
    answer_mask: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) input positions, i.e. the number of loss terms."""
        return int(self.padding_mask.sum())


def pad_rows(rows: list[list[int]], *, seq_len: int, pad_id: int, fact_id: str | None = None) -> Batch:
    """Right-pad/truncate id lists (each ``[bos] + text + [eos]``) into a :class:`Batch` of width ``seq_len``."""
    if not rows:
        raise ValueError("pad_rows needs at least one row")
    b = len(rows)
    tokens = torch.full((b, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((b, seq_len), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((b, seq_len), dtype=torch.bool)
    truncated = 0
    for i, ids in enumerate(rows):
        if len(ids) < 2:
            raise ValueError(f"row {i} has {len(ids)} ids; a row needs at least 2 (an input and a target)")
        if len(ids) > seq_len + 1:
            ids = ids[: seq_len + 1]
            truncated += 1
        n = len(ids) - 1
        row = torch.tensor(ids, dtype=torch.long)
        tokens[i, :n] = row[:-1]
        labels[i, :n] = row[1:]
        mask[i, :n] = True
    return Batch(tokens=tokens, padding_mask=mask, labels=labels, fact_id=fact_id, num_truncated=truncated)


def concat_batches(batches: list[Batch]) -> Batch:
    """Stack batches of the same width along the batch dimension (fact_id of the first non-None)."""
    widths = {b.tokens.shape[1] for b in batches}
    if len(widths) != 1:
        raise ValueError(f"cannot concatenate batches of different seq_len {sorted(widths)}")
    return Batch(
        tokens=torch.cat([b.tokens for b in batches]),
        padding_mask=torch.cat([b.padding_mask for b in batches]),
        labels=torch.cat([b.labels for b in batches]),
        fact_id=next((b.fact_id for b in batches if b.fact_id is not None), None),
        num_truncated=sum(b.num_truncated for b in batches),
        answer_mask=(torch.cat([b.answer_mask for b in batches])
                     if all(b.answer_mask is not None for b in batches) else None),
    )
