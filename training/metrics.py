"""Rank-0 metrics: TensorBoard scalars, metrics.jsonl, one console line per logged step."""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch


def rss_gb() -> float:
    """Peak resident memory of this process (GB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


class MetricsLogger:
    """Writes only on rank 0; other ranks get a no-op logger with the same interface."""

    def __init__(self, run_dir: str | Path, *, enabled: bool) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.writer = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            self.jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)

    def log(self, step: int, scalars: dict[str, float], *, kind: str = "train", console: bool = True,
            extra: dict[str, Any] | None = None) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items() if v is not None and math.isfinite(float(v))}
        for key, value in clean.items():
            self.writer.add_scalar(key, value, step)
        self.jsonl.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **(extra or {}), **clean}) + "\n")
        if console:
            shown = " ".join(f"{k.split('/', 1)[-1]}={v:.4g}" for k, v in clean.items()
                             if k in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
                                      "sparse_update/selected", "sparse_update/accessed") or kind == "eval")
            print(f"[{kind}] step {step} {shown}", file=sys.stderr if kind == "train" else sys.stdout, flush=True)

    def offset(self) -> int | None:
        """Bytes of metrics.jsonl written so far (stored with a checkpoint; see rewind)."""
        return self.jsonl.tell() if self.enabled else None

    def rewind(self, offset: int | None, step: int) -> None:
        """Resuming from the checkpoint of `step`: drop what an abandoned attempt logged after that checkpoint
        was written (metrics.jsonl from `offset` on; TensorBoard events after `step`), so a reader gets one
        value per step."""
        if not self.enabled or offset is None:
            return
        self.jsonl.flush()
        if self.jsonl.tell() > offset:
            self.jsonl.truncate(offset)
            self.jsonl.seek(offset)
        from torch.utils.tensorboard import SummaryWriter
        self.writer.close()
        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=step + 1)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.jsonl.close()


def memory_scalars() -> dict[str, Any]:
    out: dict[str, Any] = {"memory/rss_gb": rss_gb()}
    if torch.cuda.is_available():
        out["memory/cuda_allocated_gb"] = torch.cuda.memory_allocated() / 1024 ** 3
        out["memory/cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 1024 ** 3
    return out


def progress_bar(config, dist_info, total: int, initial: int):
    """Rank 0's tqdm bar over a stage's steps (None on other ranks or with logging.progress off)."""
    if not (dist_info.is_main and config.logging.progress):
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=config.stage, dynamic_ncols=True, mininterval=2.0)


def print_main(dist_info, message: str) -> None:
    """One console line from rank 0."""
    if dist_info.is_main:
        print(message, flush=True)
