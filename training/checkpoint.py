"""Run-directory checkpoints: complete or absent.

Layout of `RUN/checkpoints/step_000123/`:
  sharded/              strategy state (FSDP2: torch.distributed.checkpoint of model + optimizer)
  values.safetensors    the replicated memory values table (+ its optimizer state, if any)
  sparse.safetensors    sparse_update state: background statistics, last selection
  trainer.json          step, stage, method, world size, config fingerprint, per-rank data state
  run_state.safetensors what the summary reports besides the weights (rows updated so far, diagnostics)
  COMPLETE.json         manifest (every file and its size), written last: a checkpoint without it, or whose
                        files disagree with it, is not complete
A checkpoint is written into `step_000123.tmp/` and renamed by rank 0 after every rank finished, so a
crash mid-save leaves the previous checkpoint as the latest complete one. Replacing a checkpoint of the
same step moves the old one to `step_000123.old/` first (still listed while `step_000123/` is absent),
then renames the new one into place, then deletes the old one: at every instant one complete copy is
found. Nothing is ever unpickled.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from evaluation.summary import write_bytes_atomic
from training import distributed as D
from training.callbacks import Callbacks, as_callbacks

PREFIX = "step_"
MANIFEST = "COMPLETE.json"
OLD = ".old"


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
    write_bytes_atomic(path, save(tensors, metadata={"tree": json.dumps(meta)}))


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
def _step_of(p: Path) -> int | None:
    name = p.name[len(PREFIX):]
    name = name[:-len(OLD)] if name.endswith(OLD) else name
    return int(name) if name.isdigit() else None


def is_complete(ckpt: Path) -> bool:
    """The manifest is written last: its presence says every file was written (verify_checkpoint checks them)."""
    return (ckpt / MANIFEST).is_file() and (ckpt / "trainer.json").is_file()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first; `step_N.old` stands in for `step_N` while a replacement of
    step N is under way (or was interrupted)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    by_step: dict[int, Path] = {}
    for p in ckpt_dir.iterdir():
        step = _step_of(p) if p.name.startswith(PREFIX) and p.is_dir() else None
        if step is None or not is_complete(p):
            continue
        if step not in by_step or by_step[step].name.endswith(OLD):
            by_step[step] = p
    return [by_step[s] for s in sorted(by_step)]


def verify_checkpoint(ckpt: Path, remedy: str = "resume from an earlier checkpoint") -> None:
    """Every file the manifest lists is there with its size; one-line ValueError naming the file and ending
    with `remedy` (what to do) otherwise."""
    try:
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"checkpoint {ckpt} is incomplete: its manifest {ckpt / MANIFEST} is missing or unreadable "
                         f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); it was not finished "
                         "(an interrupted save); " + remedy) from None
    for rel, size in files.items():
        path = ckpt / rel
        if not path.is_file():
            raise ValueError(f"checkpoint file {path} is missing (listed in {ckpt / MANIFEST}); "
                             f"this checkpoint is damaged; {remedy}")
        if path.stat().st_size != size:
            raise ValueError(f"checkpoint file {path} is truncated or corrupted ({path.stat().st_size} bytes, the "
                             f"manifest says {size}); {remedy}")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, or a run dir (its latest checkpoint), verified against its manifest. One-line error otherwise."""
    path = Path(path)
    if (path / "trainer.json").is_file():
        verify_checkpoint(path)
        return path
    if path.is_dir():
        found = list_checkpoints(path)
        if found:
            verify_checkpoint(found[-1])
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
                    trainer_state: dict, rank_state: dict, dist_info, keep_latest: int,
                    run_state: dict | None = None, callbacks: Callbacks | None = None) -> Path:
    callbacks = as_callbacks(callbacks)
    ckpt_dir = Path(run_dir) / "checkpoints"
    final = ckpt_dir / f"{PREFIX}{step:06d}"
    tmp = ckpt_dir / f"{PREFIX}{step:06d}.tmp"
    if dist_info.is_main:
        recover(run_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    D.barrier()
    strategy.save(str(tmp / "sharded"))
    callbacks.in_save(step)
    ranks = D.all_gather_objects(rank_state)
    if dist_info.is_main:
        if values is not None:
            tree: dict[str, Any] = {"values": values.data}
            if values_optimizer is not None:
                tree["optim"] = values_optimizer.state_dict()
            save_tree(tmp / "values.safetensors", tree)
        if sparse_state is not None:
            save_tree(tmp / "sparse.safetensors", sparse_state)
        if run_state is not None:
            save_tree(tmp / "run_state.safetensors", run_state)
        state = dict(trainer_state, step=step, world_size=dist_info.world_size, ranks=ranks)
        (tmp / "trainer.json").write_text(json.dumps(state, indent=1))
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))   # last: complete
        _swap_into_place(tmp, final, callbacks)
        for old in list_checkpoints(run_dir)[:-keep_latest]:
            shutil.rmtree(old, ignore_errors=True)
    D.barrier()
    callbacks.after_save(step)
    return final


def _swap_into_place(tmp: Path, final: Path, callbacks: Callbacks) -> None:
    """tmp -> final. An existing final is moved to final.old first (list_checkpoints still finds it), and
    deleted only once the new copy is in place: a kill at any point leaves a complete checkpoint listed."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(final.name + OLD)
    if old.exists():
        shutil.rmtree(old)
    os.replace(final, old)
    callbacks.in_swap(_step_of(final) or 0)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def recover(run_dir: str | Path) -> None:
    """Finish an interrupted replacement: a complete step_N.old without a complete step_N goes back into place."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return
    for old in ckpt_dir.glob(f"{PREFIX}*{OLD}"):
        final = old.with_name(old.name[:-len(OLD)])
        if is_complete(final):
            shutil.rmtree(old, ignore_errors=True)
        elif is_complete(old):
            if final.exists():
                shutil.rmtree(final)
            os.replace(old, final)


