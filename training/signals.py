"""Preemption signals (SIGUSR1, SIGTERM): install the handler as early as possible — before the heavy
imports — so a signal arriving while the trainer starts is not lost. The handler only sets a flag; the
loop acts on it at the next step boundary (see trainer.StopRequest)."""
from __future__ import annotations

import signal

_received: list[int] = []


def _handle(signum, frame) -> None:
    _received.append(signum)


def install() -> None:
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _handle)


def received() -> bool:
    return bool(_received)
