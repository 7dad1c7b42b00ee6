"""Fault injection for the reliability tests: SMF_FAULT="kind:step[:rank]" (unset in normal runs).

Kinds: `crash_in_save` (the process dies mid-checkpoint, after the shards are written and before the
checkpoint is renamed into place), `crash_after_save` (kill -9 right after the checkpoint of that step is
complete), `crash_in_swap` (rank 0 dies while replacing an existing checkpoint of that step, between moving
the old copy aside and renaming the new one into place), `diverge` (this rank perturbs one row of its values table, which the
replica check must catch), `nan_loss` (the loss of that step becomes NaN).
"""
from __future__ import annotations

import os


def active(kind: str, step: int, rank: int) -> bool:
    spec = os.environ.get("SMF_FAULT", "")
    if not spec:
        return False
    parts = spec.split(":")
    if parts[0] != kind or int(parts[1]) != step:
        return False
    return len(parts) < 3 or int(parts[2]) == rank
