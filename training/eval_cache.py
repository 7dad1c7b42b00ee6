"""The evaluation before finetuning, kept so it is computed once.

Two places hold it: `RUN/eval_before.json`, this run's own (a resumed finetune reads it back), and
`<init_from checkpoint>/eval_cache/before-<hash>.json`, shared by every finetune of the same base with the
same evaluation sets (a sweep evaluates its base once). The hash covers everything the numbers depend on,
so a stale entry cannot be hit.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from data_pipeline.atomic import atomic_write
from evaluation import write_summary
from training import checkpoint as C
from training import distributed as D

RUN_FILE = "eval_before.json"
_EVAL_CODE = [Path(__file__).resolve().parent.parent / d for d in ("evaluation", "training/evaluate_checkpoint.py",
                                                                  "training/data.py", "data_pipeline")]


def cache_path(config, sets, model_config, world_size: int) -> Path | None:
    """<init_from checkpoint>/eval_cache/before-<hash>.json: the hash covers the checkpoint, the model config,
    LoRA or not, the evaluation records, the eval section, the world size and the source of the evaluation
    and data code. None when caching is off or there is nothing to cache."""
    if not (config.eval.cache_before and config.init_from and sets):
        return None
    ckpt = C.resolve_checkpoint(config.init_from)
    h = hashlib.sha256()
    head = {"checkpoint": str(ckpt.resolve()), "trainer": (ckpt / "trainer.json").read_text(),
            "model": repr(model_config), "lora": dataclasses.asdict(config.lora) if config.method == "lora" else None,
            "eval": {k: v for k, v in dataclasses.asdict(config.eval).items() if k != "cache_before"},
            "world_size": world_size, "device": str(config.device), "strategy": config.strategy}
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    for name in sorted(sets):
        h.update(json.dumps([name, sets[name][0], sets[name][1]], sort_keys=True, default=repr).encode())
    for root in _EVAL_CODE:
        for src in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            h.update(src.read_bytes())
    return ckpt / "eval_cache" / f"before-{h.hexdigest()[:24]}.json"


def read_cached(path: Path | None) -> dict | None:
    """The cached numbers, or None. Every rank must see the same file, else all evaluate (collectives)."""
    found = path is not None and path.is_file()
    if D.all_reduce_max(0.0 if found else 1.0) > 0:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable evaluation cache ({e}); delete it (it is recomputed)") from None


def write_cached(path: Path, before: dict) -> None:
    try:
        write_summary(path, before)   # atomic; refuses NaN, so a NaN 'before' is simply not cached
    except (OSError, ValueError) as e:   # e.g. a read-only base checkpoint: no cache, same results
        print(f"note: could not cache the 'before' evaluation in {path.parent} ({e})", flush=True)


def load_run(run_dir: Path) -> dict | None:
    """This run's own 'before' numbers (written by `save_run`), or None."""
    path = run_dir / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def save_run(run_dir: Path, before: dict) -> None:
    atomic_write(run_dir / RUN_FILE, json.dumps(before))
