"""Hooks into a stage for code outside the trainer: the reliability tests' fault injection
(training/faults.py), or anything a caller wants to observe. `trainer.run(config, callbacks=[...])` calls
each callback's hooks, in list order, at these points of a stage:

  on_start(dist_info)                 once, when the process group is up (before anything is built)
  on_loss(step, loss) -> loss         every rank, step `step` (1-based), before the finiteness check and
                                      backward; the returned loss is the one trained on
  on_step_end(step, values=, metrics=) every rank, after step `step` updated the weights, before the loop
                                      checks replicas, logs, evaluates or saves
  in_save(step)                       every rank, its shards of the checkpoint of `step` written, the
                                      checkpoint not yet complete
  in_swap(step)                       rank 0 only, replacing an existing checkpoint of `step`: the old copy
                                      moved aside, the new one not yet in place
  after_save(step)                    every rank, the checkpoint of `step` complete
"""
from __future__ import annotations

from typing import Any, Iterable

import torch


class Callback:
    """Every hook does nothing here: subclass and override the ones you need."""

    def on_start(self, dist_info) -> None:
        pass

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def on_step_end(self, step: int, *, values: torch.Tensor | None, metrics: dict[str, Any]) -> None:
        pass

    def in_save(self, step: int) -> None:
        pass

    def in_swap(self, step: int) -> None:
        pass

    def after_save(self, step: int) -> None:
        pass


class Callbacks(Callback):
    """A list of callbacks called as one, in order (an empty one does nothing)."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.items = list(callbacks)

    def on_start(self, dist_info) -> None:
        for cb in self.items:
            cb.on_start(dist_info)

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        for cb in self.items:
            loss = cb.on_loss(step, loss)
        return loss

    def on_step_end(self, step: int, *, values: torch.Tensor | None, metrics: dict[str, Any]) -> None:
        for cb in self.items:
            cb.on_step_end(step, values=values, metrics=metrics)

    def in_save(self, step: int) -> None:
        for cb in self.items:
            cb.in_save(step)

    def in_swap(self, step: int) -> None:
        for cb in self.items:
            cb.in_swap(step)

    def after_save(self, step: int) -> None:
        for cb in self.items:
            cb.after_save(step)


def as_callbacks(callbacks: Callbacks | Iterable[Callback] | None) -> Callbacks:
    return callbacks if isinstance(callbacks, Callbacks) else Callbacks(callbacks or ())
