"""Fault injection for the reliability tests, as a trainer callback (training/callbacks.py).

A test running the trainer in its own process registers `FaultInjection(kind, step, rank)` directly; the
tests that launch `recipes/train.py` under torchrun cannot hand a callback to a subprocess, so they set
SMF_FAULT="kind:step[:rank]" and the entry point turns it into the callback once (`from_env`). The trainer
itself never reads the environment. Without a rank the fault fires on every rank.

Kinds: `crash_in_save` (the process dies mid-checkpoint, after the shards are written and before the
checkpoint is renamed into place), `crash_after_save` (kill -9 right after the checkpoint of that step is
complete), `crash_in_swap` (rank 0 dies while replacing an existing checkpoint of that step, between moving
the old copy aside and renaming the new one into place), `diverge` (this rank perturbs one row of its values
table, which the replica check must catch), `nan_loss` (the loss of that step becomes NaN).
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from training.callbacks import Callback

KINDS = ("crash_in_save", "crash_after_save", "crash_in_swap", "diverge", "nan_loss")
ENV = "SMF_FAULT"


class FaultInjection(Callback):
    def __init__(self, kind: str, step: int, rank: int | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"fault kind {kind!r} is not one of {', '.join(KINDS)}")
        self.kind, self.step, self.rank = kind, int(step), rank
        self.this_rank = 0

    def on_start(self, dist_info) -> None:
        self.this_rank = dist_info.rank

    def _fires(self, kind: str, step: int) -> bool:
        return kind == self.kind and step == self.step and self.rank in (None, self.this_rank)

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if self._fires("nan_loss", step) else loss

    def on_step_end(self, step: int, *, values: torch.Tensor | None, metrics: dict) -> None:
        if self._fires("diverge", step) and values is not None:
            with torch.no_grad():
                values[0] += 1e-3

    def in_save(self, step: int) -> None:
        if self._fires("crash_in_save", step):
            os._exit(9)

    def in_swap(self, step: int) -> None:
        if self._fires("crash_in_swap", step):
            os._exit(9)

    def after_save(self, step: int) -> None:
        if self._fires("crash_after_save", step):
            os._exit(9)


def parse(spec: str) -> FaultInjection:
    """"kind:step[:rank]" -> the callback; a one-line ValueError for anything else."""
    parts = spec.split(":")
    numbers = parts[1:]
    if len(parts) not in (2, 3) or not all(n.isdigit() for n in numbers):
        raise ValueError(f"{ENV}={spec!r} is not kind:step[:rank] (kinds: {', '.join(KINDS)})")
    try:
        return FaultInjection(parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else None)
    except ValueError as err:
        raise ValueError(f"{ENV}={spec!r}: {err}") from None


def from_env(environ: Mapping[str, str] = os.environ) -> list[Callback]:
    """The fault callbacks SMF_FAULT asks for (none when it is unset or empty)."""
    spec = environ.get(ENV, "")
    return [parse(spec)] if spec else []