def load_run_state(ckpt: Path) -> dict | None:
    path = ckpt / "run_state.safetensors"
    return load_tree(path) if path.is_file() else None


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


# ---- what a run reports besides the weights (run_state.safetensors) -------------------------------
@dataclasses.dataclass
class Progress:
    """What the loop accumulates; a checkpoint saves it (`progress_state`) and a resume puts it back
    (`restore_progress`)."""
    step: int = 0
    metrics: dict = dataclasses.field(default_factory=dict)
    updated: torch.Tensor | None = None          # every row any step selected (updated_rows.safetensors)
    selections: list | None = None               # (step, fact id, rows) per finetune step (selections.safetensors)
    diagnostics: Any = None                      # training.diagnostics.FactDiagnostics of a fact finetune
    diag_before: dict | None = None


def progress_state(progress: Progress) -> dict:
    """The run_state a checkpoint stores for `progress`."""
    state: dict[str, Any] = {"last_train_loss": progress.metrics.get("train/loss")}
    if progress.updated is not None:
        state["updated"] = progress.updated
    if progress.selections is not None:
        state["selections"] = selections_tree(progress.selections)
    if progress.diagnostics is not None:
        state["diagnostics"] = progress.diagnostics.state_dict(progress.diag_before)
    return state


def restore_progress(progress: Progress, state: dict | None) -> None:
    """Put a resumed run's run_state back into `progress`, which is built for this stage (what it does not
    track is not restored). Without stored diagnostics `diag_before` stays None: the caller measures it."""
    if not state:
        return
    if progress.diagnostics is not None and "diagnostics" in state:
        progress.diag_before = progress.diagnostics.load_state_dict(state["diagnostics"])
    if progress.updated is not None and "updated" in state:
        progress.updated |= state["updated"].to(torch.bool)
    if progress.selections is not None and "selections" in state:
        progress.selections = selections_list(state["selections"])
    if state.get("last_train_loss") is not None:
        progress.metrics["train/loss"] = state["last_train_loss"]


def selections_tree(selections: list[tuple[int, str, torch.Tensor]]) -> dict:
    """Per-step selections as flat tensors: step s's rows are rows[offsets[s]:offsets[s+1]]."""
    sizes = torch.tensor([0] + [r.numel() for _, _, r in selections], dtype=torch.int64)
    return {"rows": torch.cat([r for _, _, r in selections]) if selections else torch.zeros(0, dtype=torch.int32),
            "offsets": sizes.cumsum(0), "steps": torch.tensor([s for s, _, _ in selections], dtype=torch.int64),
            "fact_ids": [f for _, f, _ in selections]}


def selections_list(tree: dict) -> list[tuple[int, str, torch.Tensor]]:
    off = tree["offsets"].tolist()
    return [(int(s), f, tree["rows"][off[i]:off[i + 1]])
            for i, (s, f) in enumerate(zip(tree["steps"].tolist(), tree["fact_ids"]))]


def restore(run_dir: Path, config, dist_info, *, strategy, values, values_optimizer, finetuner, stream, log,
            lora_names: set[str]) -> tuple[int, dict | None, str | None]:
    """Resume this run from its latest checkpoint, or start from `config.init_from`'s weights (and its
    background statistics, for a finetune). Returns (step, run_state of a resumed run or None, what to print).

    A resumed background stage is redone from its first batch: its weights are the init's and it trains
    nothing, so its stream is left fresh and what the abandoned attempt logged is dropped from the stage
    start. Any other stage restores every rank's stream and drops the log lines after the checkpoint."""
    found = list_checkpoints(run_dir)
    if found:
        ckpt = found[-1]
        verify_checkpoint(ckpt)
        state = read_trainer_state(ckpt)
        if state.get("world_size") != dist_info.world_size:
            raise ValueError(f"checkpoint {ckpt} was written by {state.get('world_size')} ranks, this run has "
                             f"{dist_info.world_size}; resume with the same number of processes")
        strategy.load(str(ckpt / "sharded"), model_only=False)
        if values is not None:
            load_values(ckpt, values, values_optimizer)
        sparse_state = load_sparse_state(ckpt)
        if sparse_state is not None and finetuner is not None:
            finetuner.load_state_dict(sparse_state)
        step = int(state["step"])
        if config.stage == "background":
            log.rewind(state.get("metrics_offset"), -1)
        else:
            stream.load_state_dict(state["ranks"][dist_info.rank]["stream"])
            log.rewind(state.get("metrics_offset"), step)
        log.log(step, {}, kind="resume", console=False, extra={"checkpoint": ckpt.name})
        return step, load_run_state(ckpt) or {}, f"resumed from {ckpt} at step {step}"
    if not config.init_from:
        return 0, None, None
    ckpt = resolve_checkpoint(config.init_from)
    strategy.load(str(ckpt / "sharded"), model_only=True, allow_missing=lambda k: k in lora_names)
    if values is not None:
        load_values(ckpt, values, None)
    sparse_state = load_sparse_state(ckpt)
    if sparse_state is not None and finetuner is not None and config.stage == "finetune":
        # a new stage keeps the base's background statistics, not its selection
        df = sparse_state["document_frequency"]
        if df.numel() != values.shape[0]:
            raise ValueError(f"checkpoint {ckpt} holds background statistics for N={df.numel()}, this "
                             f"model has N={values.shape[0]}; re-run the background stage for this model")
        finetuner.background_tracker.set_statistics(df.to(values.device), int(sparse_state["num_batches"]),
                                                    sparse_state.get("access_counts"))
    return 0, None, f"initialised from {ckpt}"
