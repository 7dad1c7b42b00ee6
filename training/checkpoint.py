"""Run-directory checkpoints: complete or absent.

Layout of `RUN/checkpoints/step_000123/`:
  sharded/              strategy state (FSDP2: torch.distributed.checkpoint of model + optimizer)
  values.safetensors    the replicated memory values table (+ its optimizer state, if any)
  sparse.safetensors    sparse_update state: background statistics, last selection
  trainer.json          step, stage, method, world size, config fingerprint, per-rank data state
A checkpoint is written into `step_000123.tmp/` and renamed by rank 0 after every rank finished, so a
crash mid-save leaves the previous checkpoint as the latest complete one. Nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from training import distributed as D
from training import faults

PREFIX = "step_"


# ---- tensor trees in safetensors (no pickle) ----------------------------------------------------
def _flatten(tree: Any, prefix: str, tensors: dict, meta: dict) -> None:
    if isinstance(tree, torch.Tensor):
        tensors[prefix] = tree.detach().contiguous().cpu()
    elif isinstance(tree, dict):
        if not tree:
            meta[prefix] = {"__empty_dict__": True}
        for key, value in tree.items():
            _flatten(value, f"{prefix}/{key}" if prefix else str(key), tensors, meta)
    else:
        meta[prefix] = tree


def save_tree(path: str | Path, tree: dict) -> None:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    _flatten(tree, "", tensors, meta)
    save_file(tensors, str(path), metadata={"tree": json.dumps(meta)})


def load_tree(path: str | Path) -> dict:
    path = Path(path)
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("tree", "{}"))
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint file {path} is truncated or corrupted ({str(err).splitlines()[0]}); "
                         "delete this checkpoint to resume from an earlier one") from None
    tree: dict = {}
    for key, value in list(tensors.items()) + list(meta.items()):
        node = tree
        parts = key.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = {} if isinstance(value, dict) and value.get("__empty_dict__") else value
    return tree


def _restore_keys(tree: Any) -> Any:
    """Optimizer state dicts use int keys ('state' -> {0: ...}); JSON/safetensors made them strings."""
    if isinstance(tree, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _restore_keys(v) for k, v in tree.items()}
    return tree


# ---- discovery ----------------------------------------------------------------------------------
def list_checkpoints(run_dir: str | Path) -> list[Path]:
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and not p.name.endswith(".tmp") and (p / "trainer.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, or a run dir (its latest checkpoint). One-line error otherwise."""
    path = Path(path)
    if (path / "trainer.json").is_file():
        return path
    if path.is_dir():
        found = list_checkpoints(path)
        if found:
            return found[-1]
    raise ValueError(f"init_from={path}: no complete checkpoint there (expected a run directory with "
                     "checkpoints/step_*/trainer.json or a checkpoint directory); run the previous stage first")


def read_trainer_state(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "trainer.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint file {ckpt / 'trainer.json'} is unreadable ({err}); "
                         "delete this checkpoint to resume from an earlier one") from None


# ---- save / load --------------------------------------------------------------------------------
def save_checkpoint(run_dir: str | Path, step: int, *, strategy, values: torch.Tensor | None,
                    values_optimizer: torch.optim.Optimizer | None, sparse_state: dict | None,
                    trainer_state: dict, rank_state: dict, dist_info, keep_latest: int) -> Path:
    ckpt_dir = Path(run_dir) / "checkpoints"
    final = ckpt_dir / f"{PREFIX}{step:06d}"
    tmp = ckpt_dir / f"{PREFIX}{step:06d}.tmp"
    if dist_info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    D.barrier()
    strategy.save(str(tmp / "sharded"))
    if faults.active("crash_in_save", step, dist_info.rank):
        os._exit(9)
    ranks = D.all_gather_objects(rank_state)
    if dist_info.is_main:
        if values is not None:
            tree: dict[str, Any] = {"values": values.data}
            if values_optimizer is not None:
                tree["optim"] = values_optimizer.state_dict()
            save_tree(tmp / "values.safetensors", tree)
        if sparse_state is not None:
            save_tree(tmp / "sparse.safetensors", sparse_state)
        state = dict(trainer_state, step=step, world_size=dist_info.world_size, ranks=ranks)
        (tmp / "trainer.json").write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep_latest]:
            shutil.rmtree(old, ignore_errors=True)
    D.barrier()
    return final


def load_values(ckpt: Path, values: torch.Tensor, values_optimizer: torch.optim.Optimizer | None) -> None:
    path = ckpt / "values.safetensors"
    if not path.is_file():
        raise ValueError(f"checkpoint {ckpt} has no values.safetensors; it is incomplete — delete it")
    tree = load_tree(path)
    stored = tree["values"]
    if stored.shape != values.shape:
        raise ValueError(f"checkpoint {path} holds a values table of shape {tuple(stored.shape)}, the model "
                         f"has {tuple(values.shape)}; use a checkpoint of the same model config")
    with torch.no_grad():
        values.copy_(stored.to(values.device, values.dtype))
    if values_optimizer is not None and "optim" in tree:
        state = _restore_keys(tree["optim"])
        state.setdefault("state", {})
        values_optimizer.load_state_dict(state)


def load_sparse_state(ckpt: Path) -> dict | None:
    path = ckpt / "sparse.safetensors"
    return load_tree(path) if path.is_file() else None
